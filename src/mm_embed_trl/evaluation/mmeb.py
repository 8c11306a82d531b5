"""Load and validate MMEB-eval rows (``TIGER-Lab/MMEB-eval`` schema).

A row is one query with its own candidate list: ``qry_text`` (str), ``qry_img_path`` (image value),
``tgt_text`` (list of str) and ``tgt_img_path`` (list of image values, same length), the first target being
the correct one. ``""`` and ``None`` both mean "absent" (MMEB uses ``""``); they are normalised to ``""``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..data.schema import (
    EVAL_QUERY_IMAGE,
    EVAL_QUERY_TEXT,
    EVAL_TARGET_IMAGES,
    EVAL_TARGET_TEXTS,
    is_missing,
)
from .inputs import Deduper

__all__ = ["MMEB_EVAL_COLUMNS", "MMEBRowIndex", "index_mmeb_rows", "load_mmeb_eval", "validate_mmeb_eval_rows"]

MMEB_EVAL_COLUMNS = (EVAL_QUERY_TEXT, EVAL_QUERY_IMAGE, EVAL_TARGET_TEXTS, EVAL_TARGET_IMAGES)
_DATA_EXTENSIONS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv", ".arrow": "arrow"}


def _resolve_image(value: Any, image_root: str | None) -> Any:
    """Normalise "absent" to ``""`` and make relative string paths absolute under ``image_root``."""
    if is_missing(value):
        return ""
    if image_root is not None and isinstance(value, str) and not os.path.isabs(value):
        return os.path.join(os.path.abspath(image_root), value)
    return value


def validate_mmeb_eval_rows(
    rows: Iterable[Mapping[str, Any]], *, image_root: str | None = None, source: str = "MMEB-eval data"
) -> list[dict[str, Any]]:
    """Check rows against the MMEB-eval schema and return normalised copies.

    Raises ``ValueError`` naming the offending row and column when a column is missing, a target column is not
    a list, the two target lists differ in length or are empty, or a query / target has neither text nor image.
    """
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{source}: row {i} is a {type(row).__name__}, expected a dict with {MMEB_EVAL_COLUMNS}.")
        missing = [col for col in MMEB_EVAL_COLUMNS if col not in row]
        if missing:
            raise ValueError(
                f"{source}: row {i} lacks column(s) {missing}; MMEB-eval rows need {list(MMEB_EVAL_COLUMNS)} "
                f"(got {sorted(row)})."
            )
        texts, images = row[EVAL_TARGET_TEXTS], row[EVAL_TARGET_IMAGES]
        for col, value in ((EVAL_TARGET_TEXTS, texts), (EVAL_TARGET_IMAGES, images)):
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(
                    f"{source}: row {i} column '{col}' must be a list (one entry per candidate), "
                    f"got {type(value).__name__}."
                )
        if len(texts) != len(images):
            raise ValueError(
                f"{source}: row {i} has {len(texts)} '{EVAL_TARGET_TEXTS}' but {len(images)} "
                f"'{EVAL_TARGET_IMAGES}'; both lists must have one entry per candidate (use \"\" for absent)."
            )
        if not texts:
            raise ValueError(f"{source}: row {i} has an empty candidate list; the first candidate must be the answer.")
        qry_text = "" if is_missing(row[EVAL_QUERY_TEXT]) else row[EVAL_QUERY_TEXT]
        if not isinstance(qry_text, str):
            raise ValueError(
                f"{source}: row {i} column '{EVAL_QUERY_TEXT}' must be a str, got {type(qry_text).__name__}."
            )
        qry_img = _resolve_image(row[EVAL_QUERY_IMAGE], image_root)
        if qry_text == "" and qry_img == "":
            raise ValueError(
                f"{source}: row {i} has neither '{EVAL_QUERY_TEXT}' nor '{EVAL_QUERY_IMAGE}'; a query needs one."
            )
        tgt_texts = ["" if is_missing(t) else t for t in texts]
        tgt_imgs = [_resolve_image(v, image_root) for v in images]
        for j, (t, v) in enumerate(zip(tgt_texts, tgt_imgs)):
            if not isinstance(t, str):
                raise ValueError(
                    f"{source}: row {i} column '{EVAL_TARGET_TEXTS}'[{j}] must be a str, got {type(t).__name__}."
                )
            if t == "" and (isinstance(v, str) and v == ""):
                raise ValueError(
                    f"{source}: row {i} candidate {j} has neither '{EVAL_TARGET_TEXTS}' nor "
                    f"'{EVAL_TARGET_IMAGES}'; every candidate needs a text or an image."
                )
        new_row = dict(row)
        new_row.update(
            {
                EVAL_QUERY_TEXT: qry_text,
                EVAL_QUERY_IMAGE: qry_img,
                EVAL_TARGET_TEXTS: tgt_texts,
                EVAL_TARGET_IMAGES: tgt_imgs,
            }
        )
        out.append(new_row)
    if not out:
        raise ValueError(f"{source} holds no rows.")
    return out


def _pick_split(dataset: Any, split: str, source: str) -> Any:
    import datasets

    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"{source} has splits {sorted(dataset)}, not '{split}'; pass split=one of them.")
        return dataset[split]
    return dataset


def _load_local_files(files: list[str], source: str) -> Any:
    import datasets

    exts = {os.path.splitext(f)[1].lower() for f in files}
    builders = {_DATA_EXTENSIONS[e] for e in exts if e in _DATA_EXTENSIONS}
    if len(builders) != 1 or len(exts) != 1:
        raise ValueError(
            f"{source}: cannot tell the file format from {sorted(exts)}; use one of {sorted(_DATA_EXTENSIONS)} "
            "(all files of one kind)."
        )
    return datasets.load_dataset(builders.pop(), data_files=sorted(files), split="train")


def _open_source(path_or_dataset: Any, subset: str | None, split: str) -> tuple[Any, str]:
    """Return (dataset-or-rows, description) for any supported source."""
    import datasets

    if isinstance(path_or_dataset, (datasets.Dataset, datasets.DatasetDict)):
        return _pick_split(path_or_dataset, split, "the given DatasetDict"), "the given dataset"
    if isinstance(path_or_dataset, (list, tuple)):
        return list(path_or_dataset), "the given rows"
    if not isinstance(path_or_dataset, (str, os.PathLike)):
        raise TypeError(
            "path_or_dataset must be a hub id, a local file or directory, a datasets.Dataset/DatasetDict or a "
            f"list of row dicts; got {type(path_or_dataset).__name__}."
        )
    path = os.fspath(path_or_dataset)
    if os.path.isfile(path):
        return _load_local_files([path], path), path
    if os.path.isdir(path):
        # A `save_to_disk` directory (Dataset or DatasetDict) ...
        if any(os.path.isfile(os.path.join(path, m)) for m in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return _pick_split(datasets.load_from_disk(path), split, path), path
        # ... or a folder of data files, laid out like the hub repo (`<subset>/<split>-*.parquet`) or flat.
        folder = os.path.join(path, subset) if subset and os.path.isdir(os.path.join(path, subset)) else path
        files = [
            os.path.join(folder, f)
            for f in sorted(os.listdir(folder))
            if os.path.splitext(f)[1].lower() in _DATA_EXTENSIONS
        ]
        split_files = [f for f in files if os.path.basename(f).startswith(split)]
        files = split_files or files
        if not files:
            raise FileNotFoundError(
                f"{folder} holds no dataset: expected a `save_to_disk` directory or {sorted(_DATA_EXTENSIONS)} files "
                f"(optionally in a '{subset}' sub-folder)."
                if subset
                else f"{folder} holds no dataset: expected a `save_to_disk` directory or data files."
            )
        return _load_local_files(files, folder), folder
    if os.path.splitext(path)[1].lower() in _DATA_EXTENSIONS or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{path} does not exist; pass an existing file/directory or a hub dataset id.")
    # A hub dataset id, e.g. "TIGER-Lab/MMEB-eval" with subset "ImageNet-1K" (needs network or the HF cache).
    return datasets.load_dataset(path, subset, split=split), f"{path} ({subset or 'default'}, {split})"


def load_mmeb_eval(
    path_or_dataset: Any,
    subset: str | None = None,
    split: str = "test",
    image_root: str | None = None,
    max_queries: int | None = None,
) -> list[dict[str, Any]]:
    """Load MMEB-eval rows as a list of validated dicts.

    Args:
        path_or_dataset: a hub dataset id (``"TIGER-Lab/MMEB-eval"``, loaded with ``datasets.load_dataset``), a
            local ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` file, a directory of such files (optionally
            with a ``<subset>/`` sub-folder, as on the hub), a ``save_to_disk`` directory, a ``datasets.Dataset``
            / ``DatasetDict``, or a list of row dicts.
        subset: the MMEB task (hub config name / sub-folder), e.g. ``"ImageNet-1K"``.
        split: split to take from a ``DatasetDict`` / hub dataset / file names.
        image_root: folder that relative image paths are resolved against (they become absolute paths).
        max_queries: keep only the first ``max_queries`` rows (deterministic, for quick evaluations).

    Returns:
        Rows with ``qry_text``, ``qry_img_path``, ``tgt_text`` (list), ``tgt_img_path`` (list); absent values
        as ``""``; other columns kept.
    """
    if max_queries is not None and max_queries < 1:
        raise ValueError(f"max_queries must be >= 1 or None, got {max_queries}.")
    data, source = _open_source(path_or_dataset, subset, split)
    if not isinstance(data, list):
        missing = [col for col in MMEB_EVAL_COLUMNS if col not in data.column_names]
        if missing:
            raise ValueError(
                f"{source} lacks column(s) {missing}; MMEB-eval data needs {list(MMEB_EVAL_COLUMNS)} "
                f"(it has {data.column_names})."
            )
        if max_queries is not None:
            data = data.select(range(min(max_queries, len(data))))
        data = data.to_list()
    elif max_queries is not None:
        data = data[:max_queries]
    return validate_mmeb_eval_rows(data, image_root=image_root, source=source)


class MMEBRowIndex(NamedTuple):
    """MMEB-eval rows as indices into their distinct inputs (see :func:`index_mmeb_rows`)."""

    queries: Deduper  # the distinct query inputs (and each one's first row label)
    candidates: Deduper  # the distinct candidate inputs over all rows
    query_index: list[int]  # row -> its query among ``queries``
    candidate_lists: list[list[int]]  # row -> its candidates among ``candidates``; the first is the correct one


def index_mmeb_rows(rows: Iterable[Mapping[str, Any]]) -> MMEBRowIndex:
    """Index validated MMEB-eval rows (:func:`validate_mmeb_eval_rows`): each distinct (text, image) query and
    candidate is embedded once, and every row keeps its own candidate list in order (the first target correct).
    The one reading of MMEB-eval rows that the evaluators share."""
    queries, candidates = Deduper(), Deduper()
    query_index: list[int] = []
    candidate_lists: list[list[int]] = []
    for i, row in enumerate(rows):
        query_index.append(queries.add_row(row[EVAL_QUERY_TEXT], row[EVAL_QUERY_IMAGE], f"row {i} query"))
        candidate_lists.append(
            [
                candidates.add_row(text, image, f"row {i} candidate {j}")
                for j, (text, image) in enumerate(zip(row[EVAL_TARGET_TEXTS], row[EVAL_TARGET_IMAGES]))
            ]
        )
    return MMEBRowIndex(queries, candidates, query_index, candidate_lists)
