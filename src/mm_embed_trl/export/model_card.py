"""Model cards for exported embedding models, built from what a training run actually produced.

:func:`collect_card_metadata` gathers plain, JSON-able metadata from the model (backbone, pooling, prompt template,
dimension), the run's ``TrainingArguments`` (a hyper-parameter subset), its evaluation results (before / after
training) and the training method as the trainer declares it (``method_card()``: title, description, paper and
citation; the card holds no table of methods).
:func:`render_model_card` renders it with the Jinja template ``model_cards/mm_embedding_model_card.md`` into a
README whose YAML front matter is built by ``huggingface_hub.ModelCardData`` (``library_name``, ``pipeline_tag``,
``tags``, ``base_model``, ``datasets``, ``license`` and a ``model-index`` when there are metrics), with usage snippets
for sentence-transformers, plain transformers and mm-embed-trl (written in the template) that use the right prompts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CARD_ARGS",
    "DEFAULT_TEMPLATE_PATH",
    "UNTRAINED_METHOD_CARD",
    "card_for_export",
    "collect_card_metadata",
    "hyperparameters_from_args",
    "normalize_eval_results",
    "render_model_card",
    "split_card_data",
]



def _default_template_path() -> pathlib.Path:
    """The repository's `model_cards/` (a checkout), else the same folder shipped as `mm_embed_trl.model_cards`."""
    # src/mm_embed_trl/export/model_card.py -> repository root / model_cards
    in_repo = pathlib.Path(__file__).resolve().parents[3] / "model_cards" / "mm_embedding_model_card.md"
    if in_repo.exists():
        return in_repo
    try:
        import importlib.resources

        return pathlib.Path(str(importlib.resources.files("mm_embed_trl.model_cards") / "mm_embedding_model_card.md"))
    except (ModuleNotFoundError, TypeError):
        return in_repo


DEFAULT_TEMPLATE_PATH = _default_template_path()
_TEMPLATE_ENV = "MM_EMBED_TRL_MODEL_CARD_TEMPLATE"

# What the card says when it is handed no method: a backbone wrapped with pooling, not trained as an embedding model.
# Trained models get their method's card from the trainer (`EmbeddingTrainerMixin.method_card`).
UNTRAINED_METHOD_CARD: dict[str, Any] = {
    "key": "none",
    "title": "no embedding training (the backbone wrapped with pooling)",
    "short": "untrained baseline",
    "description": (
        "The backbone was wrapped with pooling and prompts but not trained as an embedding model; use it as a "
        "baseline."
    ),
    "trainer": None,
    "paper": None,
}

# Keys of an export's `model_card_data` that are collect_card_metadata's arguments; its other keys (license,
# model_name, repo_id, ...) override the collected values.
CARD_ARGS = ("training_args", "eval_results", "method", "dataset_name")

# TrainingArguments fields worth showing (in this order) when present; method-specific fields of a subclass are
# added automatically.
_HPARAM_KEYS = (
    "learning_rate",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "lr_scheduler_type",
    "warmup_ratio",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "optim",
    "bf16",
    "fp16",
    "seed",
)
# Bookkeeping fields of config subclasses that say nothing about the training recipe.
_HPARAM_SKIP = re.compile(
    r"(^|_)(dir|path|paths|root|token|hub|logging|report|push|save|eval|output|run_name|resume|cache|"
    r"dataloader|ddp|fsdp|deepspeed|tpu|debug|log|verbos|device|num_proc|num_workers)(_|$)"
)
_RUNTIME_METRIC = re.compile(r"(runtime|per_second|^epoch$|^step$|samples|^loss$)")
# "<evaluator name>_<metric>" as written by mm_embed_trl's evaluators (e.g. "heldout_recall@1").
_PREFIXED_METRIC = re.compile(
    r"^(?P<dataset>.+?)_(?P<metric>(?:accuracy|precision|recall|mrr|ndcg|map)(?:@\d+)?|spearman\w*|mmeb\w*)$"
)


def _method_card(method: Any) -> Mapping[str, Any]:
    """The method card handed to :func:`collect_card_metadata`: a mapping, or a trainer (class) that has one."""
    if method is None:
        return UNTRAINED_METHOD_CARD
    if hasattr(method, "method_card"):
        method = method.method_card() or UNTRAINED_METHOD_CARD
    if not isinstance(method, Mapping):
        raise TypeError(
            f"method must be a trainer (class) or its method_card(), or None; got {method!r}. A method key or alias "
            "names its trainer through mm_embed_trl.trainers.identity.trainer_for_method (e.g. 'hardneg')."
        )
    return method


def _plain(value: Any) -> Any:
    """A JSON/YAML-friendly version of a hyper-parameter value (enums -> their value, others -> str)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "value") and isinstance(value.value, (str, int, float)):  # enums (lr_scheduler_type, ...)
        return value.value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return str(value)


def hyperparameters_from_args(training_args: Any) -> dict[str, Any]:
    """The recipe-relevant subset of ``TrainingArguments.to_dict()`` (or of a plain dict of them).

    Standard fields in :data:`_HPARAM_KEYS` come first, then the fields a method config adds over
    ``transformers.TrainingArguments`` (temperature, number of hard negatives, ...), skipping bookkeeping
    (paths, logging, hub, evaluation schedule) and unset values. ``total_train_batch_size`` is added when known.
    """
    if training_args is None:
        return {}
    if isinstance(training_args, Mapping):
        values = dict(training_args)
        extra_names = [k for k in values if k not in _HPARAM_KEYS]
    elif hasattr(training_args, "to_dict"):
        values = training_args.to_dict()
        from transformers import TrainingArguments

        base = {f.name for f in dataclasses.fields(TrainingArguments)}
        extra_names = [f.name for f in dataclasses.fields(training_args) if f.name not in base]
    else:
        raise TypeError(
            f"training_args must be a transformers TrainingArguments (or subclass) or a dict, got "
            f"{type(training_args).__name__}."
        )
    out: dict[str, Any] = {}
    for key in _HPARAM_KEYS:
        value = values.get(key)
        if value is None or (key == "max_steps" and value is not None and value <= 0):
            continue
        if key in ("warmup_ratio", "warmup_steps") and not value:
            continue
        if key in ("bf16", "fp16") and not value:
            continue
        out[key] = _plain(value)
    for key in extra_names:
        value = values.get(key)
        if value is None or value == "" or _HPARAM_SKIP.search(key) or isinstance(value, Mapping):
            continue
        out[key] = _plain(value)
    per_device = values.get("per_device_train_batch_size")
    if isinstance(per_device, int):
        world = getattr(training_args, "world_size", None) if not isinstance(training_args, Mapping) else None
        world = world or values.get("world_size") or 1
        out["total_train_batch_size"] = per_device * int(values.get("gradient_accumulation_steps") or 1) * int(world)
    return out


def _metric_name(name: str) -> str:
    return name.removeprefix("eval_")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))


def normalize_eval_results(eval_results: Any, dataset_name: str | None = None) -> list[dict[str, Any]]:
    """Turn evaluation results into rows ``{"dataset", "metric", "before", "after"}`` (values may be ``None``).

    Accepted forms:

    * ``{"before": {metric: value}, "after": {metric: value}}`` (one dataset, named ``dataset_name``);
    * ``{dataset: {"before": {...}, "after": {...}}, ...}``;
    * ``{metric: value}`` (after training only; Trainer-style ``eval_`` prefixes are removed and runtime
      fields such as ``eval_runtime`` dropped);
    * a list of row dicts with ``metric`` and ``after`` and/or ``before`` (and optionally ``dataset``).

    Without an explicit dataset, a metric named ``<evaluator>_<metric>`` (``heldout_recall@1``, as mm-embed-trl's
    evaluators write them) is attributed to dataset ``<evaluator>``; otherwise to ``dataset_name`` or
    ``"evaluation set"``.
    """
    if eval_results is None:
        return []
    default = dataset_name or "evaluation set"
    rows: list[dict[str, Any]] = []

    def add(dataset: str, before: Mapping | None, after: Mapping | None, named: bool = False) -> None:
        names = list(dict.fromkeys(list((before or {}).keys()) + list((after or {}).keys())))
        for raw in names:
            metric = _metric_name(str(raw))
            if _RUNTIME_METRIC.search(metric):
                continue
            row_dataset = dataset
            prefixed = _PREFIXED_METRIC.match(metric)
            if prefixed and not named and dataset_name is None:
                # The evaluator's name is the dataset the numbers belong to.
                row_dataset, metric = prefixed["dataset"], prefixed["metric"]
            b, a = (before or {}).get(raw), (after or {}).get(raw)
            for label, value in (("before", b), ("after", a)):
                if value is not None and not _is_number(value):
                    raise ValueError(f"eval_results[{dataset!r}][{label}][{raw!r}] = {value!r} is not a finite number.")
            rows.append({"dataset": row_dataset, "metric": metric, "before": b, "after": a})

    if isinstance(eval_results, Mapping):
        keys = set(eval_results)
        if keys and keys <= {"before", "after"}:
            add(default, eval_results.get("before"), eval_results.get("after"))
        elif eval_results and all(isinstance(v, Mapping) for v in eval_results.values()):
            for dataset, value in eval_results.items():
                if set(value) <= {"before", "after"}:
                    add(str(dataset), value.get("before"), value.get("after"), named=True)
                else:
                    add(str(dataset), None, value, named=True)
        else:
            add(default, None, eval_results)
    elif isinstance(eval_results, Sequence) and not isinstance(eval_results, str):
        for i, row in enumerate(eval_results):
            if not isinstance(row, Mapping) or "metric" not in row or not ({"before", "after"} & set(row)):
                raise ValueError(
                    f"eval_results[{i}] must be a dict with 'metric' and 'after' and/or 'before'; got {row!r}."
                )
            add(
                str(row.get("dataset", default)),
                {row["metric"]: row.get("before")},
                {row["metric"]: row.get("after")},
                named="dataset" in row,
            )
    else:
        raise TypeError(f"eval_results must be a dict or a list of dicts, got {type(eval_results).__name__}.")
    return rows


def _hub_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hub model id (``org/name``) and is not a local path."""
    if not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    return name if re.fullmatch(r"[\w.-]+/[\w.-]+", name) else None


def collect_card_metadata(
    model: Any,
    training_args: Any = None,
    eval_results: Any = None,
    method: Any = None,
    dataset_name: str | Sequence[str] | None = None,
    *,
    export_info: Mapping[str, Any] | None = None,
    sentence_transformers_subdir: str | None = None,
) -> dict[str, Any]:
    """Metadata for :func:`render_model_card` from a real run.

    Args:
        model: the ``MultimodalEmbeddingModel`` (or the directory of a saved one).
        training_args: the run's ``TrainingArguments`` (any subclass) or a dict of them.
        eval_results: evaluation results, see :func:`normalize_eval_results`.
        method: what the model was trained with, as its trainer declares it: the trainer (class), or its
            ``method_card()``; ``None``: an untrained baseline. The card renders it as it is.
        dataset_name: the training dataset id(s) (Hub ids go into the YAML ``datasets``).
        export_info: what the sentence-transformers export recorded (prompts, pooling); set by the exporter.
        sentence_transformers_subdir: set when the card describes a final save's folder
            (``save_model_for_inference``) whose ST export lives in that subfolder.

    Returns:
        A dict of plain values; override any of them (``license``, ``model_name``, ``repo_id``, ``language``,
        ``tags``, ``base_model``) before rendering.
    """
    from .._version import __version__
    from ..data.templates import get_template
    from ..data.videos import video_sampling

    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load_model_for_export

        model = load_model_for_export(model)
    config = model.config
    encoder_config = config.encoder_config
    base_name = getattr(encoder_config, "_name_or_path", "") or getattr(config, "_name_or_path", "") or ""
    base_model = _hub_id(base_name)
    base_display = base_model or (pathlib.Path(base_name).name if base_name else encoder_config.model_type)
    info = _method_card(method)
    preset = _preset_card(config.preset)
    if method is None and preset is not None:  # a published model as its authors trained it
        info = {
            **info,
            "key": "published",
            "title": f"{preset['title']} as its authors released it (preset `{preset['name']}`)",
            "short": f"{preset['title']}, released",
            "description": f"The published {preset['title']} weights, wrapped with their authors' encode settings.",
        }
    paper = info["paper"]
    datasets = [dataset_name] if isinstance(dataset_name, str) else [str(d) for d in (dataset_name or [])]
    template = get_template(config.prompt_template)
    processor = model.processor
    multimodal = processor is not None and hasattr(processor, "image_processor")
    export_info = dict(export_info or {})
    prompts = dict(
        export_info.get("prompts") or {"query": template.query_instruction, "document": template.document_instruction}
    )
    dim = int(config.embedding_dim or config.hidden_size)
    # Several images and a video go through the chat template (as content items), which templates rendered without
    # one cannot place. describe_export records the same judgement for exports.
    several_images = multimodal and template.use_chat_template
    takes_video = bool(
        export_info.get("takes_video", several_images and getattr(processor, "video_processor", None) is not None)
    )
    sampling = video_sampling(processor) if takes_video else None
    family = encoder_config.model_type
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "mm-embed-trl", family]
    if multimodal:
        tags += ["multimodal-embedding", "image-text-retrieval"]
    if paper:
        tags.append(paper["name"].lower())
    return {
        "model_name": f"{base_display.split('/')[-1]} multimodal embedding ({info['short']})",
        "repo_id": None,
        "model_reference": None,
        "base_model": base_model,
        "base_model_display": base_display,
        "backbone_type": family,
        "backbone_class": type(model.backbone).__name__,
        "method": info["key"],
        "method_title": info["title"],
        "method_description": info["description"],
        "trainer": info["trainer"],
        "paper": dict(paper) if paper else None,
        "datasets": datasets,
        "hyperparameters": hyperparameters_from_args(training_args),
        "eval_results": normalize_eval_results(eval_results),
        "prompt_template": template.name,
        "prompt_examples": _prompt_examples(template, prompts.get("query") or "", multimodal),
        "chat_template_prompts": template.use_chat_template,
        "instruction_in_system": template.instruction_in_system,
        "generation_suffix": template.generation_suffix,
        "prompts": prompts,
        "text_only_image_size": template.text_only_image_size,
        "preset": preset,
        "sequential_positions": bool(config.sequential_positions),
        "pooling": config.pooling,
        "pooling_token": export_info.get("pooling_token", config.pooling_token),
        "normalize": bool(config.normalize),
        "embedding_dim": dim,
        "hidden_size": int(config.hidden_size),
        "truncated": config.embedding_dim is not None,
        "modalities": (["text", "image", "image+text"] if multimodal else ["text"])
        + (["images"] if several_images else []) + (["video"] if takes_video else []),
        "multimodal": multimodal,
        "several_images": several_images,
        "takes_video": takes_video,
        "video_inputs": bool(export_info.get("video_inputs", False)),
        "video_max_frames": sampling.max_frames if sampling else None,
        "video_fps": sampling.fps if sampling else None,
        "license": None,
        "language": None,
        "tags": tags,
        "library_version": __version__,
        "sentence_transformers_subdir": sentence_transformers_subdir,
    }


def _preset_card(name: str | None) -> dict[str, Any] | None:
    """What the card says of the published model's preset the wrapper started from (None: a plain backbone)."""
    if name is None:
        return None
    from ..presets import get_preset

    try:
        preset = get_preset(name)
    except ValueError:  # saved by a version that knew a preset this one does not
        return {"name": name, "title": name, "hub_ids": [], "verified": True}
    return {"name": preset.name, "title": preset.title, "hub_ids": list(preset.hub_ids), "verified": preset.verified}


# ---------------------------------------------------------------------------------------------------- rendering
def _model_ref(metadata: Mapping[str, Any]) -> str:
    ref = metadata.get("repo_id") or metadata.get("model_reference")
    if not ref:
        raise ValueError(
            "The model card needs `repo_id` (the Hub id the model will be pushed to) or `model_reference` (a local "
            "path) for its usage snippets; pass it in model_card_data."
        )
    return str(ref)


def _prompt_examples(template, instruction: str, multimodal: bool) -> list[dict[str, str | None]]:
    """The query side's prompt for each kind of input, as ``template`` builds it for `encode`: its system message
    (None: the chat template's default) and user message, or (a template without a chat template) the whole
    prompt; ``<image>`` stands where the image goes, ``<text>`` for the input text."""
    from PIL import Image

    from ..data.schema import EmbeddingInput

    kinds = [("text", EmbeddingInput(text="<text>"))]
    if multimodal:
        image = Image.new("RGB", (1, 1))  # a stand-in: only its place in the prompt is shown
        kinds += [("image", EmbeddingInput(image=image)), ("image + text", EmbeddingInput(text="<text>", image=image))]
    rows = []
    for kind, inp in kinds:
        if not template.use_chat_template:
            rows.append({"input": kind, "system": None, "content": template.render_plain(inp, "<image>", "query",
                                                                                         instruction)})
            continue
        messages = template.build_messages(inp, "query", instruction)
        system = next((m["content"][0]["text"] for m in messages if m["role"] == "system"), None)
        user = "".join(item.get("text", f"<{item['type']}>") for item in messages[-1]["content"])
        rows.append({"input": kind, "system": system, "content": user})
    return rows


def _resolve_template_path(template_path: str | os.PathLike | None) -> pathlib.Path:
    candidates = (
        [template_path] if template_path is not None else [os.environ.get(_TEMPLATE_ENV), DEFAULT_TEMPLATE_PATH]
    )
    for candidate in candidates:
        if candidate and pathlib.Path(candidate).is_file():
            return pathlib.Path(candidate)
    raise FileNotFoundError(
        f"Model card template not found (looked at {[str(c) for c in candidates if c]}). Pass template_path=... or "
        f"set ${_TEMPLATE_ENV} to model_cards/mm_embedding_model_card.md of the mm-embed-trl repository."
    )


def _card_data(metadata: Mapping[str, Any]):
    from huggingface_hub import EvalResult, ModelCardData

    eval_results = []
    for row in metadata.get("eval_results") or []:
        if row.get("after") is None:
            continue
        dataset = row["dataset"]
        eval_results.append(
            EvalResult(
                task_type="information-retrieval",
                task_name="Information Retrieval",
                dataset_type=dataset if _hub_id(dataset) else re.sub(r"[^\w.-]+", "-", dataset).strip("-") or "eval",
                dataset_name=dataset,
                metric_type=row["metric"],
                metric_name=row["metric"],
                metric_value=float(row["after"]),
            )
        )
    datasets = [d for d in metadata.get("datasets") or [] if _hub_id(d)]
    return ModelCardData(
        language=metadata.get("language"),
        license=metadata.get("license"),
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=list(dict.fromkeys(metadata.get("tags") or [])),
        base_model=metadata.get("base_model"),
        datasets=datasets or None,
        model_name=metadata["model_name"],
        eval_results=eval_results or None,
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(metadata: Mapping[str, Any], template_path: str | os.PathLike | None = None) -> str:
    """Render the README.md (YAML front matter + markdown) for ``metadata`` from :func:`collect_card_metadata`.

    The template is rendered with ``StrictUndefined``, so a variable the metadata lacks is an error instead of a
    silently blank field; the front matter comes from ``huggingface_hub.ModelCardData`` and is parsed back by
    ``huggingface_hub.ModelCard`` as a check.
    """
    import jinja2
    from huggingface_hub import ModelCard

    path = _resolve_template_path(template_path)
    card_data = _card_data(metadata)
    rows = []
    for row in metadata.get("eval_results") or []:
        before, after = row.get("before"), row.get("after")
        delta = after - before if before is not None and after is not None else None
        rows.append(
            {
                **row,
                "before_str": _fmt(before),
                "after_str": _fmt(after),
                "delta_str": _fmt(delta) if delta is None else f"{delta:+.4g}",
            }
        )
    context = dict(metadata)
    context.update(
        card_data=card_data.to_yaml(),
        eval_rows=rows,
        has_before=any(r.get("before") is not None for r in rows),
        hyperparameter_rows=[(k, _fmt(v)) for k, v in (metadata.get("hyperparameters") or {}).items()],
        model_ref=_model_ref(metadata),  # what the template's usage snippets load
    )
    context.setdefault("sentence_transformers_subdir", None)
    for key in ("several_images", "takes_video", "video_inputs", "video_max_frames", "video_fps"):
        context.setdefault(key, None)  # metadata collected before these existed
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    try:
        content = env.from_string(path.read_text(encoding="utf-8")).render(**context)
    except jinja2.UndefinedError as err:
        raise ValueError(f"Model card template {str(path)!r} uses a value the metadata lacks: {err}.") from err
    content = content.strip() + "\n"
    ModelCard(content)  # parses the YAML front matter: raises on a malformed header
    return content


def split_card_data(model_card_data: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """An export's ``model_card_data`` as (the :data:`CARD_ARGS` for :func:`collect_card_metadata`, the overrides)."""
    overrides = dict(model_card_data or {})
    return {k: overrides.pop(k) for k in CARD_ARGS if k in overrides}, overrides


def card_for_export(
    metadata: Mapping[str, Any],
    overrides: Mapping[str, Any],
    model_reference: str | os.PathLike,
    *,
    sentence_transformers_subdir: str | None = None,
) -> tuple[str, str]:
    """The README of one export from metadata collected once: the export's path and its sentence-transformers
    subfolder (if any) set, then ``overrides`` applied. Returns the card and the reference its usage snippets name
    (the repo id when given), which ``push_to_hub`` rewrites to the repo it pushes to."""
    final = {
        **metadata,
        "model_reference": str(model_reference),
        "sentence_transformers_subdir": sentence_transformers_subdir,
        **overrides,
    }
    return render_model_card(final), final.get("repo_id") or final["model_reference"]
