# Copyright the mm-embed-trl authors. Apache-2.0.
"""A sentence-transformers input module that embeds with UME-R1's *generative* embedding.

This file is copied into generative exports as ``mm_embed_generative.py`` and loaded by
``SentenceTransformer(path, trust_remote_code=True)``; it needs ``mm-embed-trl`` installed. Each batch runs
``MultimodalEmbeddingModel.encode(mode="generative")`` on the model saved in ``mm_embedding/``: generation of a
reasoning, then one prefill forward reading the state at the last ``<gen_emb>`` (exactly the library's embeddings,
with the generation settings saved in the module's config).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from sentence_transformers.base.modules import InputModule

from mm_embed_trl.modeling import MultimodalEmbeddingModel

MODEL_SUBDIR = "mm_embedding"
_DOCUMENT_TASKS = ("document", "documents", "passage", "corpus", "positive", "negative", "target", "candidate")


class MMEmbedGenerativeEncoder(InputModule):
    """Embeds texts, PIL images and ``{"text", "image", "video"}`` dicts (several images, a video file, frame folder or
    list of frames, read as ``model.encode`` reads them) with the generative embedding (normalised).

    ``encode_query`` / ``task="query"`` use the query side of the model's prompt template, ``encode_document`` the
    document side. ``generation`` holds the ``encode`` options (``max_new_tokens``, ``do_sample``, ...).
    """

    config_keys = ["generation"]
    config_file_name = "mm_embed_generative_config.json"
    save_in_root = True

    def __init__(self, model: MultimodalEmbeddingModel | str, generation: dict[str, Any] | None = None):
        super().__init__()
        self.model = MultimodalEmbeddingModel.from_pretrained(model) if isinstance(model, str) else model
        self.generation = dict(generation or {})
        self.tokenizer = getattr(self.model.processor, "tokenizer", self.model.processor)

    @property
    def modalities(self) -> list[str]:
        # "message" tells sentence-transformers that one batch may mix texts, images, videos and dicts of them (as
        # model.encode does); chat-message inputs themselves are not supported.
        processor = self.model.processor
        if getattr(processor, "video_processor", None) is not None:
            return ["text", "image", "video", ("image", "text"), ("text", "video"), "message"]
        if hasattr(processor, "image_processor"):
            return ["text", "image", ("image", "text"), "message"]
        return ["text"]

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict[str, Any]:
        if prompt:
            raise ValueError(
                "This generative export takes no prompt: its instruction is the model's UME-R1 prompt template. Use "
                "encode_query / encode_document (or task=...)."
            )
        side = "document" if task in _DOCUMENT_TASKS else "query"
        return {"mm_embed_inputs": list(inputs), "mm_embed_side": side}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        embeddings = self.model.encode(
            features["mm_embed_inputs"], side=features["mm_embed_side"], mode="generative",
            batch_size=len(features["mm_embed_inputs"]), show_progress_bar=False, **self.generation,
        )
        features["sentence_embedding"] = torch.as_tensor(embeddings).to(self.model.device)
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.embedding_size

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(os.path.join(output_path, MODEL_SUBDIR), safe_serialization=safe_serialization)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs):
        root = cls.load_dir_path(
            model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision,
            local_files_only=local_files_only,
        )
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        return cls(os.path.join(root, MODEL_SUBDIR), **config)
