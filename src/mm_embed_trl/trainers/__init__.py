from .base import EmbeddingRunArguments, EmbeddingTrainer, EmbeddingTrainingArguments, freeze_vision_tower
from .distill_config import DistillEmbedConfig
from .distill_trainer import DistillEmbedTrainer
from .embedding_mixin import EmbeddingTrainerMixin, NonFiniteLossError
from .hardneg_config import HardNegContrastiveConfig
from .hardneg_trainer import HardNegContrastiveTrainer
from .sft_config import EmbeddingSFTConfig
from .sft_trainer import EmbeddingSFTTrainer

__all__ = [
    "EmbeddingRunArguments",
    "EmbeddingTrainer",
    "EmbeddingTrainerMixin",
    "EmbeddingTrainingArguments",
    "HardNegContrastiveConfig",
    "HardNegContrastiveTrainer",
    "NonFiniteLossError",
    "freeze_vision_tower",
]
__all__ += ["DistillEmbedConfig", "DistillEmbedTrainer"]
__all__ += ["EmbeddingSFTConfig", "EmbeddingSFTTrainer"]

# EmbeddingGRPOConfig / EmbeddingGRPOTrainer (trainers.grpo_*) import trl's GRPOTrainer: reached through
# `mm_embed_trl.EmbeddingGRPOTrainer` (lazy), not imported here.
