"""`DistillEmbedTrainer`: UniME stage 1, textual discriminative knowledge distillation from a text teacher.

Also here: the text-only collator it uses (:class:`TextDistillCollator`). The stage-1 row contract it runs before
training lives in `mm_embed_trl.data.distill_rows` (re-exported here); the student/teacher agreement evaluator in
`mm_embed_trl.evaluation.agreement`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data.collators import DEFAULT_MAX_TEXT_TOKENS, EmbeddingCollator, describe_batch_row
from ..data.distill_rows import (
    HOW_TO_COMPUTE,
    IMAGE_COLUMNS,
    check_distill_batch_texts,
    check_distill_rows,
    validate_distill_dataset,
)
from ..data.schema import EmbeddingInput
from ..data.templates import PromptTemplate
from ..distributed import gather_no_grad, gather_with_grad
from ..evaluation.agreement import TeacherAgreementEvaluator, similarity_agreement
from ..losses import distill_kl_loss
from .base import EmbeddingTrainer
from .distill_config import DistillEmbedConfig
from .papers import UNIME_PAPER

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMNS",
    "DistillEmbedTrainer",
    "TeacherAgreementEvaluator",
    "TextDistillCollator",
    "check_distill_rows",
    "validate_distill_dataset",
]


# --------------------------------------------------------------------------------------------------- collator
class TextDistillCollator:
    """Text-only stage-1 batches: one processor call over the prompted texts plus the teacher vectors.

    Returns ``{"text": enc, "teacher_embeddings": (B, D_t) float32 tensor}``; ``enc`` comes from
    :meth:`EmbeddingCollator.encode_inputs` (prompt template, chat template, left padding), so it is exactly what
    inference with the same template produces. Rows are checked as they come: an empty text, an image value,
    a missing/non-finite teacher vector or one whose dimension differs from the others raises a clear error.

    Args:
        processor: the backbone's processor (or tokenizer).
        template: prompt template name or object; UniME's text prompt is ``"unime"``
            (``<sent>\\nSummary above sentence in one word:``).
        text_column: the texts' column.
        teacher_column: the teacher vectors' column.
        max_length: max text tokens kept per text (the prompt is never cut; `None` keeps whole texts).
        teacher_dim: the expected teacher dimension (from :func:`validate_distill_dataset`); `None` takes the
            first batch's and then holds every later batch to it.
    """

    def __init__(
        self,
        processor,
        template: str | PromptTemplate = "unime",
        *,
        text_column: str = "text",
        teacher_column: str = "teacher_embedding",
        max_length: int | None = DEFAULT_MAX_TEXT_TOKENS,
        teacher_dim: int | None = None,
    ):
        self.encoder = EmbeddingCollator(processor, template=template, max_length=max_length, num_negatives=0)
        self.text_column = text_column
        self.teacher_column = teacher_column
        self.teacher_dim = teacher_dim

    def _describe(self, row: Mapping, index: int) -> str:
        text = row.get(self.text_column)
        snippet = f" (text={str(text)[:60]!r})" if isinstance(text, str) and text.strip() else ""
        return describe_batch_row(row, index) + snippet

    def _teacher_matrix(self, rows: Sequence[Mapping]) -> torch.Tensor:
        values = []
        for i, row in enumerate(rows):
            if self.teacher_column not in row:
                raise KeyError(
                    f"{self._describe(row, i)} has no teacher embedding column {self.teacher_column!r} (keys: "
                    f"{sorted(row)}). " + HOW_TO_COMPUTE.format(text=self.text_column)
                )
            vector = row[self.teacher_column]
            if vector is None:
                raise ValueError(
                    f"{self._describe(row, i)} has no teacher embedding. "
                    + HOW_TO_COMPUTE.format(text=self.text_column)
                )
            values.append(vector)
        lengths = [len(v) for v in values]
        expected = self.teacher_dim if self.teacher_dim is not None else lengths[0]
        odd = [i for i, n in enumerate(lengths) if n != expected]
        if odd:
            detail = ", ".join(f"{self._describe(rows[i], i)} has {lengths[i]}" for i in odd[:5])
            raise ValueError(
                f"Teacher embeddings of inconsistent dimension: expected {expected} (the dataset's), but {detail}. "
                "All vectors must come from one teacher; recompute them with mm_embed_trl.teacher.embed_with_teacher."
            )
        matrix = torch.as_tensor(np.asarray(values, dtype=np.float32))
        finite = torch.isfinite(matrix).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(
                f"Non-finite teacher embeddings (NaN/inf) in {', '.join(self._describe(rows[i], i) for i in bad[:5])}; "
                "recompute them (a half-precision teacher can overflow: load it in float32)."
            )
        self.teacher_dim = expected
        return matrix

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, Any]:
        if len(rows) == 0:
            raise ValueError("The collator got an empty batch.")
        texts = check_distill_batch_texts(rows, self.text_column, self._describe)
        inputs = [EmbeddingInput(text=text) for text in texts]
        return {
            "text": self.encoder.encode_inputs(inputs, side="query"),
            "teacher_embeddings": self._teacher_matrix(rows),
        }


# ---------------------------------------------------------------------------------------------------- trainer
class DistillEmbedTrainer(EmbeddingTrainer):
    r"""Textual discriminative knowledge distillation (UniME stage 1).

    The MLLM's language model learns to embed text like a strong text embedding teacher: for a batch of n texts,
    each wrapped in UniME's prompt (``<sent>\nSummary above sentence in one word:``) and embedded at the last
    token, the student's in-batch similarity distribution P_s(i,·) = softmax_j(s_i·s_j/τ) is pulled towards the
    teacher's P_t(i,·) = softmax_j(t_i·t_j/τ) by KL(P_t(i) ‖ P_s(i)) (`kl_direction`, `temperature`,
    `loss_reduction` and `mask_diagonal` are options). Student embeddings are gathered across ranks with their
    local gradient and the teacher's without, so the distributions span the **global** batch; with GradCache
    (`gradient_cache_chunk_size`) that batch can be far larger than memory allows. Only n×n similarity matrices are
    compared, so student and teacher dimensions need not match.

    The teacher is never loaded here: its vectors are a dataset column computed offline, once
    (:func:`mm_embed_trl.teacher.embed_with_teacher`, ``python -m mm_embed_trl.teacher``). Batches are text-only,
    so the vision tower and projector never run; they are also frozen (`freeze_vision_tower=True`), and the saved
    model is the full multimodal model with its vision weights unchanged, ready for stage 2
    (:class:`HardNegContrastiveTrainer`).

    Paper: Gu et al., "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs"
    (UniME), arXiv 2504.17432 (LoRA rank 32, lr 5e-4, batch 768, 2 epochs on ~273k NLI sentences, NV-Embed-v2
    teacher; Phi-3.5-V MMEB 25.3 → 40.3 from this stage alone).

    Example:
    ```python
    from mm_embed_trl import DistillEmbedConfig, DistillEmbedTrainer, MultimodalEmbeddingModel
    from mm_embed_trl.demo.text_corpus import make_text_corpus
    from mm_embed_trl.teacher import embed_with_teacher
    from mm_embed_trl.demo.tiny import get_tiny_backbone

    data = embed_with_teacher(make_text_corpus())  # offline all-MiniLM-L6-v2; or teacher="nvidia/NV-Embed-v2"
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), prompt_template="unime")
    args = DistillEmbedConfig(output_dir="out", per_device_train_batch_size=64, temperature=0.05)
    trainer = DistillEmbedTrainer(model=model, args=args, train_dataset=data["train"])
    trainer.train()
    trainer.save_for_inference()  # out/ (MultimodalEmbeddingModel) + out/sentence_transformers
    ```
    """

    _tag_names = ["mm-embed-trl", "unime", "distillation", "text-distillation"]
    _name = "Distill Embed"
    _paper = UNIME_PAPER
    config_class = DistillEmbedConfig
    method_key = "unime_stage1"
    method_aliases = ("distill", "unime1", "unime_1", "distillembed", "distillembedconfig", "distillembedtrainer")
    method_title = "UniME stage 1: textual discriminative knowledge distillation"
    method_short_title = "UniME stage 1"
    method_description = (
        "The language model of the backbone (vision tower frozen) is trained on text only to match the in-batch "
        "similarity distribution of a strong text-embedding teacher whose embeddings were computed offline: "
        "KL(teacher || student) between the softmax of the n x n cosine-similarity matrices of a batch."
    )
    # Every rank's batches are text-only, so sharded training needs no blank-image forward to stay in step.
    _text_only_batches = True

    def __init__(
        self,
        model,
        args: DistillEmbedConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        **kwargs,
    ):
        if args is None:
            args = DistillEmbedConfig(output_dir="distill-output")
        if not isinstance(args, DistillEmbedConfig):
            raise TypeError(
                f"DistillEmbedTrainer needs a DistillEmbedConfig (it has text_column, teacher_column, temperature, "
                f"...); got {type(args).__name__}."
            )
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self._warned_small_batch = False

    def check_datasets(self, train_dataset, eval_dataset, args):
        """The stage-1 row contract (:func:`check_distill_rows`) on every dataset, before any model work; all teacher
        vectors must share one dimension."""
        dims = {}

        def check(dataset, what):
            dataset, dims[what] = check_distill_rows(
                dataset,
                text_column=args.text_column,
                teacher_column=args.teacher_column,
                what=what,
                on_bad_row=args.on_bad_row,
            )
            return dataset

        train_dataset, eval_dataset = self._check_each(train_dataset, eval_dataset, args, check)
        self._teacher_dim = dims.get("training dataset")
        for what, dim in dims.items():
            if dim is not None and self._teacher_dim is not None and dim != self._teacher_dim:
                raise ValueError(
                    f"The {what}'s teacher embeddings have dimension {dim} but the training dataset's have "
                    f"{self._teacher_dim}: they must come from the same teacher."
                )
        return train_dataset, eval_dataset

    def default_collator(self, model, processing_class, args):
        return TextDistillCollator(
            processing_class,
            template=model.config.prompt_template,
            text_column=args.text_column,
            teacher_column=args.teacher_column,
            max_length=args.max_length,
            teacher_dim=self._teacher_dim,
        )

    def compute_embedding_loss(self, model, inputs):
        args: DistillEmbedConfig = self.args
        (student,) = self.embed(model, inputs["text"])
        teacher = inputs["teacher_embeddings"]
        if args.gather_across_devices:
            student, teacher = gather_with_grad(student), gather_no_grad(teacher)
            student, teacher = self.without_repeated_rows(inputs, student, teacher)
        if student.shape[0] < 2:
            # One text has no in-batch distribution (its softmax is [1] for both): contribute nothing, keep the
            # graph connected so every rank runs the same backward (DDP), and say how to avoid it.
            if not getattr(self, "_warned_small_batch", False):
                logger.warning(
                    "A global batch of 1 text carries no distillation signal (skipped with zero loss); set "
                    "dataloader_drop_last=True or a batch size that divides the dataset."
                )
                self._warned_small_batch = True
            return student.sum() * 0.0, {}
        loss = distill_kl_loss(
            student,
            teacher.to(student.device),
            temperature=args.temperature,
            teacher_temperature=args.teacher_temperature,
            direction=args.kl_direction,
            reduction=args.loss_reduction,
            mask_diagonal=args.mask_diagonal,
        )
        return loss, similarity_agreement(student, teacher)
