from .configuration import MultimodalEmbeddingConfig
from .modeling import EmbeddingOutput, MultimodalEmbeddingModel, load_processor_for, register_auto_classes
from .pooling import POOLING_MODES, finalize_embeddings, pool
from .special_tokens import add_embedding_tokens

register_auto_classes()

__all__ = [
    "POOLING_MODES",
    "add_embedding_tokens",
    "EmbeddingOutput",
    "MultimodalEmbeddingConfig",
    "MultimodalEmbeddingModel",
    "finalize_embeddings",
    "load_processor_for",
    "pool",
    "register_auto_classes",
]
