"""Machinery every embedding trainer shares: model/LoRA set-up, per-side embedding (with GradCache), cross-rank
gradient scaling, non-finite-loss stop, atomic checkpoints, metric logging and the final inference export.

Method trainers (`HardNegContrastiveTrainer`, `DistillEmbedTrainer`, ...) only implement `compute_embedding_loss`.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import logging
import warnings
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, enable_full_determinism, set_seed

from ..distributed import GradCache, distributed_loss_scale
from ..modeling import MultimodalEmbeddingModel
from ..modeling.preparation import freeze_vision_tower as freeze_vision_tower  # its home before modeling/
from ..modeling.preparation import is_vision_parameter
from .arguments import EmbeddingTrainingArguments
from .embedding_mixin import EmbeddingTrainerMixin

logger = logging.getLogger(__name__)

# Set in a batch that accelerate completed with repeated rows (see `EmbeddingTrainer.get_batch_samples`): how many
# rows of the gathered global batch are real. Absent from every other batch.
REAL_ROWS_KEY = "real_global_rows"


class _SkippedRowsReport(TrainerCallback):
    """Repeats at the end of training how many bad rows the pre-training check left out (on_bad_row="skip")."""

    def __init__(self, skipped: dict[str, int]):
        self.skipped = skipped

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            counts = ", ".join(f"{n} of the {what}" for what, n in self.skipped.items())
            logger.warning(
                "Bad rows left out of training (on_bad_row='skip'): %s; each was logged before training.", counts
            )


# Set by `_CountingSkippedRows` in a batch of streamed rows: how many bad rows the streamed check left out before them.
SKIPPED_ROWS_KEY = "bad_rows_skipped"


class _StreamedSkippedRowsReport(TrainerCallback):
    """Reports at the end of training how many bad rows of the streams the trainer read were left out
    (on_bad_row="skip"), summed over the ranks (each counts the rows of its own batches)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_end(self, args, state, control, **kwargs):
        counts = torch.tensor(list(self.trainer._stream_skipped.values()), device=args.device)
        train, evaluation = (int(n) for n in self.trainer.accelerator.reduce(counts, reduction="sum"))
        if state.is_world_process_zero and (train or evaluation):
            logger.warning(
                "Bad rows left out of the streamed data (on_bad_row='skip'): %d of the training stream, %d of the "
                "eval stream(s), among the rows read; each was logged as it streamed in.",
                train, evaluation,
            )


class _CountingSkippedRows:
    """A collator over streamed rows: the inner collator's batch, plus under :data:`SKIPPED_ROWS_KEY` the bad rows
    the streamed check left out before these rows (their ``SKIPPED_ROWS_COLUMN``), as a plain int (no device sync).
    Everything else is the inner collator's."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        from ..data.schema import SKIPPED_ROWS_COLUMN

        skipped = sum(int(row.pop(SKIPPED_ROWS_COLUMN, None) or 0) for row in rows)
        batch = self.collator(rows)
        batch[SKIPPED_ROWS_KEY] = skipped
        return batch

    def __getattr__(self, name):
        if name == "collator":  # not set yet (unpickling in a data-loader worker)
            raise AttributeError(name)
        return getattr(self.collator, name)


class _ScaleGrad(torch.autograd.Function):
    """Identity in the forward pass, multiplies the gradient in the backward pass (keeps logged losses honest)."""

    @staticmethod
    def forward(ctx, tensor, scale):
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class EmbeddingTrainer(EmbeddingTrainerMixin, Trainer):
    """Base class of the embedding trainers. Subclasses implement :meth:`compute_embedding_loss`.

    Args:
        model: a `MultimodalEmbeddingModel`, or a hub id / directory (a saved model or a plain backbone).
        args: an `EmbeddingTrainingArguments` subclass instance.
        processing_class: the processor; defaults to the one saved with the model.
        peft_config: a `peft.LoraConfig` (e.g. `trl.get_peft_config(model_args)`) to train adapters only.
        evaluators: callables `evaluator(model) -> dict` (e.g. `RetrievalEvaluator`, `TeacherAgreementEvaluator`)
            run by an `EmbeddingEvalCallback` at each evaluation and logged through the trainer.
        dataset_mixture: the `DatasetMixture` that `train_dataset` was loaded from (`DatasetMixture.load()`): rows
            are then drawn by its weights, seeded by `data_seed` (else `seed`), and with `same_source_batches` each
            global batch from one source (`mm_embed_trl.data.mixture`).
    """

    _tag_names = ["mm-embed-trl"]
    # Per-row dataset columns the method's loss reads (judge scores, teacher vectors): the default collator hands
    # them through as ``inputs[column]``, one (B, ...) tensor each.
    extra_columns: tuple[str, ...] = ()
    # True when no batch ever carries images (then ranks run the same modules without a blank-image forward).
    _text_only_batches = False

    def __init__(
        self,
        model: MultimodalEmbeddingModel | str,
        args: EmbeddingTrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        data_collator=None,
        callbacks=None,
        peft_config=None,
        evaluators=None,
        dataset_mixture=None,
        **kwargs,
    ):
        self.dataset_mixture = dataset_mixture
        if dataset_mixture is not None and args.train_sampling_strategy != "random":
            raise ValueError(
                f"train_sampling_strategy={args.train_sampling_strategy!r} contradicts dataset_mixture, whose weights "
                "decide the order of the rows: leave train_sampling_strategy at 'random' (its default)."
            )
        self._streamed_training = _is_stream(train_dataset)
        eval_streams = any(_is_stream(d) for d in _eval_datasets(eval_dataset))
        streams = self._streamed_training or eval_streams
        self._stream_run: dict[str, Any] = {}  # this train() call's batches from a stream (_batches_pass_after_pass)
        self._stream_skip = 0  # batches a resumed run skips on the stream (get_resumed_dataloader)
        if self._streamed_training:
            self._check_stream_options(train_dataset, args)
        if args.world_size > 1 and eval_streams:
            # accelerate would read it on the main process and cut its batches along dim 0 (Qwen-VL's flattened image
            # patches included), or, read per rank, shards of unequal size would leave ranks waiting at the end
            raise ValueError(
                f"An eval dataset is a stream (a datasets.IterableDataset) and {args.world_size} processes run: "
                "evaluate on a map-style dataset instead, e.g. datasets.Dataset.from_list(list(stream.take(n))) "
                "(an eval stream works on one process)."
            )
        # Check the data before any model work: a bad row found hours into training is the expensive kind. A stream
        # is checked as it streams (data.validation.check_streamed_rows).
        train_dataset, eval_dataset = self.check_datasets(train_dataset, eval_dataset, args)
        if args.freeze_vision_tower and peft_config is not None and args.lora_target == "all":
            raise ValueError(
                "freeze_vision_tower=True contradicts lora_target='all' (adapters in the vision tower would train); "
                "use lora_target='language_model', or unfreeze the vision tower."
            )
        model, processing_class = self.prepare_embedding_model(
            model, processing_class, args, **(args.model_init_kwargs or {})
        )
        if peft_config is not None:
            # LoRA draws its A matrices from the global RNG, and Trainer.__init__ seeds only later: seed as it does.
            enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
            model.add_lora(peft_config, target=args.lora_target)
        if args.gradient_checkpointing and model.has_lora:
            # Reentrant checkpointing needs an input that requires grad when only adapters train.
            model.backbone.enable_input_require_grads()
        vision_trains = any(p.requires_grad for n, p in model.backbone.named_parameters() if is_vision_parameter(n))
        if args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = vision_trains
        if data_collator is None:
            data_collator = self.default_collator(model, processing_class, args)
        check_rows = getattr(data_collator, "check_rows", None)
        if check_rows is not None:  # the part of the row contract only the collator can judge, still before training
            train_dataset, eval_dataset = self._check_each(
                train_dataset, eval_dataset, args,
                lambda dataset, what: check_rows(dataset, what=what, on_bad_row=args.on_bad_row),
            )
        # bad rows a streamed check left out, per mode, counted as their batches arrive (the rows carry the count)
        self._stream_skipped = {"train": 0, "eval": 0}
        if streams:
            data_collator = _CountingSkippedRows(data_collator)
        self.grad_cache = GradCache(args.gradient_cache_chunk_size) if args.gradient_cache_chunk_size else None
        self._chunk_cache = None  # (loss, GradCache handles) for the chunk-by-chunk backward (DeepSpeed, FSDP)
        self._last_train_loss: torch.Tensor | None = None
        self._output_dir_claimed = False
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        callbacks = list(callbacks or [])
        if self.skipped_rows:
            callbacks.append(_SkippedRowsReport(self.skipped_rows))
        if streams and args.on_bad_row == "skip":
            callbacks.append(_StreamedSkippedRowsReport(self))
        eval_callback = None
        if evaluators:
            from ..evaluation import EmbeddingEvalCallback

            eval_callback = EmbeddingEvalCallback(evaluators)
        super().__init__(
            model=model,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            data_collator=data_collator,
            callbacks=callbacks,
            **kwargs,
        )
        self._coalesced_reduction = None  # open DeepSpeed coalesce_grad_reduction block (GradCache under ZeRO)
        zero_stage = self.zero_stage
        if self.grad_cache is not None and zero_stage is not None and zero_stage >= 2 and not _can_coalesce():
            # ZeRO-2/3 reduce and partition gradients inside every engine.backward; with one backward per chunk the
            # result was measured wrong (tests/test_sharded.py). DeepSpeed's coalesce_grad_reduction is the fix.
            raise ValueError(
                f"gradient_cache_chunk_size under DeepSpeed ZeRO-{zero_stage} needs DeepSpeed's "
                "`engine.coalesce_grad_reduction` (present in 0.19.8), which this DeepSpeed lacks. "
                "Upgrade DeepSpeed, or "
                "use ZeRO-1 / DDP with GradCache, or plain batches with gradient accumulation."
            )
        self._check_final_save_can_gather()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            # Sharded weights are gathered collectively module by module (ZeRO-3, FSDP) and ZeRO reduces gradient
            # buckets of the same parameters on every rank: a text-only batch on one rank must still run (and, when
            # it trains, give a zero gradient to) the vision tower another rank runs on images.
            if not self._text_only_batches and (self.shards_weights or vision_trains):
                model.run_vision_tower_in_every_forward(self.processing_class)
        if self.args.n_gpu > 1:
            # torch.nn.DataParallel would scatter the per-side batches and Qwen's flattened pixel patches along dim 0
            # (breaking their pairing with image_grid_thw) and gather no cross-device negatives.
            raise ValueError(
                f"{self.args.n_gpu} GPUs in one process (DataParallel) are not supported: launch one process per GPU "
                "with `accelerate launch` or `torchrun`."
            )
        if eval_callback is not None:
            eval_callback.attach(self)  # registers it and logs through the trainer (feeds metric_for_best_model)
        if hasattr(self.model, "add_model_tags"):
            self.model.add_model_tags(self._tag_names)

    # ------------------------------------------------------------------ hooks for subclasses
    def check_datasets(self, train_dataset, eval_dataset, args):
        """Check every row of the datasets before training (`data.validation`): returns the datasets to use, bad
        rows left out under `on_bad_row="skip"` (counted in `self.skipped_rows`), with a row index column."""
        from ..data.validation import check_training_rows

        def check(dataset, what):
            return check_training_rows(dataset, what=what, on_bad_row=args.on_bad_row, **args.row_contract)

        return self._check_each(train_dataset, eval_dataset, args, check)

    def _check_stream_options(self, stream, args) -> None:
        """What training on a stream (a ``datasets.IterableDataset``) needs, checked before the model loads.

        accelerate's default for an iterable dataset is ``dispatch_batches=True``: the main process reads every
        batch, and the other ranks get slices of it cut along dim 0, which cuts Qwen-VL's flattened image patches
        away from their rows (and puts all image decoding on one process). Each rank reads its own rows instead
        (``dispatch_batches=False``): accelerate gives each rank ``stream.shard(world_size, rank)`` (its own shards)
        when the stream has at least ``world_size`` shards, else every rank reads the whole stream and keeps its
        slice of each batch (``IterableDatasetShard``); ``datasets`` then deals each rank's shards to its data-loader
        workers, never one shard to two workers.
        """
        if args.max_steps is None or args.max_steps <= 0:
            raise ValueError(
                "The training dataset is a stream (a datasets.IterableDataset), which has no length, so the number of "
                "steps cannot be derived from num_train_epochs: set max_steps (--max_steps N), the optimizer steps "
                "to train (one pass over the stream ends when it runs out and the next begins, reshuffled by "
                "set_epoch)."
            )
        if self.dataset_mixture is not None:
            raise ValueError(
                "dataset_mixture draws rows by index from a map-style dataset; a stream has none. Interleave the "
                "streams with datasets.interleave_datasets(..., probabilities=...) instead."
            )
        config = args.accelerator_config
        if config.dispatch_batches:
            raise ValueError(
                "accelerator_config.dispatch_batches=True with a streamed training dataset: the main process would "
                "read every batch and the other ranks get slices cut along dim 0, which separates image patches from "
                "their rows. Leave dispatch_batches unset (each rank then reads its own rows)."
            )
        config.dispatch_batches = False
        workers = max(1, args.dataloader_num_workers)
        readers = workers * args.world_size
        shards = stream.num_shards
        if shards < readers:
            if shards < args.world_size:
                where = (
                    f"fewer than the {args.world_size} processes: every process reads the whole stream and keeps its "
                    "slice of each batch (the same rows read world_size times)"
                )
            else:
                where = f"fewer than {readers} readers ({args.world_size} processes x {workers} data-loader workers)"
            logger.warning(
                "The training stream has %d shard(s), %s; datasets gives a worker whole shards only, so %d reader(s) "
                "idle (no row is read twice by one process). Stream from more files, or "
                "Dataset.to_iterable_dataset(num_shards=...) / IterableDataset.reshard(), or lower "
                "dataloader_num_workers.",
                shards, where, readers - shards,
            )

    def _check_each(self, train_dataset, eval_dataset, args, check):
        """Run `check(dataset, what) -> dataset` on the training and every eval dataset (main process first, so the
        others read its cached facts) and record the rows each check left out."""
        from ..data.validation import rows_left_out

        self.skipped_rows: dict[str, int] = {}

        def run(dataset, what):
            if dataset is None:
                return None
            checked = check(dataset, what)
            if rows_left_out(checked):  # by this check, or by the example's before the model loaded
                self.skipped_rows[what] = rows_left_out(checked)
            return checked

        with args.main_process_first(desc="checking the dataset rows"):
            train_dataset = run(train_dataset, "training dataset")
            if isinstance(eval_dataset, dict):
                eval_dataset = {name: run(ds, f"eval dataset {name!r}") for name, ds in eval_dataset.items()}
            else:
                eval_dataset = run(eval_dataset, "eval dataset")
        return train_dataset, eval_dataset

    def default_collator(self, model, processing_class, args):
        from ..data.collators import EmbeddingCollator

        return EmbeddingCollator(
            processing_class,
            template=model.config.prompt_template,
            image_root=args.image_root,
            max_length=args.max_length,
            num_negatives=args.num_negatives,
            extra_columns=self.extra_columns,
        )

    def compute_embedding_loss(self, model, inputs) -> tuple[torch.Tensor, dict[str, float]]:
        """Return (loss over the global batch, metrics to log). Embed all sides with ONE :meth:`embed` call."""
        raise NotImplementedError

    def _get_train_sampler(self, train_dataset=None):
        if self.dataset_mixture is None:
            return super()._get_train_sampler(train_dataset)
        sampler = self.mixture_sampler(train_dataset if train_dataset is not None else self.train_dataset, self.args)
        if self.is_world_process_zero():
            shares = ", ".join(f"{s.name!r} {n}" for s, n in zip(self.dataset_mixture.sources, sampler.counts))
            logger.info("Dataset mixture, rows per epoch: %s (%d in all, seed %d).", shares, len(sampler), sampler.seed)
        return sampler

    def mixture_sampler(self, dataset, args):
        """The `dataset_mixture`'s sampler over `dataset`, seeded by `data_seed` (else `seed`)."""
        # accelerate deals the sampler's batches to the ranks in turn: a block of one global batch is one step
        per_device = getattr(self, "_train_batch_size", args.per_device_train_batch_size)
        block = per_device * args.world_size if self.dataset_mixture.same_source_batches else 1
        seed = args.data_seed if args.data_seed is not None else args.seed
        return self.dataset_mixture.sampler(dataset, seed=seed, block_size=block)

    # ------------------------------------------------------------------ shared machinery
    def embed(self, model, *encs: dict[str, Any], select=None) -> list[Any]:
        """Embed each processed side (`enc`) of the batch; returns one result per side.

        ``select(output)`` picks what a side yields from the model's `EmbeddingOutput` (default: ``embeddings``): a
        tensor or a tuple of tensors with one row per input, or a per-call scalar as a ``(1,)`` tensor (e.g. the
        summed LM loss). Without GradCache all sides go through ONE model call (DDP arms its reducer once per
        forward). Under GradCache each side is embedded chunk-wise without graph and recorded for the re-forward in
        backward; a ``(1,)`` output then comes back with one entry per chunk.
        """
        select = select or (lambda output: output.embeddings)
        if self.grad_cache is not None and model.training and torch.is_grad_enabled():
            from ..data.collators import split_batch

            out = []
            for enc in encs:
                chunks = split_batch(enc, self.grad_cache.chunk_size)
                embeddings, handle = self.grad_cache.embed(lambda chunk: select(model(**chunk)), chunks)
                self._cache_handles.append(handle)
                out.append(embeddings)
            return out
        if len(encs) == 1:
            return [select(model(**encs[0]))]
        return [select(output) for output in model(batches=list(encs)).outputs_per_batch]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """`Trainer.get_batch_samples`, marking a batch that accelerate completed with repeated rows (see
        `without_repeated_rows`) as it leaves the data loader (Trainer takes a whole accumulation window ahead, so
        the data loader's state at loss time may already be the next batch's). On a stream the batches run on from
        pass to pass (`_batches_pass_after_pass`)."""
        if self._streamed_training:
            epoch_iterator = self._batches_pass_after_pass(epoch_iterator)
        marked = _mark_repeated_rows(epoch_iterator, self.accelerator)
        return super().get_batch_samples(marked, num_batches, device)

    def get_resumed_dataloader(self, dataloader, num_batches):
        """`Trainer.get_resumed_dataloader`; on a stream the batches already trained are skipped by
        `_batches_pass_after_pass`, which counts them across passes (Trainer's own skip counts them in the first
        pass only, and went on with the next pass from its start)."""
        if not self._streamed_training:
            return super().get_resumed_dataloader(dataloader, num_batches)
        self._stream_skip = num_batches
        return dataloader

    def _batches_pass_after_pass(self, epoch_iterator):
        """This process's batches from a stream, without end: when its pass runs out, its next pass begins.

        A stream has no length, so for Trainer one "epoch" is the whole run (`max_steps` steps). Each rank reads its
        own shards, and shards differ in size, so ranks run out of a pass at different batches. Left to Trainer, a
        rank that ran out mid-way through an accumulation window trained a short window while another rank began
        its next pass, and their collectives (the loss's gathers, DDP's all-reduce) no longer paired up: the run
        hung. Here every window is full: a rank that runs out goes on with its next pass (`set_epoch(pass)`:
        reshuffled), independently of the others, whose passes end where theirs do. No row is left out, and a
        resumed run skips the batches already trained across passes, so it goes on at the exact batch.
        """
        run = self._stream_run
        if run.get("first_pass") is not epoch_iterator:  # a new training loop: Trainer's iterator is the first pass
            skip, self._stream_skip = self._stream_skip, 0
            run.update(first_pass=epoch_iterator, batches=self._stream_passes(epoch_iterator, skip))
        return run["batches"]

    def _stream_passes(self, first_pass, skip: int):
        loader = self.callback_handler.train_dataloader  # the prepared loader, not a resumed run's skipping one
        for number in itertools.count():
            read = 0
            for batch in first_pass if number == 0 else self._next_pass(loader, number):
                read += 1
                if skip:
                    skip -= 1
                    continue
                yield batch
            if not read:
                raise ValueError(
                    f"The training stream gave process {self.args.process_index} of {self.args.world_size} no rows in "
                    f"pass {number + 1}: its share of the stream ({_num_shards(loader.dataset)} shard(s)) is empty. "
                    "Stream more rows or files, or use fewer processes."
                )

    def _next_pass(self, loader, number: int):
        """Pass `number` over the stream, reshuffled (`set_epoch`). Starting it draws a seed from torch's CPU generator
        (the data loader's base seed), which a resumed run would have drawn before restoring the checkpoint's
        generator state, and so fall one draw behind: the pass starts on a generator of its own, seeded by the pass."""
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(number)
        batches = iter(loader)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed + number)
            first = next(batches, _NO_BATCH)  # the loader's generator starts here
        return iter(()) if first is _NO_BATCH else itertools.chain([first], batches)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._stream_run = {}  # the stream's open pass (and its data-loader workers) ends with the run
            self._stream_skip = 0

    def without_repeated_rows(self, inputs, *gathered):
        """The global-batch tensors ``gathered`` (every rank's rows in rank order, as `gather_with_grad` and
        `gather_no_grad` return them; None passes) cut to the rows that are not repeats.

        Across processes accelerate completes an uneven last batch of the data loader with rows from the start of
        the epoch (`even_batches`, its default): as extra copies among the negatives they would weigh twice or more
        in the softmax. They come after the real rows of the gathered batch (what `gather_for_metrics` drops), so
        the step equals a single process's step on the unique rows. A trainer calls this on its gathered batch;
        one that does not gets a warning naming the count of repeated rows.
        """
        self._repeated_rows_left_out = True
        real = inputs.get(REAL_ROWS_KEY)
        if real is None:
            return gathered
        return tuple(None if t is None else t[:real] for t in gathered)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if SKIPPED_ROWS_KEY in inputs:
            self._stream_skipped["train" if model.training else "eval"] += inputs.pop(SKIPPED_ROWS_KEY)
        self._cache_handles: list = []
        self._repeated_rows_left_out = False
        loss, metrics = self.compute_embedding_loss(model, inputs)
        if inputs.get(REAL_ROWS_KEY) is not None and not self._repeated_rows_left_out:
            self._warn_repeated_rows(inputs[REAL_ROWS_KEY], model.training)
        mode = "train" if model.training else "eval"
        for key, value in metrics.items():
            # kept as device tensors: converting here would sync host and device at every step
            self._metrics[mode][key].append(value.detach() if torch.is_tensor(value) else torch.tensor(float(value)))
        if model.training and torch.is_grad_enabled():
            # One scalar sync per step, before any backward: a non-finite loss never reaches the weights (nor,
            # through them, a checkpoint), also under DeepSpeed, whose backward already steps the optimizer.
            self._check_finite(loss)
            self._last_train_loss = loss.detach()  # read (one sync) only when a checkpoint records its health
            # The loss spans the global batch but only this rank's slice carries gradient; DDP averages over ranks,
            # so scale the gradient (not the logged value) by the world size to match single-process training.
            scale = distributed_loss_scale() if self.args.gather_across_devices else 1.0
            if scale != 1.0:
                loss = _ScaleGrad.apply(loss, scale)
            if self._cache_handles and self._chunkwise_backward:
                self._chunk_cache = (loss, self._cache_handles)  # replayed chunk by chunk in training_step
            elif self._cache_handles:
                loss = self.grad_cache.attach(loss, self._cache_handles, model=model)
        self._cache_handles = []
        return (loss, {"loss": loss.detach()}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.grad_cache is not None and self._chunkwise_backward:
            return self._chunkwise_grad_cache_step(model, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    @property
    def _chunkwise_backward(self) -> bool:
        # Sharding engines hook their reduction into every backward; re-running chunks inside one backward (the
        # DDP path) would reduce a parameter twice, so they get one backward call per chunk instead.
        return self.is_deepspeed_enabled or self.is_fsdp_enabled

    def _chunkwise_grad_cache_step(self, model, inputs) -> torch.Tensor:
        """GradCache under DeepSpeed ZeRO and FSDP: one backward per chunk, gradients reduced once per step.

        ZeRO rejects a parameter's gradient computed twice inside one backward, which is where GradCache re-runs
        inside a single backward break (Tevatron's issue #206), so every chunk gets its own backward.
        - DeepSpeed ZeRO >= 1: every chunk (and micro-batch) of an accumulation window runs inside
          `engine.coalesce_grad_reduction`; gradients stay local and are reduced once when the window closes,
          then one `engine.step()`. ZeRO-2's own per-backward partitioning was measured to give wrong gradients
          for this pattern. Without that block (ZeRO-0, or an older DeepSpeed under ZeRO-1) the accumulation
          boundary is held open until the last chunk instead: DeepSpeed's manual-accumulation pattern.
        - FSDP: every chunk but the step's last runs under `accelerator.no_sync` (FSDP2 keeps unsharded
          gradients locally), the last one reduce-scatters; the Trainer then steps as usual.
        """
        model.train()
        inputs = self._prepare_inputs(inputs)
        self._chunk_cache = None
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        sync = self.accelerator.sync_gradients
        engine = self.accelerator.deepspeed_engine_wrapped.engine if self.is_deepspeed_enabled else None
        coalesce = engine is not None and self.zero_stage >= 1 and _can_coalesce()
        if coalesce and self._coalesced_reduction is None:
            self._coalesced_reduction = contextlib.ExitStack()
            self._coalesced_reduction.enter_context(engine.coalesce_grad_reduction())
        if self._chunk_cache is not None:
            cached_loss, handles = self._chunk_cache
            self._chunk_cache = None
            # The Trainer's own backward would divide by the accumulation steps; do it here.
            cached_loss = cached_loss / self.current_gradient_accumulation_steps
            for surrogate, is_last in self.grad_cache.surrogate_losses(cached_loss, handles):
                reduce_now = sync and is_last
                if engine is None:
                    with contextlib.nullcontext() if reduce_now else self.accelerator.no_sync(model):
                        self.accelerator.backward(surrogate)
                    continue
                if not coalesce:
                    engine.set_gradient_accumulation_boundary(is_boundary=reduce_now)
                engine.backward(surrogate, scale_wrt_gas=False)
        if sync and engine is not None:
            if self._coalesced_reduction is not None:
                self._coalesced_reduction.close()  # the single reduction of every chunk of the window
                self._coalesced_reduction = None
            engine.set_gradient_accumulation_boundary(is_boundary=True)
            engine.step()
        return loss.detach() / self.current_gradient_accumulation_steps

    def _warn_repeated_rows(self, real: int, training: bool) -> None:
        if getattr(self, "_warned_repeated_rows", False):
            return
        self._warned_repeated_rows = True
        per_device = self._train_batch_size if training else self.args.per_device_eval_batch_size
        total = per_device * self.accelerator.num_processes
        logger.warning(
            "The last %s batch of the epoch holds %d rows for %d processes: accelerate completed it with %d rows "
            "repeated from the start of the epoch (even_batches), and %s keeps them in its loss (without "
            "gather_across_devices it cannot tell them apart), where they weigh twice. Set dataloader_drop_last=True, "
            "or a batch that divides the dataset, to avoid them.",
            "training" if training else "evaluation", real, self.accelerator.num_processes, total - real,
            type(self).__name__,
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # transformers computes no loss for a label-free model: compute ours.
        _mark(inputs, self.accelerator)  # the evaluation loop takes one batch at a time
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        metrics = self._metrics[mode]
        averaged = {}
        for key, values in metrics.items():
            if values:
                value = torch.stack([v.to(self.args.device, torch.float64) for v in values]).mean()
                averaged[key] = self.accelerator.reduce(value, reduction="mean").item()
        metrics.clear()
        prefix = "eval_" if mode == "eval" else ""
        logs = {**logs, **{prefix + k: v for k, v in averaged.items()}}
        super().log(logs, start_time)




def _is_stream(dataset) -> bool:
    import datasets

    return isinstance(dataset, datasets.IterableDataset)


def _eval_datasets(eval_dataset) -> list:
    if isinstance(eval_dataset, dict):
        return list(eval_dataset.values())
    return [] if eval_dataset is None else [eval_dataset]


_NO_BATCH = object()


def _num_shards(dataset) -> str:
    return str(getattr(dataset, "num_shards", "?"))


def _mark(batch, accelerator) -> None:
    """Record in ``batch`` how many rows of its gathered global batch are real, when it is a data loader's last
    batch and accelerate completed it across processes with repeated rows (`gradient_state.remainder`: what
    `Accelerator.gather_for_metrics` keeps)."""
    state = accelerator.gradient_state
    if accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0 and isinstance(batch, Mapping):
        batch[REAL_ROWS_KEY] = state.remainder


def _mark_repeated_rows(batches, accelerator):
    for batch in batches:
        _mark(batch, accelerator)  # right after the data loader yields it: its state is this batch's
        yield batch


def _can_coalesce() -> bool:
    """Whether the installed DeepSpeed can coalesce ZeRO's gradient reduction over several backward calls."""
    try:
        from deepspeed import DeepSpeedEngine
    except ImportError:
        return False
    return hasattr(DeepSpeedEngine, "coalesce_grad_reduction")


# Moved to trainers/arguments.py (the options of both trainer families): the old names warn.
_MOVED_TO_ARGUMENTS = ("EmbeddingRunArguments", "adapt_to_cpu", "check_option_types", "setup_devices_with_timeout")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_ARGUMENTS:
        warnings.warn(
            f"mm_embed_trl.trainers.base.{name} moved to mm_embed_trl.trainers.arguments.{name}; the old name will be "
            "removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(f"{__package__}.arguments"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
