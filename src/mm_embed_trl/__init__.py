"""mm-embed-trl: trainers that turn multimodal LLMs into universal multimodal embedding models.

Public names are imported lazily so `import mm_embed_trl` stays cheap. The trainers and configs of the methods are
not listed here: they are found in the registry of methods (`mm_embed_trl.trainers.registry`).
"""

from __future__ import annotations

import atexit
import importlib
import sys
from typing import Any

from ._version import __version__ as __version__

_EXPORTS = {
    "MultimodalEmbeddingConfig": "mm_embed_trl.modeling",
    "MultimodalEmbeddingModel": "mm_embed_trl.modeling",
    "EmbeddingCollator": "mm_embed_trl.data.collators",
    "EmbeddingRunArguments": "mm_embed_trl.trainers.arguments",
    "EmbeddingTrainingArguments": "mm_embed_trl.trainers.arguments",
    "EmbeddingTrainer": "mm_embed_trl.trainers.base",
    "RetrievalEvaluator": "mm_embed_trl.evaluation",
    "get_tiny_backbone": "mm_embed_trl.demo.tiny",
}



def _end_process_group_at_exit() -> None:
    """Any process that imports the library ends its process group cleanly (mm_embed_trl.distributed.process_group:
    gloo otherwise aborts some exits after complete runs). Importing torch is left to the process."""
    if "torch.distributed" in sys.modules:
        from .distributed.process_group import destroy_process_group_on_clean_exit

        destroy_process_group_on_clean_exit()


atexit.register(_end_process_group_at_exit)


def _method_names() -> list[str]:
    from .trainers.registry import method_trainers

    return [cls.__name__ for trainer in method_trainers() for cls in (trainer, trainer.config_class) if cls is not None]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "__all__":  # every method registered (their modules imported): what `import *` takes
        return sorted([*_EXPORTS, *_method_names()]) + ["__version__"]
    if name[:1].isupper():  # a class name: a method's trainer or config?
        found = importlib.import_module("mm_embed_trl.trainers").method_export(name)
        if found is not None:
            return found
    raise AttributeError(f"module 'mm_embed_trl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
