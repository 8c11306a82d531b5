"""Losses and rewards over embeddings (never models): UniME's hard-negative InfoNCE and batch-similarity
distillation; UME-R1's retrieval and format rewards (and a reciprocal-rank alternative)."""

from .distill_kl import DistillKLLoss, distill_kl_loss
from .format_reward import completion_text, ume_r1_format_reward
from .hard_negative_infonce import (
    HardNegativeInfoNCELoss,
    HardNegativeLossOutput,
    duplicate_mask_from_ids,
    hard_negative_infonce_loss,
)
from .reciprocal_rank import reciprocal_rank_reward
from .retrieval_reward import RetrievalPool, RetrievalRewardOutput, retrieval_pool, ume_r1_retrieval_reward

__all__ = [
    "DistillKLLoss",
    "HardNegativeInfoNCELoss",
    "HardNegativeLossOutput",
    "RetrievalPool",
    "RetrievalRewardOutput",
    "completion_text",
    "distill_kl_loss",
    "duplicate_mask_from_ids",
    "hard_negative_infonce_loss",
    "reciprocal_rank_reward",
    "retrieval_pool",
    "ume_r1_format_reward",
    "ume_r1_retrieval_reward",
]
