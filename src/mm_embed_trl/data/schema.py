"""The native row schema (MMEB train / eval) and the single-input type every component speaks.

MMEB-train rows (TIGER-Lab/MMEB-train) are used unchanged: ``qry``, ``qry_image_path``, ``pos_text``,
``pos_image_path`` and optional ``neg_text`` / ``neg_image_path``. MMEB-eval rows carry ``qry_text``,
``qry_img_path``, ``tgt_text`` (list) and ``tgt_img_path`` (list), the first target being the correct one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# MMEB-train columns
QUERY_TEXT = "qry"
QUERY_IMAGE = "qry_image_path"
POS_TEXT = "pos_text"
POS_IMAGE = "pos_image_path"
NEG_TEXT = "neg_text"
NEG_IMAGE = "neg_image_path"
TRAIN_COLUMNS = (QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE)
OPTIONAL_TRAIN_COLUMNS = (NEG_TEXT, NEG_IMAGE)

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
    """One thing to embed: text, an image, or both. ``image`` is a loaded ``PIL.Image`` (or None)."""

    text: str | None = None
    image: Any = None

    def __post_init__(self):
        if is_missing(self.text):
            self.text = None
        if self.text is None and self.image is None:
            raise ValueError("An embedding input needs a text, an image, or both; got neither.")

    @property
    def modality(self) -> str:
        if self.image is not None and self.text is not None:
            return "image+text"
        return "image" if self.image is not None else "text"


def to_embedding_input(value: Any, *, index: int | None = None, image_root: Any = None) -> EmbeddingInput:
    """Convert a user-facing input (str, PIL image, (image, text) tuple, {"text", "image"} dict)."""
    from PIL import Image

    where = f"input #{index}" if index is not None else "input"
    if isinstance(value, EmbeddingInput):
        return value
    if isinstance(value, str):
        if is_missing(value):
            raise ValueError(f"{where} is an empty text; pass a non-empty string or an image.")
        return EmbeddingInput(text=value)
    if isinstance(value, Image.Image):
        return EmbeddingInput(image=value.convert("RGB") if value.mode != "RGB" else value)
    if isinstance(value, dict):
        unknown = set(value) - {"text", "image"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}; use 'text' and/or 'image'.")
        text, image = value.get("text"), value.get("image")
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        # (image, text); an image may itself be a path string, so only a non-str second item flips the order
        first, second = value
        image, text = (second, first) if isinstance(first, str) and not isinstance(second, str) else (first, second)
    else:
        raise TypeError(
            f"{where} has unsupported type {type(value).__name__}; pass a str, a PIL.Image, "
            "an (image, text) tuple or a {'text': ..., 'image': ...} dict."
        )
    if image is not None and not isinstance(image, Image.Image):
        from .images import load_image

        image = load_image(image, image_root, where=where)
    if is_missing(text) and image is None:
        raise ValueError(f"{where} has neither a text nor an image; give at least one.")
    return EmbeddingInput(text=text, image=image)
