"""`MultimodalEmbeddingModel`: any vision-language (or text) backbone + pooling → one normalised vector per input."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from numbers import Integral
from pathlib import Path
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    PreTrainedModel,
)
from transformers.utils import ModelOutput

from .._tensors import iter_tensors
from ..data.schema import BATCH_METADATA_KEYS
from .configuration import MultimodalEmbeddingConfig
from .export_reader import LOAD_TRAINED_HINT, read_export_info, recorded_wrapper_options, restore_backbone_chat_template
from .generative import UME_R1_MAX_NEW_TOKENS
from .pooling import TokenPooling, finalize_embeddings, pool, special_token_indices

logger = logging.getLogger(__name__)

METADATA_KEYS = BATCH_METADATA_KEYS  # the collator's bookkeeping keys, never passed to the backbone

# Options of the wrapper that `from_pretrained` accepts next to the usual transformers kwargs.
WRAPPER_OPTIONS = (
    "encoder_kind",
    "pooling",
    "pooling_token",
    "pooling_token_id",
    "normalize",
    "embedding_dim",
    "prompt_template",
    "generative_pooling_token",
    "sequential_positions",
)

# transformers >= 5.25 turns Hub kernels on by default (`use_kernels=None` -> True): on CUDA it swaps layers such as
# Qwen2-VL's RMSNorm and rotary embedding for kernels downloaded from the Hugging Face Hub. This library loads models
# with them off unless asked (`use_kernels=True`): no code fetched from the Hub without the user's consent (as with
# trust_remote_code), offline clusters start without network probes, and vectors keep the numerics of the plain
# torch layers the published encode paths ran. On the CPU no Hub kernel exists, so both settings compute the same.
USE_HUB_KERNELS_DEFAULT = False

# LoRA targets. "language_model" keeps adapters out of the vision tower (Qwen2.5-VL's vision MLP also has
# gate/up/down_proj, so a plain name list would catch it); "all" adapts every linear projection.
# Parameter-name parts of the vision encoder and projector across Qwen-VL (visual.*, incl. its merger) and
# LLaVA-OneVision (vision_tower, multi_modal_projector, image_newline).
VISION_MODULE_NAMES = ("visual", "vision_tower", "vision_model", "multi_modal_projector", "image_newline")
# The projector part of those: Qwen-VL's merger (visual.merger, and Qwen3-VL's deepstack mergers), LLaVA's projector.
VISION_PROJECTOR_NAMES = ("merger", "multi_modal_projector")
_PROJ = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LORA_TARGETS = {
    "language_model": rf"^(?!.*({'|'.join(VISION_MODULE_NAMES)})).*\.{_PROJ}$",
    "all": rf".*\.({_PROJ[1:-1]}|qkv|proj|fc1|fc2|linear_fc1|linear_fc2|linear_1|linear_2)$",
}


# Supervised tokens whose logits are computed at once in the LM loss (x vocabulary x 4 bytes: 0.6 GB at 151k).
LM_LOSS_CHUNK_TOKENS = 1024


def _token_ce_sum(head: torch.nn.Module, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(states).float()  # the cross-entropy of a large vocabulary in float32, as HF and UME-R1 do
    return torch.nn.functional.cross_entropy(logits, targets, reduction="sum")


def _region_mask(attention_mask: torch.Tensor, region: str, completion_start) -> torch.Tensor:
    """The attention mask restricted to the positions of ``region`` (see TokenPooling)."""
    if region == "all":
        return attention_mask
    if completion_start is None:
        raise ValueError(f"TokenPooling(region={region!r}) needs completion_start (the first completion position).")
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    start = torch.as_tensor(completion_start, device=attention_mask.device).reshape(-1, 1)
    inside = positions >= start if region == "completion" else positions < start
    return attention_mask.bool() & inside


@dataclass
class EmbeddingOutput(ModelOutput):
    """Output of :class:`MultimodalEmbeddingModel`.

    Args:
        loss: mean token cross-entropy of the language-model head on ``labels`` (when given).
        embeddings: (batch, dim) pooled embeddings, L2-normalised when `config.normalize`.
        last_hidden_state: (batch, seq, hidden), only when `output_hidden_states=True` was asked.
        token_found: (batch,) bool, for special-token pooling: whether the row contained the token.
        embeddings_per_batch: one embeddings tensor per input batch when called with `batches=[...]`.
        named_embeddings: ``{name: (batch, dim)}`` for the ``pool_tokens`` asked (e.g. ``disc`` and ``gen``), from
            the same forward, finalised like ``embeddings``.
        named_token_found: ``{name: (batch,) bool}``: whether each row held that token in its region.
        lm_loss_sum: the summed token cross-entropy (float32) of ``labels``; ``loss = lm_loss_sum / lm_num_tokens``.
            Sums are what GradCache chunks and ranks add up exactly.
        lm_num_tokens: the number of supervised tokens (``labels != -100`` after the shift).
        outputs_per_batch: the whole output of each batch when called with `batches=[...]`.
    """

    loss: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    embeddings_per_batch: tuple[torch.Tensor, ...] | None = None
    last_hidden_state: torch.Tensor | None = None
    token_found: torch.Tensor | None = None
    named_embeddings: dict[str, torch.Tensor] | None = None
    named_token_found: dict[str, torch.Tensor] | None = None
    lm_loss_sum: torch.Tensor | None = None
    lm_num_tokens: torch.Tensor | None = None
    outputs_per_batch: tuple[EmbeddingOutput, ...] | None = None


def lora_config_dict(peft_config) -> dict:
    """A PEFT `LoraConfig` as `MultimodalEmbeddingConfig.lora_config` stores it (JSON-able; what the model, not PEFT's
    bookkeeping, needs to rebuild the adapters when loaded)."""
    config_dict = peft_config.to_dict()
    config_dict = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config_dict.items()}
    for key in ("peft_type", "task_type", "auto_mapping", "base_model_name_or_path", "revision"):
        config_dict.pop(key, None)
    return config_dict


def with_lora_target(peft_config, target: str = "language_model"):
    """A copy of the PEFT `LoraConfig` ``peft_config`` whose `target_modules` is the ``target`` preset of
    `LORA_TARGETS`, unless it names modules itself (anything but None, empty or "all-linear").

    PEFT infers no modules for vision-language backbones (their model types are not in its table) and its
    "all-linear" would put adapters in the vision tower too."""
    if target not in LORA_TARGETS:
        raise ValueError(f"Unknown LoRA target {target!r}; choose one of {sorted(LORA_TARGETS)}.")
    targets = peft_config.target_modules
    if targets is None or targets == "all-linear" or (isinstance(targets, (set, list)) and not targets):
        return replace(peft_config, target_modules=LORA_TARGETS[target])
    return peft_config


def _is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def _encoder_auto_class(config, kind: str):
    if kind == "base":
        return AutoModel
    return AutoModelForImageTextToText if _is_vision_language(config) else AutoModelForCausalLM


def _log_preset(name: str, preset, found_by: str) -> None:
    logger.info("%s: preset %r (%s), found by %s.", name, preset.name, preset.title, found_by)
    if not preset.verified:
        logger.warning(
            "The preset %r (%s) is assumed, not read from its authors' code (none was public): %s. Check its vectors "
            "against the authors' before relying on them, or pass the options yourself.",
            preset.name, preset.title, preset.source,
        )


def _unsupported_backbone_error(name: str, config, err: Exception | None = None) -> ValueError:
    return ValueError(
        f"Cannot wrap {name!r} (model_type={getattr(config, 'model_type', '?')!r}) as an embedding backbone: "
        f"{err or 'it exposes no text hidden size'}. Supported: decoder LLMs and vision-language models loadable "
        "with AutoModel / AutoModelForImageTextToText (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision, Qwen2, "
        "Llama, ...). Pass a model id or directory of such a backbone, or a saved MultimodalEmbeddingModel."
    )


class MultimodalEmbeddingModel(PreTrainedModel):
    r"""A universal multimodal embedding model on top of a (multimodal) LLM.

    The backbone runs on the processor outputs of a batch; the embedding is the last-layer hidden state at the
    pooled position (last token of the prompt for UniME, `<disc_emb>`/`<gen_emb>` for UME-R1), optionally truncated
    and L2-normalised.

    ``backbone`` is the canonical name of the wrapped vision-language (or text) model, LoRA layers included but
    without PEFT's wrapper. ``encoder`` is the submodule attribute that holds it: the same model, or the
    ``PeftModel`` around it while adapters are live. It stays because it names the stored state (weights under
    ``encoder.``, ``config.encoder_config``, ``encoder_kind``): checkpoints keep loading; new code reads ``backbone``.

    Example:
    ```python
    >>> from mm_embed_trl import MultimodalEmbeddingModel
    >>> model = MultimodalEmbeddingModel.from_pretrained("Qwen/Qwen2-VL-2B-Instruct")  # wraps a plain backbone
    >>> emb = model.encode(["a red circle", image, (image, "What colour is the shape?")])
    >>> model.save_pretrained("out")  # reloads bit-identically with MultimodalEmbeddingModel.from_pretrained("out")
    ```
    """

    config_class = MultimodalEmbeddingConfig
    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _can_compile_fullgraph = False

    def __init__(self, config: MultimodalEmbeddingConfig, encoder: PreTrainedModel | None = None):
        super().__init__(config)
        if encoder is None:
            auto_cls = _encoder_auto_class(config.encoder_config, config.encoder_kind)
            try:
                encoder = auto_cls.from_config(config.encoder_config)
            except (ValueError, KeyError) as err:
                raise _unsupported_backbone_error("encoder_config", config.encoder_config, err) from err
        self.encoder = encoder
        if config.lora_config is not None:
            # A checkpoint saved mid-training with live adapters: rebuild the same structure so its keys load.
            self._wrap_with_lora(config.lora_config)
        # The processor is not a module: it travels alongside (save_pretrained writes it next to the weights).
        self.processor = None
        # Set by `run_vision_tower_in_every_forward` (sharded training).
        self._blank_image: BlankImageHook | None = None
        self.post_init()
        self._register_tied_weights()

    # ------------------------------------------------------------------ construction / loading
    def _init_weights(self, module):
        # Every parameter belongs to the backbone, whose own init already ran (or whose weights are loaded).
        pass

    @classmethod
    def from_backbone(
        cls,
        backbone: str | os.PathLike | PreTrainedModel,
        *,
        processor: Any = None,
        load_processor: bool = True,
        **kwargs,
    ) -> MultimodalEmbeddingModel:
        """Wrap a plain backbone (hub id, directory, or an instantiated model) with embedding pooling.

        A published embedding model gets its preset's options (see :mod:`mm_embed_trl.presets`; ``preset=`` picks
        one, ``preset=None`` none); keyword arguments override them.
        """
        from ..presets import loading as presets

        options = {k: kwargs.pop(k) for k in WRAPPER_OPTIONS if k in kwargs}
        preset_args = {k: kwargs.pop(k) for k in presets.PRESET_LOAD_OPTIONS if k in kwargs}
        choice = preset_args.pop("preset", presets.AUTO)
        if isinstance(backbone, PreTrainedModel):
            encoder, name = backbone, getattr(backbone.config, "_name_or_path", type(backbone).__name__)
            preset = presets.resolve_preset(name, encoder.config, choice if choice != presets.AUTO else None, {})[0]
            options = {**(preset.wrapper_options() if preset else {}), **options}
            if hasattr(encoder, "lm_head"):
                options.setdefault("encoder_kind", "generative")
        else:
            name = str(backbone)
            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "trust_remote_code") if k in kwargs}
            backbone_config = AutoConfig.from_pretrained(name, **hub_kwargs)
            preset, found_by = presets.resolve_preset(name, backbone_config, choice, hub_kwargs)
            if preset is not None:
                _log_preset(name, preset, found_by)
                options = {**preset.wrapper_options(), **options}
            else:
                presets.warn_assumed_defaults(name, options, MultimodalEmbeddingConfig().to_dict())
            auto_cls = _encoder_auto_class(backbone_config, options.get("encoder_kind", "base"))
            load_kwargs = {"use_kernels": USE_HUB_KERNELS_DEFAULT, **kwargs}
            try:
                encoder = None
                if preset is not None and preset.adapter:
                    encoder = presets.load_adapter_backbone(
                        name,
                        _encoder_auto_class(backbone_config, "generative"),
                        load_kwargs,
                        base_model=preset_args.get("base_model"),
                        bare=options.get("encoder_kind", "base") == "base",
                    )
                if encoder is None:
                    encoder = auto_cls.from_pretrained(name, **load_kwargs)
            except ValueError as err:
                if "Unrecognized configuration class" in str(err):
                    raise _unsupported_backbone_error(name, backbone_config, err) from err
                raise
        encoder_config = encoder.config
        text_config = getattr(encoder_config, "text_config", None) or encoder_config
        if getattr(text_config, "hidden_size", None) is None:
            raise _unsupported_backbone_error(name, encoder_config)
        attn_implementation = encoder_config._attn_implementation
        config = MultimodalEmbeddingConfig(
            encoder_config=encoder_config, preset=preset.name if preset is not None else None, **options
        )
        model = cls(config, encoder=encoder)
        if attn_implementation is not None:
            # Wrapping re-resolves the sub-config's attention; keep what the backbone was loaded with.
            model.set_attn_implementation(attn_implementation)
        model.config._name_or_path = name
        if processor is None and load_processor and not isinstance(backbone, PreTrainedModel):
            processor = load_processor_for(name, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
        if processor is not None:
            presets.apply_pixel_budget(processor, preset, preset_args)
            model.set_processor(processor)
        return model

    @classmethod
    def from_sentence_transformers_export(
        cls, name_or_path, info: Mapping[str, Any], *, processor=None, load_processor: bool = True, **kwargs
    ) -> MultimodalEmbeddingModel:
        """The model an export was made from, rebuilt from the export (`from_pretrained` calls this for a folder or
        repo with an `EXPORT_INFO_FILE`; ``info`` is that file, see `modeling.export_reader`).

        The discriminative export holds the bare backbone and a processor whose chat template wraps the backbone's
        own in the model's prompts (see `export_sentence_transformers`): the backbone is wrapped again with the
        recorded pooling, pooling token, normalisation, dimension and prompt template, and the processor gets the
        backbone's chat template back, so the model embeds as the trained one did (the export's ST prompts are the
        export's; the model keeps its template's instructions). The generative export holds the whole model.
        Wrapper options in ``kwargs`` override the recorded ones.

        No preset is looked up: the export records every option the model embeds with, and its processor holds the
        trained pixel budget. A run that added UME-R1's `<disc_emb>`/`<gen_emb>` would otherwise be recognised as the
        UME-R1 release and get its pixel budget, a language-model head and ``config.preset``. ``image_min_pixels`` /
        ``image_max_pixels`` in ``kwargs`` still set the processor's budget; ``preset=`` is refused.
        """
        from ..data.templates import get_template

        if info["format"].endswith(".generative"):  # the saved MultimodalEmbeddingModel is inside, whole
            inner = Path(name_or_path) / "mm_embedding"
            if not inner.is_dir():
                from huggingface_hub import snapshot_download

                hub = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
                inner = Path(snapshot_download(str(name_or_path), allow_patterns=["mm_embedding/*"], **hub))
                inner = inner / "mm_embedding"
            return cls.from_pretrained(inner, processor=processor, load_processor=load_processor, **kwargs)
        if kwargs.get("encoder_kind", "base") != "base":
            raise ValueError(
                f"{str(name_or_path)!r} is a sentence-transformers export: it holds the bare backbone, with no "
                f"language-model head, so it cannot be loaded with encoder_kind={kwargs['encoder_kind']!r}. "
                + LOAD_TRAINED_HINT
            )
        if kwargs.pop("preset", None) not in (None, "auto", "none"):
            raise ValueError(
                f"{str(name_or_path)!r} is a sentence-transformers export: it records the options of the model it "
                "was made from and is rebuilt with them, not with a preset. Pass the options themselves "
                "(pooling=, prompt_template=, image_max_pixels=, ...) to change them."
            )
        # The export holds the bare backbone (no LM head), whatever encoder_kind the trained model had.
        options = {**recorded_wrapper_options(info), "encoder_kind": "base"}
        options.update({k: kwargs.pop(k) for k in WRAPPER_OPTIONS if k in kwargs})
        if processor is None and load_processor:
            processor = load_processor_for(name_or_path, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
            if processor is not None:
                restore_backbone_chat_template(processor, get_template(options["prompt_template"]), info, name_or_path)
        return cls.from_backbone(
            name_or_path, processor=processor, load_processor=False, preset=None, **options, **kwargs
        )

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs) -> MultimodalEmbeddingModel:
        """Load a saved `MultimodalEmbeddingModel`, or wrap a plain backbone (hub id or directory); a
        sentence-transformers export of this library (`export_sentence_transformers`, `examples/export.py`) gives
        back the model it was made from.

        A published embedding model (UME-R1, VLM2Vec, UniME, GME, Qwen3-VL-Embedding, ...; `python -m
        mm_embed_trl.presets --list`) is recognised by hub id, repository name or fingerprint and wrapped with its
        preset, so `encode` embeds as its authors' code does; `preset=<name>` picks one, `preset=None` none, and a
        backbone without preset loads with a warning naming the defaults assumed. Wrapper options (`pooling`,
        `normalize`, `embedding_dim`, `prompt_template`, `pooling_token`, `encoder_kind`) and the processor's
        `image_min_pixels` / `image_max_pixels` may be given as keyword arguments and win over the preset's;
        `base_model` names the base of a release published as an adapter (default: its adapter_config.json's).
        Other keyword arguments go to transformers (`dtype`, `attn_implementation`, `revision`, `token`, ...). The
        processor saved next to the weights is attached as `model.processor` (pass `load_processor=False` to skip).
        Hub kernels stay off unless `use_kernels=True` (see `USE_HUB_KERNELS_DEFAULT`).
        """
        load_processor = kwargs.pop("load_processor", True)
        processor = kwargs.pop("processor", None)
        if kwargs.get("config") is None and pretrained_model_name_or_path is not None:
            hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "trust_remote_code") if k in kwargs}
            export = read_export_info(pretrained_model_name_or_path, **hub_kwargs)
            if export is not None:  # what examples/export.py writes: rebuild the model it was made from
                return cls.from_sentence_transformers_export(
                    pretrained_model_name_or_path, export, processor=processor, load_processor=load_processor,
                    **kwargs,
                )
            try:
                found = AutoConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
            except (OSError, ValueError) as err:
                from ..presets.loading import raise_for_unloadable

                raise_for_unloadable(pretrained_model_name_or_path, err, hub_kwargs)
                raise OSError(
                    f"{pretrained_model_name_or_path!r} is neither a saved MultimodalEmbeddingModel nor a backbone "
                    f"transformers can load ({err}). Pass a hub model id or a directory with a config.json."
                ) from err
            if found.model_type != cls.config_class.model_type:
                return cls.from_backbone(
                    pretrained_model_name_or_path, processor=processor, load_processor=load_processor, **kwargs
                )
        options = {k: kwargs.pop(k) for k in WRAPPER_OPTIONS if k in kwargs}
        pixel_budget = {k: kwargs.pop(k) for k in ("image_min_pixels", "image_max_pixels") if k in kwargs}
        if kwargs.pop("preset", None) not in (None, "auto"):
            raise ValueError(
                f"{pretrained_model_name_or_path!r} is a saved MultimodalEmbeddingModel: its options are in its config "
                "(config.preset names the preset it started from). preset= applies when wrapping a backbone; pass the "
                "options themselves (pooling=, prompt_template=, ...) to change them."
            )
        kwargs.setdefault("use_kernels", USE_HUB_KERNELS_DEFAULT)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        for key, value in options.items():
            setattr(model.config, key, value)
        model._load_generation_config(pretrained_model_name_or_path, kwargs)
        model.config.check_options()
        if processor is None and load_processor:
            processor = load_processor_for(
                pretrained_model_name_or_path, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs}
            )
        if processor is not None:
            if pixel_budget:
                from ..presets.loading import apply_pixel_budget

                apply_pixel_budget(processor, None, pixel_budget)
            model.set_processor(processor)
        return model

    def _load_generation_config(self, name_or_path, kwargs: dict) -> None:
        """Restore the backbone's generation config saved by :meth:`save_pretrained` (a model saved before it was
        kept has none: the backbone then keeps the one built from its model config)."""
        from transformers import GenerationConfig

        if getattr(self.backbone, "generation_config", None) is None:
            return
        hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir") if k in kwargs}
        try:
            self.backbone.generation_config = GenerationConfig.from_pretrained(name_or_path, **hub_kwargs)
        except OSError:
            logger.debug("No generation_config.json with %s; the backbone keeps its default one.", name_or_path)

    def set_processor(self, processor) -> None:
        """Attach the processor (or tokenizer) used by `encode`; resolves `pooling_token_id` from its vocabulary."""
        self.processor = processor
        token = self.config.pooling_token
        if token is not None:
            tokenizer = getattr(processor, "tokenizer", processor)
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or token_id == tokenizer.unk_token_id:
                raise ValueError(
                    f"pooling_token {token!r} is not in the tokenizer's vocabulary. Add it first, e.g. "
                    f"`tokenizer.add_special_tokens({{'additional_special_tokens': [{token!r}]}})` and "
                    "`model.backbone.resize_token_embeddings(len(tokenizer))`."
                )
            self.config.pooling_token_id = int(token_id)

    def save_pretrained(self, save_directory, *args, save_processor: bool = True, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        # The wrapper cannot generate, so transformers saves no generation config for it: save the backbone's (its
        # EOS ids and sampling defaults, e.g. Qwen's two EOS tokens) beside the weights.
        generation_config = getattr(self.backbone, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(save_directory)
        if save_processor and self.processor is not None:
            self.processor.save_pretrained(save_directory)

    # ------------------------------------------------------------------ LoRA
    def _wrap_with_lora(self, lora_config) -> None:
        from peft import LoraConfig, get_peft_model

        if isinstance(lora_config, dict):
            lora_config = LoraConfig(**lora_config)
        if lora_config.task_type is not None:
            # A task's wrapper (TRL's get_peft_config says CAUSAL_LM) needs generation plumbing a bare backbone
            # lacks (`prepare_inputs_for_generation`); this model drives its encoder itself, so the plain PeftModel
            # serves every backbone kind, and is what a saved LoRA model is rebuilt with (no task_type is stored).
            lora_config = replace(lora_config, task_type=None)
        self.encoder = get_peft_model(self.encoder, lora_config)
        self._register_tied_weights()

    def _register_tied_weights(self) -> None:
        """Name the backbone's tied weights (e.g. lm_head = embed_tokens) by their paths in this model, with or without
        PEFT's wrapper. transformers derives them through attribute lookups that PEFT forwards to the inner model, so
        with adapters `encoder.model.language_model...` resolved to the wrong module and a saved LoRA model with tied
        embeddings (Qwen2-VL-2B's) failed to load."""
        prefix = "encoder.base_model.model." if self.has_lora else "encoder."
        tied = getattr(self.backbone, "all_tied_weights_keys", None) or {}
        self.all_tied_weights_keys = {prefix + target: prefix + source for target, source in tied.items()}

    def add_lora(self, peft_config=None, *, target: str = "language_model", **lora_kwargs) -> None:
        """Add LoRA adapters to the backbone (in place); the rest of the backbone is frozen.

        Args:
            peft_config: a `peft.LoraConfig` (e.g. from `trl.get_peft_config(model_args)`). Its `target_modules`
                is replaced by the `target` preset unless it names modules explicitly other than "all-linear".
            target: "language_model" (default; vision tower and projector untouched) or "all".
            lora_kwargs: used to build a `LoraConfig` when `peft_config` is None (r, lora_alpha, lora_dropout...).
        """
        from peft import LoraConfig

        if self.has_lora:
            raise ValueError("The model already has LoRA adapters; call merge_lora() first to stack a new set.")
        if peft_config is None:
            peft_config = LoraConfig(**{"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, **lora_kwargs})
        peft_config = with_lora_target(peft_config, target)
        self._wrap_with_lora(peft_config)
        self.config.lora_config = lora_config_dict(peft_config)

    @property
    def has_lora(self) -> bool:
        from peft import PeftModel

        return isinstance(self.encoder, PeftModel)

    def merge_lora(self) -> None:
        """Merge LoRA adapters into the backbone weights (the saved model is then a plain full-weight model)."""
        if self.has_lora:
            self.encoder = self.encoder.merge_and_unload()
            self.config.lora_config = None
            self._register_tied_weights()

    # ------------------------------------------------------------------ sharded training
    def run_vision_tower_in_every_forward(self, processor=None, *, direct_backbone_calls: bool = False) -> None:
        """Make every forward run the vision tower, text-only ones on a tiny blank image (its output times 0).

        ZeRO-3 and FSDP all-gather each module's weights with collectives as it runs (forward and backward), so
        every rank must run the same modules in the same order: a text-only batch on one rank while another has
        images hangs both, and ZeRO-1/2 reduce mismatched gradient buckets. See :class:`BlankImageHook`. A no-op
        for text-only backbones.

        ``direct_backbone_calls``: also for forwards that call the backbone itself rather than this model (TRL's
        GRPOTrainer trains the backbone as its policy: log-probabilities, the rollout embeddings).
        """
        if not _is_vision_language(self.backbone.config):
            return
        if self._blank_image is None:
            processor = processor if processor is not None else self.processor
            self._blank_image = BlankImageHook(self._hidden_state_module(), processor)
        if direct_backbone_calls:
            self._blank_image.hook_top_level(self.backbone)

    # ------------------------------------------------------------------ forward
    @property
    def backbone(self) -> PreTrainedModel:
        """The wrapped model (the canonical name): ``encoder`` without PEFT's wrapper (LoRA layers, if any, stay
        injected in it)."""
        enc = self.encoder
        return enc.get_base_model() if hasattr(enc, "get_base_model") else enc

    def _hidden_state_module(self) -> torch.nn.Module:
        base = self.backbone
        # Generative backbones (…ForConditionalGeneration / …ForCausalLM): skip the LM head, its vocab-sized
        # logits are not needed for embeddings.
        return base.model if hasattr(base, "lm_head") and hasattr(base, "model") else base

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        batches: Sequence[dict[str, Any]] | None = None,
        pool_tokens: Mapping[str, int | TokenPooling] | None = None,
        completion_start: torch.Tensor | int | None = None,
        labels: torch.Tensor | None = None,
        run_backbone: torch.nn.Module | None = None,
        **backbone_inputs,
    ) -> EmbeddingOutput:
        """Embed one processed batch, or several (`batches=[enc_query, enc_target, ...]`) in ONE call.

        Several sides in one call matter under DDP: every forward of a DDP module re-arms its reducer, so a query
        forward and a target forward followed by one backward mark shared parameters ready twice (and break
        `find_unused_parameters`). One call that embeds every side keeps DDP to one forward per backward.

        Args:
            pool_tokens: extra embeddings read off the same forward, ``{name: token id or TokenPooling}`` (UME-R1:
                ``{"disc": TokenPooling(disc_id, "prompt"), "gen": TokenPooling(gen_id, "completion")}``); they come
                back in ``named_embeddings``.
            completion_start: (batch,) or a scalar: the first position of the completion (the assistant turn) of
                each row; needed by ``"prompt"`` / ``"completion"`` regions.
            labels: (batch, seq) token ids, ``-100`` where no loss applies: the language-model head's cross-entropy
                on the next-token predictions (generative backbones, ``encoder_kind="generative"``), computed only at
                supervised positions and in chunks of tokens, so the vocabulary-sized logits of a whole batch never
                exist at once.
            run_backbone: a module to run in place of the backbone, holding the same weights: the backbone as a
                trainer wraps it (TRL's policy under DDP, DeepSpeed or FSDP, whose wrappers gather or synchronise the
                weights only when called themselves). It is called as a generative backbone (all hidden states, one
                logit kept) and its last hidden state is pooled.
        """
        if batches is not None:
            outputs = tuple(self._embed(**enc) for enc in batches)
            return EmbeddingOutput(
                embeddings_per_batch=tuple(o.embeddings for o in outputs), outputs_per_batch=outputs
            )
        return self._embed(
            input_ids,
            attention_mask,
            output_hidden_states,
            pool_tokens=pool_tokens,
            completion_start=completion_start,
            labels=labels,
            run_backbone=run_backbone,
            **backbone_inputs,
        )

    def _embed(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        pool_tokens: Mapping[str, int | TokenPooling] | None = None,
        completion_start: torch.Tensor | int | None = None,
        labels: torch.Tensor | None = None,
        run_backbone: torch.nn.Module | None = None,
        **backbone_inputs,
    ) -> EmbeddingOutput:
        for key in METADATA_KEYS:
            backbone_inputs.pop(key, None)
        if attention_mask is None:
            raise ValueError("MultimodalEmbeddingModel needs an attention_mask to find the pooled position.")
        if labels is not None and self.lm_head is None:
            raise ValueError(
                "labels were given, but this model has no language-model head: load the backbone with "
                "encoder_kind='generative' (MultimodalEmbeddingModel.from_pretrained(..., encoder_kind='generative'))."
            )
        if self.config.sequential_positions and backbone_inputs.get("position_ids") is None:
            # 0, 1, 2, ... over each row's real tokens (left padding skipped), images included (see the config)
            backbone_inputs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if self._blank_image is not None:
            self._blank_image.arm(backbone_inputs)
        try:
            if run_backbone is None:
                hidden = self._hidden_state_module()(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True,
                    **backbone_inputs,
                ).last_hidden_state
            else:  # the generative backbone's last hidden state, its vocabulary-sized logits at one position only
                hidden = run_backbone(
                    input_ids=input_ids, attention_mask=attention_mask, use_cache=False, return_dict=True,
                    output_hidden_states=True, logits_to_keep=1, **backbone_inputs,
                ).hidden_states[-1]
        finally:
            if self._blank_image is not None:
                self._blank_image.arm(None)
        token_found = None
        if self.config.pooling == "special_token":
            _, token_found = special_token_indices(input_ids, self.config.pooling_token_id, attention_mask)
        pooled = pool(
            hidden,
            attention_mask,
            mode=self.config.pooling,
            input_ids=input_ids,
            token_id=self.config.pooling_token_id,
        )
        embeddings = self._finalize(pooled)
        named, named_found = None, None
        if pool_tokens:
            named, named_found = {}, {}
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            for name, spec in pool_tokens.items():
                spec = spec if isinstance(spec, TokenPooling) else TokenPooling(int(spec))
                region = _region_mask(attention_mask, spec.region, completion_start)
                index, named_found[name] = special_token_indices(input_ids, spec.token_id, region)
                named[name] = self._finalize(hidden[rows, index])
        loss = loss_sum = num_tokens = None
        if labels is not None:
            loss_sum, num_tokens = self._lm_loss_sum(hidden, labels)
            loss = loss_sum / num_tokens.clamp_min(1)
        return EmbeddingOutput(
            loss=loss,
            embeddings=embeddings,
            last_hidden_state=hidden if output_hidden_states else None,
            token_found=token_found,
            named_embeddings=named,
            named_token_found=named_found,
            lm_loss_sum=loss_sum,
            lm_num_tokens=num_tokens,
        )

    def _finalize(self, pooled: torch.Tensor) -> torch.Tensor:
        return finalize_embeddings(pooled, dim=self.config.embedding_dim, normalize=self.config.normalize)

    @property
    def lm_head(self) -> torch.nn.Module | None:
        """The backbone's language-model head (generative backbones), else None."""
        return getattr(self.backbone, "lm_head", None)

    def _lm_loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed next-token cross-entropy at the supervised positions, their count), float32.

        Only supervised positions go through the head, in chunks of LM_LOSS_CHUNK_TOKENS tokens under activation
        checkpointing when grad is on: a chunk's logits (tokens x vocabulary) are recomputed in backward instead of
        kept, so memory stays at one chunk of logits however long the completions are.
        """
        targets = labels[:, 1:]
        supervised = targets != -100
        states = hidden[:, :-1][supervised]  # the position before each supervised token predicts it
        targets = targets[supervised]
        num_tokens = supervised.sum()
        head = self.lm_head
        if states.shape[0] == 0:
            return hidden.sum() * 0.0, num_tokens  # keeps the graph connected (every rank runs the same backward)
        checkpointed = torch.is_grad_enabled() and states.requires_grad
        pieces = []
        for chunk, chunk_targets in zip(states.split(LM_LOSS_CHUNK_TOKENS), targets.split(LM_LOSS_CHUNK_TOKENS)):
            if checkpointed:
                pieces.append(checkpoint(_token_ce_sum, head, chunk, chunk_targets, use_reentrant=False))
            else:
                pieces.append(_token_ce_sum(head, chunk, chunk_targets))
        return torch.stack(pieces).sum(), num_tokens

    # ------------------------------------------------------------------ inference
    def make_collator(self, **kwargs):
        """The collator `encode` uses: this model's processor and prompt template."""
        from ..data.collators import EmbeddingCollator

        if self.processor is None:
            raise ValueError(
                "This model has no processor attached: load it with from_pretrained (which loads the processor "
                "saved next to the weights) or call model.set_processor(AutoProcessor.from_pretrained(...))."
            )
        kwargs.setdefault("template", self.config.prompt_template)
        return EmbeddingCollator(self.processor, **kwargs)

    @torch.no_grad()
    def encode(
        self,
        inputs: Sequence[Any] | Any,
        *,
        side: str = "query",
        instruction: str | None = None,
        mode: str = "discriminative",
        batch_size: int = 16,
        show_progress_bar: bool | None = None,
        image_root: str | os.PathLike | None = None,
        max_length: int | None = None,
        convert_to_numpy: bool = False,
        max_new_tokens: int = UME_R1_MAX_NEW_TOKENS,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 50,
        min_p: float | None = None,
        num_samples: int = 1,
        missing_token: str = "last_token",
        return_reasoning: bool = False,
        generate_fn=None,
        generation_kwargs: dict[str, Any] | None = None,
    ):
        """Embed texts, images, (image, text) pairs or {"text", "image", "video"} dicts; returns a (N, D) float32 CPU
        tensor.

        `side` picks the prompt side of the template ("query" or "document"); `instruction` replaces that side's
        instruction for every input (a task instruction: the system message of Qwen3-VL-Embedding and GME, a text
        prefix for the other templates). Images may be PIL images, paths (relative to `image_root`) or
        `datasets.Image` values, and a list of them (several images in one input); a video is a video file, a folder
        of frames or a list of frames, sampled as the processor is set to
        (:func:`mm_embed_trl.data.videos.set_video_options`). A progress bar shows for more than 8 batches unless
        `show_progress_bar` says otherwise.

        Models trained for UME-R1 (``config.generative_pooling_token`` set) have three modes:

        * ``"discriminative"`` (default): one forward, the state at ``<disc_emb>`` (the configured pooling);
        * ``"generative"``: batched generation of a reasoning, then one prefill forward reading the state at the last
          ``<gen_emb>`` the completion wrote (see :mod:`mm_embed_trl.modeling.generative`); ``missing_token``
          (``"last_token"``, ``"discriminative"``, ``"zero"``, ``"error"``) decides for completions that never write
          it, and a warning counts them. Greedy by default. ``do_sample`` samples with ``temperature``, ``top_p``,
          ``top_k`` (transformers' default 50, as in UME-R1's RL rollouts; 0: the whole vocabulary) and ``min_p``
          alone, never with the sampling defaults of the backbone's generation config; ``num_samples=k`` draws k
          completions per input (pass@k): the result is then (N, k, D). ``return_reasoning=True`` also returns the
          generated texts (a list, of lists with ``num_samples > 1``); ``generate_fn`` replaces the generation phase
          (e.g. vLLM).
        * ``"both"``: ``{"discriminative": ..., "generative": ...}`` from the same generation and forward.
        """
        from tqdm.auto import tqdm

        from ..data.inputs import to_embedding_input
        from .generative import MODES, apply_missing_token_policy, encode_generative_batch, sampling_settings

        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, Integral) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r}: encode needs a positive whole number of inputs per batch.")
        if num_samples < 1 or (num_samples > 1 and not do_sample):
            raise ValueError(f"num_samples={num_samples} needs do_sample=True (greedy decoding gives one completion).")
        single = not isinstance(inputs, (list, tuple)) or (
            isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], str)
        )
        if single:
            inputs = [inputs]
        items = [
            to_embedding_input(x, index=i, image_root=image_root, processor=self.processor)
            for i, x in enumerate(inputs)
        ]
        collator = self.make_collator(max_length=max_length)
        batches = range(0, len(items), batch_size)
        if show_progress_bar is None:
            show_progress_bar = len(batches) > 8 or (mode != "discriminative" and len(batches) > 1)
        gen_kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False)
        if do_sample and mode != "discriminative":
            gen_kwargs.update(sampling_settings(self, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p))
        gen_kwargs.update(generation_kwargs or {})
        was_training = self.training
        self.eval()
        disc_chunks: list[torch.Tensor] = []
        gen_chunks: list[torch.Tensor] = []
        completions: list[list[int]] = []
        missing = cut_short = 0
        try:
            for start in tqdm(batches, desc="Encoding", disable=not show_progress_bar):
                enc = collator.encode_inputs(items[start : start + batch_size], side=side, instruction=instruction)
                enc = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in enc.items()}
                if mode == "discriminative":
                    disc_chunks.append(self(**enc).embeddings.float().cpu())
                    continue
                if num_samples > 1:  # k copies of each prompt, adjacent: row i*k + j is sample j of input i
                    enc = _repeat_rows(enc, num_samples)
                result = encode_generative_batch(self, enc, generation_kwargs=gen_kwargs, generate_fn=generate_fn)
                missing += int((~result.found).sum())
                cut_short += int(result.cut_short.sum())
                gen_chunks.append(apply_missing_token_policy(result, missing_token).float().cpu())
                disc_chunks.append(result.discriminative.float().cpu())
                completions += result.completion_ids
        finally:
            self.train(was_training)
        if cut_short:
            logger.warning(
                "%d of %d generated completions reached max_new_tokens=%s before ending: their reasoning was cut "
                "short (UME-R1 evaluates with up to %d new tokens).",
                cut_short, len(completions), gen_kwargs.get("max_new_tokens"), UME_R1_MAX_NEW_TOKENS,
            )
        if missing:
            logger.warning(
                "%d of %d generated completions never wrote %s; their generative embedding follows "
                "missing_token=%r. Raise max_new_tokens, or check that the model was trained to end with it.",
                missing, len(completions), self.config.generative_pooling_token, missing_token,
            )

        def finish(tensor: torch.Tensor):
            tensor = tensor[0] if single else tensor
            return tensor.numpy() if convert_to_numpy else tensor

        empty = torch.empty(0, self.embedding_size)
        disc = torch.cat(disc_chunks) if disc_chunks else empty
        gen = torch.cat(gen_chunks) if gen_chunks else empty
        degenerate = count_degenerate_rows(disc) + count_degenerate_rows(gen)
        if degenerate:
            logger.warning(
                "encode: %d of %d embeddings are zero or non-finite (NaN/inf) vectors: the weights are degenerate "
                "(e.g. a diverged training run); use an earlier checkpoint.",
                degenerate,
                len(disc) + len(gen),
            )
        if mode == "discriminative":
            return finish(disc)
        if num_samples > 1:  # one discriminative embedding per input; k generative ones
            disc, gen = disc[::num_samples], gen.view(-1, num_samples, gen.shape[-1])
        result = {"discriminative": finish(disc), "generative": finish(gen)} if mode == "both" else finish(gen)
        if not return_reasoning:
            return result
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        if num_samples > 1:
            texts = [texts[i : i + num_samples] for i in range(0, len(texts), num_samples)]
        return result, (texts[0] if single else texts)

    @property
    def embedding_size(self) -> int:
        return self.config.embedding_dim or self.config.hidden_size


def _repeat_rows(enc: dict[str, Any], times: int) -> dict[str, Any]:
    """Each row of a processed batch ``times`` times in a row (images and their grids with it)."""
    from ..data.collators import split_batch

    rows = split_batch(enc, 1)
    repeated = [row for row in rows for _ in range(times)]
    out = {}
    for key, value in enc.items():
        if not torch.is_tensor(value):
            out[key] = value
            continue
        pieces = [r[key] for r in repeated if key in r]
        out[key] = torch.cat(pieces) if pieces else value
    return out


class BlankImageHook:
    """Runs a vision-language backbone's vision tower in forwards without images, on a tiny blank image whose output
    joins the language model's input embeddings times 0: results are unchanged, every rank runs the same modules.

    Backbones that take videos run the tower once for a batch's images and once for its videos, so a forward without
    videos also gets a blank two-frame video: a rank with images and videos, one with videos only and one with text
    only all run the tower twice.

    The blank image runs where real images do, between the token embedding and the language model (a forward
    pre-hook on ``inner.language_model``), so the backward visits the modules in the same order too and a trainable
    vision tower gets an explicit zero gradient. A forward arms it with :meth:`arm` (MultimodalEmbeddingModel's
    forward does), or :meth:`hook_top_level` arms it for every prefill call of a module without ``pixel_values``
    (not for cached decoding steps).

    Args:
        inner: the module with ``get_image_features`` and ``language_model`` (e.g. ``Qwen2VLModel``).
        processor: the backbone's processor (its image processor encodes the blank image once).
    """

    def __init__(self, inner, processor):
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is None or not hasattr(inner, "language_model"):
            raise ValueError(
                "Running the vision tower in every forward needs the backbone's processor (with an image processor) "
                f"and a backbone with a `language_model` ({type(inner).__name__})."
            )
        from PIL import Image

        accepted = inspect.signature(inner.get_image_features).parameters
        encoded = image_processor(images=[Image.new("RGB", (64, 64))], return_tensors="pt")
        self.inputs = {k: v for k, v in encoded.items() if k in accepted and torch.is_tensor(v)}
        self.video_inputs = None
        video_processor = getattr(processor, "video_processor", None)
        if video_processor is not None and hasattr(inner, "get_video_features"):
            accepted = inspect.signature(inner.get_video_features).parameters
            blank = [Image.new("RGB", (64, 64))] * 2
            encoded = video_processor(videos=[blank], return_tensors="pt", do_sample_frames=False)
            self.video_inputs = {k: v for k, v in encoded.items() if k in accepted and torch.is_tensor(v)}
        self.inner = inner
        self.pending = False
        self.pending_video = False
        self._top_level: set[int] = set()
        inner.language_model.register_forward_pre_hook(self._add_blank_image_features, with_kwargs=True)

    def hook_top_level(self, module) -> None:
        """Arm the hook in each prefill forward of ``module`` (the backbone, or a reference copy's) without images."""
        if id(module) not in self._top_level:
            self._top_level.add(id(module))
            module.register_forward_pre_hook(self._arm, with_kwargs=True)

    def _arm(self, module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # transformers 5 names it `cache`
        prefill = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        self.arm(kwargs if prefill else None)
        return None

    def arm(self, inputs: Mapping[str, Any] | None) -> None:
        """Arm for one forward over ``inputs`` (None: disarm): blank inputs for what it lacks."""
        self.pending = inputs is not None and inputs.get("pixel_values") is None
        self.pending_video = (
            inputs is not None and self.video_inputs is not None and inputs.get("pixel_values_videos") is None
        )

    def _add_blank_image_features(self, module, args, kwargs):
        embeds = kwargs.get("inputs_embeds")
        if not (self.pending or self.pending_video) or embeds is None:
            return None
        zero = embeds.new_zeros(())
        if self.pending:
            zero = zero + self._blank_features(self.inner.get_image_features, self.inputs, embeds.device)
        if self.pending_video:
            zero = zero + self._blank_features(self.inner.get_video_features, self.video_inputs, embeds.device)
        self.pending = self.pending_video = False
        return args, {**kwargs, "inputs_embeds": embeds + zero.to(embeds.dtype)}

    @staticmethod
    def _blank_features(get_features, inputs, device) -> torch.Tensor:
        features = get_features(**{k: v.to(device) for k, v in inputs.items()}, return_dict=True)
        # Exactly the outputs the backbone consumes for real images: each module output that receives a gradient
        # triggers ZeRO-3's pre-backward fetch, so using more (e.g. last_hidden_state) would change the order.
        used = (features.pooler_output, getattr(features, "deepstack_features", None))
        return sum(t.float().sum() for t in iter_tensors(used) if t.is_floating_point()) * 0.0


def count_degenerate_rows(embeddings: torch.Tensor) -> int:
    """Rows of a (N, D) embedding matrix that are unusable: any NaN/inf, or a (numerically) zero vector."""
    if embeddings.numel() == 0:
        return 0
    rows = embeddings.reshape(len(embeddings), -1).float()
    # 1e-12: far below any real embedding's norm (1 when normalised), above what underflow leaves of a zero vector
    bad = ~torch.isfinite(rows).all(dim=-1) | (rows.norm(dim=-1) < 1e-12)
    return int(bad.sum())


def load_processor_for(name_or_path, **kwargs):
    """The processor of a backbone (AutoProcessor, falling back to AutoTokenizer); None when there is none."""
    from transformers import AutoProcessor, AutoTokenizer

    for loader in (AutoProcessor, AutoTokenizer):
        try:
            processor = loader.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError, TypeError, KeyError) as err:
            logger.debug("%s could not load from %s: %s", loader.__name__, name_or_path, err)
            continue
        return processor
    logger.warning(
        "No processor or tokenizer found at %s; call model.set_processor(...) before encode().", name_or_path
    )
    return None


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModel` resolve `model_type="mm_embedding"` in this process."""
    try:
        AutoConfig.register(MultimodalEmbeddingConfig.model_type, MultimodalEmbeddingConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModel.register(MultimodalEmbeddingConfig, MultimodalEmbeddingModel)
    except ValueError:
        pass

