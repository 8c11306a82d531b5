"""Deprecated module path: its contents moved to :mod:`mm_embed_trl.rewards.retrieval`."""

import warnings

from ..rewards.retrieval import *  # noqa: F403
from ..rewards.retrieval import __all__  # noqa: F401

warnings.warn(
    f"{__name__} moved to mm_embed_trl.rewards.retrieval; the old module path will be removed.",
    DeprecationWarning,
    stacklevel=2,
)
