"""Losses over embeddings (never models): UniME's hard-negative InfoNCE and batch-similarity distillation."""

from .distill_kl import DistillKLLoss, distill_kl_loss
from .hard_negative_infonce import (
    HardNegativeInfoNCELoss,
    HardNegativeLossOutput,
    duplicate_mask_from_ids,
    hard_negative_infonce_loss,
)

__all__ = [
    "DistillKLLoss",
    "HardNegativeInfoNCELoss",
    "HardNegativeLossOutput",
    "distill_kl_loss",
    "duplicate_mask_from_ids",
    "hard_negative_infonce_loss",
]
