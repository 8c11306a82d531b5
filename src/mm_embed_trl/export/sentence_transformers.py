"""Export a :class:`~mm_embed_trl.modeling.MultimodalEmbeddingModel` as a plain sentence-transformers model: the bare
backbone, ``Pooling`` (last token or mean), an identity-slice ``Dense`` for ``embedding_dim`` and ``Normalize``, with an
embedding chat template that reproduces the model's prompts; ``SentenceTransformer(path)`` loads it without remote
code. How the prompts are reproduced and the known differences: docs/EXPORT.md.

The neighbouring modules: ``chat_template`` (the template compiler), ``checkpoint`` (checks and loading),
``final_save`` (the end-of-run save), ``generative`` (UME-R1's generative embedding, a custom module).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pathlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._files import publish_dir, staged_dir
from ..data.chat_template import _special_token_affixes, build_embedding_chat_template
from ..modeling.export_reader import EXPORT_INFO_FILE, read_export_info
from .checkpoint import _prepare_output_dir, _refuse_overlap_with_source, load_model_for_export

if TYPE_CHECKING:  # heavy imports stay lazy: `import mm_embed_trl.export` must be cheap
    from ..data.templates import PromptTemplate
    from ..modeling import MultimodalEmbeddingModel


logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_INFO_FILE",
    "ST_SUBDIR",
    "describe_export",
    "export_sentence_transformers",
    "load_sentence_transformers_export",
    "read_export_info",
]

# The sentence-transformers export written by `save_model_for_inference` next to the MultimodalEmbeddingModel files.
ST_SUBDIR = "sentence_transformers"
ST_GENERATIVE_SUBDIR = "sentence_transformers_generative"  # UME-R1 models: the generative embedding (remote code)
# Small JSON written into every export: what was exported and how to reproduce the embeddings.


def _bare_backbone(model: MultimodalEmbeddingModel):
    """The backbone without LM head (what `AutoModel` loads and sentence-transformers' Transformer runs)."""
    base = model.backbone
    # Same rule as MultimodalEmbeddingModel's forward: generative backbones embed with their inner base model.
    return base.model if hasattr(base, "lm_head") and hasattr(base, "model") else base


def _resolve_prompts(template: PromptTemplate, prompts: Mapping[str, str] | None) -> dict[str, str]:
    resolved = {"query": template.query_instruction, "document": template.document_instruction}
    for name, value in (prompts or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"prompts must map names to strings; got {name!r}: {type(value).__name__}.")
        resolved[name] = value
    return resolved


def _takes_video(model: MultimodalEmbeddingModel, template) -> bool:
    return getattr(model.processor, "video_processor", None) is not None and template.use_chat_template


def check_video_inputs(model: MultimodalEmbeddingModel) -> None:
    """Raise ValueError, saying why, unless ``model`` takes videos (``video_inputs=True`` of an export needs that)."""
    from ..data.templates import get_template

    template = get_template(model.config.prompt_template)
    if not _takes_video(model, template):
        raise ValueError(
            "video_inputs=True makes the export read videos as model.encode does, but this model takes none: "
            + (f"its prompt template {template.name!r} renders without a chat template (one image token)."
               if getattr(model.processor, "video_processor", None) is not None
               else f"its processor ({type(model.processor).__name__}) has no video processor.")
        )


def describe_export(
    model: MultimodalEmbeddingModel,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    video_inputs: bool = False,
) -> dict[str, Any]:
    """What an export of ``model`` with these prompts records in :data:`EXPORT_INFO_FILE` (and its card shows):
    template, pooling (with the pooling token's text), normalisation, dimension, the resolved prompts, whether the
    backbone takes videos and whether the export reads them itself (``video_inputs``).

    Raises:
        ValueError: ``default_prompt_name`` is not one of the prompts, ``embedding_dim`` exceeds the hidden size, or
            ``video_inputs`` is asked of a model whose processor or prompt template takes no video.
    """
    from ..data.templates import get_template
    from ..modeling.configuration import check_embedding_dim

    config = model.config
    template = get_template(config.prompt_template)
    resolved_prompts = _resolve_prompts(template, prompts)
    if default_prompt_name is not None and default_prompt_name not in resolved_prompts:
        raise ValueError(
            f"default_prompt_name={default_prompt_name!r} is not one of the prompts {sorted(resolved_prompts)}; "
            "add it to `prompts` or leave it None."
        )
    check_embedding_dim(config.embedding_dim, config.hidden_size)
    pooling_token = None
    if config.pooling == "special_token":
        tokenizer = getattr(model.processor, "tokenizer", model.processor)
        pooling_token = config.pooling_token or tokenizer.convert_ids_to_tokens(int(config.pooling_token_id))
    if video_inputs:
        check_video_inputs(model)
    takes_video = _takes_video(model, template)
    return {
        "format": "mm_embed_trl.sentence_transformers",
        "prompt_template": template.name,
        "pooling": config.pooling,
        "pooling_token": pooling_token,
        "normalize": bool(config.normalize),
        "embedding_dim": config.embedding_dim,
        "encoder_kind": config.encoder_kind,
        "prompts": resolved_prompts,
        "default_prompt_name": default_prompt_name,
        "text_only_image_size": template.text_only_image_size,
        "sequential_positions": bool(config.sequential_positions),
        "takes_video": takes_video,
        "video_inputs": bool(video_inputs),
    }


# ---------------------------------------------------------------------------------------------------- export
def export_sentence_transformers(
    model_or_path: MultimodalEmbeddingModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    card_metadata: Mapping[str, Any] | None = None,
    video_inputs: bool = False,
) -> pathlib.Path:
    """Write a sentence-transformers model directory that embeds exactly like ``model.encode``.

    Args:
        model_or_path: a ``MultimodalEmbeddingModel`` or the directory of a saved one (a training run's
            ``output_dir``). LoRA adapters are merged into a copy; the caller's model is never modified.
        output_dir: directory to write (must be empty or absent unless ``overwrite``). Written to a temporary
            sibling first and renamed into place, so a failed export leaves nothing half-written. It may not be,
            contain or lie inside the checkpoint directory being exported.
        prompts: ST prompts; ``"query"`` / ``"document"`` are the side instructions (default: the prompt template's
            own, ``""`` for the built-in templates). Other names are extra instructions usable with
            ``prompt_name=``. Saved in ``config_sentence_transformers.json``.
        default_prompt_name: ST's default prompt for ``encode`` (``None``: ``encode`` without a prompt uses the query
            side anyway, see the module docstring).
        model_card_data: extra model card metadata, merged over
            :func:`~mm_embed_trl.export.model_card.collect_card_metadata`
            (keys ``training_args``, ``eval_results``, ``method``, ``dataset_name`` are passed to it; anything else,
            e.g. ``license``, ``model_name``, ``repo_id``, ``language``, ``tags``, overrides the collected values).
        overwrite: replace a non-empty ``output_dir``.
        card_metadata: metadata already collected by ``collect_card_metadata`` (with :func:`describe_export`'s
            info), rendered instead of collecting it again: the end-of-run save collects once for its two cards.
            ``model_card_data`` then carries overrides only.
        video_inputs: make the input module :class:`~mm_embed_trl.export.st_input_module.MMEmbedInputTransformer`,
            which reads a ``{"video": ...}`` value (frame folder, list of frames, video file) and image paths as
            ``model.encode`` does, with the video options saved in the processor; loading the export then needs
            ``trust_remote_code=True`` and ``mm-embed-trl`` installed. Without it the export is stock
            sentence-transformers (no remote code): several images per input work alike, and a video given as a
            list of frames that ``encode`` would keep whole (at most the saved ``max_frames``); see docs/EXPORT.md.

    Returns:
        The path of the export.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from ..data.templates import get_template
    from ..modeling.modeling import USE_HUB_KERNELS_DEFAULT
    from .model_card import card_for_export, collect_card_metadata, split_card_data

    collect_args, overrides = split_card_data(model_card_data)
    if card_metadata is not None and collect_args:
        raise ValueError(
            f"model_card_data carries {sorted(collect_args)} although card_metadata is already collected; pass them "
            "to collect_card_metadata instead."
        )
    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    if isinstance(model_or_path, (str, os.PathLike)):
        _refuse_overlap_with_source(model_or_path, output_dir)
    _prepare_output_dir(output_dir, overwrite)
    model = load_model_for_export(model_or_path)
    owned = model is not model_or_path
    config = model.config
    template = get_template(config.prompt_template)
    info = describe_export(model, prompts, default_prompt_name, video_inputs)
    resolved_prompts, pooling_token = info["prompts"], info["pooling_token"]
    if template.text_only_image_size is not None:
        size = template.text_only_image_size
        logger.warning(
            "The prompt template %r embeds a text after a %dx%d white image (as UME-R1 does), which "
            "sentence-transformers cannot add by itself: give the export text-only inputs as {'text': text, "
            "'image': Image.new('RGB', (%d, %d), 'white')} (model.encode adds it itself). The card says so.",
            template.name, size, size, size, size,
        )

    if config.sequential_positions:
        logger.warning(
            "This model reads its inputs with sequential position ids (GME's encoder), which sentence-transformers' "
            "Transformer does not pass: the export embeds texts exactly, inputs with an image with the backbone's "
            "own multimodal positions instead. Its export info and card say so; embed images with model.encode."
        )
    processor = copy.deepcopy(model.processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    multimodal = hasattr(processor, "image_processor")
    base_template = processor.chat_template if multimodal else getattr(tokenizer, "chat_template", None)
    if isinstance(base_template, dict):  # named templates: the collator renders the default one
        base_template = base_template.get("default")
    prefix, suffix = ("", "") if base_template and template.use_chat_template else _special_token_affixes(tokenizer)
    chat_template = build_embedding_chat_template(
        template,
        base_template,
        multimodal=multimodal,
        query_instruction=resolved_prompts["query"],
        document_instruction=resolved_prompts["document"],
        pooling_token=pooling_token,
        special_prefix=prefix,
        special_suffix=suffix,
        image_token=getattr(processor, "image_token", None),
    )
    processor.chat_template = chat_template
    if tokenizer is not processor:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"  # as the collator pads; Pooling("lasttoken") handles either side anyway

    if card_metadata is None:
        card_metadata = collect_card_metadata(model, **collect_args, export_info=info)
    # push_to_hub rewrites this reference in the card's snippets to the repo id (even if the folder was moved).
    card, info["card_model_reference"] = card_for_export(card_metadata, overrides, output_dir)

    with staged_dir(output_dir, what="the sentence-transformers export") as staging:
        backbone_dir, final_dir = staging / "backbone", staging / "export"
        with _merged(model, owned) as merged:
            _bare_backbone(merged).save_pretrained(backbone_dir, safe_serialization=True)
        processor.save_pretrained(backbone_dir)
        del model  # a checkpoint loaded here is ours: free it before sentence-transformers loads its own copy
        # Loading through sentence-transformers (rather than writing its JSON by hand) lets ST infer the modality
        # config and write every file in its own current format. unpad_inputs=False: Qwen-VL rope needs padding.
        input_module = Transformer
        if video_inputs:  # the video-reading subclass; importing it is only needed here
            from .st_input_module import MMEmbedInputTransformer

            input_module = MMEmbedInputTransformer
        # A video reaches the processor as frames (the stock module: as the caller gives them; ours: sampled as
        # encode samples them), which transformers refuses to sample again when the saved options sample by fps.
        processing = {"video": {"do_sample_frames": False}} if info["takes_video"] else None
        transformer = input_module(
            str(backbone_dir), unpad_inputs=False, model_kwargs={"use_kernels": USE_HUB_KERNELS_DEFAULT},
            processing_kwargs=processing,
        )
        hidden = transformer.get_embedding_dimension()
        modules: list[torch.nn.Module] = [
            transformer,
            Pooling(hidden, pooling_mode="mean" if config.pooling == "mean" else "lasttoken"),
        ]
        if config.embedding_dim is not None:
            # An identity slice keeps exactly the first `dim` features, in a stock module. (ST's truncate_dim would
            # act after Normalize; our model truncates first and normalises the truncated vector.)
            dim = int(config.embedding_dim)
            eye = torch.eye(dim, hidden, dtype=transformer.model.dtype)
            modules.append(Dense(hidden, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=eye))
        if config.normalize:
            modules.append(Normalize())
        st_model = SentenceTransformer(
            modules=modules,
            prompts=resolved_prompts,
            default_prompt_name=default_prompt_name,
            similarity_fn_name="cosine",
            device="cpu",
        )
        st_model.save(str(final_dir), create_model_card=False)
        del st_model, transformer, modules
        _keep_hub_kernels_off(final_dir)
        (final_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (final_dir / "README.md").write_text(card, encoding="utf-8")
        publish_dir(final_dir, output_dir)
    logger.info("Exported a sentence-transformers model to %s", output_dir)
    return output_dir


def _keep_hub_kernels_off(export_dir: pathlib.Path) -> None:
    """Write `use_kernels: false` into the Transformer module's load arguments, so `SentenceTransformer(path)` loads
    the backbone as `MultimodalEmbeddingModel` does (transformers >= 5.25 would otherwise fetch Hub kernels on CUDA);
    a user's `model_kwargs={"use_kernels": True}` still takes precedence."""
    from ..modeling.modeling import USE_HUB_KERNELS_DEFAULT

    config_path = export_dir / "sentence_bert_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.setdefault("model_kwargs", {}).setdefault("use_kernels", USE_HUB_KERNELS_DEFAULT)
    config_path.write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- loading back
def load_sentence_transformers_export(model_class, name_or_path, info: Mapping[str, Any], **kwargs):
    """The model an export was made from, rebuilt from it: what ``MultimodalEmbeddingModel.from_pretrained`` does
    for a folder or repo with an :data:`EXPORT_INFO_FILE` (the reader: :mod:`mm_embed_trl.modeling.export_reader`)."""
    return model_class.from_sentence_transformers_export(name_or_path, info, **kwargs)


@contextlib.contextmanager
def _merged(model: MultimodalEmbeddingModel, owned: bool):
    """``model`` with LoRA adapters merged: itself when it has none or is ours to modify, else a merged copy."""
    if not model.has_lora:
        yield model
        return
    target = model if owned else copy.deepcopy(model)
    target.merge_lora()
    try:
        yield target
    finally:
        del target

