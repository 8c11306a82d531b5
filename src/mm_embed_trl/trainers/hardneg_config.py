"""Configuration of :class:`HardNegContrastiveTrainer` (UniME stage 2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import EmbeddingTrainingArguments


@dataclass
class HardNegContrastiveConfig(EmbeddingTrainingArguments):
    r"""
    Configuration for [`HardNegContrastiveTrainer`]: hard-negative enhanced contrastive instruction tuning
    (UniME stage 2, Gu et al. 2025, arXiv 2504.17432). Defaults are the paper's.

    Parameters:
        temperature (`float`, defaults to `0.02`): InfoNCE temperature τ (UniME code; = UME-R1's logit scale 50).
        false_negative_filter (`bool`, defaults to `True`): drop candidates c with cos(q, c) > cos(q, p) + β.
        false_negative_margin (`float`, defaults to `0.1`): the margin β (paper ablation: −0.1 → 55.3, 0.0 → 61.1,
            0.1 → 64.2, 0.2 → 63.7 MMEB overall).
        num_hard_negatives (`int`, defaults to `8`): k most similar surviving candidates kept per query (paper:
            4 → 63.8, 8 → 64.2, 16 → 63.5, 64 → 63.2). `0` keeps every surviving candidate (plain InfoNCE when
            the filter is off too).
        symmetric_loss (`bool`, defaults to `False`): add the target → query InfoNCE term (UME-R1 style).
        dataloader_drop_last (`bool`, defaults to `True`, unlike `TrainingArguments`): drop each epoch's last,
            incomplete global batch (per_device_train_batch_size x processes rows). Contrastive batches are their own
            negatives: a short last batch has fewer of them, and one of 1 row has none. The rows dropped differ from
            epoch to epoch (the data is shuffled); the trainer logs how many. `False` keeps them.
    """

    temperature: float = field(default=0.02, metadata={"help": "InfoNCE temperature (UniME: 0.02)."})
    false_negative_filter: bool = field(
        default=True, metadata={"help": "Drop candidates more similar than the positive + margin (false negatives)."}
    )
    false_negative_margin: float = field(
        default=0.1, metadata={"help": "Margin beta of the false-negative filter (UniME: 0.1)."}
    )
    num_hard_negatives: int = field(
        default=8, metadata={"help": "Hardest surviving candidates kept per query, k (UniME: 8; 0 = all)."}
    )
    symmetric_loss: bool = field(default=False, metadata={"help": "Add the target->query InfoNCE term."})
    dataloader_drop_last: bool = field(
        default=True,
        metadata={
            "help": "Drop each epoch's last incomplete global batch (default True for contrastive training: a short "
            "batch has fewer in-batch negatives, one of 1 row none; the trainer logs how many rows are dropped)."
        },
    )
    # paper-style defaults for the optimiser side
    learning_rate: float = field(default=1e-4, metadata={"help": "UniME: 1e-4 (Phi-3.5-V), 2e-5 (LLaVA)."})

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if self.num_hard_negatives < 0:
            raise ValueError(f"num_hard_negatives must be >= 0, got {self.num_hard_negatives}.")
        super().__post_init__()
