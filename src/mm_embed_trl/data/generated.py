"""Kept for compatibility: the generated "shapes" dataset lives in :mod:`mm_embed_trl.demo.generated` (import
that)."""

from ..demo.generated import *  # noqa: F403
from ..demo.generated import __all__  # noqa: F401
