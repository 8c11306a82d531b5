"""What every `examples/train_*.py` shares: script arguments, the built-in defaults (tiny backbone + generated data
when nothing is named), model/data resolution and the before/after retrieval report. Examples stay thin:
parse → build → train → evaluate → export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class EmbeddingScriptArguments:
    """Data and run options of the example scripts (model options come from TRL's `ModelConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local parquet/jsonl file or save_to_disk dir in the MMEB-train schema. "
            "Default: the built-in generated shapes dataset."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. an MMEB subset)."})
    # a recipe's list (or mapping) arrives as is; the command line gives JSON text or a YAML file's path
    dataset_mixture: list | str | dict | None = field(
        default=None,
        metadata={
            "help": "Several training datasets instead of --dataset_name: a list of sources ({name_or_path, config, "
            "split, image_root, weight or num_samples, query_instruction, target_instruction}) or a mapping "
            "{sources: [...], same_source_batches: true}; in a recipe, or as JSON / a YAML file on the command line. "
            "name_or_path 'generated' is the built-in shapes data, its config the seed (see "
            "mm_embed_trl.data.mixture)."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_eval_split: str | None = field(
        default=None, metadata={"help": "Held-out split in the same schema, used for retrieval evaluation."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Stream the training split (datasets' streaming=True, hub or local files) instead of loading it: "
            "for corpora that do not fit on disk. Needs --max_steps; rows are checked as they stream in, each rank "
            "and data-loader worker reads its own shards; the held-out split is still loaded whole."
        },
    )
    shuffle_buffer_size: int = field(
        default=1000,
        metadata={
            "help": "With --streaming: shuffle the stream in a buffer of this many rows (and its shards' order), "
            "seeded by --data_seed (else --seed), reshuffled each pass over the stream; 0 keeps the stream's order."
        },
    )
    max_eval_samples: int | None = field(default=512, metadata={"help": "Evaluate on at most N held-out rows."})
    tiny_family: str = field(
        default="qwen2_vl",
        metadata={"help": "Built-in tiny backbone used when no --model_name_or_path is given."},
    )
    generated_train_size: int = field(default=2048, metadata={"help": "Rows of generated training data."})
    generated_eval_size: int = field(default=192, metadata={"help": "Rows of generated held-out data."})
    generated_num_negatives: int = field(
        default=0, metadata={"help": "Explicit hard negatives per generated row (compositional near-misses)."}
    )
    seed_data: int = field(default=0, metadata={"help": "Seed of the generated dataset."})
    evaluate_before_training: bool = field(default=True, metadata={"help": "Report retrieval before training too."})
    use_hub_kernels: bool = field(
        default=False,
        metadata={
            "help": "Let transformers (>= 5.25) swap layers for kernels downloaded from the Hugging Face Hub (on CUDA: "
            "Qwen2-VL's RMSNorm and rotary embedding). Off by default: no code from the Hub without consent, and "
            "offline clusters need none (on the CPU there are no such kernels)."
        },
    )

    def __post_init__(self):
        if self.streaming and self.dataset_mixture is not None:
            raise ValueError(
                "--streaming does not apply to --dataset_mixture (a mixture draws rows by index): stream one dataset, "
                "or interleave streams in Python with datasets.interleave_datasets."
            )
        if self.dataset_mixture is None:
            return
        from .data.mixture import DatasetMixture

        value = self.dataset_mixture
        if isinstance(value, str):
            import yaml

            # a file's path, else the JSON (a YAML subset) text itself
            value = yaml.safe_load(Path(value).read_text() if os.path.isfile(value) else value)
        if self.dataset_name is not None:
            raise ValueError(
                f"Both --dataset_name ({self.dataset_name!r}) and --dataset_mixture are set: list the dataset as one "
                "of the mixture's sources, or drop the mixture."
            )
        if self.max_train_samples is not None:
            raise ValueError(
                f"--max_train_samples ({self.max_train_samples}) does not apply to a dataset mixture: give the sources "
                "num_samples (rows per epoch) instead."
            )
        self.dataset_mixture = DatasetMixture.from_config(value)

    def training_data_name(self, default: str) -> str | list[str]:
        """What the model card names as the training data: the dataset, the mixture's sources, or `default`."""
        if self.dataset_mixture is not None:
            return list(dict.fromkeys(source.name_or_path for source in self.dataset_mixture.sources))
        return self.dataset_name or default


def refuse_stream_and_mixture(script_args, method: str, why_no_stream: str) -> None:
    """For the examples whose trainer samples its own way (GRPO's paired rollouts, distillation's text corpus) and
    needs the whole training set at hand (``why_no_stream``): a dataset mixture and a stream are refused by name."""
    if script_args.dataset_mixture is not None:
        raise ValueError(
            f"--dataset_mixture is not supported by {method}: train on one dataset (--dataset_name), e.g. the sources "
            "concatenated with datasets.concatenate_datasets and saved to one file."
        )
    if script_args.streaming:
        raise ValueError(
            f"--streaming is not supported by {method}: {why_no_stream}. Load the dataset whole (--streaming false)."
        )


# Shared by the examples' CPU demos (a tiny random backbone trained from scratch on generated data).
TINY_CPU_DEFAULTS = dict(
    per_device_train_batch_size=64,
    warmup_steps=0.05,
    lr_scheduler_type="cosine",
    weight_decay=0.0,
    save_strategy="no",
    report_to="none",
    dataloader_num_workers=0,
    seed=0,
)


def parse_args(parser, tiny_defaults: dict[str, Any]) -> tuple:
    """Parse (script, training, model) arguments; the demo's `tiny_defaults` apply only to the built-in tiny run.

    A run that names a model keeps the config class's paper defaults; in both cases a `--config` recipe and then
    the command line override what they set.
    """
    from .trainers.arguments import check_option_types

    parsed = parser.parse_args_and_config()
    if not any(getattr(a, "model_name_or_path", None) for a in parsed):
        parser.set_defaults(**{**TINY_CPU_DEFAULTS, **tiny_defaults})
        parsed = parser.parse_args_and_config()
    for options in parsed:  # the configs check themselves; the script's and TRL's ModelConfig do not
        if dataclasses.is_dataclass(options):
            check_option_types(options)
    return parsed


def resolve_model_path(model_args, script_args) -> tuple[str, bool]:
    """(model id/path, whether it is the built-in tiny backbone)."""
    if model_args.model_name_or_path:
        return model_args.model_name_or_path, False
    from accelerate import PartialState

    from .demo.tiny import get_tiny_backbone
    from .trainers.embedding_mixin import without_zero3_init

    # Built once, by the main process, the other ranks reusing the cached copy; and built whole: under ZeRO-3 the
    # model's construction would be partitioned with collectives that the waiting ranks never join (a hang).
    with PartialState().main_process_first(), without_zero3_init():
        path = get_tiny_backbone(script_args.tiny_family)
    print(
        f"[mm-embed-trl] No --model_name_or_path given: using the built-in tiny random {script_args.tiny_family} "
        f"backbone at {path} (a CPU demo; pass e.g. --model_name_or_path Qwen/Qwen2-VL-2B-Instruct for real runs)."
    )
    return str(path), True


def model_init_kwargs(model_args, script_args=None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"revision": model_args.model_revision}
    if script_args is not None and script_args.use_hub_kernels:
        kwargs["use_kernels"] = True
    if model_args.dtype not in (None, "auto"):
        import torch

        kwargs["dtype"] = getattr(torch, model_args.dtype)
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if getattr(model_args, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    return kwargs


def resolve_datasets(script_args, training_args) -> tuple[Any, Any, str | None]:
    """(train dataset, eval dataset or None, image_root), every row checked (`training_args.on_bad_row`)."""
    from .data.validation import check_training_rows

    if script_args.dataset_mixture is not None:
        image_root = training_args.image_root
        train, evaluation = load_mixture_splits(script_args)
    elif script_args.dataset_name is None:
        from accelerate import PartialState

        from .demo.generated import make_shapes_dataset

        with PartialState().main_process_first():
            data = make_shapes_dataset(
                num_train=script_args.generated_train_size,
                num_eval=script_args.generated_eval_size,
                seed=script_args.seed_data,
                num_negatives=script_args.generated_num_negatives,
            )
        image_root = training_args.image_root or str(data.image_root)
        print(
            f"[mm-embed-trl] No --dataset_name given: using the built-in generated shapes dataset "
            f"({len(data['train'])} train / {len(data['eval'])} held-out rows, images under {image_root})."
        )
        train, evaluation = data["train"], data["eval"]
        if script_args.streaming:  # the demo as a stream: one shard per reader
            train = train.to_iterable_dataset(
                num_shards=max(1, training_args.world_size * max(1, training_args.dataloader_num_workers))
            )
    else:
        image_root = training_args.image_root
        train, evaluation = load_named_splits(script_args)
    if script_args.streaming and script_args.shuffle_buffer_size > 0:
        seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
        train = train.shuffle(seed=seed, buffer_size=script_args.shuffle_buffer_size)
    # Checked here, before the model loads (a stream: its columns; its rows as they stream in); the trainer's own
    # check of the same datasets is then free.
    with training_args.main_process_first(desc="checking the dataset rows"):
        # the image_root the run will use (the generated demo's folder when none was given): its files are looked for
        policy = {**training_args.row_contract, "on_bad_row": training_args.on_bad_row, "image_root": image_root}
        train = check_training_rows(train, what="training dataset", **policy)
        if evaluation is not None:
            evaluation = check_training_rows(evaluation, what="held-out dataset", **policy)
    return train, evaluation, image_root


def load_named_splits(script_args) -> tuple[Any, Any]:
    """(train, eval or None) of `--dataset_name` (hub id, file or save_to_disk dir), `max_*_samples` applied."""
    from .data.loading import first_rows, load_rows_dataset

    name, config = script_args.dataset_name, script_args.dataset_config
    train = load_rows_dataset(
        name, config=config, split=script_args.dataset_train_split, streaming=script_args.streaming
    )
    evaluation = None
    if script_args.dataset_eval_split:
        evaluation = load_rows_dataset(name, config=config, split=script_args.dataset_eval_split)
    if script_args.max_train_samples is not None:
        n = script_args.max_train_samples
        train = train.take(n) if script_args.streaming else first_rows(train, n)
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = first_rows(evaluation, script_args.max_eval_samples)
    return train, evaluation


def load_mixture_splits(script_args) -> tuple[Any, Any]:
    """(train, eval or None) of `--dataset_mixture`: each source's split, the held-out one (`dataset_eval_split` of
    every source) capped at `max_eval_samples` shared among the sources. Sources named ``generated`` are the built-in
    shapes data (``config``: its seed; sizes from the ``generated_*`` options), their images under their own folder."""
    from accelerate import PartialState

    from .data.loading import first_rows, load_rows_dataset

    mixture, generated = script_args.dataset_mixture, {}
    for source in mixture.sources:
        if source.name_or_path == "generated":
            from .demo.generated import make_shapes_dataset

            with PartialState().main_process_first():  # built once, the other ranks reuse the cached copy
                generated[source.name] = make_shapes_dataset(
                    num_train=script_args.generated_train_size, num_eval=script_args.generated_eval_size,
                    seed=int(source.config if source.config is not None else script_args.seed_data),
                    num_negatives=script_args.generated_num_negatives,
                )
    if generated:  # their relative image paths are relative to their own folder
        sources = [
            dataclasses.replace(s, image_root=s.image_root or generated[s.name].image_root)
            if s.name in generated else s
            for s in mixture.sources
        ]
        mixture = dataclasses.replace(mixture, sources=sources)

    def load(source, split, limit=None):
        if source.name in generated:
            rows = generated[source.name][split]
        else:
            rows = load_rows_dataset(source.name_or_path, config=source.config, split=split)
        return first_rows(rows, limit) if limit is not None else rows

    with PartialState().main_process_first():  # the main process writes the prepared sources' cache files
        train = mixture.load(loader=load)
        evaluation = None
        if script_args.dataset_eval_split:
            per_source = script_args.max_eval_samples
            if per_source is not None:
                per_source = max(1, per_source // len(mixture.sources))
            evaluation = mixture.load(
                split=script_args.dataset_eval_split, loader=lambda source, split: load(source, split, per_source)
            )
    return train, evaluation


def train_evaluate_save(
    trainer, evaluator, *, title: str, dataset_name: str | list[str], evaluate_before: bool = True
) -> dict:
    """The examples' common tail: evaluate (on the ranks `evaluation.callback.evaluate_outside_training` picks), train,
    evaluate again, print the comparison, write `retrieval_report.json`, then save the model + sentence-transformers
    export with a card carrying the figures.

    `--resume_from_checkpoint` (a folder or "last") is resolved first, so a bad value or a reused output_dir fails
    before any work; a resumed run has no "before" figures (its starting model is not the untrained one).
    """
    from .evaluation.callback import evaluate_outside_training

    main = trainer.is_world_process_zero()
    resume = trainer.resolve_resume_checkpoint(trainer.args.resume_from_checkpoint)
    if main:
        if trainer.zero_stage is not None:
            engine = f"DeepSpeed ZeRO-{trainer.zero_stage}"
        else:
            engine = "FSDP" if trainer.is_fsdp_enabled else str(trainer.accelerator.distributed_type.value)
        print(f"[mm-embed-trl] Training with {engine} on {trainer.accelerator.num_processes} process(es).")
    before = None
    if resume is not None and main:
        print(f"[mm-embed-trl] Resuming from {resume}; no 'before' evaluation (the model is not the untrained one).")
    # Which ranks evaluate (every rank with sharded weights, else the main process): the callback's rule.
    if evaluator is not None and evaluate_before and resume is None:
        before = evaluate_outside_training(trainer, evaluator, before_training=True)
    trainer.train(resume_from_checkpoint=resume)
    after = None
    if evaluator is not None:
        after = evaluate_outside_training(trainer, evaluator, before_training=False)
    if evaluator is not None and main:
        print(f"\n{title}")
        print(format_comparison(before, after))
        write_report(trainer.args.output_dir, {"before": before, "after": after})
    card = {"eval_results": {"before": before, "after": after}, "dataset_name": dataset_name}
    trainer.save_for_inference(model_card_data=card)
    if main:
        print(f"\nSaved to {trainer.args.output_dir} (+ sentence_transformers*/ for SentenceTransformer(...)).")
    return {"before": before, "after": after}


def ume_r1_evaluator(eval_dataset, image_root: str | None, *, max_new_tokens: int, discriminative_only: bool = False):
    """Held-out evaluation of a UME-R1 model for the examples: one generation per input gives the disc, gen and
    oracle retrieval metrics (`RetrievalEvaluator(encode_kwargs={"mode": "both"})`), plus format compliance
    (`ReasoningFormatEvaluator`); disc retrieval alone for a discriminative-only (DUME) model. None without data."""
    if eval_dataset is None:
        return None
    from .evaluation import ReasoningFormatEvaluator, RetrievalEvaluator

    if discriminative_only:
        return RetrievalEvaluator.from_rows(eval_dataset, image_root, name="heldout", batch_size=32)
    retrieval = RetrievalEvaluator.from_rows(
        eval_dataset, image_root, name="heldout", batch_size=32,
        encode_kwargs={"mode": "both", "max_new_tokens": max_new_tokens},
    )
    formatting = ReasoningFormatEvaluator.from_rows(
        eval_dataset, image_root, name="heldout", max_new_tokens=max_new_tokens
    )

    def evaluate(model) -> dict[str, float]:  # both reports in one table
        return {**retrieval(model), **formatting(model)}

    return evaluate


def write_report(output_dir: str, report: dict[str, Any]) -> str:
    from ._files import write_text_atomic

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "retrieval_report.json")
    write_text_atomic(path, json.dumps(report, indent=2))
    return path


def format_comparison(before: dict[str, float] | None, after: dict[str, float]) -> str:
    headline = ("recall@", "mrr", "ndcg@", "precision@", "spearman", "rate")
    keys = [k for k in after if k.split("_")[-1].startswith(headline)]
    keys = keys or list(after)
    lines = [f"{'metric':<28}{'before':>10}{'after':>10}"]
    for key in keys:
        b = before.get(key) if before else None
        lines.append(f"{key:<28}{(f'{b:.4f}' if b is not None else '-'):>10}{after[key]:>10.4f}")
    return "\n".join(lines)
