"""What a preset is, the registry of them, and how a checkpoint is matched to one (hub id, then fingerprint)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FAMILY_RELEASES",
    "REMOTE_CODE_MODELS",
    "CheckpointFacts",
    "Preset",
    "available_presets",
    "find_preset",
    "get_preset",
    "register_preset",
]

# The transformers release that added each backbone family a preset needs (its model_type), for the error a user
# with an older transformers gets.
FAMILY_RELEASES: dict[str, str] = {
    "qwen2_vl": "4.45.0",
    "llava_onevision": "4.45.0",
    "qwen2_5_vl": "4.49.0",
    "qwen3_vl": "4.57.0",
}

# Published embedding models whose backbone exists only as code in their own repository (transformers has no class
# for it): loading them runs that code, so it needs `trust_remote_code=True`. {hub id (lower case): why}
REMOTE_CODE_MODELS: dict[str, str] = {
    "tiger-lab/vlm2vec-full": "its Phi-3.5-V backbone (model_type phi3_v) is defined by modeling_phi3_v.py in the "
    "repository; transformers has no phi3_v class",
    "deepglint-ai/unime-phi3.5-v-4.2b": "its Phi-3.5-V backbone (model_type phi3_v) is defined by the code of "
    "microsoft/Phi-3.5-vision-instruct; transformers has no phi3_v class",
}


@dataclass(frozen=True)
class Preset:
    """How a published embedding model embeds, as its authors' encode code does it (docs/PRESETS.md cites the code).

    Attributes:
        name: the preset's name (``--preset``, ``config.preset``).
        title: the release as its authors name it.
        hub_ids: the Hub repositories it applies to.
        model_type: the backbone family (``config.model_type``) the checkpoints use.
        prompt_template: the registered prompt template (:mod:`mm_embed_trl.data.templates`) with their format.
        pooling, pooling_token, generative_pooling_token, encoder_kind, normalize, embedding_dim,
            sequential_positions: the wrapper options (:class:`~mm_embed_trl.modeling.MultimodalEmbeddingConfig`).
        matryoshka_min_dim: trained with Matryoshka representation learning: any ``embedding_dim`` from this size up
            to the hidden size keeps the model's quality (``None``: the full size only).
        image_min_pixels / image_max_pixels: the pixel budget per image their code gives the processor; ``None``
            keeps the checkpoint's saved setting.
        dtype: the dtype their code runs the model in (transformers loads the checkpoint's saved dtype by default).
        added_tokens: tokens the checkpoint's tokenizer holds beyond the base model's (a fingerprint, and checked).
        marker_files: files only this release ships (a fingerprint for local copies).
        adapter: the repository holds a PEFT adapter over the base model its ``adapter_config.json`` names; it is
            loaded onto that base and merged, as the authors' loader does.
        verified: ``False`` when no public encode code of the release was readable: the settings are assumed (a
            warning says so at load).
        source: the files (and lines) the settings were read from.
    """

    name: str
    title: str
    hub_ids: tuple[str, ...]
    model_type: str
    prompt_template: str
    pooling: str = "last_token"
    pooling_token: str | None = None
    generative_pooling_token: str | None = None
    encoder_kind: str = "base"
    normalize: bool = True
    embedding_dim: int | None = None
    sequential_positions: bool = False
    matryoshka_min_dim: int | None = None
    image_min_pixels: int | None = None
    image_max_pixels: int | None = None
    dtype: str = "bfloat16"
    added_tokens: tuple[str, ...] = ()
    marker_files: tuple[str, ...] = ()
    adapter: bool = False
    verified: bool = True
    source: str = ""
    notes: str = field(default="", compare=False)

    def wrapper_options(self) -> dict[str, Any]:
        """The :class:`~mm_embed_trl.modeling.MultimodalEmbeddingConfig` options this preset sets."""
        options = {
            "encoder_kind": self.encoder_kind,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "prompt_template": self.prompt_template,
        }
        if self.sequential_positions:
            options["sequential_positions"] = True
        for key in ("pooling_token", "generative_pooling_token", "embedding_dim"):
            if getattr(self, key) is not None:
                options[key] = getattr(self, key)
        return options

    @property
    def repo_names(self) -> tuple[str, ...]:
        """The repositories' names without owner (what ``hf download --local-dir models/<name>`` creates)."""
        return tuple(hub_id.rsplit("/", 1)[-1].lower() for hub_id in self.hub_ids)


_PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset, *, overwrite: bool = False) -> None:
    """Make ``preset`` known by its name and hub ids."""
    if preset.name in _PRESETS and not overwrite:
        raise ValueError(f"A preset named {preset.name!r} is already registered; pass overwrite=True to replace it.")
    taken = {hub_id.lower(): p.name for p in _PRESETS.values() if p.name != preset.name for hub_id in p.hub_ids}
    clashes = [hub_id for hub_id in preset.hub_ids if hub_id.lower() in taken]
    if clashes:
        raise ValueError(f"Preset {preset.name!r}: hub ids {clashes} already belong to {taken[clashes[0].lower()]!r}.")
    _PRESETS[preset.name] = preset


def available_presets() -> list[Preset]:
    """Every registered preset, in registration order."""
    return list(_PRESETS.values())


def get_preset(name: str | Preset) -> Preset:
    """The preset called ``name`` (or serving the hub id ``name``)."""
    if isinstance(name, Preset):
        return name
    if name in _PRESETS:
        return _PRESETS[name]
    for preset in _PRESETS.values():
        if name.lower() in (hub_id.lower() for hub_id in preset.hub_ids):
            return preset
    raise ValueError(
        f"Unknown preset {name!r}. Known presets: {', '.join(_PRESETS)} (python -m mm_embed_trl.presets --list); "
        "preset=None wraps the checkpoint as a plain backbone."
    )


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint says about itself, read from its files without loading weights."""

    name: str
    model_type: str | None = None
    name_or_path: str | None = None
    added_tokens: frozenset[str] = frozenset()
    files: frozenset[str] = frozenset()

    @classmethod
    def read(cls, name: str | os.PathLike, config: Any = None, **hub_kwargs) -> CheckpointFacts:
        """Facts of a hub id or directory; ``config`` is its already loaded config (read again when None)."""
        name = os.fspath(name)
        path = pathlib.Path(name).expanduser()
        files = frozenset(p.name for p in path.iterdir()) if path.is_dir() else frozenset()
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        if not config_dict:
            config_dict = _read_json(name, "config.json", hub_kwargs)
        # Added tokens live in added_tokens.json / tokenizer_config.json (older transformers) or tokenizer.json; read
        # only for a family some preset recognises by its tokens (tokenizer.json runs to megabytes).
        tokens: set[str] = set()
        if config_dict.get("model_type") in {p.model_type for p in _PRESETS.values() if p.added_tokens}:
            tokens.update(_read_json(name, "added_tokens.json", hub_kwargs))
            decoder = _read_json(name, "tokenizer_config.json", hub_kwargs).get("added_tokens_decoder", {})
            tokens.update(entry.get("content") for entry in decoder.values() if isinstance(entry, Mapping))
            if not tokens:
                listed = _read_json(name, "tokenizer.json", hub_kwargs).get("added_tokens", [])
                tokens.update(entry.get("content") for entry in listed if isinstance(entry, Mapping))
        return cls(
            name=name,
            model_type=config_dict.get("model_type"),
            name_or_path=config_dict.get("_name_or_path") or None,
            added_tokens=frozenset(t for t in tokens if t),
            files=files,
        )


def _read_json(name: str, filename: str, hub_kwargs: Mapping[str, Any]) -> dict:
    """``filename`` of a directory or hub repository as a dict; ``{}`` when it has none (or cannot be read)."""
    path = pathlib.Path(name).expanduser()
    if path.is_dir():
        target = path / filename
        resolved = str(target) if target.is_file() else None
    else:
        from transformers.utils import cached_file

        try:
            resolved = cached_file(
                name,
                filename,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
                **{k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir")},
            )
        except (OSError, ValueError):
            resolved = None
    if resolved is None:
        return {}
    try:
        data = json.loads(pathlib.Path(resolved).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _matches_by_name(preset: Preset, facts: CheckpointFacts) -> str | None:
    for candidate in (facts.name, facts.name_or_path):
        if not candidate:
            continue
        if candidate.lower() in (hub_id.lower() for hub_id in preset.hub_ids):
            return f"hub id {candidate!r}"
        base = pathlib.PurePath(candidate.rstrip("/\\")).name.lower()
        if base in preset.repo_names:
            return f"directory name {base!r} (a local copy of {preset.hub_ids[preset.repo_names.index(base)]})"
    return None


def _matches_by_fingerprint(preset: Preset, facts: CheckpointFacts) -> str | None:
    """A fork or local copy: the same backbone family with the release's own tokens or files."""
    if not (preset.added_tokens or preset.marker_files) or facts.model_type != preset.model_type:
        return None
    if not set(preset.added_tokens) <= facts.added_tokens:
        return None
    if preset.marker_files and not set(preset.marker_files) & facts.files:
        return None
    held = [*preset.added_tokens, *sorted(set(preset.marker_files) & facts.files)]
    return f"fingerprint ({facts.model_type} with {', '.join(held)})"


def find_preset(facts: CheckpointFacts, presets: Iterable[Preset] | None = None) -> tuple[Preset | None, str]:
    """(the preset for a checkpoint, how it was recognised): by hub id or repository name first, then by
    fingerprint; ``(None, "")`` when none applies."""
    presets = list(presets if presets is not None else _PRESETS.values())
    for match in (_matches_by_name, _matches_by_fingerprint):
        for preset in presets:
            reason = match(preset, facts)
            if reason:
                return preset, reason
    return None, ""
