"""Deprecated module path: its contents moved to :mod:`mm_embed_trl.rewards.format`."""

import warnings

from ..rewards.format import *  # noqa: F403
from ..rewards.format import __all__  # noqa: F401

warnings.warn(
    f"{__name__} moved to mm_embed_trl.rewards.format; the old module path will be removed.",
    DeprecationWarning,
    stacklevel=2,
)
