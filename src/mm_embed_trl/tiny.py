"""Kept for compatibility: the tiny offline backbones live in :mod:`mm_embed_trl.demo.tiny` (import that)."""

from .demo.tiny import *  # noqa: F403
from .demo.tiny import __all__, main  # noqa: F401  (__all__: the same names as the new module)

if __name__ == "__main__":  # python -m mm_embed_trl.tiny
    main()
