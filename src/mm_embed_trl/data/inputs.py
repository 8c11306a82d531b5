"""User-facing inputs (a str, an image, an ``(image, text)`` pair, a ``{"text", "image", "video"}`` dict) turned into
:class:`~mm_embed_trl.data.schema.EmbeddingInput` with their images loaded and their video sampled: the path of
``MultimodalEmbeddingModel.encode``. Above both ``images`` and ``videos``, which it joins."""

from __future__ import annotations

from typing import Any

from .images import load_image_values
from .schema import EmbeddingInput, split_visual_input
from .videos import load_video

__all__ = ["to_embedding_input"]


def to_embedding_input(
    value: Any, *, index: int | None = None, image_root: Any = None, processor: Any = None
) -> EmbeddingInput:
    """Convert a user-facing input (see :func:`.schema.split_input`) into an ``EmbeddingInput`` with its image(s)
    loaded (:func:`load_image`) and its video sampled as ``processor`` is set to (:func:`.videos.load_video`)."""
    where = f"input #{index}" if index is not None else "input"
    if isinstance(value, EmbeddingInput):
        return value
    if isinstance(value, tuple):
        where += " (read as an (image, text) pair; pass a list for a batch of texts)"
    text, image, video = split_visual_input(value, where=where)
    if image is not None:  # paths, bytes, ... and PIL images alike: one conversion to 8-bit RGB
        image = load_image_values(image, image_root, where=where)
    if video is not None:
        video = load_video(video, image_root, where=f"{where}, video", processor=processor)
    return EmbeddingInput(text=text, image=image, video=video)
