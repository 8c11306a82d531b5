"""The end-of-run save of a training run: the model, its sentence-transformers export(s), the card and the export info,
written to a staging folder and published in one rename (the run's checkpoints and reports are kept)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._files import make_staging_dir, publish_dir, staged_dir

if TYPE_CHECKING:  # heavy imports stay lazy: `import mm_embed_trl.export` must be cheap
    from ..modeling import MultimodalEmbeddingModel

from .sentence_transformers import (
    EXPORT_INFO_FILE,
    ST_GENERATIVE_SUBDIR,
    ST_SUBDIR,
    describe_export,
    export_sentence_transformers,
)

logger = logging.getLogger(__name__)

__all__ = ["is_run_state", "save_model_files", "save_model_for_inference", "write_inference_extras"]


def save_model_files(model: MultimodalEmbeddingModel, output_dir: pathlib.Path) -> None:
    """``model.save_pretrained(output_dir)``, written to a staging folder and renamed in file by file.

    Why: the model may have been loaded from ``output_dir`` itself (a trainer reloading its final save), and its
    tensors may still be memory-mapped from those files; truncating them in place would corrupt the model. A rename
    replaces the directory entry while the old, mapped file lives on until it is released. Other files already in
    ``output_dir`` (trainer state, reports) are kept.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output_dir / "model", tag="save")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        written = {p.name for p in staging.iterdir()}
        if any(name.endswith(".safetensors") for name in written):
            # A previous save may have used other shard names: stale shards would confuse the index.
            for old in output_dir.glob("model*.safetensors"):
                if old.name not in written:
                    old.unlink()
        for path in staging.iterdir():
            target = output_dir / path.name
            if target.is_dir() and path.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# What a final save writes (or an earlier one may have written): a new save replaces all of it, so an old model's
# weights, card or export never sit beside the new config. Everything else in the folder (checkpoint-*, trainer
# state, reports, logs) is the run's and is kept. Hidden entries are staging leftovers of this package.
_MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*",
    "adapter_*",
    "README.md",
    EXPORT_INFO_FILE,
    ST_SUBDIR,
    ST_GENERATIVE_SUBDIR,
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*processor_config.json",
    "preprocessor_config.json",
    "chat_template.*",
    "*.model",
    ".*",
)


def is_run_state(name: str) -> bool:
    """Whether the entry ``name`` of a run folder survives a new final save (see ``_MODEL_FILE_PATTERNS``)."""
    return not any(fnmatch.fnmatch(name, pattern) for pattern in _MODEL_FILE_PATTERNS)


def write_inference_extras(
    model: MultimodalEmbeddingModel,
    directory: pathlib.Path,
    *,
    published_as: pathlib.Path,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
    video_inputs: bool = False,
) -> None:
    """Next to the model saved in ``directory`` (a staging folder that will be published as ``published_as``, the
    path the cards' snippets name): its sentence-transformers export in ``ST_SUBDIR``, the model card and the
    export info. A UME-R1 model (a generative pooling token and an LM head) also gets its generative export in
    ``ST_GENERATIVE_SUBDIR`` (a custom module: ``trust_remote_code=True``), with ``generation`` as its settings.
    ``video_inputs`` as in :func:`~mm_embed_trl.export.sentence_transformers.export_sentence_transformers`."""
    from .model_card import card_for_export, collect_card_metadata, split_card_data

    # One collection serves both cards (the export's and the folder's): they differ only in the path they name.
    collect_args, overrides = split_card_data(model_card_data)
    metadata = collect_card_metadata(
        model, **collect_args, export_info=describe_export(model, prompts, default_prompt_name, video_inputs)
    )
    export_sentence_transformers(
        model,
        directory / ST_SUBDIR,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        model_card_data={"model_reference": str(published_as / ST_SUBDIR), **overrides},
        overwrite=True,
        card_metadata=metadata,
        video_inputs=video_inputs,
    )
    card, reference = card_for_export(metadata, overrides, published_as, sentence_transformers_subdir=ST_SUBDIR)
    (directory / "README.md").write_text(card, encoding="utf-8")
    root_info = {
        "format": "mm_embed_trl.mm_embedding",
        "sentence_transformers_subdir": ST_SUBDIR,
        **_write_generative_export(model, directory, generation),
        "card_model_reference": reference,
    }
    (directory / EXPORT_INFO_FILE).write_text(json.dumps(root_info, indent=2, sort_keys=True) + "\n")


def _write_generative_export(model, directory: pathlib.Path, generation) -> dict[str, str]:
    if model.config.generative_pooling_token is None or model.lm_head is None:
        return {}
    from .generative import export_generative_sentence_transformers

    target = directory / ST_GENERATIVE_SUBDIR
    export_generative_sentence_transformers(model, target, generation=generation, overwrite=True)
    return {"sentence_transformers_generative_subdir": ST_GENERATIVE_SUBDIR}


def save_model_for_inference(
    model: MultimodalEmbeddingModel,
    output_dir: str | os.PathLike,
    *,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    merge_lora: bool = False,
) -> pathlib.Path:
    """Write the final artefacts of a training run: the model itself and a sentence-transformers export.

    ``output_dir`` receives ``model.save_pretrained`` (loadable with ``MultimodalEmbeddingModel.from_pretrained``) and
    ``output_dir/sentence_transformers/`` the export of :func:`export_sentence_transformers` (loadable with
    ``SentenceTransformer`` and plain transformers). The model card (README.md) is written to both.

    Everything is written to a staging folder beside ``output_dir`` and published in one rename: a kill at any point
    leaves the previous model or the new one, never a mix. The rest of ``output_dir`` (checkpoints, trainer state,
    reports) is kept.

    Args:
        merge_lora: merge LoRA adapters into ``model`` in place first (no extra copy of the weights in memory; the
            model is modified). Otherwise the adapters are saved as they are and the export merges a copy.
    """
    from ..modeling import MultimodalEmbeddingModel

    if not isinstance(model, MultimodalEmbeddingModel):
        raise TypeError(f"save_model_for_inference expects a MultimodalEmbeddingModel, got {type(model).__name__}.")
    if model.processor is None:
        raise ValueError(
            "The model has no processor attached; call model.set_processor(AutoProcessor.from_pretrained(base)) "
            "before saving, or the saved model cannot encode."
        )
    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    if merge_lora and model.has_lora:
        model.merge_lora()
    with staged_dir(output_dir, what="the final model") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        write_inference_extras(
            model,
            staging,
            published_as=output_dir,
            prompts=prompts,
            default_prompt_name=default_prompt_name,
            model_card_data=model_card_data,
        )
        publish_dir(staging, output_dir, keep_existing=is_run_state)
    return output_dir
