"""Losses over embeddings (never models): UniME's hard-negative InfoNCE and batch-similarity distillation, UME-R1's
reasoning-SFT objective in named parts. UME-R1's rewards live in :mod:`mm_embed_trl.rewards`."""

from __future__ import annotations

import importlib
import warnings
from typing import Any

from .distill_kl import DistillKLLoss, distill_kl_loss
from .hard_negative_infonce import (
    HardNegativeInfoNCELoss,
    HardNegativeLossOutput,
    duplicate_mask_from_ids,
    hard_negative_infonce_loss,
)
from .ume_r1_sft import UmeR1SFTLoss

__all__ = [
    "DistillKLLoss",
    "HardNegativeInfoNCELoss",
    "HardNegativeLossOutput",
    "UmeR1SFTLoss",
    "distill_kl_loss",
    "duplicate_mask_from_ids",
    "hard_negative_infonce_loss",
]

# Rewards that lived here before mm_embed_trl.rewards (deprecated names, resolved on first use).
_MOVED_TO_REWARDS = (
    "RetrievalPool",
    "RetrievalRewardOutput",
    "completion_text",
    "reciprocal_rank_reward",
    "retrieval_pool",
    "ume_r1_format_reward",
    "ume_r1_retrieval_reward",
)


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_REWARDS:
        warnings.warn(
            f"mm_embed_trl.losses.{name} moved to mm_embed_trl.rewards.{name}; the old name will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module("mm_embed_trl.rewards"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
