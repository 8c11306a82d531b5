"""What `MultimodalEmbeddingModel.from_pretrained` asks of the presets when it wraps a backbone: which preset applies,
its options under the caller's, the release's own loading (adapter repositories), the processor's pixel budget, and
the errors that name the fix (remote code, a backbone family the installed transformers lacks)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Any

from .registry import (
    FAMILY_RELEASES,
    REMOTE_CODE_MODELS,
    CheckpointFacts,
    Preset,
    _read_json,
    find_preset,
    get_preset,
)

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO",
    "PRESET_LOAD_OPTIONS",
    "apply_pixel_budget",
    "load_adapter_backbone",
    "raise_for_unloadable",
    "resolve_preset",
    "warn_assumed_defaults",
]

# `preset=AUTO` (the default): find the preset by hub id / fingerprint. `preset=None` wraps a plain backbone.
AUTO = "auto"
# Loading options of `from_pretrained` that belong to the preset machinery (not transformers, not the config).
PRESET_LOAD_OPTIONS = ("preset", "image_min_pixels", "image_max_pixels", "base_model")
# What a backbone without preset is wrapped with, named in the warning (the config's defaults).
_ASSUMED_WHEN_NO_PRESET = ("prompt_template", "pooling", "normalize")


def _family_error(what: str, model_type: str) -> ValueError:
    import transformers

    added = FAMILY_RELEASES[model_type]
    since = f"it was added in transformers {added}: pip install -U 'transformers>={added}'"
    return ValueError(
        f"{what} uses the {model_type!r} backbone family, which the installed transformers {transformers.__version__} "
        f"does not have; {since}."
    )


def _family_installed(model_type: str) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return model_type in CONFIG_MAPPING


def raise_for_unloadable(name: str | os.PathLike, err: Exception, hub_kwargs: Mapping[str, Any]) -> None:
    """Turn a failed config load into the error that names the fix, when the cause is known: a model whose backbone
    is remote code (`trust_remote_code=True`, and why), or a preset / backbone family this transformers lacks."""
    name = os.fspath(name)
    why = REMOTE_CODE_MODELS.get(name.lower())
    if why is not None or "trust_remote_code" in str(err):
        reason = why or "its config asks for code from the repository (auto_map)"
        raise ValueError(
            f"{name!r} needs trust_remote_code=True: {reason}. MultimodalEmbeddingModel.from_pretrained({name!r}, "
            "trust_remote_code=True) runs that code on this machine, so read it first. No preset covers it: pass "
            "pooling= and prompt_template= for its format."
        ) from err
    try:
        preset = get_preset(name)
    except ValueError:
        preset = None
    model_type = preset.model_type if preset is not None else _read_json(name, "config.json", hub_kwargs).get(
        "model_type"
    )
    if model_type in FAMILY_RELEASES and not _family_installed(model_type):
        what = f"{name!r} ({preset.title}, preset {preset.name!r})" if preset is not None else repr(name)
        raise _family_error(what, model_type) from err


def resolve_preset(
    name: str | os.PathLike, config: Any, choice: str | Preset | None, hub_kwargs: Mapping[str, Any]
) -> tuple[Preset | None, str]:
    """(the preset to apply to the backbone ``name`` whose config is ``config``, how it was chosen).

    ``choice``: :data:`AUTO` finds it by hub id, repository name or fingerprint; a preset name (or hub id) forces
    it; ``None`` (or ``"none"``) applies none.
    """
    if choice is None or (isinstance(choice, str) and choice.lower() == "none"):
        return None, ""
    model_type = getattr(config, "model_type", None)
    if choice != AUTO:
        preset = get_preset(choice)
        if not _family_installed(preset.model_type):
            raise _family_error(f"The preset {preset.name!r} ({preset.title})", preset.model_type)
        if model_type != preset.model_type:
            raise ValueError(
                f"preset={preset.name!r} is for {preset.model_type} checkpoints ({preset.title}), but {name!r} is a "
                f"{model_type} model. Pick the preset of this model (python -m mm_embed_trl.presets --list) or "
                "preset=None."
            )
        missing = set(preset.added_tokens) - CheckpointFacts.read(name, config, **hub_kwargs).added_tokens
        if missing:
            raise ValueError(
                f"preset={preset.name!r} reads embeddings at {sorted(preset.added_tokens)}, but the tokenizer of "
                f"{name!r} lacks {sorted(missing)}: it is not a {preset.title} checkpoint. Train one from it "
                "(EmbeddingSFTTrainer adds the tokens) or choose another preset."
            )
        return preset, f"preset={preset.name!r}"
    preset, reason = find_preset(CheckpointFacts.read(name, config, **hub_kwargs))
    if preset is not None and model_type != preset.model_type:
        logger.warning(
            "%s matches the preset %r by %s, but it is a %s model, not %s as %s: the preset is not applied. Pass "
            "preset=... to choose one.", name, preset.name, reason, model_type, preset.model_type, preset.title,
        )
        return None, ""
    return preset, reason


def warn_assumed_defaults(name: str, options: Mapping[str, Any], defaults: Mapping[str, Any]) -> None:
    """A backbone without preset loads with the config's defaults: say which were assumed (those not passed)."""
    assumed = {key: defaults[key] for key in _ASSUMED_WHEN_NO_PRESET if key not in options}
    if assumed:
        logger.warning(
            "No preset for %s: wrapped as a plain backbone with %s (pass them to from_pretrained to change them). "
            "Published embedding models embed their own way: python -m mm_embed_trl.presets --list.",
            name, ", ".join(f"{k}={v!r}" for k, v in assumed.items()),
        )


def load_adapter_backbone(
    name: str, generative_cls, load_kwargs: dict[str, Any], *, base_model: str | None = None, bare: bool = False
):
    """A release published as a PEFT adapter: its base model (``adapter_config.json``'s, or ``base_model``) with the
    adapter loaded and merged, as VLM2Vec's loader does (``MMEBModel.load``: ``PeftModel.from_pretrained`` on the
    ``...ForConditionalGeneration`` it trained, ``merge_and_unload``). The adapter goes onto that generative class,
    whose parameter names its keys carry (PEFT maps keys saved by older transformers); ``bare`` returns its inner
    model without the LM head (``encoder_kind="base"``); ``None`` when ``name`` holds no adapter (a merged copy)."""
    from peft import PeftModel

    hub_kwargs = {k: load_kwargs[k] for k in ("revision", "token", "cache_dir") if k in load_kwargs}
    adapter_config = _read_json(name, "adapter_config.json", hub_kwargs)
    if not adapter_config:  # a merged copy of the release: its own weights
        return None
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"The adapter_config.json of {name!r} names no base model; pass base_model=<the base model's id or "
            "directory>."
        )
    generative = generative_cls.from_pretrained(base, **load_kwargs)
    peft_kwargs = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token")}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapping = _legacy_key_mapping(generative)
        adapted = PeftModel.from_pretrained(generative, name, key_mapping=mapping, **peft_kwargs)
    missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:  # PEFT only warns: an adapter that did not load would silently give the base model's vectors
        raise ValueError(
            f"The adapter of {name!r} does not fit {type(generative).__name__} of {base!r}: {missing[0][:300]}... "
            "Check base_model (the adapter's base) and the installed transformers."
        )
    merged = adapted.merge_and_unload()
    return merged.model if bare and hasattr(merged, "lm_head") else merged


def _legacy_key_mapping(model) -> dict[str, str]:
    """Regex renames from the parameter names of older transformers releases to this model's: adapters trained then
    (VLM2Vec's keys put Qwen2-VL's language model under ``model.``, transformers >= 4.52 under
    ``model.language_model.``) load like the checkpoint's own weights. Taken from transformers' own conversion
    mapping of the model's plain renames (PEFT applies the first pattern that matches each key)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # another transformers layout: nothing to rename, a missing key is then an error above
        return {}
    mapping = {}
    for transform in get_model_conversion_mapping(model):
        if type(transform) is WeightRenaming and len(transform.target_patterns) == 1:
            mapping.update(dict.fromkeys(transform.source_patterns, transform.target_patterns[0]))
    return mapping


def apply_pixel_budget(processor, preset: Preset | None, overrides: Mapping[str, int]) -> None:
    """Set the processor's pixel budget per image: the caller's ``image_min_pixels`` / ``image_max_pixels``, else
    the preset's (its authors' setting); unset bounds keep the processor's saved ones."""
    from ..data.images import set_image_pixel_budget

    min_pixels = overrides.get("image_min_pixels", preset.image_min_pixels if preset else None)
    max_pixels = overrides.get("image_max_pixels", preset.image_max_pixels if preset else None)
    if min_pixels is None and max_pixels is None:
        return
    set_image_pixel_budget(processor, max_pixels, min_pixels=min_pixels)
