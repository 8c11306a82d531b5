"""Where mm-embed-trl caches what it builds or computes: ``$MM_EMBED_TRL_CACHE``, else ``~/.cache/mm_embed_trl``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_root"]

CACHE_ENV = "MM_EMBED_TRL_CACHE"


def cache_root(*parts: str) -> Path:
    """``$MM_EMBED_TRL_CACHE/<parts...>`` (``~`` expanded), default ``~/.cache/mm_embed_trl/<parts...>``; read at
    each call, so a changed environment variable takes effect at once. Nothing is created."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "mm_embed_trl")
    return Path(os.path.expanduser(root)).joinpath(*parts)
