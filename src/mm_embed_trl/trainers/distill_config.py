"""Configuration of :class:`DistillEmbedTrainer` (UniME stage 1)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .arguments import EmbeddingTrainingArguments

KL_DIRECTIONS = ("teacher_student", "student_teacher")
LOSS_REDUCTIONS = ("sum", "mean")


@dataclass
class DistillEmbedConfig(EmbeddingTrainingArguments):
    r"""
    Configuration for [`DistillEmbedTrainer`]: textual discriminative knowledge distillation (UniME stage 1,
    Gu et al. 2025, arXiv 2504.17432). Defaults follow the paper except `mask_diagonal` (see below); LoRA settings
    (rank 32) come from TRL's `ModelConfig` (`--use_peft --lora_r 32`), see `recipes/distill_*.yaml`. Figures
    quoted below are from the built-in demo (tiny random Qwen2-VL student, all-MiniLM-L6-v2 teacher, 3000
    generated sentences, 3 epochs, lr 1e-3, batch 64; 300 held-out sentences).

    For a batch of n texts with student embeddings s_i and (offline) teacher embeddings t_i, both L2-normalised:
    P_s(i,·) = softmax_j(s_i·s_j / τ), P_t(i,·) = softmax_j(t_i·t_j / τ_t), loss = KL(P_t(i) ‖ P_s(i)) over i,
    over the **global** batch (every rank's texts).

    Parameters:
        temperature (`float`, defaults to `0.02`): τ of the student softmax (and of the teacher's unless
            `teacher_temperature` is set). UniME's public code uses τ = 0.02 for its similarity softmaxes and the
            paper gives no separate distillation value, so 0.02 it is; it focuses each text's distribution on its
            closest neighbours. Softer values (0.05-0.1) also transfer how far apart dissimilar texts are
            (figures: docs/FIGURES.md).
        teacher_temperature (`float`, *optional*): τ_t of the teacher softmax; `None` uses `temperature`.
        kl_direction (`str`, defaults to `"teacher_student"`): `"teacher_student"` = KL(P_t ‖ P_s), the usual
            distillation direction (mass-covering: the student must put probability wherever the teacher does);
            `"student_teacher"` = KL(P_s ‖ P_t), the order the paper prints.
        loss_reduction (`str`, defaults to `"mean"`): `"mean"` averages the row KLs (a batch-size independent
            scale, comparable logs); `"sum"` sums them (the paper's Σ_i). Under Adam the two differ only by a
            constant factor on the gradients (and gradient clipping).
        mask_diagonal (`bool`, defaults to `True`): drop each text's similarity with itself from both softmaxes.
            The paper's formula keeps it (set `False` to reproduce it literally), but at τ = 0.02 the self-similarity
            (cosine 1) then takes nearly all of every row's mass for both models (a neighbour at cosine 0.8 gets
            e^-10 of it), the teacher's distribution is ~one-hot, and the loss degenerates into pushing the student's
            texts apart (figures: docs/FIGURES.md).
        text_column (`str`, defaults to `"text"`): the dataset column with the texts.
        teacher_column (`str`, defaults to `"teacher_embedding"`): the column with the precomputed teacher vectors
            (add it with `mm_embed_trl.teacher.embed_with_teacher` or `python -m mm_embed_trl.teacher`).
        freeze_vision_tower (`bool`, defaults to `True`): stage 1 trains the language model only; the vision tower
            and projector stay frozen (and never run: batches are text-only).
        learning_rate (`float`, defaults to `5e-4`): the paper's LoRA learning rate.
        num_train_epochs (`float`, defaults to `2`): the paper trains 2 epochs on ~273k NLI sentences.
    """

    temperature: float = field(
        default=0.02, metadata={"help": "Softmax temperature of the similarity distributions (UniME: 0.02)."}
    )
    teacher_temperature: float | None = field(
        default=None, metadata={"help": "Teacher softmax temperature (default: the same as `temperature`)."}
    )
    kl_direction: str = field(
        default="teacher_student",
        metadata={
            "help": "KL direction: teacher_student = KL(P_teacher || P_student) (distillation default) or "
            "student_teacher (the order the paper prints).",
            "choices": list(KL_DIRECTIONS),
        },
    )
    loss_reduction: str = field(
        default="mean",
        metadata={
            "help": "Reduce the per-text KLs by 'mean' (batch-size independent) or 'sum' (the paper's sum).",
            "choices": list(LOSS_REDUCTIONS),
        },
    )
    mask_diagonal: bool = field(
        default=True,
        metadata={
            "help": "Exclude each text's self-similarity from both distributions (False = the paper's literal "
            "formula, which degenerates at low temperature)."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Dataset column holding the texts."})
    teacher_column: str = field(
        default="teacher_embedding",
        metadata={
            "help": "Dataset column holding the precomputed teacher embeddings (python -m mm_embed_trl.teacher)."
        },
    )
    # Stage 1 trains the language model only.
    freeze_vision_tower: bool = field(
        default=True, metadata={"help": "Freeze the vision encoder and projector (stage 1 is text-only)."}
    )
    # paper-style defaults for the optimiser side
    learning_rate: float = field(default=5e-4, metadata={"help": "UniME stage 1: 5e-4 (LoRA rank 32)."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "UniME stage 1: 2 epochs."})

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
        if self.teacher_temperature is not None and self.teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be positive (or None), got {self.teacher_temperature}.")
        if self.kl_direction not in KL_DIRECTIONS:
            raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {self.kl_direction!r}.")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}.")
        if self.text_column == self.teacher_column:
            raise ValueError(f"text_column and teacher_column are both {self.text_column!r}; they must differ.")
        super().__post_init__()
