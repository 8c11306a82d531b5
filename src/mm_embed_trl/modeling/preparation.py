"""Preparing a `MultimodalEmbeddingModel` for a method's training, shared by both trainer families: freezing the
vision tower, and UME-R1's embedding tokens with the pooling that reads them."""

from __future__ import annotations

from ..data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN
from .modeling import VISION_MODULE_NAMES, VISION_PROJECTOR_NAMES, MultimodalEmbeddingModel
from .special_tokens import add_embedding_tokens

__all__ = ["freeze_vision_tower", "is_vision_parameter", "prepare_embedding_tokens"]


def is_vision_parameter(name: str) -> bool:
    """Whether a backbone parameter belongs to the vision encoder or its projector."""
    return any(part in name for part in VISION_MODULE_NAMES)


def freeze_vision_tower(model: MultimodalEmbeddingModel, *, keep_projector: bool = False) -> int:
    """Freeze vision encoder + projector parameters (the projector stays trainable with ``keep_projector``); returns
    how many tensors were frozen."""
    frozen = 0
    for name, param in model.backbone.named_parameters():
        if is_vision_parameter(name) and not (keep_projector and any(p in name for p in VISION_PROJECTOR_NAMES)):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def prepare_embedding_tokens(model: MultimodalEmbeddingModel, processor) -> tuple[int, int]:
    """Add UME-R1's ``<disc_emb>`` / ``<gen_emb>`` (idempotent) and make the model pool ``<disc_emb>`` by default,
    with ``<gen_emb>`` as its generative token; returns (disc id, gen id)."""
    ids = add_embedding_tokens(model, processor)
    model.config.pooling = "special_token"
    model.config.pooling_token = DISC_EMB_TOKEN
    model.config.generative_pooling_token = GEN_EMB_TOKEN
    model.set_processor(processor)  # resolves pooling_token_id
    return ids[DISC_EMB_TOKEN], ids[GEN_EMB_TOKEN]
