"""`EmbeddingEvalCallback`: runs embedding evaluators during ``Trainer`` training, and the rule of which ranks run
an evaluator (:func:`evaluates_on_every_rank`), which the examples' before/after evaluation
(:func:`evaluate_outside_training`) follows too.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

__all__ = ["EmbeddingEvalCallback", "evaluate_outside_training", "evaluates_on_every_rank"]

logger = logging.getLogger(__name__)


def evaluates_on_every_rank(trainer: Any) -> bool:
    """Whether every rank must run an evaluator: with sharded weights (DeepSpeed ZeRO-3, FSDP) each forward gathers
    them collectively, so all ranks evaluate (the same rows, hence the same collectives) and only the main process
    reports. Otherwise the main process evaluates alone. ``trainer=None`` (a callback without its trainer): no."""
    if trainer is None:
        return False
    sharded = getattr(trainer, "shards_weights", None)  # EmbeddingTrainer
    if sharded is not None:
        return bool(sharded)
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "deepspeed_plugin", None)
    return plugin is not None and getattr(trainer, "is_deepspeed_enabled", False) and plugin.zero_stage == 3


def evaluate_outside_training(trainer: Any, evaluator: Callable[[Any], dict], *, before_training: bool):
    """Run ``evaluator`` on the trainer's model before or after ``trainer.train()`` by :func:`evaluates_on_every_rank`;
    returns its metrics where it ran and ``None`` on the ranks that skip it.

    Before training, FSDP has not wrapped the model yet (whole weights everywhere: the main process evaluates), but a
    ZeRO-3 model loaded under ``zero.Init`` is already partitioned and has no engine to gather it: every rank gathers
    the weights for this one evaluation.
    """
    main = trainer.is_world_process_zero()
    if before_training:
        if getattr(trainer, "zero_stage", None) == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(trainer.model.parameters())):
                return evaluator(_embedding_model(trainer))
        return evaluator(_embedding_model(trainer)) if main else None
    sharded = evaluates_on_every_rank(trainer)
    if not (main or sharded):
        return None
    return evaluator(_embedding_model(trainer))  # sharded: each forward gathers the weights, on every rank


def _embedding_model(trainer: Any) -> Any:
    """The model that embeds: the trainer's `inference_model()` (EmbeddingTrainerMixin; for EmbeddingGRPOTrainer
    the MultimodalEmbeddingModel around its policy), else the unwrapped training model."""
    if hasattr(trainer, "inference_model"):
        return trainer.inference_model()
    return _unwrap_model(trainer.model)


def _unwrap_model(model: Any) -> Any:
    """Peel DDP / DeepSpeed style ``.module`` wrappers until something with ``encode`` appears."""
    current = model
    for _ in range(8):  # bounded: wrappers nest a few levels at most
        if callable(getattr(current, "encode", None)):
            return current
        if not hasattr(current, "module"):
            break
        current = current.module
    raise TypeError(
        f"EmbeddingEvalCallback needs a model with an `encode(inputs, side=..., ...)` method; got "
        f"{type(model).__name__}. Train a MultimodalEmbeddingModel (or wrap yours to provide `encode`)."
    )


def _broadcast_from_main(metrics: dict[str, float] | None) -> dict[str, float] | None:
    """Give every rank the main process's metrics (so e.g. ``metric_for_best_model`` works everywhere)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return metrics
    payload = [metrics]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


class EmbeddingEvalCallback(TrainerCallback):
    """Run embedding evaluators during ``Trainer`` training and log their metrics.

    Evaluators are callables ``evaluator(model) -> dict[str, float]`` (:class:`RetrievalEvaluator`,
    :class:`MMEBEvaluator`, ...); a dict ``{name: evaluator}`` prefixes each one's keys with ``name_``. Logged
    keys get ``metric_key_prefix`` (``"eval_recall@1"``), and on ``on_evaluate`` they are also merged into the
    Trainer's metrics dict, so ``metric_for_best_model`` can name them.

    The evaluators run on the unwrapped model switched to eval mode under ``torch.no_grad`` (its train/eval mode is
    restored afterwards), on the world main process only; with sharded weights (DeepSpeed ZeRO-3 / FSDP, known from
    the trainer given as ``trainer=`` or by :meth:`attach`) on every rank, since each forward gathers the weights
    collectively (:func:`evaluates_on_every_rank`). Only the main process logs; with ``sync_across_processes`` its
    results are broadcast to the other ranks.

    Metrics go through ``trainer.log`` (log history, reporting integrations) when the callback knows the
    trainer (``trainer=`` or :meth:`attach`); otherwise they are appended to ``state.log_history`` directly.
    Every run is kept in ``self.history`` as ``{"event", "step", "epoch", **metrics}``.

    Args:
        evaluators: one evaluator, a list of them, or a ``{name: evaluator}`` dict.
        trainer: the Trainer, for logging through ``trainer.log``.
        eval_steps: also evaluate every ``eval_steps`` optimizer steps (works without an eval dataset).
        evaluate_on_evaluate: run whenever the Trainer evaluates.
        evaluate_on_train_begin: run once before training ("step 0" baseline).
        evaluate_on_train_end: run once after training, on the weights training ends with (the best checkpoint
            under ``load_best_model_at_end``); it reuses the last evaluation only when that was of these weights.
        metric_key_prefix: prefix of logged keys (the Trainer's eval prefix).
        sync_across_processes: broadcast the main process's metrics to every rank.
    """

    def __init__(
        self,
        evaluators: Callable[[Any], dict[str, float]]
        | Sequence[Callable[[Any], dict[str, float]]]
        | Mapping[str, Callable[[Any], dict[str, float]]],
        *,
        trainer: Any = None,
        eval_steps: int | None = None,
        evaluate_on_evaluate: bool = True,
        evaluate_on_train_begin: bool = False,
        evaluate_on_train_end: bool = False,
        metric_key_prefix: str = "eval",
        sync_across_processes: bool = True,
    ):
        if isinstance(evaluators, Mapping):
            self.evaluators = list(evaluators.items())
        elif callable(evaluators):
            self.evaluators = [("", evaluators)]
        else:
            self.evaluators = [("", e) for e in evaluators]
        if not self.evaluators:
            raise ValueError("EmbeddingEvalCallback needs at least one evaluator.")
        for name, evaluator in self.evaluators:
            if not callable(evaluator):
                raise TypeError(f"evaluator {name or evaluator!r} is not callable; pass evaluator(model) -> dict.")
        if eval_steps is not None and eval_steps < 1:
            raise ValueError(f"eval_steps must be >= 1 or None, got {eval_steps}.")
        self.trainer = trainer
        self.eval_steps = eval_steps
        self.evaluate_on_evaluate = evaluate_on_evaluate
        self.evaluate_on_train_begin = evaluate_on_train_begin
        self.evaluate_on_train_end = evaluate_on_train_end
        self.metric_key_prefix = metric_key_prefix
        self.sync_across_processes = sync_across_processes
        self.history: list[dict[str, Any]] = []
        self._last: tuple[int, dict[str, float]] | None = None  # (global_step, metrics) of the latest run

    def attach(self, trainer: Any) -> EmbeddingEvalCallback:
        """Register with ``trainer`` and log through it; returns ``self``."""
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def _prefixed(self, key: str) -> str:
        return f"{self.metric_key_prefix}_{key}" if self.metric_key_prefix else key

    def evaluate(self, model: Any) -> dict[str, float]:
        """Run every evaluator on ``model`` (unwrapped, eval mode, no grad) and return the prefixed metrics."""
        module = _unwrap_model(model)
        was_training = getattr(module, "training", False)
        if hasattr(module, "eval"):
            module.eval()
        metrics: dict[str, float] = {}
        try:
            with torch.no_grad():
                for name, evaluator in self.evaluators:
                    for key, value in evaluator(module).items():
                        metrics[self._prefixed(f"{name}_{key}" if name else key)] = float(value)
        finally:
            if hasattr(module, "train"):
                module.train(was_training)
        return metrics

    def _run(self, event: str, state: Any, model: Any) -> dict[str, float] | None:
        step = int(getattr(state, "global_step", 0) or 0)
        if self._last is not None and self._last[0] == step:
            # Already evaluated at this step (e.g. eval_steps and the Trainer's own evaluation coincide, or one
            # on_evaluate per eval dataset, or training ends right after the last evaluation): reuse, don't re-run
            # or re-log. `on_train_end` drops this cache when the Trainer loaded its best checkpoint since.
            return self._last[1]
        is_main = bool(getattr(state, "is_world_process_zero", True))
        metrics = None
        if is_main or evaluates_on_every_rank(self.trainer):
            if model is None:
                raise ValueError(f"EmbeddingEvalCallback.{event}: the Trainer passed no `model` to the callback.")
            metrics = self.evaluate(model)
        if self.sync_across_processes:
            metrics = _broadcast_from_main(metrics)
        if metrics is None:
            return None
        self._last = (step, metrics)
        if is_main:
            self.history.append({"event": event, "step": step, "epoch": getattr(state, "epoch", None), **metrics})
            self._log(metrics, state)
        return metrics

    def _log(self, metrics: dict[str, float], state: Any) -> None:
        if self.trainer is not None:
            self.trainer.log(dict(metrics))  # copy: Trainer.log adds "epoch" to the dict it gets
            return
        entry = dict(metrics)
        if getattr(state, "epoch", None) is not None:
            entry["epoch"] = state.epoch
        entry["step"] = getattr(state, "global_step", 0)
        if getattr(state, "log_history", None) is not None:
            state.log_history.append(entry)
        logger.info("Embedding evaluation at step %s: %s", entry["step"], metrics)

    # ---- TrainerCallback events -------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.evaluate_on_train_begin:
            self._run("train_begin", state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.eval_steps and state.global_step > 0 and state.global_step % self.eval_steps == 0:
            self._run("step", state, model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if not self.evaluate_on_evaluate:
            return
        ours = self._run("evaluate", state, model)
        if ours is not None and metrics is not None:
            metrics.update(ours)  # the Trainer returns (and picks the best checkpoint from) this very dict

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._best_model_replaced_weights(args, state):
            # `load_best_model_at_end`: the Trainer loaded an earlier checkpoint before this event, at the same
            # global_step. The metrics cached for this step belong to the final weights, which are gone: evaluate
            # again (here, or at a later `trainer.evaluate()`) rather than reuse them.
            self._last = None
        if self.evaluate_on_train_end:
            self._run("train_end", state, model)

    def _best_model_replaced_weights(self, args: Any, state: Any) -> bool:
        """Whether the Trainer swapped in its best checkpoint (``load_best_model_at_end``) and that checkpoint is not
        the step whose metrics are cached, so the weights now in the model are not the ones evaluated last."""
        best = getattr(state, "best_model_checkpoint", None)
        if self._last is None or not getattr(args, "load_best_model_at_end", False) or not best:
            return False
        found = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(os.path.normpath(str(best))))
        return found is None or int(found.group(1)) != self._last[0]  # unknown step: assume the weights changed
