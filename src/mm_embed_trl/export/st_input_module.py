"""sentence-transformers' ``Transformer`` input module, reading ``{"text", "image", "video"}`` inputs as
``MultimodalEmbeddingModel.encode`` reads them: the input module of an export made with ``video_inputs=True``.

Stock sentence-transformers passes a dict's ``"video"`` value untouched to transformers' video processor
(``sentence_transformers/base/modality.py``, ``_unwrap_video``), which decodes a file with torchcodec and samples
frames by its own rule, takes a list of images whole (``_decode_and_sample_videos`` in
``transformers/video_processing_utils.py`` refuses to sample one), reads a list of paths as that many videos
(``make_batched_videos``) and reads no frame folder. This module first loads
the video as ``encode`` does (:func:`mm_embed_trl.data.videos.load_video`: a frame folder, a list of frame paths or
images, a video file decoded with PyAV, sampled by the options saved with the processor; the same
:class:`~mm_embed_trl.data.videos.VideoLoadError` for a missing file or a video without frames) and the images as
``encode`` loads them, then hands the sampled frames to the stock module. Everything after that (chat template,
processor, backbone) is sentence-transformers' own, so the vectors are ``encode``'s.

Loading it runs this package's code: ``SentenceTransformer(path, trust_remote_code=True)`` with ``mm-embed-trl``
installed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sentence_transformers.base.modules import Transformer

from ..data.inputs import to_embedding_input

__all__ = ["MMEmbedInputTransformer"]

_INPUT_KEYS = frozenset({"text", "image", "video"})


class MMEmbedInputTransformer(Transformer):
    """A ``Transformer`` whose ``preprocess`` loads each ``{"text", "image", "video"}`` dict's images and video as
    ``MultimodalEmbeddingModel.encode`` does. Strings, PIL images and chat messages pass through unchanged."""

    def preprocess(self, inputs, prompt: str | None = None, processing_kwargs=None, **kwargs) -> dict[str, Any]:
        loaded = [self._load(value, index) for index, value in enumerate(inputs)]
        if any(isinstance(value, dict) and "video" in value for value in loaded):
            # The frames are sampled already (load_video, with the processor's saved options): never again.
            processing_kwargs = dict(processing_kwargs or {})
            processing_kwargs["video"] = {"do_sample_frames": False, **processing_kwargs.get("video", {})}
        return super().preprocess(loaded, prompt=prompt, processing_kwargs=processing_kwargs, **kwargs)

    def _load(self, value: Any, index: int) -> Any:
        if not isinstance(value, Mapping) or not value or not set(value) <= _INPUT_KEYS:
            return value
        # `index` counts within sentence-transformers' batch, which it sorts by length: the message names the input
        # by its value too (the path of a missing video, ...).
        loaded = to_embedding_input(dict(value), index=index, processor=self.processor)
        out: dict[str, Any] = {}
        if loaded.text is not None:
            out["text"] = loaded.text
        if loaded.images:
            out["image"] = loaded.images if len(loaded.images) > 1 else loaded.images[0]
        if loaded.video is not None:
            out["video"] = list(loaded.video.frames)
        return out
