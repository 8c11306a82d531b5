"""Configuration of :class:`~mm_embed_trl.modeling.MultimodalEmbeddingModel`."""

from __future__ import annotations

from numbers import Integral

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .pooling import POOLING_MODES

ENCODER_KINDS = ("base", "generative")


class MultimodalEmbeddingConfig(PreTrainedConfig):
    r"""
    Wraps the config of any vision-language (or text-only) backbone and says how to read an embedding off it.

    Args:
        encoder_config (`dict` or `PreTrainedConfig`):
            The backbone's config (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, any causal LM...).
        encoder_kind (`str`, defaults to `"base"`):
            `"base"` instantiates the backbone with `AutoModel` (no LM head: the lightest for pure embedding
            training); `"generative"` with `AutoModelForImageTextToText` / `AutoModelForCausalLM`, needed when the
            model must also generate (UME-R1).
        pooling (`str`, defaults to `"last_token"`): one of `last_token`, `mean`, `special_token`.
        pooling_token (`str`, *optional*): the token whose last occurrence is pooled (`"<disc_emb>"`).
        pooling_token_id (`int`, *optional*): its id; filled in from the tokenizer when the model is built.
        normalize (`bool`, defaults to `True`): L2-normalise embeddings (similarity = dot product = cosine).
        embedding_dim (`int`, *optional*): keep only the first `embedding_dim` features (Matryoshka-style).
        prompt_template (`str`, defaults to `"unime"`): name of the prompt template used to build inputs
            (see `mm_embed_trl.data.templates`).
        generative_pooling_token (`str`, *optional*): the token whose last occurrence in a *generated* completion is
            the generative embedding (UME-R1's `"<gen_emb>"`); set for models that can `encode(mode="generative")`.
        lora_config (`dict`, *optional*): the PEFT `LoraConfig` (as a dict) of adapters that are part of the
            saved weights (intermediate checkpoints); `None` for merged / full-weight models.
        sequential_positions (`bool`, defaults to `False`): give the backbone plain sequential position ids (0, 1,
            2, ... over each input's tokens, images included) instead of its own multimodal ones (Qwen-VL's 3D
            M-RoPE image positions): GME's encoder calls the language model without position ids, so its vectors
            are computed so.
        preset (`str`, *optional*): the published model's preset the wrapper options came from (`"ume-r1"`,
            `"gme-qwen2vl"`, ...; see `mm_embed_trl.presets`); `None` for a plain backbone.
    """

    model_type = "mm_embedding"
    sub_configs_defaults = {"encoder_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen2_vl")}

    encoder_config: dict | PreTrainedConfig | None = None
    encoder_kind: str = "base"
    pooling: str = "last_token"
    pooling_token: str | None = None
    pooling_token_id: int | None = None
    normalize: bool = True
    embedding_dim: int | None = None
    prompt_template: str = "unime"
    generative_pooling_token: str | None = None
    lora_config: dict | None = None
    sequential_positions: bool = False
    preset: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.check_options()

    def check_options(self) -> None:
        """Refuse option values no model can embed with (``from_pretrained`` calls it again after setting options
        on a loaded config: strict validation covers only the base class's fields)."""
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLING_MODES}.")
        if self.encoder_kind not in ENCODER_KINDS:
            raise ValueError(f"encoder_kind={self.encoder_kind!r} is not one of {ENCODER_KINDS}.")
        if self.pooling == "special_token" and self.pooling_token is None and self.pooling_token_id is None:
            raise ValueError("pooling='special_token' needs `pooling_token` (e.g. '<disc_emb>') or `pooling_token_id`.")
        hidden_size = self.hidden_size if self.encoder_config is not None else None
        check_embedding_dim(self.embedding_dim, hidden_size)

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The backbone's text config: special-token ids, hidden size and the like live there."""
        if self.encoder_config is None:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        return self.encoder_config.get_text_config(decoder=decoder, encoder=encoder)

    @property
    def hidden_size(self) -> int:
        """Hidden size of the backbone's language model (the raw embedding width)."""
        return int(self.get_text_config().hidden_size)


def check_embedding_dim(embedding_dim, hidden_size: int | None = None) -> None:
    """``embedding_dim`` must be None (every feature) or a whole number in [1, hidden_size]: 0 gave 0-dimensional
    vectors, a negative one cut features off the end."""
    if embedding_dim is None:
        return
    bound = f"[1, {hidden_size}] (the backbone's hidden size)" if hidden_size is not None else "[1, hidden size]"
    if isinstance(embedding_dim, bool) or not isinstance(embedding_dim, Integral):
        raise TypeError(
            f"embedding_dim={embedding_dim!r} must be a whole number of features in {bound}, or None to keep all."
        )
    if embedding_dim < 1 or (hidden_size is not None and embedding_dim > hidden_size):
        raise ValueError(
            f"embedding_dim={embedding_dim!r} is outside {bound}: it keeps the first embedding_dim features of "
            "each vector (None keeps all)."
        )
