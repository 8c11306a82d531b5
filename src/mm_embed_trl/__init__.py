"""mm-embed-trl: trainers that turn multimodal LLMs into universal multimodal embedding models.

Public names are imported lazily so `import mm_embed_trl` stays cheap.
"""

from __future__ import annotations

import atexit
import importlib
import sys
from typing import Any

__version__ = "0.1.0.dev0"

_EXPORTS = {
    "MultimodalEmbeddingConfig": "mm_embed_trl.modeling",
    "MultimodalEmbeddingModel": "mm_embed_trl.modeling",
    "EmbeddingCollator": "mm_embed_trl.data.collators",
    "EmbeddingRunArguments": "mm_embed_trl.trainers.base",
    "EmbeddingTrainingArguments": "mm_embed_trl.trainers.base",
    "EmbeddingTrainer": "mm_embed_trl.trainers.base",
    "HardNegContrastiveConfig": "mm_embed_trl.trainers.hardneg_config",
    "HardNegContrastiveTrainer": "mm_embed_trl.trainers.hardneg_trainer",
    "DistillEmbedConfig": "mm_embed_trl.trainers.distill_config",
    "DistillEmbedTrainer": "mm_embed_trl.trainers.distill_trainer",
    "EmbeddingSFTConfig": "mm_embed_trl.trainers.sft_config",
    "EmbeddingSFTTrainer": "mm_embed_trl.trainers.sft_trainer",
    "EmbeddingGRPOConfig": "mm_embed_trl.trainers.grpo_config",
    "EmbeddingGRPOTrainer": "mm_embed_trl.trainers.grpo_trainer",
    "RetrievalEvaluator": "mm_embed_trl.evaluation",
    "get_tiny_backbone": "mm_embed_trl.demo.tiny",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def _end_process_group_at_exit() -> None:
    """Any process that imports the library ends its process group cleanly (mm_embed_trl.distributed.process_group:
    gloo otherwise aborts some exits after complete runs). Importing torch is left to the process."""
    if "torch.distributed" in sys.modules:
        from .distributed.process_group import destroy_process_group_on_clean_exit

        destroy_process_group_on_clean_exit()


atexit.register(_end_process_group_at_exit)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mm_embed_trl' has no attribute {name!r}")
