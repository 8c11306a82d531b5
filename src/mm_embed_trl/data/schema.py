"""The native row schema (MMEB train / eval) and the single-input type every component speaks.

MMEB-train rows (TIGER-Lab/MMEB-train) are used unchanged: ``qry``, ``qry_image_path``, ``pos_text``,
``pos_image_path`` and optional ``neg_text`` / ``neg_image_path``; UME-R1's reasoning SFT adds ``qry_reasoning`` and
``pos_reasoning``, each side's assistant target ``<think>...</think><answer>...</answer><gen_emb>``. MMEB-eval rows
carry ``qry_text``, ``qry_img_path``, ``tgt_text`` (list) and ``tgt_img_path`` (list), the first target being the
correct one.

Several images per side: an image column holds a list of image values (``qry_image_path: ["a.jpg", "b.jpg"]``).
A video per side: ``qry_video_path`` / ``pos_video_path`` hold a video file, a folder of frames or a list of frames
(see :mod:`mm_embed_trl.data.videos`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Keys the collator adds to a batch for bookkeeping (images and videos per row, for GradCache's splitting); never
# passed to the backbone.
BATCH_METADATA_KEYS = ("image_counts", "video_counts")

# MMEB-train columns
QUERY_TEXT = "qry"
QUERY_IMAGE = "qry_image_path"
POS_TEXT = "pos_text"
POS_IMAGE = "pos_image_path"
NEG_TEXT = "neg_text"
NEG_IMAGE = "neg_image_path"
QUERY_VIDEO = "qry_video_path"
POS_VIDEO = "pos_video_path"
# UME-R1 reasoning targets (the assistant turn of each side): "<think>...</think><answer>...</answer><gen_emb>"
QUERY_REASONING = "qry_reasoning"
POS_REASONING = "pos_reasoning"
TRAIN_COLUMNS = (QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE)
OPTIONAL_TRAIN_COLUMNS = (NEG_TEXT, NEG_IMAGE, QUERY_REASONING, POS_REASONING, QUERY_VIDEO, POS_VIDEO)
# side name -> its video column (negatives carry none)
VIDEO_COLUMNS = {"query": QUERY_VIDEO, "positive": POS_VIDEO}

# Added by the pre-training row check (data/validation.py): each row's position in the dataset the trainer was given,
# so a collator error names the dataset row rather than the row's place in a shuffled batch.
ROW_INDEX_COLUMN = "_row_index"
# Added by the streamed row check (a datasets.IterableDataset, on_bad_row="skip"): how many bad rows were left out just
# before this row, which the trainer adds up batch by batch.
SKIPPED_ROWS_COLUMN = "_bad_rows_before"

# MMEB-eval columns
EVAL_QUERY_TEXT = "qry_text"
EVAL_QUERY_IMAGE = "qry_img_path"
EVAL_TARGET_TEXTS = "tgt_text"
EVAL_TARGET_IMAGES = "tgt_img_path"

# side name -> (text column, image column) in a training row
SIDES = {
    "query": (QUERY_TEXT, QUERY_IMAGE),
    "positive": (POS_TEXT, POS_IMAGE),
    "negative": (NEG_TEXT, NEG_IMAGE),
}


def is_missing(value: Any) -> bool:
    """MMEB uses ``""`` for "no image" / "no text"; treat it like ``None``."""
    return value is None or (isinstance(value, str) and value.strip() == "")


@dataclass
class EmbeddingInput:
    """One thing to embed: a text, images, a video, or a mix. ``image`` is a loaded ``PIL.Image``, a list of them
    (several images, in order) or None; ``video`` a loaded :class:`~mm_embed_trl.data.videos.Video` or None."""

    text: str | None = None
    image: Any = None
    video: Any = None

    def __post_init__(self):
        if is_missing(self.text):
            self.text = None
        if isinstance(self.image, (list, tuple)):
            self.image = list(self.image) if len(self.image) > 1 else (self.image[0] if self.image else None)
        if self.text is None and self.image is None and self.video is None:
            raise ValueError("An embedding input needs a text, an image or a video; got none.")

    @property
    def images(self) -> list:
        """The input's images, in order (``[]`` for none)."""
        if self.image is None:
            return []
        return list(self.image) if isinstance(self.image, list) else [self.image]

    @property
    def has_visual(self) -> bool:
        return self.image is not None or self.video is not None

    @property
    def modality(self) -> str:
        parts = [name for name, present in (("image", self.image is not None), ("video", self.video is not None),
                                            ("text", self.text is not None)) if present]
        return "+".join(parts)


def _as_list(value: Any) -> list:
    if is_missing(value):
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def row_negatives(row: Mapping, *, where: str = "row", with_index: bool = False) -> list[tuple]:
    """The explicit negatives of an MMEB-train row as (text, image value) pairs.

    ``neg_text`` / ``neg_image_path`` may each be a list or a single value; a single value next to a list applies
    to every negative (MMEB writes ``""`` for "no image"); ``""``/None mean "none", and pairs with neither a text
    nor an image are dropped, so a row with ``neg_text=""`` simply has no negatives.

    ``with_index=True`` gives (index, text, image value) triples instead, ``index`` being the pair's position in
    the row's ``neg_text``/``neg_image_path`` lists before the empty pairs were dropped (what errors should name).
    """
    texts, images = _as_list(row.get(NEG_TEXT)), _as_list(row.get(NEG_IMAGE))
    n = max(len(texts), len(images))
    texts = texts * n if len(texts) == 1 else texts or [None] * n
    images = images * n if len(images) == 1 else images or [None] * n
    if len(texts) != n or len(images) != n:
        raise ValueError(
            f"{where}: {NEG_TEXT!r} has {len(texts)} entries but {NEG_IMAGE!r} has {len(images)}; give one image "
            "value ('' for none) per negative text."
        )
    kept = [(j, t, im) for j, (t, im) in enumerate(zip(texts, images)) if not (is_missing(t) and is_missing(im))]
    return kept if with_index else [(t, im) for _, t, im in kept]


def split_input(value: Any, *, where: str = "input") -> tuple[str | None, Any]:
    """Parse a user-facing input into (text or None, image value or None) without loading the image.

    Accepts a str, a PIL image, an ``EmbeddingInput``, an (image, text) tuple (the image may be a path string; a
    (text, image) tuple with a non-str image is accepted too), or a ``{"text": ..., "image": ..., "video": ...}``
    dict (``image`` may be a list of images; ``video`` a video file, a frame folder or a list of frames). Empty
    strings count as missing, as in MMEB rows. Use :func:`split_visual_input` to get the video too.
    """
    text, image, _ = split_visual_input(value, where=where)
    return text, image


def split_visual_input(value: Any, *, where: str = "input") -> tuple[str | None, Any, Any]:
    """:func:`split_input` with the video: ``(text or None, image value(s) or None, video value or None)``."""
    from PIL import Image

    video = None
    if isinstance(value, EmbeddingInput):
        text, image, video = value.text, value.image, value.video
    elif isinstance(value, str):
        text, image = value, None
    elif isinstance(value, Image.Image):
        text, image = None, value
    elif isinstance(value, Mapping):
        unknown = set(value) - {"text", "image", "video"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}; use 'text', 'image' and/or 'video'.")
        text, image, video = value.get("text"), value.get("image"), value.get("video")
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        # (image, text); an image may itself be a path string, so only a non-str second item flips the order
        first, second = value
        image, text = (second, first) if isinstance(first, str) and not isinstance(second, str) else (first, second)
    else:
        raise TypeError(
            f"{where} has unsupported type {type(value).__name__}; pass a str, a PIL.Image, "
            "an (image, text) tuple or a {'text': ..., 'image': ...} dict."
        )
    text = None if is_missing(text) else text
    image = None if is_missing(image) or (isinstance(image, (list, tuple)) and len(image) == 0) else image
    video = None if is_missing(video) or (isinstance(video, (list, tuple)) and len(video) == 0) else video
    if text is not None and not isinstance(text, str):
        raise TypeError(f"{where} has a text of type {type(text).__name__}; texts must be str.")
    if text is None and image is None and video is None:
        raise ValueError(f"{where} has neither a text, an image nor a video (an empty text?); give at least one.")
    return text, image, video
