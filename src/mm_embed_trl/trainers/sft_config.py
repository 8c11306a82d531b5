"""Configuration of :class:`EmbeddingSFTTrainer` (UME-R1 stage 1, reasoning SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..modeling.generative import UME_R1_MAX_NEW_TOKENS
from .arguments import EmbeddingTrainingArguments


@dataclass
class EmbeddingSFTConfig(EmbeddingTrainingArguments):
    r"""
    Configuration for [`EmbeddingSFTTrainer`]: reasoning SFT that teaches a discriminative (``<disc_emb>``) and a
    generative (``<gen_emb>``, after a written reasoning) embedding (UME-R1 stage 1, Lan et al. 2025,
    arXiv 2511.00405). This class includes only the parameters specific to this stage; for the rest see
    [`EmbeddingTrainingArguments`] and `transformers.TrainingArguments`. Defaults are UME-R1's (public code,
    ``qwenvl/train/trainer.py`` and the README's recipe): per-device batch and steps come from the recipes.

    loss = w_gen · InfoNCE(gen) + w_disc · InfoNCE(disc) + w_q · CE(query reasoning) + w_t · CE(target reasoning)
    [+ w_align · InfoNCE(disc queries, gen targets)], the InfoNCE terms symmetric at logit scale 1/τ over the global
    batch (per_device_train_batch_size x processes, however GradCache chunks it; or groups of it, see
    `contrastive_group_size`), the CE terms the token mean of each side over the global batch. Gradient
    accumulation averages such losses: UME-R1 contrasted 256 pairs per loss (4 per GPU x 64) and accumulated 4.

    > Loss

    Parameters:
        temperature (`float`, defaults to `0.02`): τ of the symmetric InfoNCE (UME-R1: logit scale 50).
        gen_contrastive_weight (`float`, defaults to `1.0`): weight of InfoNCE on the generative embeddings.
        disc_contrastive_weight (`float`, defaults to `1.0`): weight of InfoNCE on the discriminative embeddings.
        query_lm_weight (`float`, defaults to `1.0`): weight of the cross-entropy on the queries' reasoning.
        target_lm_weight (`float`, defaults to `1.0`): weight of the cross-entropy on the targets' reasoning.
        disc_gen_alignment_weight (`float`, defaults to `0.0`): weight of a symmetric InfoNCE between discriminative
            query and generative target embeddings, which puts both kinds in one space: a corpus indexed once with
            the (costly) generative embedding can then be searched with the cheap discriminative query embedding
            (asked of UME-R1 in its issue #1; not in the paper).
        discriminative_only (`bool`, defaults to `False`): train the discriminative embedding alone: no
            reasoning, no generation, only ``disc_contrastive_weight`` (UME-R1's DUME variant, its issue #2); rows
            need no reasoning columns then.
        mask_duplicate_targets (`bool`, defaults to `True`): identical targets (shared labels) are never each
            other's negatives (UME-R1 does not mask them).
        contrastive_group_size (`int`, *optional*): pairs per InfoNCE. `None` (default): each pair is contrasted with
            the whole global batch, UME-R1's setting when that batch is its 256 pairs per forward (the recipes:
            32 per GPU x 8, GA 4). An integer cuts the global batch into groups of that many consecutive pairs (in
            rank order), each contrasted on its own and the losses averaged: the gradient of as many accumulated
            micro-batches, so a 1024-pair GradCache step with groups of 256 trains UME-R1's objective without
            gradient accumulation. Without it such a step puts 1024 pairs in one loss: 4x the negatives at the same τ.

    > Data

    Parameters:
        max_sequence_length (`int`, defaults to `12288`): the longest prompt + reasoning in tokens (UME-R1's
            `model_max_length`); a longer row is an error naming it, never silently cut (cutting would drop
            ``<gen_emb>``).
        train_sampling_strategy (`str`, defaults to `"sequential"`): rows in file order, as UME-R1 trains
            (`--data_group True`: its JSON is grouped, so are its batches, whose in-batch negatives are harder than
            a shuffle's); `"random"` shuffles (transformers' default).
        max_length (`int`, *optional*): text tokens kept from each input's raw text. `None` (default): whole texts,
            as UME-R1, which never cuts an input text on its own (only `max_sequence_length` bounds a row); the other
            trainers cut at 1024.
        prompt_template (`str`, defaults to `"ume_r1_blank_image"`): UME-R1's prompt (the input, ``<disc_emb>``, its
            instruction) and its 28x28 white image before every text-only input, the inputs its released checkpoints
            know; saved with the model, so encode and evaluation build the same. `"ume_r1"` leaves text alone.

    > Model

    Parameters:
        freeze_vision_tower (`bool`, defaults to `True`): freeze the vision encoder, as UME-R1 does
            (`--tune_mm_vision False`).
        train_vision_projector (`bool`, defaults to `True`): keep the projector (Qwen-VL's merger) trainable with
            the language model, as UME-R1 does (`--tune_mm_mlp True`).
        learning_rate (`float`, defaults to `5e-5`): UME-R1's, cosine schedule with 3% warm-up, no weight decay.

    > Evaluation

    Parameters:
        max_new_tokens (`int`, defaults to `8192`): tokens generated per input for generative embeddings at
            evaluation and in the generative export (UME-R1 evaluates with 8192); a reasoning cut short by it is
            counted in a warning.
    """

    temperature: float = field(default=0.02, metadata={"help": "InfoNCE temperature (UME-R1: logit scale 50)."})
    gen_contrastive_weight: float = field(default=1.0, metadata={"help": "Weight of InfoNCE(gen)."})
    disc_contrastive_weight: float = field(default=1.0, metadata={"help": "Weight of InfoNCE(disc)."})
    query_lm_weight: float = field(default=1.0, metadata={"help": "Weight of the CE on the queries' reasoning."})
    target_lm_weight: float = field(default=1.0, metadata={"help": "Weight of the CE on the targets' reasoning."})
    disc_gen_alignment_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of InfoNCE(disc queries, gen targets): one space for both embeddings (0: off)."},
    )
    discriminative_only: bool = field(
        default=False, metadata={"help": "Train <disc_emb> alone (UME-R1's DUME): no reasoning, no CE, no gen."}
    )
    mask_duplicate_targets: bool = field(
        default=True, metadata={"help": "Identical targets are never negatives of each other."}
    )
    contrastive_group_size: int | None = field(
        default=None,
        metadata={"help": "Pairs per InfoNCE: None contrasts the whole global batch (UME-R1's 256-pair forwards); "
                  "an integer contrasts groups of that many consecutive pairs apart, as accumulated micro-batches."},
    )
    max_sequence_length: int | None = field(
        default=12288,
        metadata={"help": "Longest prompt + reasoning in tokens (UME-R1: 12288); longer rows are an error."},
    )
    train_sampling_strategy: str = field(
        default="sequential",
        metadata={"help": "Training order: sequential (file order, UME-R1's task-grouped batches) or random.",
                  "choices": ["random", "sequential", "group_by_length", "batch_rebalance"]},
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Text tokens kept per input text; None (UME-R1) keeps whole texts, max_sequence_length "
                  "bounds the row."},
    )
    prompt_template: str | None = field(
        default="ume_r1_blank_image",
        metadata={"help": "Prompt template: ume_r1_blank_image (UME-R1's prompt, a 28x28 white image before text-only "
                  "inputs) or ume_r1 (text alone)."},
    )
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Freeze the vision encoder (UME-R1 does)."}
    )
    train_vision_projector: bool = field(
        default=True, metadata={"help": "With a frozen vision tower, still train its projector/merger (UME-R1)."}
    )
    max_new_tokens: int = field(
        default=UME_R1_MAX_NEW_TOKENS,
        metadata={"help": "Tokens generated per input for generative embeddings (evaluation, export; UME-R1: 8192)."},
    )
    learning_rate: float = field(default=5e-5, metadata={"help": "UME-R1 SFT: 5e-5."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "UME-R1 SFT: cosine."})
    warmup_ratio: float = field(
        default=0.03, metadata={"help": "UME-R1 SFT: warm-up over the first 0.03 of the steps."}
    )

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        weights = {
            "gen_contrastive_weight": self.gen_contrastive_weight,
            "disc_contrastive_weight": self.disc_contrastive_weight,
            "query_lm_weight": self.query_lm_weight,
            "target_lm_weight": self.target_lm_weight,
            "disc_gen_alignment_weight": self.disc_gen_alignment_weight,
        }
        negative = [k for k, v in weights.items() if v < 0]
        if negative:
            raise ValueError(f"Loss weights must be >= 0: {negative}.")
        if self.discriminative_only:
            self.gen_contrastive_weight = self.query_lm_weight = self.target_lm_weight = 0.0
            self.disc_gen_alignment_weight = 0.0
        if not any(v > 0 for v in (self.gen_contrastive_weight, self.disc_contrastive_weight)):
            raise ValueError("At least one of gen_contrastive_weight and disc_contrastive_weight must be > 0.")
        if self.contrastive_group_size is not None and self.contrastive_group_size < 2:
            raise ValueError(
                f"contrastive_group_size must be >= 2 (a pair needs negatives) or None, got "
                f"{self.contrastive_group_size}."
            )
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be positive or None, got {self.max_sequence_length}.")
        super().__post_init__()

    @property
    def row_contract(self) -> dict:
        """Reasoning batches need UME-R1's reasoning rows (and carry no explicit negatives)."""
        if self.needs_reasoning:
            return {"num_negatives": 0, "reasoning": True, "image_root": self.image_root}
        return super().row_contract

    @property
    def needs_reasoning(self) -> bool:
        """Whether batches carry the reasoning completions (anything but the discriminative-only variant)."""
        return any(
            w > 0
            for w in (self.gen_contrastive_weight, self.query_lm_weight, self.target_lm_weight,
                      self.disc_gen_alignment_weight)
        )
