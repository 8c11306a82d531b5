"""Kept for compatibility: the generated text corpus lives in :mod:`mm_embed_trl.demo.text_corpus` (import that)."""

from ..demo.text_corpus import *  # noqa: F403
from ..demo.text_corpus import __all__  # noqa: F401
