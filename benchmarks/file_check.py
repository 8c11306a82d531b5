"""What does looking for every file the rows name cost before training? Rows/s of `missing_file_problems`.

    PYTHONPATH=src python benchmarks/file_check.py [--rows 200000] [--files 50000] [--negatives 3] [--repeats 3]

Builds ``--files`` empty files in a temporary folder (the check only asks whether a file is there, not what is in
it) and an MMEB-train-schema dataset of ``--rows`` rows, each naming a query image, a positive image and
``--negatives`` negative images drawn from those files (targets and negatives repeat across rows, as in MMEB-train),
with one row in a thousand naming a file that is not there. Reports the median time of
:func:`mm_embed_trl.data.validation.missing_file_problems` (every path of the dataset read from Arrow, each distinct
path looked up once on threads) and the whole ``check_training_rows`` (row facts cached after the first run, the file
look-up not), as seconds and rows/s. The figures are for the local disk it runs on: a shared file system (NFS, Lustre)
answers each look-up slower, which the threads hide in part.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))


def build(folder: Path, rows: int, files: int, negatives: int, seed: int = 0):
    import datasets
    import numpy as np

    rng = np.random.default_rng(seed)
    names = [f"{i // 1000:03d}/{i}.jpg" for i in range(files)]
    for sub in {n.split("/")[0] for n in names}:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).touch()
    pick = rng.integers(0, files, size=(rows, 2 + negatives))
    paths = np.array(names, dtype=object)[pick]
    paths[::1000, 1] = "missing/gone.jpg"  # one row in a thousand names a file that is not there
    data = datasets.Dataset.from_dict({
        "qry": [f"<|image_1|> query {i}" for i in range(rows)],
        "qry_image_path": paths[:, 0].tolist(),
        "pos_text": [""] * rows,
        "pos_image_path": paths[:, 1].tolist(),
        "neg_text": [[""] * negatives] * rows,
        "neg_image_path": paths[:, 2:].tolist(),
    })
    data.save_to_disk(str(folder / "rows"))  # a dataset with cache files, as a loaded one: its row facts are cached
    return datasets.load_from_disk(str(folder / "rows"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=50_000)
    parser.add_argument("--negatives", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import logging

    import datasets
    from mining_search import _median_seconds as median_seconds  # one timing helper for the benchmarks

    from mm_embed_trl.data import validation

    datasets.disable_progress_bar()
    logging.getLogger("mm_embed_trl.data.validation").setLevel(logging.ERROR)  # each skipped row is a warning
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        data = build(root, args.rows, args.files, args.negatives)
        print(f"built {args.rows} rows naming {args.files} files in {time.perf_counter() - start:.1f} s")
        problems = validation.missing_file_problems(data, str(root))
        bad = sum(len(p.rows) for p in problems)
        assert bad == len(range(0, args.rows, 1000)), problems
        paths = args.rows * (2 + args.negatives)
        look = median_seconds(lambda: validation.missing_file_problems(data, str(root)), args.repeats)
        print(f"missing_file_problems: {look:.2f} s ({args.rows / look:,.0f} rows/s, {paths / look:,.0f} paths/s; "
              f"{bad} rows found)")

        def whole_check():
            validation._CHECKED.clear()  # the in-process memo would make a repeat free
            validation.check_training_rows(data, image_root=str(root), on_bad_row="skip")

        whole_check()  # the row facts are computed (and cached) once
        whole = median_seconds(whole_check, args.repeats)
        print(f"check_training_rows (row facts cached): {whole:.2f} s ({args.rows / whole:,.0f} rows/s)")


if __name__ == "__main__":
    main()
