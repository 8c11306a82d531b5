"""Load a training dataset in the native (MMEB-train) schema from wherever it lives, and check its columns."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .schema import (
    NEG_IMAGE,
    NEG_TEXT,
    OPTIONAL_TRAIN_COLUMNS,
    POS_IMAGE,
    POS_TEXT,
    QUERY_IMAGE,
    QUERY_TEXT,
    ROW_INDEX_COLUMN,
    SKIPPED_ROWS_COLUMN,
    TRAIN_COLUMNS,
)

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}
# dataset fingerprint -> the local file it was loaded from, row i being the file's i-th record (for error messages)
_SOURCE_FILES: dict[str, str] = {}


def load_rows_dataset(
    name_or_path: str, *, config: str | None = None, split: str = "train", streaming: bool = False, **kwargs
):
    """A `datasets.Dataset` from a hub id (+ config), a local parquet/jsonl/csv file, or a `save_to_disk` dir.

    With ``streaming`` a `datasets.IterableDataset` instead: a hub id or a file is read as it is iterated
    (``load_dataset(..., streaming=True)``, a shard per file); a `save_to_disk` dir or UME-R1's JSON is loaded and
    then streamed (``to_iterable_dataset``). Raises a clear error when the split is missing or a local file is empty.
    """
    import datasets

    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise KeyError(f"{path} has no split {split!r} (it has {sorted(loaded)}); pass one of those.")
            ds = loaded[split]
        else:
            ds = loaded
    elif path.is_file() and _is_ume_r1_sft_json(path):
        from .ume_r1_json import load_ume_r1_sft_json

        ds = load_ume_r1_sft_json(path)
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Unsupported data file {path}: use one of {sorted(_FILE_BUILDERS)}.")
        if _is_blank(path):  # datasets' json builder fails on it with a bare StopIteration
            raise ValueError(f"The data file {path} is empty: it holds no rows. Point --dataset_name at the data.")
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, streaming=streaming, **kwargs)
        if not streaming:
            _SOURCE_FILES[ds._fingerprint] = str(path)
    else:
        ds = datasets.load_dataset(str(name_or_path), config, split=split, streaming=streaming, **kwargs)
    if streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    return ds


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def keep_source(derived, ds):
    """Record that `derived`'s row i is still `ds`'s row i (a prefix, an added column): same source file lines."""
    path = source_file(ds)
    if path is not None:
        _SOURCE_FILES[derived._fingerprint] = path
    return derived


def first_rows(ds, n: int):
    """The first `n` rows of `ds` (all when it has fewer), still known to come from the same file lines."""
    return keep_source(ds.select(range(min(n, len(ds)))), ds)


def source_file(ds) -> str | None:
    """The local file `ds` was loaded from by :func:`load_rows_dataset`, if its rows are still that file's records
    in order (any later select/shuffle/map gives a dataset without one)."""
    return _SOURCE_FILES.get(getattr(ds, "_fingerprint", None))


def source_lines(path: str, rows: Iterable[int]) -> dict[int, int]:
    """``{row: 1-based line number}`` of records of a JSON Lines file (blank lines hold no record); ``{}`` for other
    formats. Reads the file once, on the error path only."""
    if not str(path).lower().endswith(".jsonl"):
        return {}
    wanted = sorted({int(r) for r in rows})
    found: dict[int, int] = {}
    if not wanted:
        return found
    record, next_wanted = -1, 0
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            record += 1
            if record == wanted[next_wanted]:
                found[record] = line_number
                next_wanted += 1
                if next_wanted == len(wanted):
                    break
    return found


# ------------------------------------------------------------------------------------------------ column check
# Words that start a column name and say which side of a row it belongs to, and words that say what it holds.
_SIDE_WORDS = {
    "query": {"q", "qry", "query", "queries", "question", "anchor"},
    "positive": {"pos", "positive", "positives", "tgt", "target", "targets", "doc", "document", "candidate"},
    "negative": {"neg", "negs", "negative", "negatives", "hard"},
}
_IMAGE_WORDS = {"image", "images", "img", "imgs", "picture", "pic", "photo"}
_TEXT_WORDS = {"text", "texts", "txt", "caption", "sentence", "str"}
# a trailing word that makes an image-ish name metadata rather than the image itself
_METADATA_WORDS = {"id", "ids", "idx", "index", "name", "count", "size", "width", "height", "caption", "url", "hash"}
_SCHEMA_COLUMNS = {
    "query": (QUERY_TEXT, QUERY_IMAGE),
    "positive": (POS_TEXT, POS_IMAGE),
    "negative": (NEG_TEXT, NEG_IMAGE),
}


def _words(column: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", column.lower()) if w]


def _column_role(column: str) -> tuple[str | None, str | None]:
    """(side or None, "image" / "text" / None) that a column's name suggests."""
    words = _words(column)
    if not words:
        return None, None
    side = next((s for s, names in _SIDE_WORDS.items() if words[0] in names), None)
    if any(w in _IMAGE_WORDS for w in words) and words[-1] not in _METADATA_WORDS:
        return side, "image"
    if side is not None and (len(words) == 1 or any(w in _TEXT_WORDS for w in words[1:])):
        return side, "text"
    return side, None


def check_training_columns(ds, *, name: str = "dataset") -> None:
    """Raise a clear error when the columns do not fit the MMEB training schema.

    ``qry`` and ``pos_text`` are required. A schema column that is missing while another column looks like it
    (``qry_img_path`` for ``qry_image_path``, ``pos_image``, ``query``, ``negatives``; a bare ``image`` column when a
    side has no image column) is an error naming both: the data would otherwise train without those images or
    texts, silently.
    """
    columns = list(ds.column_names)
    known = set(TRAIN_COLUMNS) | set(OPTIONAL_TRAIN_COLUMNS) | {ROW_INDEX_COLUMN, SKIPPED_ROWS_COLUMN}
    unknown = [c for c in columns if c not in known]
    roles = {c: _column_role(c) for c in unknown}
    problems = []
    for side, (text_col, image_col) in _SCHEMA_COLUMNS.items():
        for kind, schema_col in (("text", text_col), ("image", image_col)):
            if schema_col in columns:
                continue
            lookalikes = [c for c in unknown if roles[c] == (side, kind)]
            # misspellings the word lists miss ("qry_imagepath"), among columns not claimed by another side or kind
            vague = [c for c in unknown if c not in lookalikes and (roles[c][0] == side or roles[c] == (None, None))]
            lookalikes += difflib.get_close_matches(schema_col, vague, n=2, cutoff=0.8)
            if lookalikes:
                problems.append(
                    f"{schema_col!r} is missing but {', '.join(map(repr, lookalikes))} looks like it: rename it with "
                    f"dataset.rename_column({lookalikes[0]!r}, {schema_col!r})"
                )
    if QUERY_IMAGE not in columns or POS_IMAGE not in columns:
        sideless = [c for c in unknown if roles[c] == (None, "image")]
        if sideless:
            problems.append(
                f"column(s) {', '.join(map(repr, sideless))} look like images but the schema names image columns by "
                f"side: rename to {QUERY_IMAGE!r} (query images) or {POS_IMAGE!r} (target images), or drop them if "
                "they are not images"
            )
    missing = [c for c in (QUERY_TEXT, POS_TEXT) if c not in columns]
    if problems or missing:
        raise ValueError(
            f"{name[:1].upper() + name[1:]} does not fit the MMEB training schema (columns: {columns}): "
            + "; ".join(problems or [f"it lacks {missing}"])
            + f". Rows need {QUERY_TEXT}, {QUERY_IMAGE}, {POS_TEXT}, {POS_IMAGE} (optional {NEG_TEXT}, {NEG_IMAGE}); "
            "image columns may be left out only for text-only data."
        )


def _is_ume_r1_sft_json(path: Path) -> bool:
    """A JSON list whose records hold ``{"qry": {"conversations": ...}}`` (UME-R1's released SFT annotations)."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[") and b'"qry"' in head and b'"conversations"' in head
