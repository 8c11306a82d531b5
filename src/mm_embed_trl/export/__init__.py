"""Export trained embedding models: sentence-transformers directories, model cards and Hub publishing.

Heavy dependencies (sentence-transformers, huggingface_hub, torch) are imported when a function is called, so
importing this package is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ST_SUBDIR": "mm_embed_trl.export.sentence_transformers",
    "build_embedding_chat_template": "mm_embed_trl.data.chat_template",
    "export_sentence_transformers": "mm_embed_trl.export.sentence_transformers",
    "load_model_for_export": "mm_embed_trl.export.checkpoint",
    "save_model_for_inference": "mm_embed_trl.export.final_save",
    "collect_card_metadata": "mm_embed_trl.export.model_card",
    "render_model_card": "mm_embed_trl.export.model_card",
    "validate_export_dir": "mm_embed_trl.export.hub",
    "push_to_hub": "mm_embed_trl.export.hub",
}

__all__ = [
    "ST_SUBDIR",
    "build_embedding_chat_template",
    "collect_card_metadata",
    "export_sentence_transformers",
    "load_model_for_export",
    "push_to_hub",
    "render_model_card",
    "save_model_for_inference",
    "validate_export_dir",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mm_embed_trl.export' has no attribute {name!r}")
