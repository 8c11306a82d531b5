"""Load a training dataset in the native (MMEB-train) schema from wherever it lives."""

from __future__ import annotations

import os
from pathlib import Path

from .schema import POS_TEXT, QUERY_TEXT

_FILE_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def load_rows_dataset(name_or_path: str, *, config: str | None = None, split: str = "train", **kwargs):
    """A `datasets.Dataset` from a hub id (+ config), a local parquet/jsonl/csv file, or a `save_to_disk` dir.

    Raises a clear error when the split is missing or the rows lack the MMEB training columns.
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
        from .reasoning import load_ume_r1_sft_json

        ds = load_ume_r1_sft_json(path)
    elif path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Unsupported data file {path}: use one of {sorted(_FILE_BUILDERS)}.")
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split, **kwargs)
    else:
        ds = datasets.load_dataset(str(name_or_path), config, split=split, **kwargs)
    return ds


def check_training_columns(ds, *, name: str = "dataset") -> None:
    missing = [c for c in (QUERY_TEXT, POS_TEXT) if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{name} lacks the MMEB training columns {missing} (has {ds.column_names}). Rows need qry, "
            "qry_image_path, pos_text, pos_image_path (optional neg_text, neg_image_path); rename columns with "
            "`dataset.rename_column(old, new)`."
        )


def _is_ume_r1_sft_json(path: Path) -> bool:
    """A JSON list whose records hold ``{"qry": {"conversations": ...}}`` (UME-R1's released SFT annotations)."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    return head.startswith(b"[") and b'"qry"' in head and b'"conversations"' in head
