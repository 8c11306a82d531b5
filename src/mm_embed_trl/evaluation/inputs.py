"""Evaluation inputs: parsed once (cheap, validates early), de-duplicated, images and videos loaded lazily at encode
time.

Inputs are what ``mm_embed_trl.data.inputs.to_embedding_input`` accepts: a str, a PIL image, an ``(image, text)``
tuple or a ``{"text", "image", "video"}`` dict. Images given as paths (or ``datasets.Image`` values) and videos (a
video file, a frame folder or a list of frames) are loaded block by block in :func:`encode_items`, so a large eval set
never sits in memory decoded; a video is sampled as the model's processor is set to (as ``model.encode`` samples it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.images import image_identity
from ..data.schema import split_visual_input
from ..data.videos import video_identity

__all__ = ["Deduper", "EvalItem", "encode_items", "materialize", "parse_input", "row_input"]


class EvalItem(NamedTuple):
    """A parsed input: text (or None), an image value and a video value, neither loaded yet (image: PIL image, path,
    datasets.Image dict, ... or None; video: a video file, a frame folder, a list of frames, ... or None). A distinct
    type so already-parsed items are never re-read with the ambiguous tuple rule."""

    text: str | None
    image: Any
    video: Any = None


def parse_input(value: Any, where: str) -> EvalItem:
    """Parse a user input into (text, image value, video value) without loading anything
    (``schema.split_visual_input``)."""
    if isinstance(value, EvalItem):
        return value
    return EvalItem(*split_visual_input(value, where=where))


def row_input(text: Any, image: Any, where: str, video: Any = None) -> EvalItem:
    """(text, image, video) from named row columns (a dict, so no tuple-order rule is involved)."""
    return parse_input({"text": text, "image": image, "video": video}, where)


def materialize(item: EvalItem, image_root: str | None, where: str, processor: Any = None) -> Any:
    """(text, image value, video value) -> an input for ``model.encode`` with the image loaded as a PIL image and the
    video sampled (:func:`mm_embed_trl.data.videos.load_video`, as ``processor`` is set to sample videos)."""
    from PIL import Image

    text, image, video = item
    if image is not None and not isinstance(image, Image.Image):
        from ..data.images import load_image_values  # imported lazily: keeps this module importable on its own

        image = load_image_values(image, image_root, where=where)  # one image, or the list of an input's images
    if video is not None:
        from ..data.videos import load_video

        video = load_video(video, image_root, where=f"{where}, video", processor=processor)
        return {key: value for key, value in (("text", text), ("image", image), ("video", video)) if value is not None}
    if image is None:
        return text
    if text is None:
        return image
    return {"text": text, "image": image}


def encode_items(
    model: Any,
    items: Sequence[EvalItem],
    *,
    side: str,
    batch_size: int,
    show_progress_bar: bool | None,
    image_root: str | None,
    block_size: int,
    what: str,
    labels: Sequence[str] | None = None,
    encode_kwargs: Mapping[str, Any] | None = None,
) -> Tensor | dict[str, Tensor]:
    """Embed ``items`` with ``model.encode`` in blocks of ``block_size`` (images and videos decoded one block at a
    time; videos sampled as ``model.processor``, when the model has one, is set to).

    ``labels[i]`` names item i in image-loading errors (e.g. "row 12 query"); ``f"{what} #{i}"`` by default.
    ``encode_kwargs`` go to ``encode`` (e.g. ``mode="both"``, which returns a dict: then so does this function;
    ``num_samples=k`` gives (N, k, D)).
    """
    blocks = range(0, len(items), block_size)
    outer = blocks
    inner_progress = show_progress_bar
    if show_progress_bar and len(blocks) > 1:
        from tqdm.auto import tqdm

        outer = tqdm(blocks, desc=f"Encoding {what} ({len(items)})")
        inner_progress = False
    chunks = []
    processor = getattr(model, "processor", None)  # its saved video sampling, as model.encode samples a video
    for start in outer:
        block = items[start : start + block_size]
        inputs = [
            materialize(
                item, image_root, labels[start + i] if labels is not None else f"{what} #{start + i}", processor
            )
            for i, item in enumerate(block)
        ]
        out = model.encode(
            inputs, side=side, batch_size=batch_size, show_progress_bar=inner_progress, **(encode_kwargs or {})
        )
        named = out if isinstance(out, Mapping) else {"": out}
        for key, emb in named.items():
            emb = torch.as_tensor(emb)
            if emb.ndim not in (2, 3) or emb.shape[0] != len(inputs):
                raise ValueError(
                    f"model.encode returned shape {tuple(emb.shape)} for {len(inputs)} {what} inputs; "
                    "expected (num_inputs, dim) (or (num_inputs, samples, dim))."
                )
            named[key] = emb.detach().float().cpu()
        chunks.append(named)
    # Normalise defensively: the metrics use dot products as cosine similarities.
    joined = {key: F.normalize(torch.cat([c[key] for c in chunks]), dim=-1) for key in chunks[0]}
    return joined[""] if list(joined) == [""] else joined


class Deduper:
    """Assigns one index per distinct (text, image, video) input, keeping the first occurrence (and its label)."""

    def __init__(self):
        self.items: list[EvalItem] = []
        self.labels: list[str] = []
        self._index: dict[Any, int] = {}

    def add(self, item: EvalItem, label: str) -> int:
        key = (item.text, image_identity(item.image))
        if item.video is not None:  # inputs without a video keep their (text, image) key
            key += (video_identity(item.video),)
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self.items)
            self.items.append(item)
            self.labels.append(label)
        return idx

    def add_row(self, text: Any, image: Any, where: str, video: Any = None) -> int:
        """Parse named row columns (text, image, video) and add them; ``where`` labels the input in errors."""
        return self.add(row_input(text, image, where, video), where)
