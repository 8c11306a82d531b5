"""The trainers: the shared base and mixin here; each method's trainer and config found through the registry of
methods (``registry.py``), imported when first named (``EmbeddingGRPOTrainer``'s module imports TRL)."""

from __future__ import annotations

from typing import Any

from ..modeling.preparation import freeze_vision_tower
from .arguments import EmbeddingRunArguments, EmbeddingTrainingArguments
from .base import EmbeddingTrainer
from .embedding_mixin import EmbeddingTrainerMixin, NonFiniteLossError
from .registry import iter_method_trainers

__all__ = [
    "EmbeddingRunArguments",
    "EmbeddingTrainer",
    "EmbeddingTrainerMixin",
    "EmbeddingTrainingArguments",
    "NonFiniteLossError",
    "freeze_vision_tower",
]


def method_export(name: str) -> type | None:
    """The method trainer or config class called ``name`` (a registry search), or None."""
    for trainer in iter_method_trainers(mentioning=name):
        for candidate in (trainer, trainer.config_class):
            if candidate is not None and candidate.__name__ == name:
                return candidate
    return None


def __getattr__(name: str) -> Any:
    found = method_export(name) if name[:1].isupper() else None  # class names; submodules import as usual
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return found
