"""Row contracts checked before training, so a bad row is found at start-up rather than hours into a run.

A contract is checked over the whole dataset, vectorised over its Arrow table batch by batch (``datasets.map``: a
progress bar, and a cache file keyed by the dataset's fingerprint, so a re-run on the same data is free). Problems
with a column (missing, misspelt, the wrong type) always raise. Problems with single rows follow ``on_bad_row``:

* ``"raise"`` (the default): one error naming the dataset and, per cause, the rows (numbered as in the user's
  dataset: by :data:`~mm_embed_trl.data.schema.ROW_INDEX_COLUMN` where a dataset carries one, so rows an earlier
  check skipped do not shift them; and the lines of the JSON Lines file they came from when known) with the fix;
* ``"skip"``: every bad row is logged with its cause and left out, and the count is logged.

The contrastive (MMEB-train) contract is :func:`check_training_rows`, which also looks for every image and video
file the rows name (:func:`missing_file_problems`; not cached: files come and go); with ``reasoning=True`` it adds
UME-R1's reasoning SFT contract (a target per side in UME-R1's format, without vision tokens), whose last clause,
the length of prompt + target in tokens, needs the collator and runs once the trainer has one
(:func:`check_reasoning_lengths`, still before training). The stage-1 distillation contract (:mod:`.distill_rows`)
is built from the same pieces. A stream (``datasets.IterableDataset``) is checked as it streams in: the same
contract, row by row batch by batch, bad rows raising or skipped (and counted) under the same policy
(:func:`lazily_checked`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np

from .loading import check_training_columns, keep_source, source_file, source_lines
from .schema import (
    NEG_IMAGE,
    NEG_TEXT,
    POS_REASONING,
    QUERY_REASONING,
    QUERY_TEXT,
    ROW_INDEX_COLUMN,
    SIDES,
    SKIPPED_ROWS_COLUMN,
    VIDEO_COLUMNS,
)
from .templates import (
    GEN_EMB_TOKEN,
    IMAGE_PLACEHOLDER_PATTERN,
    UME_R1_FORMAT,
    VIDEO_PLACEHOLDER_PATTERN,
    VISION_TOKEN_PATTERN,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ON_BAD_ROW_CHOICES",
    "BadRows",
    "BadRowsError",
    "check_reasoning_lengths",
    "check_streamed_rows",
    "check_training_rows",
    "enforce_on_bad_row",
    "fact_column",
    "format_rows",
    "invalid_utf8_mask",
    "lazily_checked",
    "missing_file_problems",
    "present_mask",
    "require_column",
    "row_facts",
    "text_causes",
    "rows_left_out",
    "text_values",
    "value_lists",
    "with_row_index",
    "with_undecoded_images",
]

ON_BAD_ROW_CHOICES = ("raise", "skip")
# Part of every cache key: bump when a contract's facts change for the same data.
_CONTRACT_VERSION = 5
_BATCH_ROWS = 10_000
# Fingerprints (+ contract options) of datasets a contrastive check returned in this process: the example checks
# before the model loads, the trainer checks again, and the second check must cost nothing.
_CHECKED: set[str] = set()
# streams check_streamed_rows returned -> their contract options: the example checks, then the trainer; once is enough
_CHECKED_STREAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# fingerprint of a dataset enforce_on_bad_row returned -> how many bad rows it left out (reported after training)
_LEFT_OUT: dict[str, int] = {}
# fingerprint of a dataset whose ROW_INDEX_COLUMN holds the record numbers of the file it was loaded from (a check
# with on_bad_row="skip" left rows of it out, so its positions are no longer the file's records) -> that file
_INDEXED_SOURCES: dict[str, str] = {}


class BadRowsError(ValueError):
    """Rows of a dataset break its contract; the message names the dataset, the rows, the causes and the fix."""


# ----------------------------------------------------------------------------------------------- arrow helpers
def as_array(column):
    """One contiguous ``pyarrow.Array`` from a (chunked) column."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def _is_json(array) -> bool:
    return getattr(array.type, "extension_name", None) == "arrow.json"


def _json_values(array) -> list:
    """The Python values of a ``datasets.Json`` column (what a JSON file with mixed-type fields loads as)."""
    return [None if s is None else json.loads(s) for s in array.storage.to_pylist()]


def present_mask(array) -> np.ndarray:
    """Per row: does this arrow array hold a real value (non-null, non-blank string, non-empty list / struct)?"""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = array.type
    if _is_json(array):
        from .schema import is_missing

        return np.array([not is_missing(v) and v != [] for v in _json_values(array)], dtype=bool)
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
        np.logical_or.at(present_np, parents, present_mask(flat))
        return present_np & valid.to_numpy(zero_copy_only=False)
    elif pa.types.is_struct(t):  # datasets.Image: {"bytes", "path"}
        any_field = np.zeros(len(array), dtype=bool)
        for i in range(t.num_fields):
            any_field |= present_mask(array.field(i))
        return any_field & valid.to_numpy(zero_copy_only=False)
    else:
        present = valid
    return present.fill_null(False).to_numpy(zero_copy_only=False)


def require_column(dataset, column: str, *, what: str, kind: str = "text", option: str = "text_column") -> None:
    """A clear KeyError when the ``kind`` column ``column`` is missing, naming the option that picks it."""
    if column not in dataset.column_names:
        raise KeyError(
            f"The {what} has no {kind} column {column!r} (columns: {dataset.column_names}). Name it with "
            f"{option}=..., or rename it: dataset.rename_column(<old>, {column!r})."
        )


def invalid_utf8_mask(array) -> np.ndarray:
    """Per row of a string array: is its text invalid UTF-8 (what a badly encoded file loads as, unchecked)?

    Arrow validates a whole array at once and names only the first bad value, so rows are looked at one by one only
    in an array that failed (the error path).
    """
    import pyarrow as pa

    bad = np.zeros(len(array), dtype=bool)
    try:
        array.validate(full=True)
        return bad
    except pa.ArrowInvalid:
        pass
    for i in range(len(array)):
        try:
            array.slice(i, 1).validate(full=True)
        except pa.ArrowInvalid:
            bad[i] = True
    return bad


def text_values(array, column: str, *, what: str):
    """``(texts, not_text, bad_utf8)`` of a text column: a string array (null where the value is missing or
    unusable) and per-row masks of values that are not texts (numbers in a mixed JSON field) or invalid UTF-8.

    Raises:
        TypeError: the column holds no texts at all (numbers, lists, ...): a column-level problem.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(array)
    if pa.types.is_null(array.type):
        return pa.nulls(n, pa.string()), np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if _is_json(array):  # a JSON field whose rows mix texts and other values: keep the texts, flag the rest
        values = _json_values(array)
        not_text = np.array([v is not None and not isinstance(v, str) for v in values], dtype=bool)
        texts = pa.array([v if isinstance(v, str) else None for v in values], pa.string())
        return texts, not_text, np.zeros(n, dtype=bool)
    if not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        raise TypeError(
            f"Column {column!r} of the {what} holds {array.type} values, not strings. Convert it, e.g. "
            f"dataset.cast_column({column!r}, datasets.Value('string')), or map the values to the texts they stand "
            "for (label names rather than label ids)."
        )
    bad_utf8 = invalid_utf8_mask(array)
    if bad_utf8.any():
        array = pc.if_else(pa.array(bad_utf8), pa.scalar(None, array.type), array)
    return array, np.zeros(n, dtype=bool), bad_utf8


def value_lists(array):
    """Row i as a list of values, the way :func:`~mm_embed_trl.data.schema.row_negatives` reads a field: a list
    stays a list, a present single value is a list of one, a missing one (None, "") an empty list."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = array.type
    if _is_json(array):
        from .schema import _as_list

        def element(x):  # texts and paths as they are; anything else is at least "present"
            return x if isinstance(x, str) or x is None else json.dumps(x)

        return pa.array([[element(x) for x in _as_list(v)] for v in _json_values(array)], pa.list_(pa.string()))
    if pa.types.is_fixed_size_list(t):
        array, t = array.cast(pa.list_(t.value_type)), pa.list_(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return pc.if_else(pc.is_null(array), pa.scalar([], t), array) if array.null_count else array
    present = present_mask(array)
    offsets = np.concatenate([[0], np.cumsum(present)]).astype(np.int32)
    values = array.filter(pa.array(present)) if len(array) else array
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _list_lengths(lists) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _per_element_to_rows(lists, element_mask: np.ndarray) -> np.ndarray:
    """Per row: does any element of the row's list have ``element_mask`` set?"""
    import pyarrow.compute as pc

    out = np.zeros(len(lists), dtype=bool)
    if len(element_mask):
        np.logical_or.at(out, pc.list_parent_indices(lists).to_numpy(), element_mask)
    return out


# ------------------------------------------------------------------------------------------------- the policy
def format_rows(rows: np.ndarray, limit: int = 10) -> str:
    shown = ", ".join(str(int(i)) for i in rows[:limit])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > limit else "")


@dataclass
class BadRows:
    """Rows (positions in the dataset) that share one problem. ``cause`` is a noun phrase ("an empty 'qry' and no
    image in 'qry_image_path'"), ``fix`` says what to do about it. Messages name the rows as the user's dataset
    numbers them (:func:`_row_numbers`)."""

    cause: str
    rows: np.ndarray
    fix: str = ""


def _row_numbers(dataset, positions: np.ndarray) -> np.ndarray:
    """The row numbers, as the user's dataset counts them, of the rows at ``positions``: their
    :data:`~mm_embed_trl.data.schema.ROW_INDEX_COLUMN` where the dataset has one (after a check with
    ``on_bad_row="skip"`` left rows out, a position is no longer the row's number), else the positions."""
    positions = np.asarray(positions, dtype=np.int64)
    if ROW_INDEX_COLUMN not in (getattr(dataset, "column_names", None) or ()) or not len(positions):
        return positions
    index = dataset.select_columns([ROW_INDEX_COLUMN]).with_format("arrow")[positions.tolist()][ROW_INDEX_COLUMN]
    return as_array(index).to_numpy(zero_copy_only=False).astype(np.int64)


def _keep_indexed_source(derived, ds):
    """:func:`~mm_embed_trl.data.loading.keep_source`, and the file that ``ds``'s row index numbers the records of."""
    keep_source(derived, ds)
    path = _INDEXED_SOURCES.get(getattr(ds, "_fingerprint", None))
    if path is not None:
        _INDEXED_SOURCES[derived._fingerprint] = path
    return derived


def _locations(dataset, positions: np.ndarray, numbers: np.ndarray) -> dict[int, str]:
    """Where rows came from, for messages: ``{row number: "line 2 of train.jsonl"}`` when known (the rows at
    ``positions``, numbered ``numbers`` by :func:`_row_numbers`)."""
    path, records = source_file(dataset), positions  # a dataset with a source file holds its records in order
    if path is None:  # rows of a file that a skip left out: the row index numbers its records
        path, records = _INDEXED_SOURCES.get(getattr(dataset, "_fingerprint", None)), numbers
        if path is None:
            return {}
    lines = source_lines(path, records)
    name = path.rsplit("/", 1)[-1]
    return {int(n): f"line {lines[int(r)]} of {name}" for r, n in zip(records, numbers) if int(r) in lines}


def _rows_with_lines(rows: np.ndarray, where: dict[int, str], limit: int = 10) -> str:
    text = f"rows {format_rows(rows, limit)}"
    shown = [where[int(r)] for r in rows[:limit] if int(r) in where]
    if shown:
        name = shown[0].rsplit(" of ", 1)[-1]
        text += "; lines " + ", ".join(s.split()[1] for s in shown) + f" of {name}"
    return text


def _bad_rows_error(problems: Sequence[BadRows], *, what: str, describe: Callable[[np.ndarray], str], when: str):
    """The ``on_bad_row="raise"`` error: per cause, its rows (``describe(rows)``) and the fix."""
    parts = [
        f"{len(p.rows)} row(s) of the {what} with {p.cause} ({describe(p.rows)})." + (f" {p.fix}" if p.fix else "")
        for p in problems
    ]
    return BadRowsError(
        f"The {what} has rows that training cannot use ({when}):\n"
        + "\n".join(f"  - {part}" for part in parts)
        + "\nFix or drop these rows, or set on_bad_row='skip' (--on_bad_row skip) to leave them out (each is "
        "logged)."
    )


def _log_skipped(problems: Sequence[BadRows], *, what: str, where: Callable[[int], str]) -> None:
    """Under ``on_bad_row="skip"``: one warning per bad row, with its cause (``where(row)``: where it came from), and
    one per cause with its fix."""
    for p in problems:
        for row in p.rows:
            logger.warning("Skipping row %d%s of the %s: %s.", int(row), where(int(row)), what, p.cause)
        if p.fix:
            logger.warning("Rows of the %s with %s: %s", what, p.cause, p.fix)


def enforce_on_bad_row(dataset, problems: Sequence[BadRows], *, what: str, on_bad_row: str):
    """Apply the ``on_bad_row`` policy to the rows ``problems`` name: raise a :class:`BadRowsError` that lists them
    per cause, or log each with its cause and return the dataset without them."""
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}.")
    problems = [p for p in problems if len(p.rows)]
    if not problems:
        return dataset
    positions = np.unique(np.concatenate([p.rows for p in problems]))
    numbers = _row_numbers(dataset, positions)
    where = _locations(dataset, positions, numbers)
    # the messages name the rows as the user's dataset numbers them; `problems` keeps the positions to leave out
    number_of = dict(zip(positions.tolist(), numbers.tolist()))
    named = [BadRows(p.cause, np.array([number_of[int(r)] for r in p.rows], dtype=np.int64), p.fix) for p in problems]
    if on_bad_row == "raise":
        raise _bad_rows_error(
            named, what=what, describe=lambda rows: _rows_with_lines(rows, where),
            when="found before training, nothing was trained",
        )
    _log_skipped(named, what=what, where=lambda row: f" ({where[row]})" if row in where else "")
    bad = np.zeros(len(dataset), dtype=bool)
    for p in problems:
        bad[p.rows] = True
    keep = np.flatnonzero(~bad)
    if len(keep) == 0:
        raise BadRowsError(
            f"Every row of the {what} ({len(dataset)}) is bad (causes: {'; '.join(p.cause for p in problems)}); "
            "there is nothing left to train on."
        )
    logger.warning(
        "Skipped %d bad row(s) of %d in the %s (on_bad_row='skip'); %d remain.", int(bad.sum()), len(dataset), what,
        len(keep),
    )
    kept = dataset.select(keep)
    _LEFT_OUT[kept._fingerprint] = rows_left_out(dataset) + len(dataset) - len(keep)  # with earlier checks' rows
    path = _INDEXED_SOURCES.get(getattr(dataset, "_fingerprint", None))
    if path is None and source_file(dataset) is not None and ROW_INDEX_COLUMN in dataset.column_names:
        index = as_array(dataset.with_format("arrow")[ROW_INDEX_COLUMN]).to_numpy(zero_copy_only=False)
        if np.array_equal(index, np.arange(len(dataset))):  # the file's records, numbered as a later check names them
            path = source_file(dataset)
    if path is not None and ROW_INDEX_COLUMN in dataset.column_names:
        _INDEXED_SOURCES[kept._fingerprint] = path
    return kept


def rows_left_out(dataset) -> int:
    """How many bad rows a check with ``on_bad_row="skip"`` left out to give ``dataset`` (0 if none / unknown)."""
    return _LEFT_OUT.get(getattr(dataset, "_fingerprint", None), 0)


def row_facts(dataset, compute: Callable, *, contract: str, options: dict, what: str):
    """``compute(batch: pyarrow.Table) -> {name: numpy array}`` over every row, as one ``pyarrow.Table``.

    Runs batch by batch through ``datasets.map`` (a progress bar) under a fingerprint made of the dataset's, the
    contract's name and ``options`` (everything the facts depend on) and :data:`_CONTRACT_VERSION`: a dataset with
    cache files (loaded from a file, the Hub or disk) is checked once, later runs read the cached facts.
    """
    import pyarrow as pa

    key = hashlib.blake2b(
        json.dumps(
            {"v": _CONTRACT_VERSION, "data": dataset._fingerprint, "contract": contract, **options}, sort_keys=True
        ).encode(),
        digest_size=16,
    ).hexdigest()

    def batch_facts(batch):
        return pa.table(compute(batch))

    facts = dataset.with_format("arrow").map(
        batch_facts,
        batched=True,
        batch_size=_BATCH_ROWS,
        remove_columns=dataset.column_names,
        new_fingerprint=key,
        desc=f"Checking the rows of the {what}",
    )
    return facts.with_format("arrow")[:]


def fact_column(facts, name: str) -> np.ndarray:
    """One column of :func:`row_facts`'s table as a numpy array."""
    return as_array(facts[name]).to_numpy(zero_copy_only=False)


def with_row_index(dataset):
    """The dataset with a :data:`~mm_embed_trl.data.schema.ROW_INDEX_COLUMN` of row positions (kept when it already
    has one), so the collators name the dataset row of a bad value, not its position in a shuffled batch."""
    if ROW_INDEX_COLUMN in dataset.column_names:
        return dataset
    return keep_source(dataset.add_column(ROW_INDEX_COLUMN, np.arange(len(dataset), dtype=np.int64)), dataset)


def _checked_key(dataset, options: dict) -> str:
    return f"{getattr(dataset, '_fingerprint', None)}:{json.dumps(options, sort_keys=True)}"


# ------------------------------------------------------------------------------------ the contrastive contract
_PLACEHOLDER_REGEX = IMAGE_PLACEHOLDER_PATTERN.pattern
# what the templates strip from prompt texts: image and video placeholders (a video's place is its content item)
_VISUAL_PLACEHOLDER_REGEX = _PLACEHOLDER_REGEX + "|" + VIDEO_PLACEHOLDER_PATTERN.pattern
_VIDEO_PLACEHOLDERS = "a video placeholder (<video>, <|video_pad|>, <|video_1|>)"
_VISION_REGEX = VISION_TOKEN_PATTERN.pattern
# UME-R1's format check in Arrow's regex engine (RE2): the same pattern, DOTALL as an inline flag
_FORMAT_REGEX = "(?s)" + UME_R1_FORMAT.pattern
# the two sides every row embeds (negatives are checked on their own)
_ROW_SIDES = ("query", "positive")
# side -> its reasoning target (UME-R1 SFT)
REASONING_COLUMNS = {"query": QUERY_REASONING, "positive": POS_REASONING}


def text_causes(column: str) -> list[tuple[str, str]]:
    """(cause, fix) of the two problems :func:`text_values` finds in a text column, in its mask order."""
    return [
        (f"a {column!r} that is not a text (a number or a list)", f"Store {column!r} values as strings."),
        (f"a {column!r} that is not valid UTF-8", "Re-encode the data file as UTF-8 (e.g. iconv -f latin1 -t utf-8)."),
    ]


def _check_image_column(array, column: str, *, what: str, kind: str = "image") -> None:
    """Image values per row: a path, a ``datasets.Image`` struct, encoded bytes, nothing, or a list of those (several
    images; a video's frames)."""
    import pyarrow as pa

    t = array.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    if _is_json(array) or pa.types.is_null(t) or pa.types.is_struct(t):
        return
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return
    raise TypeError(
        f"Column {column!r} of the {what} holds {array.type} values; it needs an {kind} per row: a path (relative to "
        "image_root), a datasets.Image value, encoded bytes, a list of those, or '' for none."
    )


def _per_row(array, per_value: Callable) -> np.ndarray:
    """``per_value`` (a per-value mask function) of an image column, with a list column's values folded to rows."""
    import pyarrow as pa

    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        return _per_element_to_rows(array, per_value(array.flatten()))
    return per_value(array)


_UNREADABLE_FIX = (
    "Its bytes are not an image file PIL can open (corrupt, or not an image at all): replace them, or drop these rows."
)


def _unreadable_images(array) -> np.ndarray:
    """Per value of an image column stored as bytes (``datasets.Image`` structs, binary): encoded bytes whose header
    no decoder reads? The bytes are in the table, so this costs no I/O; only headers are read, and a truncated image
    is reported by the loader when its batch comes."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from PIL import Image

    t = array.type
    if pa.types.is_struct(t) and t.get_field_index("bytes") >= 0:
        data = pc.struct_field(array, "bytes")
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        data = array
    else:
        return np.zeros(len(array), dtype=bool)
    bad = np.zeros(len(array), dtype=bool)
    for i in range(len(data)):
        value = data[i]
        if not value.is_valid or not len(value.as_buffer()):
            continue
        try:
            with Image.open(pa.BufferReader(value.as_buffer())):  # zero-copy: image bytes can be large
                pass
        except Image.DecompressionBombError:
            pass  # readable, only large: the loader explains PIL's pixel limit when the image is used
        except Exception:
            bad[i] = True
    return bad


def with_undecoded_images(dataset):
    """The dataset with its ``datasets.Image`` columns (and lists of them) set to ``decode=False``, so rows give the
    collators the encoded image, which :func:`~mm_embed_trl.data.images.load_image` decodes, upright, naming the
    row and column of a bad one; datasets' own decoder fails when the batch is fetched, naming neither."""
    import datasets

    features = getattr(dataset, "features", None) or {}
    for name, feature in features.items():
        undecoded = _undecoded(feature)
        if undecoded is not None:
            cast = dataset.cast_column(name, undecoded)
            dataset = _keep_indexed_source(cast, dataset) if isinstance(dataset, datasets.Dataset) else cast
    return dataset


def _undecoded(feature):
    """``feature`` with each decoding ``datasets.Image`` in it set to ``decode=False``; None when it has none."""
    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False) if feature.decode else None
    if isinstance(feature, (datasets.List, datasets.LargeList)):
        inner = _undecoded(feature.feature)
        if inner is None:
            return None
        return datasets.LargeList(inner) if isinstance(feature, datasets.LargeList) else datasets.List(
            inner, length=feature.length
        )
    return None


def _contrastive_causes(reasoning: bool = False) -> list[tuple[str, str]]:
    """The (cause, fix) of each problem bit of :func:`_contrastive_facts`, in bit order."""
    causes = []
    for side in _ROW_SIDES:
        text_col, image_col = SIDES[side]
        causes += text_causes(text_col) + [
            (
                f"an empty {text_col!r} and no image in {image_col!r}",
                "There is nothing to embed: fill in the text or the image, or drop these rows.",
            ),
            (
                f"only an image placeholder in {text_col!r} but no image in {image_col!r}",
                f"Fill in {image_col!r} with the row's image path (relative to image_root), or drop these rows.",
            ),
            (f"an image path in {image_col!r} that is not valid UTF-8", "Re-encode the data file as UTF-8."),
            (
                f"{_VIDEO_PLACEHOLDERS} in {text_col!r} but no video in {VIDEO_COLUMNS[side]!r}",
                f"Put the row's video (a video file, a frame folder or a list of frames) in {VIDEO_COLUMNS[side]!r}, "
                "or remove the placeholder, or drop these rows.",
            ),
            (f"an image in {image_col!r} that is not a readable image", _UNREADABLE_FIX),
        ]
    causes += [
        (
            f"{NEG_TEXT!r} and {NEG_IMAGE!r} lists of different lengths",
            "Give one image value ('' for none) per negative text.",
        ),
        (f"a negative in {NEG_TEXT!r} that is not valid UTF-8", "Re-encode the data file as UTF-8."),
        (
            f"a negative in {NEG_TEXT!r} that is not a text",
            f"Give each row a list of texts in {NEG_TEXT!r}, one string per negative (not a list or a number).",
        ),
        (
            f"a negative in {NEG_IMAGE!r} that is not an image value",
            f"Give each row a list of image paths in {NEG_IMAGE!r}, one per negative ('' for none).",
        ),
        (
            f"{_VIDEO_PLACEHOLDERS} in {NEG_TEXT!r}",
            "Explicit negatives carry no video: remove the placeholder, or drop these rows.",
        ),
        (f"an image in {NEG_IMAGE!r} that is not a readable image", _UNREADABLE_FIX),
    ]
    if reasoning:
        for column in REASONING_COLUMNS.values():
            causes += text_causes(column) + [
                (
                    f"no reasoning target in {column!r}",
                    "Reasoning SFT trains on one target per side, '<think>...</think><answer>...</answer>"
                    f"{GEN_EMB_TOKEN}': fill it in, drop these rows, or train without reasoning "
                    "(discriminative_only=True).",
                ),
                (
                    f"an image or video token (<|image_pad|>, <|video_pad|>, <image>, <video>) in {column!r}",
                    "A reasoning target is text the model writes; the token asks for image features no image gives "
                    "(the model stops with 'Image features and image tokens do not match'). Remove it.",
                ),
                (
                    f"a reasoning target in {column!r} without {GEN_EMB_TOKEN}",
                    f"The generative embedding is read at the {GEN_EMB_TOKEN} that ends the target: add it "
                    "(mm_embed_trl.data.reasoning.format_reasoning builds targets).",
                ),
                (
                    f"a reasoning target in {column!r} outside UME-R1's format <think>...</think><answer>..."
                    f"</answer>{GEN_EMB_TOKEN}",
                    "Rewrite it in that format (format_reasoning builds it); UME-R1's format reward checks the same "
                    "pattern.",
                ),
            ]
    return causes


def _contrastive_facts(batch, *, what: str, with_negatives: bool, reasoning: bool = False) -> dict[str, np.ndarray]:
    """Per row: a bit mask of problems (see :func:`_contrastive_causes`), whether each side's text holds an image
    placeholder and whether it has an image, and the number of explicit negatives."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    problems = np.zeros(n, dtype=np.int64)
    bit = 0
    facts: dict[str, np.ndarray] = {}

    def flag(mask):
        nonlocal bit
        problems[mask] |= np.int64(1) << bit
        bit += 1

    for side in _ROW_SIDES:
        text_col, image_col = SIDES[side]
        texts, not_text, bad_utf8 = text_values(as_array(batch[text_col]), text_col, what=what)
        placeholder = pc.match_substring_regex(texts, _PLACEHOLDER_REGEX).fill_null(False)
        placeholder = placeholder.to_numpy(zero_copy_only=False)
        without_placeholders = pc.replace_substring_regex(texts, _VISUAL_PLACEHOLDER_REGEX, "")
        stripped = pc.utf8_trim_whitespace(without_placeholders)
        empty = pc.equal(pc.utf8_length(stripped), 0).fill_null(True).to_numpy(zero_copy_only=False)
        image_bad_utf8 = unreadable = np.zeros(n, dtype=bool)
        if image_col in batch.column_names:
            images = as_array(batch[image_col])
            _check_image_column(images, image_col, what=what)
            image_bad_utf8 = _per_row(images, _invalid_utf8_paths)
            has_image = present_mask(images) & ~image_bad_utf8
            unreadable = _per_row(images, _unreadable_images)
        else:
            has_image = np.zeros(n, dtype=bool)
        has_video = np.zeros(n, dtype=bool)
        video_col = VIDEO_COLUMNS[side]
        if video_col in batch.column_names:  # read when its batch comes: files and folders are not opened here
            videos = as_array(batch[video_col])
            _check_image_column(videos, video_col, what=what, kind="video (a file, a frame folder or frames)")
            has_video = present_mask(videos)
        usable = ~not_text & ~bad_utf8
        flag(not_text)
        flag(bad_utf8)
        flag(usable & empty & ~placeholder & ~has_image & ~has_video)
        flag(usable & empty & placeholder & ~has_image & ~has_video)
        flag(image_bad_utf8)
        flag(usable & _matches(texts, VIDEO_PLACEHOLDER_PATTERN.pattern) & ~has_video)
        flag(unreadable)
        facts[f"{side}_placeholder"] = placeholder
        facts[f"{side}_image"] = has_image

    counts = np.zeros(n, dtype=np.int32)
    mismatch = np.zeros(n, dtype=bool)
    negative_bad_utf8 = np.zeros(n, dtype=bool)
    not_values = {NEG_TEXT: np.zeros(n, dtype=bool), NEG_IMAGE: np.zeros(n, dtype=bool)}
    negative_video = negative_unreadable = np.zeros(n, dtype=bool)
    if with_negatives and (NEG_TEXT in batch.column_names or NEG_IMAGE in batch.column_names):
        counts, mismatch, negative_bad_utf8 = _negative_counts(batch)
        for column in not_values:
            if column in batch.column_names:
                not_values[column] = _negatives_of_other_types(as_array(batch[column]), column, what=what)
        if NEG_TEXT in batch.column_names:
            lists = value_lists(as_array(batch[NEG_TEXT]))
            flat = lists.flatten()
            if pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type):
                negative_video = _per_element_to_rows(lists, _matches(flat, VIDEO_PLACEHOLDER_PATTERN.pattern))
        if NEG_IMAGE in batch.column_names and not not_values[NEG_IMAGE].any():
            lists = value_lists(as_array(batch[NEG_IMAGE]))
            negative_unreadable = _per_element_to_rows(lists, _unreadable_images(lists.flatten()))
    flag(mismatch)
    flag(negative_bad_utf8)
    flag(not_values[NEG_TEXT])
    flag(not_values[NEG_IMAGE])
    flag(negative_video & ~negative_bad_utf8)
    flag(negative_unreadable)
    if reasoning:
        for column in REASONING_COLUMNS.values():
            texts, not_text, bad_utf8 = text_values(as_array(batch[column]), column, what=what)
            target = _reasoning_facts(texts)
            there = ~not_text & ~bad_utf8 & ~target["missing"]
            flag(not_text)
            flag(bad_utf8)
            flag(~not_text & ~bad_utf8 & target["missing"])
            flag(there & target["vision_token"])
            flag(there & ~target["has_gen_emb"])
            flag(there & target["has_gen_emb"] & ~target["follows_format"])
    facts["problems"] = problems
    facts["num_negatives"] = counts
    return facts


# ------------------------------------------------------------------------------------------- the files rows name
# Columns whose values name files, and what each value must be: an image file, or a video (a video file or a frame
# folder; a list of frames is a list of files, judged by the same rule).
_FILE_COLUMNS = {
    SIDES["query"][1]: "image",
    SIDES["positive"][1]: "image",
    NEG_IMAGE: "image",
    VIDEO_COLUMNS["query"]: "video",
    VIDEO_COLUMNS["positive"]: "video",
}
# Paths one thread looks up in a row: a shared file system's latency (NFS, Lustre) hides behind 32 threads.
_LOOKUP_CHUNK = 512
# Paths whose answer a whole-dataset check remembers (targets and negatives repeat across rows); forgotten past this.
_REMEMBERED_PATHS = 1_000_000


def _struct_paths(values, *, bytes_win: bool):
    """The ``path`` of each struct of ``values`` (``datasets.Image`` / ``Video`` values); with ``bytes_win``, null
    where the struct holds bytes (the image loader reads those, not the file)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = values.type
    paths = pc.struct_field(values, "path")
    data_index = t.get_field_index("bytes")
    if bytes_win and data_index >= 0 and (
        pa.types.is_binary(t.field(data_index).type) or pa.types.is_large_binary(t.field(data_index).type)
    ):
        holds = pc.greater(pc.binary_length(pc.struct_field(values, "bytes")), 0).fill_null(False)
        paths = pc.if_else(holds, pa.scalar(None, paths.type), paths)
    return paths


def _json_named_paths(array, kind: str):
    """:func:`_named_paths` of a ``datasets.Json`` column (a JSON field whose rows mix strings, lists and dicts)."""
    import pyarrow as pa

    from .schema import _as_list

    def path_of(value, frame: bool):
        if isinstance(value, str):
            return value
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            holds = isinstance(value.get("bytes"), (str, bytes)) and len(value["bytes"]) > 0
            return None if holds and (kind == "image" or frame) else value["path"]
        return None  # a number, a list in a list: another cause reports it, or the loader names it

    rows, frames = [], []
    for value in _json_values(array):
        listed = isinstance(value, (list, tuple))
        elements = _as_list(value) if not isinstance(value, dict) else [value]
        rows.append([path_of(v, listed and kind == "video") for v in elements])
        frames += [listed and kind == "video"] * len(elements)
    lists = pa.array(rows, pa.list_(pa.string()))
    return lists, lists.flatten(), np.array(frames, dtype=bool)


def _named_paths(array, kind: str):
    """``(lists, paths, frames)``: an image or video column's values per row (:func:`value_lists`); per value, the
    path of the file it names (a path string, or a ``datasets.Image`` struct's path when it holds no bytes; a video
    struct's path always: the video loader reads the file) or null for a value that names none (bytes, a blank,
    invalid UTF-8: other causes report those); and per value whether it is a frame of a video given as a list of
    frames (an image file, not a video or a folder). ``paths`` is None when the column holds no paths at all."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if _is_json(array):
        lists, paths, frames = _json_named_paths(array, kind)
    else:
        t = array.type
        listed = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
        lists = value_lists(array)
        flat = lists.flatten()
        frames = np.full(len(flat), listed and kind == "video")
        if pa.types.is_struct(flat.type) and flat.type.get_field_index("path") >= 0:
            paths = _struct_paths(flat, bytes_win=kind == "image" or listed)
        else:
            paths = flat
    if not (pa.types.is_string(paths.type) or pa.types.is_large_string(paths.type)):
        return lists, None, frames
    unusable = invalid_utf8_mask(paths)
    if unusable.any():
        paths = pc.if_else(pa.array(unusable), pa.scalar(None, paths.type), paths)
    unusable |= ~present_mask(paths)
    if unusable.any():
        paths = pc.if_else(pa.array(unusable), pa.scalar(None, paths.type), paths)
    return lists, paths, frames


_THERE, _GONE, _NO_FRAME, _UNREADABLE = "there", "not there", "no frame", "unreadable"  # a path's look-up


class _FileLookup:
    """What each path names, as the loaders look for it (:func:`~mm_embed_trl.data.images.find_file` for an image,
    :func:`~mm_embed_trl.data.videos.find_video` for a video: a frame folder, which must hold a frame it can read, or
    a file). Each path is looked up once, many at a time on threads (a file system's answer is I/O, not Python work).
    """

    def __init__(self, image_root):
        from .images import find_file
        from .videos import find_video, holds_frames

        def image(text: str) -> str:
            return _THERE if find_file(text, image_root) is not None else _GONE

        def video(text: str) -> str:
            found = find_video(text, image_root)
            if found is None:
                return _GONE
            try:
                return _THERE if not os.path.isdir(found) or holds_frames(found) else _NO_FRAME
            except OSError:  # the loader cannot list it either
                return _UNREADABLE

        self.image_root = image_root
        self.status_of = {"image": image, "video": video}
        self.known: dict[str, dict[str, str]] = {"image": {}, "video": {}}  # kind -> path -> status

    def problems(self, paths: list[str], kind: str) -> dict[str, list[str]]:
        """The paths among ``paths`` that the loader would stop on, by status (:data:`_GONE`, ...)."""
        from concurrent.futures import ThreadPoolExecutor

        known = self.known[kind]
        if len(known) > _REMEMBERED_PATHS:
            known.clear()
        new = [p for p in paths if p not in known]
        status_of = self.status_of[kind]
        chunks = [new[i:i + _LOOKUP_CHUNK] for i in range(0, len(new), _LOOKUP_CHUNK)]
        if len(chunks) > 1:
            with ThreadPoolExecutor(max_workers=min(32, len(chunks))) as pool:
                found = list(pool.map(lambda chunk: [status_of(p) for p in chunk], chunks))
        else:
            found = [[status_of(p) for p in chunk] for chunk in chunks]
        for chunk, answers in zip(chunks, found):
            known.update(zip(chunk, answers))
        by_status: dict[str, list[str]] = {}
        for path in paths:
            if known[path] != _THERE:
                by_status.setdefault(known[path], []).append(path)
        return by_status

    def cause_and_fix(self, status: str, column: str, kind: str, example: str, frame: bool) -> tuple[str, str]:
        """A bad row's cause in ``column`` (of ``kind``), and the fix, for ``status``; the first path with it:
        ``example``, a frame of a frame list when ``frame``."""
        from .images import missing_file_fix, path_candidates
        from .videos import EMPTY_FRAME_FOLDER_FIX, UNREADABLE_FRAME_FOLDER_FIX, find_video

        if status == _GONE:
            tried = ", ".join(repr(c) for c in path_candidates(example, self.image_root))
            thing = "video file or frame folder" if kind == "video" and not frame else "file"
            return (
                f"{'a video' if kind == 'video' else 'an image file'} in {column!r} that is not there",
                f"The first: {example!r} (looked for as {tried}). {missing_file_fix(example, self.image_root, thing)}",
            )
        cause, fix = {
            _NO_FRAME: ("holds no frame image", EMPTY_FRAME_FOLDER_FIX),
            _UNREADABLE: ("cannot be read", UNREADABLE_FRAME_FOLDER_FIX),
        }[status]
        return (
            f"a frame folder in {column!r} that {cause}",
            f"The first: {example!r} ('{find_video(example, self.image_root)}'). {fix}",
        )


def _negatives_in_use(batch, lists, k: int) -> np.ndarray:
    """Per element of ``lists`` (the rows' ``neg_image_path`` values): is it one of the first ``k`` negatives the
    collator takes (:func:`~mm_embed_trl.data.schema.row_negatives`: a single text applies to every image, a single
    image to every text, and pairs with neither a text nor an image do not count)? Every element of a row whose
    texts and images differ in number otherwise (a bad row: another cause) counts."""
    import pyarrow.compute as pc

    flat = lists.flatten()
    lengths = _list_lengths(lists)
    parents = pc.list_parent_indices(lists).to_numpy()
    starts = np.concatenate([[0], np.cumsum(lengths)])
    position = np.arange(len(flat)) - starts[parents]
    image_lengths = lengths[parents]
    if NEG_TEXT in batch.column_names:
        texts = value_lists(as_array(batch[NEG_TEXT]))
        text_lengths = _list_lengths(texts)[parents]
        text_starts = np.concatenate([[0], np.cumsum(_list_lengths(texts))])[parents]
        text_present = np.concatenate([present_mask(texts.flatten()), [False]])  # a last slot: "no text"
    else:
        text_lengths = np.zeros(len(flat), dtype=np.int64)
        text_starts = np.zeros(len(flat), dtype=np.int64)
        text_present = np.zeros(1, dtype=bool)
    no_text = len(text_present) - 1
    beside = np.select(  # the text paired with each image, by row_negatives' rules
        [text_lengths == image_lengths, text_lengths == 1], [text_starts + position, text_starts], default=no_text
    )
    nonempty = present_mask(flat) | text_present[beside]
    counted = np.cumsum(nonempty) - nonempty  # non-empty pairs before each element, over the whole batch
    rank = counted - np.concatenate([[0], np.cumsum(nonempty)])[starts[:-1]][parents]
    shared_image = (image_lengths == 1) & (text_lengths > 1)  # one image for every text: the first pair's
    mismatched = (text_lengths != image_lengths) & (text_lengths > 1) & (image_lengths > 1)
    return mismatched | np.where(shared_image, k > 0, rank < k)


def _file_problems(batch, lookup: _FileLookup, negatives: int | None = None) -> tuple[list[BadRows], np.ndarray]:
    """Rows (positions in ``batch``, a ``pyarrow.Table``) naming an image or video that is not there, or a URL,
    per column: the loader would stop the run when their batch came; and how many distinct paths were looked for and
    how many of them are not there (see :func:`_refuse_a_wrong_root`). ``negatives``: how many explicit negatives a
    row's batch takes (None: all; 0: none, their images are not looked for)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    problems, counts = [], np.zeros(2, dtype=np.int64)
    for column, kind in _FILE_COLUMNS.items():
        if column not in batch.column_names or (column == NEG_IMAGE and negatives == 0):
            continue
        lists, paths, frames = _named_paths(as_array(batch[column]), kind)
        if paths is None or paths.null_count == len(paths):
            continue
        if column == NEG_IMAGE and negatives is not None:
            unused = ~_negatives_in_use(batch, lists, negatives)
            if unused.any():
                paths = pc.if_else(pa.array(unused), pa.scalar(None, paths.type), paths)
        url = _matches(paths, "^https?://")
        if url.any():
            problems.append(BadRows(
                f"a URL in {column!r}",
                np.flatnonzero(_per_element_to_rows(lists, url)),
                f"mm-embed-trl does not download {kind}s: download them and name the local files (relative to "
                "--image_root) in the rows.",
            ))
            paths = pc.if_else(pa.array(url), pa.scalar(None, paths.type), paths)
        stopped: dict[str, np.ndarray] = {}  # status -> per element: does the loader stop on it for that?
        for rule, elements in ((kind, ~frames), ("image", frames)):  # a frame of a list is an image file
            if not elements.any():
                continue
            these = pc.if_else(pa.array(elements), paths, pa.scalar(None, paths.type))
            unique = pc.unique(these.drop_null()).to_pylist()
            by_status = lookup.problems(unique, rule)
            counts += (len(unique), len(by_status.get(_GONE, ())))
            for status, found in by_status.items():
                mask = stopped.setdefault(status, np.zeros(len(paths), dtype=bool))
                mask |= pc.is_in(these, value_set=pa.array(found, paths.type)).fill_null(False).to_numpy(
                    zero_copy_only=False
                )
        for status, mask in stopped.items():
            first = int(np.flatnonzero(mask)[0])
            cause, fix = lookup.cause_and_fix(status, column, kind, paths[first].as_py(), bool(frames[first]))
            problems.append(BadRows(cause, np.flatnonzero(_per_element_to_rows(lists, mask)), fix))
    return problems, counts


def _refuse_a_wrong_root(problems: Sequence[BadRows], counts: np.ndarray, *, what: str, rows: str,
                         on_bad_row: str) -> None:
    """Under ``on_bad_row="skip"``, raise when none of the files the rows name is there (and they name several):
    the paths or ``image_root`` point elsewhere, the rows are not bad; skipping them all would train on the rows
    without files and call it done. (Under "raise" the rows are named with the rest, with the same fix.)"""
    looked, missed = (int(c) for c in counts)
    if on_bad_row != "skip" or missed < 2 or missed < looked:
        return
    fix = next((p.fix for p in problems if p.cause.endswith("that is not there")), "")
    raise BadRowsError(
        f"None of the {missed} files that {rows} of the {what} name is there: the paths, or image_root (or the "
        f"working directory, without one), point elsewhere; skipping every row that names a file would leave only "
        f"the rest. Nothing was left out. {fix}"
    )


def missing_file_problems(
    dataset, image_root=None, *, what: str = "training dataset", negatives: int | None = None,
    on_bad_row: str = "raise",
) -> list[BadRows]:
    """:func:`_file_problems` of a whole ``datasets.Dataset`` (rows: positions in it), batch by batch, reading only
    its image and video columns (and the negatives' texts, which say which negatives count). Not cached with the row
    facts: files come and go between runs."""
    import datasets
    from tqdm.auto import tqdm

    columns = [c for c in _FILE_COLUMNS if c in dataset.column_names and not (c == NEG_IMAGE and negatives == 0)]
    if not columns or len(dataset) == 0:
        return []
    columns += [NEG_TEXT] if NEG_IMAGE in columns and NEG_TEXT in dataset.column_names else []
    view = dataset.select_columns(columns).with_format("arrow")
    lookup = _FileLookup(image_root)
    found: dict[str, tuple[BadRows, list[np.ndarray]]] = {}  # cause -> (its first BadRows, rows per batch)
    starts = range(0, len(dataset), _BATCH_ROWS)
    progress = tqdm(
        starts, desc=f"Looking for the files the {what} names", unit="batch",
        disable=len(starts) < 2 or not datasets.utils.logging.is_progress_bar_enabled(),
    )
    counts = np.zeros(2, dtype=np.int64)  # paths looked for, paths not there (distinct within each batch)
    for start in progress:
        problems, batch_counts = _file_problems(view[start:start + _BATCH_ROWS], lookup, negatives)
        counts += batch_counts
        for problem in problems:
            first, rows = found.setdefault(problem.cause, (problem, []))
            rows.append(problem.rows + start)
    problems = [BadRows(first.cause, np.concatenate(rows), first.fix) for first, rows in found.values()]
    _refuse_a_wrong_root(problems, counts, what=what, rows="the rows", on_bad_row=on_bad_row)
    return problems


def _invalid_utf8_paths(array) -> np.ndarray:
    import pyarrow as pa

    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        return invalid_utf8_mask(array)
    return np.zeros(len(array), dtype=bool)


def _matches(texts, regex: str) -> np.ndarray:
    """Per string: does ``regex`` (RE2) match somewhere in it (False for nulls)?"""
    import pyarrow.compute as pc

    return pc.match_substring_regex(texts, regex).fill_null(False).to_numpy(zero_copy_only=False)


def _reasoning_facts(targets) -> dict[str, np.ndarray]:
    """Per reasoning target (strings, None where missing): is it missing, does it hold a vision token, a
    ``<gen_emb>``, UME-R1's format (:data:`~mm_embed_trl.data.templates.UME_R1_FORMAT`, as UME-R1's reward searches
    for it)?"""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(targets, pa.Array):
        targets = pa.array(targets, pa.string())
    return {
        "missing": ~present_mask(targets),
        "vision_token": _matches(targets, _VISION_REGEX),
        "has_gen_emb": pc.match_substring(targets, GEN_EMB_TOKEN).fill_null(False).to_numpy(zero_copy_only=False),
        "follows_format": _matches(targets, _FORMAT_REGEX),
    }


def _negative_counts(batch):
    """Per row, vectorised: (number of explicit negatives, whether the neg_* lists disagree in length, whether a
    negative text is invalid UTF-8), following :func:`~mm_embed_trl.data.schema.row_negatives`: a field of one value
    applies to every negative, pairs with neither a text nor an image do not count."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n = batch.num_rows
    fields = []  # per column: (list lengths, lists or None, per-element presence)
    bad_utf8 = np.zeros(n, dtype=bool)
    for column in (NEG_TEXT, NEG_IMAGE):
        if column not in batch.column_names:
            fields.append((np.zeros(n, dtype=np.int64), None, None))
            continue
        lists = value_lists(as_array(batch[column]))
        flat = lists.flatten()
        if column == NEG_TEXT and (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
            bad_utf8 |= _per_element_to_rows(lists, invalid_utf8_mask(flat))
        fields.append((_list_lengths(lists), lists, present_mask(flat) if len(flat) else np.zeros(0, dtype=bool)))
    total = np.maximum(fields[0][0], fields[1][0])
    mismatch = np.zeros(n, dtype=bool)
    for length, _, _ in fields:
        mismatch |= (length > 1) & (length != total)
    # pair j of row r lives at starts[r] + j; a pair counts when its text or its image is present
    starts = np.concatenate([[0], np.cumsum(total)])
    pair_present = np.zeros(int(starts[-1]), dtype=bool)
    broadcast = np.zeros(n, dtype=bool)  # one present value applied to every negative of the row
    for length, lists, present in fields:
        if lists is None or not len(present):
            continue
        parents = pc.list_parent_indices(lists).to_numpy()
        offsets = lists.offsets.to_numpy()
        within = np.arange(len(present)) + offsets[0] - offsets[parents]
        broadcast |= (length == 1) & (total > 1) & _per_element_to_rows(lists, present)
        aligned = (length == total)[parents] & ~mismatch[parents] & present
        pair_present[starts[parents[aligned]] + within[aligned]] = True
    cumulative = np.concatenate([[0], np.cumsum(pair_present)])
    counts = cumulative[starts[1:]] - cumulative[starts[:-1]]
    counts = np.where(broadcast, total, counts)
    return np.where(mismatch, 0, counts).astype(np.int32), mismatch, bad_utf8


def _negatives_of_other_types(array, column: str, *, what: str) -> np.ndarray:
    """Per row: does a negative in ``column`` hold something other than a text (``neg_text``) or an image value
    (``neg_image_path``): a list in the list, a number? A typed column of such values is a column problem."""
    import pyarrow as pa

    texts = column == NEG_TEXT
    allowed = (str,) if texts else (str, dict, bytes)

    def other(values) -> list[bool]:
        return [x is not None and not isinstance(x, allowed) for x in values]

    if _is_json(array):  # a JSON field whose rows differ: judge each element
        from .schema import _as_list

        return np.array([any(other(_as_list(v))) for v in _json_values(array)], dtype=bool)
    t = array.type
    element = t.value_type if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) else t
    if getattr(element, "extension_name", None) == "arrow.json":  # lists whose elements differ in type
        flat = array.flatten()
        return _per_element_to_rows(array, np.array(other(_json_values(flat)), dtype=bool))
    usable = pa.types.is_null(element) or pa.types.is_string(element) or pa.types.is_large_string(element)
    if not texts:
        usable = usable or pa.types.is_binary(element) or pa.types.is_large_binary(element)
        usable = usable or pa.types.is_struct(element)  # datasets.Image values
    if not usable:
        raise TypeError(
            f"Column {column!r} of the {what} holds {t} values, not "
            + ("texts: give each row one text per negative, as a list of strings (or one string)." if texts else
               "image values: give each row one image path per negative, as a list ('' for none).")
        )
    return np.zeros(len(array), dtype=bool)


def _placeholder_problems(facts, columns: Sequence[str], *, what: str, absent_only: bool = False) -> None:
    """A side whose texts ask for images (``<|image_1|>``) while its image column is absent or empty in every row:
    the images were lost (a misspelt or dropped column), and training would embed the bare instruction. A stream
    (``absent_only``) is judged a batch at a time, where "empty in every row" says nothing about the column."""
    for side in _ROW_SIDES:
        text_col, image_col = SIDES[side]
        asks, has = fact_column(facts, f"{side}_placeholder"), fact_column(facts, f"{side}_image")
        if absent_only and image_col in columns:
            continue
        if asks.any() and not has.any():
            state = "absent" if image_col not in columns else "empty in every row"
            raise ValueError(
                f"{int(asks.sum())} row(s) of the {what} have an image placeholder (e.g. <|image_1|>) in {text_col!r}, "
                f"but column {image_col!r} is {state}, so every such query would embed the bare instruction. Put each "
                f"row's image (a path relative to image_root, or a datasets.Image) in {image_col!r}: rename the "
                f"column that holds them (columns: {list(columns)}) with dataset.rename_column(<old>, {image_col!r})."
            )


def _negative_count_problems(
    counts: np.ndarray, num_negatives: int | None, common: int | None = None, carried_by: str = "most rows"
) -> list[BadRows]:
    """Rows whose explicit negatives are fewer than ``num_negatives``, or (None) other than the ``common`` count
    (default: the count most rows carry; a stream's is the one its first rows carry)."""
    if num_negatives is not None:
        few = np.flatnonzero(counts < num_negatives)
        return [
            BadRows(
                f"fewer than num_negatives={num_negatives} explicit negatives",
                few,
                "Give these rows more negatives, or lower num_negatives (0 ignores explicit negatives).",
            )
        ]
    if common is None:
        values, seen = np.unique(counts, return_counts=True)
        if len(values) <= 1:
            return []
        common = int(values[np.argmax(seen)])
    return [
        BadRows(
            f"a number of explicit negatives other than the {common} {carried_by} carry",
            np.flatnonzero(counts != common),
            "Every batch needs the same number per row: pad or trim neg_text/neg_image_path, or set num_negatives "
            "to a count every row has (0 ignores explicit negatives).",
        )
    ]


def _missing_files_of_every_rank(
    dataset, image_root, *, what: str, negatives: int | None, on_bad_row: str
) -> list[BadRows]:
    """:func:`missing_file_problems`, looked up by the main process and read from it by the other ranks
    (:func:`~mm_embed_trl.distributed.shared_answer.main_process_answer`): every rank leaves the same rows out, and
    a shared file system answers once, not once per rank."""
    from ..distributed.shared_answer import main_process_answer

    # Not the fingerprint: a dataset whose fingerprint is random (an unhashable map) has another on every rank. The
    # n-th ask of this key is one question on every rank; the answer carries its dataset's length as a check.
    key = hashlib.blake2b(json.dumps([image_root, negatives, on_bad_row, what]).encode(), digest_size=16).hexdigest()

    def encode(problems):
        return json.dumps({"rows": len(dataset), "problems": [[p.cause, p.rows.tolist(), p.fix] for p in problems]})

    def decode(data):
        answer = json.loads(data)
        if answer["rows"] != len(dataset):
            return None
        return [BadRows(c, np.asarray(r, dtype=np.int64), f) for c, r, f in answer["problems"]]

    return main_process_answer(
        f"missing_files/{key}",
        lambda: missing_file_problems(dataset, image_root, what=what, negatives=negatives, on_bad_row=on_bad_row),
        encode=lambda problems: encode(problems).encode(),
        decode=decode,
    )


def check_training_rows(
    dataset,
    *,
    what: str = "training dataset",
    num_negatives: int | None = None,
    on_bad_row: str = "raise",
    reasoning: bool = False,
    image_root: str | os.PathLike | None = None,
):
    """Check an MMEB-train-schema dataset before training; return it ready for the collator.

    Column problems raise: missing or misspelt MMEB columns (:func:`~mm_embed_trl.data.loading.check_training_columns`),
    a text column without texts, image placeholders in a side's texts while its image column is absent or empty in
    every row, an empty dataset. Row problems (a text that is not a string or not valid UTF-8, a side with neither a
    text, an image nor a video, negatives that do not pair up or differ in number) follow
    ``on_bad_row`` (see :func:`enforce_on_bad_row`). With ``reasoning`` (UME-R1's reasoning SFT, whose batches carry
    no explicit negatives) both reasoning columns must exist, and a row must have a target per side that is a text in
    UME-R1's format ending with ``<gen_emb>``, without image or video tokens. Every image and video file a row names
    must be there, looked for as the loaders look (``image_root``, then the working directory; a URL is refused): a
    missing one found only when its batch came would stop the run there. The returned dataset carries a row
    index column for the collator's error messages. An ``IterableDataset`` is checked as it streams
    (:func:`check_streamed_rows`); plain lists are returned unchanged (the collator checks each batch).
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return check_streamed_rows(
            dataset, what=what, num_negatives=num_negatives, on_bad_row=on_bad_row, reasoning=reasoning,
            image_root=image_root,
        )
    if not isinstance(dataset, datasets.Dataset):
        return dataset
    with_negatives = num_negatives != 0 and not reasoning
    image_root = None if image_root is None else os.fspath(image_root)
    options = {
        "with_negatives": with_negatives, "reasoning": reasoning, "num_negatives": num_negatives,
        "image_root": image_root,
    }
    if _checked_key(dataset, options) in _CHECKED:
        return dataset
    check_training_columns(dataset, name=f"the {what}")
    if reasoning:
        _require_reasoning_columns(dataset.column_names, what=what)
    if len(dataset) == 0:
        raise ValueError(f"The {what} has no rows (an empty file or split?); there is nothing to train on.")
    facts = row_facts(
        dataset,
        partial(_contrastive_facts, what=what, with_negatives=with_negatives, reasoning=reasoning),
        contract="contrastive",
        options={"with_negatives": with_negatives, "reasoning": reasoning, "columns": dataset.column_names},
        what=what,
    )
    _placeholder_problems(facts, dataset.column_names, what=what)
    problems = _contrastive_problems(
        facts, reasoning=reasoning, with_negatives=with_negatives, num_negatives=num_negatives
    ) + _missing_files_of_every_rank(
        dataset, image_root, what=what, negatives=num_negatives if with_negatives else 0, on_bad_row=on_bad_row
    )
    dataset = enforce_on_bad_row(with_row_index(dataset), problems, what=what, on_bad_row=on_bad_row)
    dataset = with_undecoded_images(dataset)
    _CHECKED.add(_checked_key(dataset, options))
    return dataset


def _require_reasoning_columns(columns: Sequence[str], *, what: str) -> None:
    for column in REASONING_COLUMNS.values():
        if column not in columns:
            raise KeyError(
                f"The {what} has no column {column!r} (columns: {list(columns)}): reasoning SFT trains on "
                f"each side's target '<think>...</think><answer>...</answer>{GEN_EMB_TOKEN}' in "
                f"{QUERY_REASONING!r} and {POS_REASONING!r}. Add them (load_ume_r1_sft_json reads UME-R1's "
                "released data), or train the discriminative embedding alone (discriminative_only=True)."
            )


def _contrastive_problems(
    facts, *, reasoning: bool, with_negatives: bool, num_negatives: int | None, **count_options
) -> list[BadRows]:
    """The bad rows that :func:`_contrastive_facts` found, per cause; negatives counted only among rows without
    another problem (``count_options``: see :func:`_negative_count_problems`)."""
    bits = fact_column(facts, "problems")
    problems = [
        BadRows(cause, np.flatnonzero(bits & (np.int64(1) << i)), fix)
        for i, (cause, fix) in enumerate(_contrastive_causes(reasoning))
    ]
    if with_negatives:
        counts = fact_column(facts, "num_negatives")
        usable = bits == 0
        problems += [
            BadRows(p.cause, p.rows[usable[p.rows]], p.fix)
            for p in _negative_count_problems(counts, num_negatives, **count_options)
        ]
    return problems


def check_reasoning_lengths(dataset, collator, *, what: str = "training dataset", on_bad_row: str = "raise"):
    """The last clause of the reasoning SFT contract: each side's prompt + reasoning target within the collator's
    ``max_sequence_length``, counted in the tokens its batches will hold
    (:meth:`~mm_embed_trl.data.reasoning.ReasoningCollator.sequence_lengths`). It needs the collator (processor,
    template, image budget), so the trainer runs it once it has one, still before training; a longer row would stop
    the run when its batch came (cutting it would cut off its ``<gen_emb>``). Bad rows follow ``on_bad_row``; rows
    must have passed :func:`check_training_rows` with ``reasoning=True``.
    """
    import datasets

    limit = collator.max_sequence_length
    if limit is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return lazily_checked(
            dataset, lambda batch: _length_problems(collator.sequence_lengths(batch), limit), what=what,
            on_bad_row=on_bad_row,
        )
    if not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
        return dataset
    facts = row_facts(
        dataset, collator.sequence_lengths, contract="reasoning_lengths", options=collator.length_options(), what=what
    )
    problems = _length_problems({side: fact_column(facts, side) for side in REASONING_COLUMNS}, limit)
    return enforce_on_bad_row(dataset, problems, what=what, on_bad_row=on_bad_row)


def _length_problems(lengths_per_side: dict[str, np.ndarray], limit: int) -> list[BadRows]:
    """Rows whose prompt + reasoning target (``lengths_per_side``: side -> tokens per row) exceed ``limit``."""
    problems = []
    for side, column in REASONING_COLUMNS.items():
        lengths = np.asarray(lengths_per_side[side])
        rows = np.flatnonzero(lengths > limit)
        if len(rows):
            problems.append(
                BadRows(
                    f"a prompt + reasoning target in {column!r} longer than max_sequence_length={limit} tokens "
                    f"(--max_sequence_length; up to {int(lengths[rows].max())})",
                    rows,
                    "Raise max_sequence_length, shorten the reasoning, lower image_max_pixels, or drop these rows: "
                    f"cutting them would cut off the target's {GEN_EMB_TOKEN}.",
                )
            )
    return problems


# ------------------------------------------------------------------------------------------------------ streams
# Rows a streamed check reads and judges at once: its first batch waits for this many rows.
_STREAM_BATCH_ROWS = 1_000


def check_streamed_rows(
    dataset, *, what: str = "training dataset", num_negatives: int | None = None, on_bad_row: str = "raise",
    reasoning: bool = False, image_root: str | os.PathLike | None = None,
):
    """:func:`check_training_rows` for a ``datasets.IterableDataset`` (a stream): the column problems raise now;
    the row contract runs on each batch of rows as they stream in (:func:`lazily_checked`), with the same causes,
    messages and ``on_bad_row`` policy. What a stream cannot know in advance is judged from what has streamed: with
    ``num_negatives=None`` the count of explicit negatives every row must carry is the one the first rows carry, and
    an image column "empty in every row" is not detected (an absent one is)."""
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}.")
    image_root = None if image_root is None else os.fspath(image_root)
    options = json.dumps(
        {"num_negatives": num_negatives, "reasoning": reasoning, "what": what, "on": on_bad_row, "root": image_root}
    )
    if _CHECKED_STREAMS.get(dataset) == options:
        return dataset
    if dataset.column_names is None:  # a stream whose features are unknown until read: datasets reads its first row
        dataset = dataset._resolve_features()
    check_training_columns(dataset, name=f"the {what}")
    if reasoning:
        _require_reasoning_columns(dataset.column_names, what=what)
    contract = _StreamedContract(
        what=what, num_negatives=num_negatives, reasoning=reasoning, image_root=image_root, on_bad_row=on_bad_row
    )
    checked = lazily_checked(with_undecoded_images(dataset), contract, what=what, on_bad_row=on_bad_row)
    _CHECKED_STREAMS[checked] = options
    return checked


class _StreamedContract:
    """The contrastive contract of one batch of a stream, as :func:`check_training_rows` judges a whole dataset."""

    def __init__(
        self, *, what: str, num_negatives: int | None, reasoning: bool, image_root: str | None = None,
        on_bad_row: str = "raise",
    ):
        self.what, self.num_negatives, self.reasoning, self.image_root = what, num_negatives, reasoning, image_root
        self.on_bad_row = on_bad_row
        self.with_negatives = num_negatives != 0 and not reasoning
        self.common: int | None = None  # the negatives' count of the first usable rows (num_negatives=None)
        self.judged_root = False  # whether the first batch was looked at for a wrong image_root

    def __call__(self, batch) -> list[BadRows]:
        import pyarrow as pa

        facts = pa.table(
            _contrastive_facts(batch, what=self.what, with_negatives=self.with_negatives, reasoning=self.reasoning)
        )
        _placeholder_problems(facts, batch.column_names, what=self.what, absent_only=True)
        if self.with_negatives and self.num_negatives is None and self.common is None:
            usable = fact_column(facts, "problems") == 0
            counts = fact_column(facts, "num_negatives")[usable]
            if len(counts):
                values, seen = np.unique(counts, return_counts=True)
                self.common = int(values[np.argmax(seen)])
        files, counts = _file_problems(
            batch, _FileLookup(self.image_root), self.num_negatives if self.with_negatives else 0
        )
        if not self.judged_root:  # on the first batch only, before anything trained: later ones leave rows out
            self.judged_root = True
            _refuse_a_wrong_root(
                files, counts, what=self.what, rows="the first rows of the stream", on_bad_row=self.on_bad_row
            )
        return _contrastive_problems(
            facts, reasoning=self.reasoning, with_negatives=self.with_negatives, num_negatives=self.num_negatives,
            common=self.common, carried_by="the first rows of the stream",
        ) + files


def lazily_checked(dataset, problems_of: Callable, *, what: str, on_bad_row: str):
    """The stream ``dataset`` with ``problems_of(batch: pyarrow.Table) -> [BadRows]`` (rows = positions in the
    batch) applied to each batch of rows as they stream in, under ``on_bad_row``: "raise" stops at the first batch
    with a bad row, naming it; "skip" logs each and leaves it out.

    Each row gets :data:`~mm_embed_trl.data.schema.ROW_INDEX_COLUMN` (its place in the stream as the process or
    data-loader worker reading it counts, when the stream has none: the row's text is named beside it) and
    :data:`~mm_embed_trl.data.schema.SKIPPED_ROWS_COLUMN`: how many bad rows were left out just before it, which the
    trainer adds up as the batches arrive (every rank and worker its own rows), so a skipped row is counted once.
    Several checks chain (the reasoning lengths after the contrastive contract), adding to the same count.
    """
    import datasets

    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}.")
    features = dataset.features
    if features is not None:
        features = datasets.Features(
            {**features, ROW_INDEX_COLUMN: datasets.Value("int64"), SKIPPED_ROWS_COLUMN: datasets.Value("int64")}
        )
    check = _LazyCheck(problems_of, what=what, on_bad_row=on_bad_row)
    checked = dataset.with_format("arrow").map(check, batched=True, batch_size=_STREAM_BATCH_ROWS, features=features)
    return checked.with_format(None)


class _LazyCheck:
    """One reader's (process or data-loader worker) check of the batches it streams: its position and the bad rows
    skipped since its last kept row are its own state."""

    def __init__(self, problems_of: Callable, *, what: str, on_bad_row: str):
        self.problems_of, self.what, self.on_bad_row = problems_of, what, on_bad_row
        self.position = 0
        self.carried = 0
        self.explained: set[str] = set()

    def __call__(self, batch):
        import pyarrow as pa

        n = batch.num_rows
        if ROW_INDEX_COLUMN not in batch.column_names:
            batch = batch.append_column(ROW_INDEX_COLUMN, pa.array(np.arange(self.position, self.position + n)))
        self.position += n
        if SKIPPED_ROWS_COLUMN in batch.column_names:  # an earlier check's count
            before = as_array(batch[SKIPPED_ROWS_COLUMN]).fill_null(0).to_numpy(zero_copy_only=False)
            batch = batch.drop_columns([SKIPPED_ROWS_COLUMN])
        else:
            before = np.zeros(n, dtype=np.int64)
        problems = [p for p in self.problems_of(batch) if len(p.rows)]
        if problems:
            index = as_array(batch[ROW_INDEX_COLUMN]).to_numpy(zero_copy_only=False)
            queries = batch[QUERY_TEXT].to_pylist() if QUERY_TEXT in batch.column_names else [None] * n

            def name(row: int) -> str:
                return f"stream row {int(index[row])} ({QUERY_TEXT} {str(queries[row])[:40]!r})"

            if self.on_bad_row == "raise":
                raise _bad_rows_error(
                    problems, what=self.what,
                    describe=lambda rows: ", ".join(name(r) for r in rows[:10]) + (
                        f", ... ({len(rows)} in all)" if len(rows) > 10 else ""
                    ),
                    when="found as the rows streamed in, before their batch trained",
                )
            for p in problems:
                for row in p.rows:
                    logger.warning("Skipping %s of the %s: %s.", name(int(row)), self.what, p.cause)
                if p.fix and p.cause not in self.explained:  # a cause's fix once per reader, not per batch
                    self.explained.add(p.cause)
                    logger.warning("Rows of the %s with %s: %s", self.what, p.cause, p.fix)
        bad = np.zeros(n, dtype=bool)
        for p in problems:
            bad[p.rows] = True
        skipped = np.zeros(n, dtype=np.int64)
        for row in range(n):  # a kept row carries the bad rows (and what they carried) since the last kept row
            if bad[row]:
                self.carried += int(before[row]) + 1
            else:
                skipped[row], self.carried = int(before[row]) + self.carried, 0
        batch = batch.append_column(SKIPPED_ROWS_COLUMN, pa.array(skipped))
        return batch.filter(pa.array(~bad)) if bad.any() else batch
