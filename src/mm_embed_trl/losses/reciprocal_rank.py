"""Deprecated module path: its contents moved to :mod:`mm_embed_trl.rewards.reciprocal_rank`."""

import warnings

from ..rewards.reciprocal_rank import *  # noqa: F403
from ..rewards.reciprocal_rank import __all__  # noqa: F401

warnings.warn(
    f"{__name__} moved to mm_embed_trl.rewards.reciprocal_rank; the old module path will be removed.",
    DeprecationWarning,
    stacklevel=2,
)
