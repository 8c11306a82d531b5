"""Reading back a sentence-transformers export this library wrote (`export_sentence_transformers`,
`examples/export.py`): its info file, the wrapper options it recorded and the backbone's own chat template inside the
export's. `MultimodalEmbeddingModel.from_pretrained` uses it to rebuild the model an export was made from; the writer
lives in :mod:`mm_embed_trl.export.sentence_transformers`, above this (it imports the info file's name from here)."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "EXPORT_INFO_FILE",
    "LOAD_TRAINED_HINT",
    "read_export_info",
    "recorded_wrapper_options",
    "restore_backbone_chat_template",
]

# The export's record of how it was made (format, prompts, pooling, ...), beside the sentence-transformers files.
EXPORT_INFO_FILE = "mm_embed_trl_export.json"
LOAD_TRAINED_HINT = (
    "Load the output_dir of the training run (the MultimodalEmbeddingModel the export was made from) instead."
)
# What an export records of the wrapper (`describe_export`), given back to it when it is rebuilt. The rest of the
# record is not a wrapper option of the rebuilt model: `encoder_kind` is the trained model's (the export holds the
# bare backbone, rebuilt with encoder_kind="base"), `text_only_image_size` follows from the prompt template, `prompts`
# go back into the chat template (`restore_backbone_chat_template`), and `default_prompt_name`, `takes_video`,
# `video_inputs` describe the sentence-transformers side only.
RECORDED_WRAPPER_OPTIONS = (
    "prompt_template", "pooling", "pooling_token", "normalize", "embedding_dim", "sequential_positions"
)
# Options recorded only by later versions of the writer, with the value an export that lacks them was made with.
_RECORDED_LATER = {"sequential_positions": False}


def read_export_info(name_or_path: str | os.PathLike, **hub_kwargs) -> dict[str, Any] | None:
    """The :data:`EXPORT_INFO_FILE` of a sentence-transformers export this library wrote (a folder or a Hub repo),
    or None for anything else (a saved model, a backbone, another sentence-transformers model)."""
    from transformers.utils import cached_file

    try:
        found = cached_file(
            str(name_or_path), EXPORT_INFO_FILE, _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **{k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir")},
        )
    except OSError:  # e.g. not a folder and not a valid repo id
        return None
    if found is None:
        return None
    info = json.loads(pathlib.Path(found).read_text())
    return info if str(info.get("format", "")).startswith("mm_embed_trl.sentence_transformers") else None


def recorded_wrapper_options(info: Mapping[str, Any]) -> dict[str, Any]:
    """The wrapper options ``info`` (an export's :data:`EXPORT_INFO_FILE`) records, to rebuild the model with."""
    return {
        key: info.get(key, _RECORDED_LATER[key]) if key in _RECORDED_LATER else info[key]
        for key in RECORDED_WRAPPER_OPTIONS
    }


def restore_backbone_chat_template(processor, template, info: Mapping[str, Any], where) -> None:
    """Give ``processor`` (loaded from an export) the backbone's own chat template back: the export's wraps it in the
    model's prompts (:func:`~mm_embed_trl.data.chat_template.build_embedding_chat_template`)."""
    from ..data.chat_template import recover_base_chat_template

    tokenizer = getattr(processor, "tokenizer", processor)
    multimodal = hasattr(processor, "image_processor")
    current = processor.chat_template if multimodal else tokenizer.chat_template
    prompts = info.get("prompts") or {}
    try:
        base = recover_base_chat_template(
            current or "", template, tokenizer=tokenizer, multimodal=multimodal,
            query_instruction=prompts.get("query", template.query_instruction),
            document_instruction=prompts.get("document", template.document_instruction),
            pooling_token=info.get("pooling_token"),
        )
    except ValueError as err:
        raise ValueError(
            f"The chat template of the sentence-transformers export {str(where)!r} cannot be turned back into the "
            f"backbone's: {err}, so the model's prompts cannot be rebuilt. {LOAD_TRAINED_HINT}"
        ) from err
    processor.chat_template = base
    if tokenizer is not processor:
        tokenizer.chat_template = base
