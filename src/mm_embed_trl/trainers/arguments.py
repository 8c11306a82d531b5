"""The options of the embedding trainers' configs, declared once for both families.

`EmbeddingRunArguments` holds what every config has, whatever runs the step: it is mixed in before
`transformers.TrainingArguments` by `EmbeddingTrainingArguments` (the Trainer-based methods) and before
`trl.GRPOConfig` by `EmbeddingGRPOConfig`. `adapt_to_cpu` and `setup_devices_with_timeout` are the device set-up both
families' configs run. A method's config subclasses one of the two and adds only its own options.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from transformers import TrainingArguments

from ..data.collators import DEFAULT_MAX_TEXT_TOKENS

__all__ = [
    "EmbeddingRunArguments",
    "EmbeddingTrainingArguments",
    "adapt_to_cpu",
    "check_option_types",
    "setup_devices_with_timeout",
]


@dataclass
class EmbeddingRunArguments:
    r"""The options every embedding trainer's config has, whatever runs its step (mixed in before
    `transformers.TrainingArguments` or `trl.GRPOConfig`), declared once.

    > Parameters that control the run

    Parameters:
        image_root (`str`, *optional*): directory relative image paths in the data are resolved against.
        on_bad_row (`str`, defaults to `"raise"`): what the row check run before training (vectorised, cached with
            the dataset's fingerprint) does with rows training cannot use (an empty side, a text that is not a
            string or not UTF-8, negatives that do not pair up, ...): `"raise"` names the dataset, the rows and the
            causes; `"skip"` logs each row with its cause, leaves it out and reports the count. Column problems
            always raise.
        overwrite_output_dir (`bool`, defaults to `False`): train afresh into an `output_dir` that holds another
            run (checkpoints or a final model): its checkpoints are deleted when training starts, its final model
            is replaced by the new one at the end. Without it such a run is refused unless it resumes.
        save_sentence_transformers (`bool`, defaults to `True`): at the end of training also write the
            sentence-transformers export to `<output_dir>/sentence_transformers` (LoRA merged), and for a UME-R1
            model the generative one to `<output_dir>/sentence_transformers_generative`.
        sentence_transformers_video_inputs (`bool`, defaults to `False`): make that export read frame folders, frame
            paths and video files itself, as `encode` does (`export_sentence_transformers(video_inputs=True)`:
            loading it then needs `trust_remote_code=True` and mm-embed-trl installed). Without it the export takes
            videos as lists of PIL frames, with stock sentence-transformers. Checked before training: the model must
            take videos.

    > Parameters that control the model and its inputs (applied by `EmbeddingTrainerMixin.prepare_embedding_model`)

    Parameters:
        prompt_template (`str`, *optional*): prompt template name; defaults to the model config's (a method may
            default to its paper's).
        image_max_pixels (`int`, *optional*): pixel budget per image for dynamic-resolution (Qwen-VL) processors.
        video_fps (`float`, *optional*), video_max_frames (`int`, *optional*), video_max_pixels (`int`, *optional*):
            how videos are sampled (frames per second of a video file, the most frames per video) and the pixel budget
            of one frame; saved with the processor (`mm_embed_trl.data.videos.set_video_options`).
        freeze_vision_tower (`bool`, defaults to `False`): freeze the vision encoder and projector.
    """

    image_root: str | None = field(
        default=None, metadata={"help": "Directory that relative image paths in the dataset are resolved against."}
    )
    on_bad_row: str = field(
        default="raise",
        metadata={
            "help": "Rows the pre-training check finds unusable: 'raise' (name dataset, rows and causes) or 'skip' "
            "(log each with its cause, leave it out, report the count).",
            "choices": ["raise", "skip"],
        },
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train afresh into an output_dir that holds another run (its checkpoint-* are deleted at the "
            "start, its final model replaced at the end). Without it, such a run is refused unless it resumes."
        },
    )
    save_sentence_transformers: bool = field(
        default=True,
        metadata={
            "help": "At the end also write the sentence-transformers exports: sentence_transformers/ (LoRA merged) "
            "and, for UME-R1 models, sentence_transformers_generative/."
        },
    )
    sentence_transformers_video_inputs: bool = field(
        default=False,
        metadata={
            "help": "The end-of-run sentence-transformers export reads frame folders, frame paths and video files "
            "itself, as encode does (loading it needs trust_remote_code=True). Default: videos as PIL frame lists."
        },
    )
    # the model and its inputs
    prompt_template: str | None = field(
        default=None, metadata={"help": "Prompt template name (unime, mmeb, ume_r1, plain); default: the model's."}
    )
    image_max_pixels: int | None = field(
        default=None,
        metadata={
            "help": "Pixel budget per image for dynamic-resolution processors (Qwen-VL family), e.g. 112896 = "
            "336x336 as in UniME; saved with the processor so inference uses the same budget."
        },
    )
    video_fps: float | None = field(
        default=None,
        metadata={"help": "Frames sampled per second of a video file (None: video_max_frames evenly spaced)."},
    )
    video_max_frames: int | None = field(
        default=None, metadata={"help": "Most frames kept per video (default 8, MMEB-V2's); saved with the processor."}
    )
    video_max_pixels: int | None = field(
        default=None, metadata={"help": "Pixel budget per video frame (Qwen-VL); saved with the processor."}
    )
    freeze_vision_tower: bool = field(
        default=False, metadata={"help": "Freeze the vision encoder and multimodal projector."}
    )

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # Every config's own checks compare its options (`temperature <= 0`): the types come first, whatever the
        # subclass's __post_init__ does before calling its parent's.
        own = cls.__dict__.get("__post_init__")
        if own is not None:

            @functools.wraps(own)
            def post_init(self, *args, **kw):
                check_option_types(self)
                own(self, *args, **kw)

            cls.__post_init__ = post_init

    def __post_init__(self):
        check_option_types(self)
        if self.on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', got {self.on_bad_row!r}.")
        super().__post_init__()

    @property
    def row_contract(self) -> dict[str, Any]:
        """What this run asks of its rows: the options of the pre-training row check
        (:func:`~mm_embed_trl.data.validation.check_training_rows`) that the trainer and the examples run."""
        return {"num_negatives": getattr(self, "num_negatives", None), "image_root": self.image_root}


_SCALAR_TYPES = (bool, int, float, str)


@functools.cache
def _scalar_options(cls) -> dict[str, tuple[tuple[type, ...], bool]]:
    """``{field: (scalar types, whether None is one of them)}`` of the dataclass fields typed with scalars only
    (``float``, ``int | None``, ...); fields of other types (lists, dicts, enums) are not looked at."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation that does not resolve here: check only the fields whose types are objects
        hints = {f.name: f.type for f in dataclasses.fields(cls) if not isinstance(f.type, str)}
    scalar = {}
    for name, hint in hints.items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        members = typing.get_args(hint) if union else (hint,)
        kinds = tuple(m for m in members if m is not type(None))
        if kinds and all(m in _SCALAR_TYPES for m in kinds):
            scalar[name] = (kinds, len(kinds) < len(members))
    return scalar


def check_option_types(options) -> None:
    """Refuse a list, a mapping or a null given to an option that takes one number, text or flag, naming it.

    A YAML recipe's values reach a config as they are (argparse converts only the command line's strings), so
    ``learning_rate: [1e-4]`` or ``temperature: null`` failed deep inside torch. A null stays allowed where the
    option's default is None.
    """
    scalar = _scalar_options(type(options))
    problems = []
    for f in dataclasses.fields(options):
        if f.name not in scalar or not hasattr(options, f.name):
            continue
        kinds, nullable = scalar[f.name]
        value = getattr(options, f.name)
        if value is None:
            if nullable or f.default is None:
                continue
            got = "null (None)"
        elif isinstance(value, (list, tuple, set)):
            got = f"a list ({value!r})"
        elif isinstance(value, Mapping):
            got = f"a mapping ({value!r})"
        else:
            continue
        wanted = " or ".join(k.__name__ for k in kinds)
        problems.append(f"Option {f.name} (--{f.name}) takes one {wanted}, got {got}")
    if problems:
        raise ValueError(
            "; ".join(problems) + ". Give a single value (in a YAML recipe e.g. `learning_rate: 1.0e-4`), or remove "
            "the line to keep the default."
        )


@dataclass
class EmbeddingTrainingArguments(EmbeddingRunArguments, TrainingArguments):
    r"""Arguments shared by every Trainer-based embedding trainer. This class includes only the parameters that are
    specific to the Trainer-based methods; those every embedding trainer has (run folder, bad rows, prompt template,
    pixel budget, frozen vision tower, ...) come from [`EmbeddingRunArguments`], which `EmbeddingGRPOConfig` shares,
    and the rest from `transformers.TrainingArguments`.

    > Parameters that control the model's loading and the inputs

    Parameters:
        model_init_kwargs (`dict`, *optional*): kwargs for `MultimodalEmbeddingModel.from_pretrained` when the
            trainer gets a model id/path (e.g. `{"dtype": "bfloat16", "attn_implementation": "sdpa"}`).
        max_length (`int`, *optional*, defaults to `1024`): max text tokens kept per input (prompt and image tokens
            are never cut); longer texts are truncated and the first batch that cuts any logs a warning with the
            count. `None` (YAML `null`) keeps whole texts, at the risk of running out of memory on a stray long one.
        num_negatives (`int`, *optional*): explicit negatives per row to use (`None`: what rows carry; 0: none).

    > Parameters that control the loss's batch and the adapters

    Parameters:
        gradient_cache_chunk_size (`int`, *optional*): GradCache chunk size. The whole batch is embedded without a
            graph in chunks, the loss is computed on the full (global) batch, then each chunk is re-run with graph
            and back-propagated with the cached embedding gradients: same gradients, memory bounded by the chunk.
        gather_across_devices (`bool`, defaults to `True`): use every rank's targets as negatives.
        lora_target (`str`, defaults to `"language_model"`): where LoRA adapters go (`"language_model"` or `"all"`).

    > Parameters that control the run

    Parameters:
        resume_from_checkpoint (`str`, *optional*): a checkpoint folder to resume from, or `"last"`: the newest
            complete `checkpoint-N` of `output_dir`.
    """

    model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "kwargs for MultimodalEmbeddingModel.from_pretrained (dict or JSON string)."}
    )
    max_length: int | None = field(
        default=DEFAULT_MAX_TEXT_TOKENS,
        metadata={
            "help": f"Max text tokens kept per input (default {DEFAULT_MAX_TEXT_TOKENS}); longer texts are truncated "
            "with a logged count. "
            "Prompt and image tokens are never cut. null (in a YAML recipe) keeps whole texts."
        },
    )
    num_negatives: int | None = field(
        default=None,
        metadata={"help": "Explicit negatives per row (None: as many as rows carry; 0: ignore neg_* columns)."},
    )
    gradient_cache_chunk_size: int | None = field(
        default=None,
        metadata={"help": "GradCache chunk size: large batches with memory bounded by the chunk (None: off)."},
    )
    gather_across_devices: bool = field(
        default=True, metadata={"help": "All-gather embeddings so every rank's targets are negatives."}
    )
    lora_target: str = field(
        default="language_model", metadata={"help": "LoRA placement: 'language_model' (vision untouched) or 'all'."}
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint folder to resume from, or 'last' for the newest complete checkpoint-N in output_dir "
            "(the run continues bit-identically: optimizer, scheduler, RNG and data order are restored)."
        },
    )
    # transformers' default would drop the raw MMEB columns our collator needs.
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the embedding collator reads raw dataset columns."}
    )
    ddp_find_unused_parameters: bool | None = field(
        default=None,
        metadata={
            "help": "DDP: allow parameters without gradient in a step. Default: on exactly when the vision tower "
            "trains (text-only steps leave it unused), off otherwise (it costs a graph traversal per forward)."
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        if isinstance(self.model_init_kwargs, str):
            import json

            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        if self.max_length is not None and self.max_length <= 0:
            raise ValueError(f"max_length must be a positive number of text tokens (or None), got {self.max_length}.")
        if self.push_to_hub and self.hub_model_id:
            from ..export.hub import check_repo_id

            check_repo_id(self.hub_model_id)  # now, not after a whole training run and export
        if self.gradient_cache_chunk_size is not None and self.gradient_cache_chunk_size <= 0:
            raise ValueError(f"gradient_cache_chunk_size must be positive, got {self.gradient_cache_chunk_size}.")
        adapt_to_cpu(self)
        super().__post_init__()

    @cached_property
    def _setup_devices(self) -> torch.device:
        return setup_devices_with_timeout(self)


def adapt_to_cpu(args: TrainingArguments) -> None:
    """On a machine without an accelerator: `use_cpu`, no pinned memory, and no bf16 unless asked for (TRL's
    configs default it to on). Called before `TrainingArguments.__post_init__`, which would refuse bf16 there."""
    if not args.use_cpu and not _has_accelerator():
        # Without it accelerate's PartialState treats `accelerate launch --multi_gpu` / torchrun processes on a
        # CPU-only machine as N independent single-process runs (each saving, none sharing negatives).
        args.use_cpu = True
        if getattr(args, "bf16", None) is None:
            args.bf16 = False
    if args.use_cpu:
        args.dataloader_pin_memory = False  # pinning is for host-to-GPU copies; on the CPU it only warns


def setup_devices_with_timeout(args: TrainingArguments) -> torch.device:
    """`TrainingArguments._setup_devices` with `ddp_timeout` given to a CPU (gloo) process group too."""
    # transformers passes `ddp_timeout` to the process group on every backend but the CPU one: a CPU run (gloo)
    # got the 30-minute default, so a stopped rank hung its peers that long. Creating the group here with the
    # timeout first makes the parent's set-up reuse it (accelerate only creates a group when none exists).
    if (args.use_cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")) and not (
        torch.distributed.is_available() and torch.distributed.is_initialized()
    ):
        from accelerate import PartialState

        PartialState(cpu=True, backend=args.ddp_backend, timeout=args.ddp_timeout_delta)
    return TrainingArguments._setup_devices.func(args)


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()
