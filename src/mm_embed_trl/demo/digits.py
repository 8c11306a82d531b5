"""Real handwritten digits with captions and UME-R1 reasoning targets: a retrieval task on data nobody here made.

The images are scikit-learn's ``load_digits`` (1797 8x8 grey-scale scans of handwritten digits from 43 writers,
UCI "Optical Recognition of Handwritten Digits"; scikit-learn is installed with sentence-transformers). Each
caption names three real properties of the image: its digit (the dataset's annotation) and two measured ones,
each relative to the other writings of the same digit (above or below that digit's median), so every caption
occurs about equally often:

* stroke weight: the total ink (sum of the pixel values): ``"bold"`` / ``"thin"``;
* slant: how far the ink's x moves per row of y (the ink-weighted covariance of x and -y over the variance of y):
  ``"leaning right"`` / ``"leaning left"``.

``"a bold seven leaning right"``: 10 x 2 x 2 = 40 captions, so an image must be read for more than its digit
(the two measured properties are what the tiny demo backbone finds hard, leaving room above what SFT reaches).

Rows follow the UME-R1 schema of :mod:`mm_embed_trl.demo.generated` (same query texts, same directions):

* ``"i2t"``: the digit image -> its caption;  ``"t2i"``: the caption -> the image;
* ``qry_reasoning`` / ``pos_reasoning``: ``<think>`` what the side shows (the image side also states the measured
  properties), ``<answer>`` the caption, ``<gen_emb>``.

The held-out split holds other images than the training split (never the same scan); captions are shared, as
labels are. Written to disk as a ``save_to_disk`` ``DatasetDict`` (splits ``train`` and ``eval``) with the PNGs
under ``images/`` (8x8, as scanned; processors upsample them), so ``--dataset_name <folder> --dataset_eval_split
eval --image_root <folder>`` loads it in the examples.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .._cache import cache_root
from .._files import publish_dir, staged_dir
from ..data.schema import POS_IMAGE, POS_REASONING, POS_TEXT, QUERY_IMAGE, QUERY_REASONING, QUERY_TEXT
from .generated import I2T_QUERY, IMAGE_DOC_TEXT, T2I_QUERY

__all__ = ["DIGIT_WORDS", "digit_attributes", "load_digits_dataset", "make_digits_dataset"]

# Bump when captions, reasoning targets or the row layout change: it is part of the cache key.
DIGITS_VERSION = 1
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_INFO_FILE = "digits_dataset.json"


def digit_attributes(images, labels) -> dict[str, Any]:
    """Measured properties of each image (numpy arrays, all images at once).

    Args:
        images: ``(n, h, w)`` ink intensities (``load_digits().images``: 0-16, ink high).
        labels: ``(n,)`` digits.

    Returns:
        ``ink`` (total ink), ``slant`` (x shift of the ink per row upwards; positive leans right), and the booleans
        ``bold`` and ``leans_right``: above the median of the images of the same digit.
    """
    import numpy as np

    images = np.asarray(images, dtype=np.float64)
    labels = np.asarray(labels)
    ink = images.sum(axis=(1, 2))
    ys, xs = np.mgrid[0 : images.shape[1], 0 : images.shape[2]]
    weight = images / np.maximum(ink, 1e-12)[:, None, None]
    mean_x = (weight * xs).sum(axis=(1, 2))
    mean_y = (weight * ys).sum(axis=(1, 2))
    dx, dy = xs - mean_x[:, None, None], ys - mean_y[:, None, None]
    # image rows grow downwards: a stroke leaning right has x growing as y shrinks
    slant = -(weight * dx * dy).sum(axis=(1, 2)) / np.maximum((weight * dy * dy).sum(axis=(1, 2)), 1e-12)
    bold, right = np.zeros(len(labels), bool), np.zeros(len(labels), bool)
    for digit in np.unique(labels):
        rows = labels == digit
        bold[rows] = ink[rows] > np.median(ink[rows])
        right[rows] = slant[rows] > np.median(slant[rows])
    return {"ink": ink, "slant": slant, "bold": bold, "leans_right": right}


def _caption(digit: int, bold: bool, right: bool) -> str:
    return f"a {'bold' if bold else 'thin'} {DIGIT_WORDS[digit]} leaning {'right' if right else 'left'}"


def _reasoning(digit: int, bold: bool, right: bool, seen_as: str) -> str:
    from ..data.reasoning import format_reasoning

    if seen_as == "image":
        think = (
            f"The image shows a {DIGIT_WORDS[digit]}. Its strokes are {'bold' if bold else 'thin'} and lean "
            f"{'right' if right else 'left'}."
        )
    else:
        think = f"The caption describes a {DIGIT_WORDS[digit]}."
    return format_reasoning(think, _caption(digit, bold, right))


def _params(num_eval: int, seed: int, t2i_fraction: float) -> dict[str, Any]:
    if not isinstance(num_eval, int) or not 1 <= num_eval < 1797:
        raise ValueError(f"num_eval must be an integer in [1, 1796] (load_digits has 1797 images); got {num_eval!r}.")
    if not 0.0 <= float(t2i_fraction) <= 1.0:
        raise ValueError(f"t2i_fraction must lie in [0, 1]; got {t2i_fraction!r}.")
    return {"version": DIGITS_VERSION, "num_eval": num_eval, "seed": int(seed), "t2i_fraction": float(t2i_fraction)}


def _write(folder: Path, params: dict[str, Any]) -> None:
    import datasets
    import numpy as np
    from datasets import Dataset, DatasetDict
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target
    attrs = digit_attributes(images, labels)
    rng = np.random.default_rng(params["seed"])
    order = rng.permutation(len(labels))
    t2i = rng.random(len(labels)) < params["t2i_fraction"]
    (folder / "images").mkdir()
    splits = {"eval": order[: params["num_eval"]], "train": order[params["num_eval"] :]}
    data = {}
    for split, indices in splits.items():
        columns: dict[str, list] = {}
        for i in indices.tolist():
            digit, bold, right = int(labels[i]), bool(attrs["bold"][i]), bool(attrs["leans_right"][i])
            path = f"images/{i:04d}.png"
            pixels = np.rint(images[i] * (255 / 16)).astype(np.uint8)  # 0-16 ink levels -> 8-bit grey
            Image.fromarray(pixels, mode="L").save(folder / path, format="PNG")
            caption = _caption(digit, bold, right)
            image_side, text_side = _reasoning(digit, bold, right, "image"), _reasoning(digit, bold, right, "text")
            if t2i[i]:
                row = {QUERY_TEXT: T2I_QUERY.format(caption=caption), QUERY_IMAGE: "", POS_TEXT: IMAGE_DOC_TEXT,
                       POS_IMAGE: path, QUERY_REASONING: text_side, POS_REASONING: image_side, "task": "t2i"}
            else:
                row = {QUERY_TEXT: I2T_QUERY, QUERY_IMAGE: path, POS_TEXT: caption, POS_IMAGE: "",
                       QUERY_REASONING: image_side, POS_REASONING: text_side, "task": "i2t"}
            row.update(caption=caption, image_path=path, digit=digit, bold=bold, leans_right=right,
                       ink=float(attrs["ink"][i]), slant=float(attrs["slant"][i]), source_index=i)
            for name, value in row.items():
                columns.setdefault(name, []).append(value)
        data[split] = Dataset.from_dict(columns)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # a sub-second save of a few hundred kB needs no bar
    try:
        DatasetDict(data).save_to_disk(str(folder))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    info = {"source": "sklearn.datasets.load_digits", "params": params, "splits": {k: len(v) for k, v in data.items()},
            "note": "Image paths are relative to this folder: pass it as image_root (--image_root)."}
    (folder / _INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def load_digits_dataset(folder: str | os.PathLike):
    """The ``DatasetDict`` written by :func:`make_digits_dataset`, with ``image_root`` set to the folder."""
    from datasets import load_from_disk

    folder = Path(folder).expanduser().resolve()
    if not (folder / _INFO_FILE).is_file():
        raise FileNotFoundError(f"'{folder}' holds no digits dataset (no {_INFO_FILE}); build one with "
                                "make_digits_dataset(output_dir=...).")
    result = load_from_disk(str(folder))
    result.image_root = str(folder)
    return result


def make_digits_dataset(
    output_dir: str | os.PathLike | None = None, *, num_eval: int = 256, seed: int = 0, t2i_fraction: float = 0.25
):
    """Build (or reuse) the digits retrieval dataset and return it as a ``DatasetDict(train=..., eval=...)``.

    Args:
        output_dir: Folder to write; it becomes the ``image_root``. ``None``: a cache folder keyed by the
            parameters (``$MM_EMBED_TRL_CACHE`` or ``~/.cache/mm_embed_trl``, ``/digits-<hash>``), reused when
            it already holds this dataset.
        num_eval: Held-out rows (images never in the training split); the other ``1797 - num_eval`` train.
        seed: Seeds the split and each row's direction.
        t2i_fraction: Fraction of rows in the text-to-image direction (the rest are image-to-text).

    Returns:
        The MMEB-train columns plus ``qry_reasoning``, ``pos_reasoning``, ``task``, ``caption``, ``image_path``,
        ``digit``, ``bold``, ``leans_right``, ``ink``, ``slant`` and ``source_index`` (the row of ``load_digits``),
        with an ``image_root`` attribute.
    """
    params = _params(num_eval, seed, t2i_fraction)
    if output_dir is None:
        digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
        out = cache_root(f"digits-{digest}")
    else:
        out = Path(output_dir).expanduser()
    out = out.resolve()
    try:
        if json.loads((out / _INFO_FILE).read_text()).get("params") == params:
            return load_digits_dataset(out)
    except (OSError, json.JSONDecodeError):
        pass
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (out / _INFO_FILE).is_file():
        raise FileExistsError(f"output_dir '{out}' exists and holds something else; pass a new or empty folder.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # built beside the target and swapped in whole: a reader never sees half a dataset
    with staged_dir(out, what="the digits dataset") as tmp:
        _write(tmp, params)
        publish_dir(tmp, out)
    return load_digits_dataset(out)
