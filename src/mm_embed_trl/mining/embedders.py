"""What mining embeds with: a model of this library or a sentence-transformers model, behind one call that also gives
each input's content key.

``embed(items, side) -> (embeddings, keys)``: ``items`` are ``(text, image value, video value)`` triples (a value is
what a row holds: a path, a ``datasets.Image`` dict, a frame folder, ...; "" for none), ``side`` is ``"query"`` or
``"document"``; the embeddings come back L2-normalised (float32, CPU) and ``keys[i]`` identifies item i's *content*
(its text up to case and spacing, and its decoded pixels), so that the same image under two paths, or a caption
written twice, count as one when mining asks whether a candidate duplicates a positive. Images and videos are decoded
and processed in dataloader workers.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..data.images import image_identity, load_image
from ..data.schema import EmbeddingInput, is_missing
from ..data.templates import strip_image_placeholders
from ..data.videos import load_video

__all__ = ["MODEL_TYPES", "content_key", "load_embedder"]

MODEL_TYPES = ("auto", "mm_embed_trl", "sentence_transformers")


def content_key(text: str | None, image, video=None) -> int:
    """A 63-bit key of an input's content: the text without image placeholders, case and runs of spaces, the decoded
    image's pixels (``image`` a loaded PIL image or None) and the sampled frames' pixels (``video`` a loaded
    :class:`~mm_embed_trl.data.videos.Video` or None)."""
    h = hashlib.blake2b(digest_size=8)
    words = (strip_image_placeholders(text) or "").split()
    h.update(" ".join(words).casefold().encode("utf-8"))
    h.update(b"\x00")
    if image is not None:
        h.update(image_identity(image).encode("utf-8"))
    if video is not None:
        for frame in video.frames:
            h.update(b"\x00frame:" + image_identity(frame).encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


class _Loaded:
    """Collate function run in the dataloader workers: decode each item's image and video, key its content, and
    (for a model of this library) run the processor, so the main process only runs the model. ``labels[i]`` names
    item i's image and video in errors: ``(image where, video where)``."""

    def __init__(self, image_root, collator=None, side: str = "query", labels: Sequence[tuple[str, str]] | None = None):
        self.image_root, self.collator, self.side, self.labels = image_root, collator, side, labels

    def __call__(self, batch: list[tuple[int, tuple[str | None, Any, Any]]]):
        inputs, keys = [], []
        processor = getattr(self.collator, "processor", None)  # its saved video sampling, as encode samples
        for position, (text, image_value, video_value) in batch:
            image_where, video_where = self.labels[position] if self.labels is not None else (f"input #{position}",) * 2
            image = load_image(image_value, self.image_root, where=image_where)
            video = None
            if not is_missing(video_value):
                video = load_video(video_value, self.image_root, where=video_where, processor=processor)
            inputs.append(EmbeddingInput(text=text, image=image, video=video))
            keys.append(content_key(text, image, video))
        encoded = self.collator.encode_inputs(inputs, side=self.side) if self.collator is not None else inputs
        return encoded, np.asarray(keys, dtype=np.int64)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return i, self.items[i]


class Embedder:
    """Base: batches of items through a DataLoader (workers decode and process), the model in this process."""

    def __init__(self, model, *, batch_size: int = 32, num_workers: int = 0, image_root=None, device=None):
        self.model, self.batch_size, self.num_workers, self.image_root = model, batch_size, num_workers, image_root
        self.device = device

    def identity(self) -> dict[str, Any]:
        """What the embeddings depend on besides the inputs (a resumed run must have embedded with the same)."""
        raise NotImplementedError

    def _collator(self, side: str):
        return None

    def _forward(self, encoded, side: str) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, items: Sequence[tuple[str | None, Any, Any]], side: str,
              labels: Sequence[tuple[str, str]] | None = None):
        loader = torch.utils.data.DataLoader(
            _Items(items),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=_Loaded(self.image_root, self._collator(side), side, labels),
        )
        embeddings, keys = [], []
        with torch.no_grad():
            for encoded, batch_keys in loader:
                vectors = self._forward(encoded, side).float()
                embeddings.append(torch.nn.functional.normalize(vectors, dim=-1).cpu())
                keys.append(batch_keys)
        return torch.cat(embeddings).numpy(), np.concatenate(keys)


class MultimodalEmbedder(Embedder):
    """A :class:`~mm_embed_trl.MultimodalEmbeddingModel`: its own collator (template, processor), as ``encode``."""

    def identity(self):
        config = self.model.config
        return {
            "model": str(getattr(config, "_name_or_path", "") or getattr(self.model, "name_or_path", "")),
            "checksum": parameter_checksum(self.model),
            "template": str(config.prompt_template),
            "pooling": str(getattr(config, "pooling", "")),
        }

    def _collator(self, side):
        return self.model.make_collator(max_length=None)  # whole texts, as encode embeds them

    def _forward(self, encoded, side):
        model = self.model
        if model.training:
            model.eval()
        device = model.device
        encoded = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in encoded.items()}
        return model(**encoded).embeddings


class SentenceTransformerEmbedder(Embedder):
    """A ``SentenceTransformer``: ``encode_query`` / ``encode_document`` (its own prompts) on the decoded inputs."""

    def identity(self):
        return {"model": str(getattr(self.model, "model_card_data", None) and self.model.model_card_data.base_model
                             or ""), "checksum": parameter_checksum(self.model), "kind": "sentence_transformers"}

    def _forward(self, inputs, side):
        values = [_st_input(x) for x in inputs]
        encode = self.model.encode_query if side == "query" else self.model.encode_document
        return encode(values, batch_size=len(values), convert_to_tensor=True, show_progress_bar=False)


def _st_input(x: EmbeddingInput):
    if x.video is not None:
        raise ValueError(
            f"{x.video.source}: mining with a sentence-transformers model embeds texts and images only; mine rows with "
            "videos with a model of this library (MultimodalEmbeddingModel)."
        )
    if x.image is None:
        return x.text
    if x.text is None:
        return x.image
    return {"text": x.text, "image": x.image}


def parameter_checksum(model: torch.nn.Module) -> str:
    """A cheap fingerprint of a model's weights (a few values of every tensor), so a resumed mining run notices
    embeddings made by other weights."""
    h = hashlib.blake2b(digest_size=12)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy() if flat.numel() else np.zeros(0)
            h.update(name.encode())
            h.update(str(tuple(tensor.shape)).encode())
            h.update(np.ascontiguousarray(sample, dtype=np.float32).tobytes())
    return h.hexdigest()


def load_embedder(model, *, model_type: str = "auto", batch_size: int = 32, num_workers: int = 0, image_root=None,
                  device=None, **model_kwargs) -> Embedder:
    """An :class:`Embedder` for ``model``: a ``MultimodalEmbeddingModel``, a ``SentenceTransformer``, or a path / hub
    id loaded as ``model_type`` says (``"auto"``: a sentence-transformers folder that is not an export of this library
    loads with sentence-transformers, anything else with :meth:`MultimodalEmbeddingModel.from_pretrained`, which also
    rebuilds this library's own exports)."""
    from ..modeling import MultimodalEmbeddingModel

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
    kwargs = dict(batch_size=batch_size, num_workers=num_workers, image_root=image_root)
    if isinstance(model, (str, os.PathLike)):
        if model_type == "auto":
            model_type = _guess_model_type(str(model))
        if model_type == "sentence_transformers":
            from sentence_transformers import SentenceTransformer

            model = SentenceTransformer(str(model), device=str(device) if device is not None else None, **model_kwargs)
        else:
            model = MultimodalEmbeddingModel.from_pretrained(str(model), **model_kwargs)
    if isinstance(model, MultimodalEmbeddingModel):
        if device is not None:
            model.to(device)
        return MultimodalEmbedder(model, **kwargs)
    if hasattr(model, "encode_query") and hasattr(model, "encode_document"):
        if device is not None:
            model.to(device)
        return SentenceTransformerEmbedder(model, **kwargs)
    raise TypeError(
        f"Cannot mine with a {type(model).__name__}: pass a MultimodalEmbeddingModel, a SentenceTransformer, or the "
        "path / hub id of either."
    )


def _guess_model_type(path: str) -> str:
    folder = os.path.expanduser(path)
    is_st = os.path.isfile(os.path.join(folder, "modules.json"))
    is_own_export = os.path.isfile(os.path.join(folder, "mm_embed_trl_export.json"))
    return "sentence_transformers" if is_st and not is_own_export else "mm_embed_trl"
