"""What every embedding trainer shares whatever runs its step (`transformers.Trainer` or `trl.GRPOTrainer`).

`EmbeddingTrainerMixin` holds the machinery that is not the optimisation step: the run folder (resume from "last",
refusing to mix two runs, locked against a concurrent one), the parallelism queries (`zero_stage`,
`shards_weights`), the finite-loss guard, staged checkpoints with a health record, and the end-of-run save (model,
sentence-transformers export, card) published in one rename. `EmbeddingTrainer` (Trainer) and `EmbeddingGRPOTrainer`
(GRPOTrainer) both put it first in their bases.

A method trainer declares what it is (see `EmbeddingTrainerMixin.method_card`): TRL's `_name` and `_paper`
(`trainers/papers.py`), its method key and aliases, its config class, and the model card's title and description of
the method. Declaring a `method_key` registers the class when it is created (`trainers/registry.py`).

Both families' `__init__` prepare the model in one step, `prepare_embedding_model`: load or wrap it, attach the
processor and the run's prompt template, the method's own preparation (`prepare_model`, e.g. UME-R1's tokens), the
pixel budget and video options saved with the processor, and the frozen vision tower.

A subclass may override three hooks: `inference_model()` (the `MultimodalEmbeddingModel` to probe and save; by default
the unwrapped training model), `_save_final_weights(directory)` (writes that model's files, gathered under
ZeRO-3/FSDP; by default the Trainer's `save_model`) and `_save_resume_state(directory)` (more state in a checkpoint).
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import math
import os
import pathlib
import re
import secrets
import shutil
from typing import Any

import torch

from .._files import RunFolderLockedError, disk_full_as_clear_error, hold_run_folder, publish_dir
from ..distributed.process_group import destroy_process_group_at_exit
from ..modeling import MultimodalEmbeddingModel
from ..modeling.modeling import count_degenerate_rows
from ..modeling.preparation import freeze_vision_tower
from .registry import register_method

logger = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_HEALTH_FILE",
    "EmbeddingTrainerMixin",
    "NonFiniteLossError",
    "last_healthy_checkpoint",
    "latest_complete_checkpoint",
    "without_zero3_init",
]

# Written into every checkpoint: whether its last loss, its weights and the embeddings of a few fixed probe texts
# are finite and non-degenerate (see EmbeddingTrainerMixin._checkpoint_health).
CHECKPOINT_HEALTH_FILE = "mm_embed_trl_health.json"
_PROBE_TEXTS = (
    "a red circle on the left",
    "two blue squares below a green star",
    "Represent the given sentence for retrieval.",
    "The quick brown fox jumps over the lazy dog.",
)
_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class NonFiniteLossError(FloatingPointError):
    """Raised when the loss turns NaN/inf: training stops before the bad gradients touch any weight."""


class EmbeddingTrainerMixin:
    """Non-step machinery of the embedding trainers; mixed in before `Trainer` / `GRPOTrainer` (see module doc)."""

    _output_dir_claimed = False
    # The main process's hold on output_dir's lock (see `_lock_run_folder`), from the run's claim to its final
    # publish; `_run_locked` is the same fact on every rank. `_staging_tag` makes this run's staging names unique.
    _run_hold = None
    _run_locked = False
    _staging_tag: str | None = None
    _complete_at_resume = False  # resumed at max_steps: the run trains nothing (see get_batch_samples)
    _last_train_loss: torch.Tensor | None = None
    # What a method trainer declares of itself (with TRL's `_name` and `_paper`): read by the model card through
    # `method_card()` and by `trainers.identity.trainer_for_method` (the export CLI's --method).
    method_key: str | None = None  # e.g. "unime_stage2"
    method_aliases: tuple[str, ...] = ()  # other names --method accepts, the short one first
    method_title: str | None = None  # the card's "Training method"
    method_short_title: str | None = None  # in the card's model name
    method_description: str | None = None  # the card's "Training" section
    config_class: type | None = None  # the method's config (its TrlParser dataclass)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "method_key" in cls.__dict__ and cls.method_key is not None:  # declared here, not inherited
            register_method(cls)

    @classmethod
    def method_card(cls) -> dict[str, Any] | None:
        """What the model card says of this trainer's method (``collect_card_metadata(method=...)``); None when the
        class declares no method (the card then describes an untrained baseline)."""
        if cls.method_key is None:
            return None
        paper = getattr(cls, "_paper", None)
        return {
            "key": cls.method_key,
            "title": cls.method_title,
            "short": cls.method_short_title,
            "description": cls.method_description,
            "trainer": cls.__name__,
            "paper": dict(paper) if paper else None,
        }

    # ------------------------------------------------------------------ preparation
    def prepare_embedding_model(
        self, model, processing_class, args, **load_kwargs
    ) -> tuple[MultimodalEmbeddingModel, Any]:
        """The model preparation both families run: ``(model, processor)`` ready for the method.

        A hub id or a folder is loaded (``load_kwargs`` go to ``MultimodalEmbeddingModel.from_pretrained``); the
        processor is ``processing_class`` or the model's; ``args.prompt_template`` replaces the model's; then the
        method's :meth:`prepare_model`, the pixel budget and video options (saved with the processor, so inference
        uses them) and, with ``args.freeze_vision_tower``, the frozen vision encoder (its projector kept trainable
        with ``train_vision_projector``). LoRA and the row check stay with each family (Trainer adds adapters to the
        model, TRL wraps the policy itself).
        """
        if isinstance(model, (str, os.PathLike)):
            model = MultimodalEmbeddingModel.from_pretrained(model, **load_kwargs)
        if not isinstance(model, MultimodalEmbeddingModel):
            raise TypeError(
                f"{type(self).__name__} trains a MultimodalEmbeddingModel; got {type(model).__name__}. Wrap a "
                "backbone with MultimodalEmbeddingModel.from_pretrained(<id or dir>) or pass its id/path."
            )
        if processing_class is None:
            processing_class = model.processor
        elif model.processor is None:
            model.set_processor(processing_class)
        if processing_class is None:
            raise ValueError("No processor: pass processing_class=AutoProcessor.from_pretrained(<backbone>).")
        if args.prompt_template is not None:
            model.config.prompt_template = args.prompt_template
        self.prepare_model(model, processing_class, args)
        if getattr(args, "image_max_pixels", None) is not None:
            from ..data.images import set_image_pixel_budget

            set_image_pixel_budget(processing_class, args.image_max_pixels)
        video = {name: getattr(args, f"video_{name}", None) for name in ("fps", "max_frames", "max_pixels")}
        if any(value is not None for value in video.values()):
            from ..data.videos import set_video_options

            set_video_options(processing_class, **video)
        if args.freeze_vision_tower:
            freeze_vision_tower(model, keep_projector=getattr(args, "train_vision_projector", False))
        if args.save_sentence_transformers and args.sentence_transformers_video_inputs:
            from ..export.sentence_transformers import check_video_inputs

            try:  # refused now, not after training, if the model takes no video
                check_video_inputs(model)
            except ValueError as err:
                raise ValueError(
                    f"sentence_transformers_video_inputs=True: {err} Leave it False (videos as PIL frame lists)."
                ) from None
        return model, processing_class

    def prepare_model(self, model: MultimodalEmbeddingModel, processing_class, args) -> None:
        """Hook: ready the model for this method once it is loaded and its processor is known, before the pixel
        budget, the frozen vision tower and LoRA (e.g. add tokens the method needs)."""

    # ------------------------------------------------------------------ hooks
    def inference_model(self) -> MultimodalEmbeddingModel:
        """The embedding model being trained (probed by checkpoint health checks, saved at the end)."""
        return self.accelerator.unwrap_model(self.model)

    def _save_resume_state(self, directory: str) -> None:
        """Write into the checkpoint being staged in `directory` what a resumed run needs beyond the Trainer's state
        (every rank; read back in `_load_optimizer_and_scheduler`, as TRL does). Nothing by default."""

    def _generation_settings(self) -> dict[str, Any] | None:
        """`encode` generation options saved with a generative export (None: the export's defaults)."""
        return None

    def _save_final_weights(self, directory: str) -> None:
        """Write the final `MultimodalEmbeddingModel` files (weights gathered when sharded) into `directory`."""
        self.save_model(directory)

    # ------------------------------------------------------------------ run folder
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """`Trainer.train`, with `resume_from_checkpoint="last"` (or True): the newest complete checkpoint of
        `output_dir`; a fresh run into an `output_dir` holding another run is refused (see `overwrite_output_dir`),
        and so is any run while another live run holds `output_dir` (its lock, held until the final save)."""
        resume = self.resolve_resume_checkpoint(resume_from_checkpoint)
        try:
            with destroy_process_group_at_exit():
                return super().train(resume_from_checkpoint=resume, trial=trial, **kwargs)
        except BaseException:
            self._release_run_folder()  # this run will not publish: free the folder
            raise

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """`Trainer.get_batch_samples`, except when the run is already complete (resumed from a checkpoint at
        `max_steps`, e.g. after a kill during the final save): Trainer checks `max_steps` only after a step, so it
        would take one step more and change the model; stop before fetching that step's batches instead."""
        if self.state.global_step >= self.state.max_steps > 0:
            if not self._complete_at_resume:
                logger.warning(
                    "The checkpoint resumed from is at step %d of max_steps %d: nothing left to train, only the final "
                    "save remains.",
                    self.state.global_step,
                    self.state.max_steps,
                )
            self._complete_at_resume = True
            self.control.should_training_stop = True
            return [], None
        return super().get_batch_samples(epoch_iterator, num_batches, device)

    def resolve_resume_checkpoint(self, resume_from_checkpoint: str | bool | None) -> str | None:
        """The checkpoint folder a run resumes from (None: a fresh run, once `output_dir` is known to be free).

        Raises:
            FileNotFoundError: "last" with no complete checkpoint in `output_dir`, or a folder that does not exist.
            FileExistsError: a fresh run into an `output_dir` holding another run, without `overwrite_output_dir`.
        """
        output_dir = self.args.output_dir
        self._lock_run_folder()
        if resume_from_checkpoint is None or resume_from_checkpoint is False:
            self._claim_output_dir()
            return None
        if resume_from_checkpoint is True or resume_from_checkpoint == "last":
            found = latest_complete_checkpoint(output_dir)
            if found is None:
                raise FileNotFoundError(
                    f"resume_from_checkpoint='last' found no complete checkpoint in output_dir {output_dir!r} (a "
                    "checkpoint-N folder with trainer_state.json and weights). Start a fresh run without "
                    "--resume_from_checkpoint, or pass the path of a checkpoint folder."
                )
            return found
        if not os.path.isdir(resume_from_checkpoint):
            raise FileNotFoundError(
                f"resume_from_checkpoint {resume_from_checkpoint!r} is not a folder. Pass a checkpoint-N folder of "
                "a run, or 'last' for the newest complete one in output_dir."
            )
        return str(resume_from_checkpoint)

    def _hold_folder(self, folder) -> Any:
        """Collective: the main process takes a hold on `folder`'s lock (`hold_run_folder`) and proposes this run's
        staging tag. Every rank raises `RunFolderLockedError` when another live run holds the folder. Returns the
        hold on the main process, None elsewhere."""
        from accelerate.utils import broadcast_object_list

        hold, failure = None, None
        if self.accelerator.is_main_process:
            try:
                hold = hold_run_folder(folder)
            except RunFolderLockedError as err:
                failure = str(err)
        shared = [failure, secrets.token_hex(4)]
        broadcast_object_list(shared)  # the main process's: every rank names staging folders alike
        if shared[0] is not None:
            raise RunFolderLockedError(shared[0])
        self._staging_tag = self._staging_tag or shared[1]
        return hold

    def _lock_run_folder(self) -> None:
        """Hold `output_dir`'s lock from the run's claim to its final publish (`save_for_inference`): a second run
        into the same folder, on any host sharing it, is refused with an error naming this one (see
        `RunFolderLock`). Only the main process locks; the lock is released at the final publish, when training
        fails, or when the process ends (a killed run's lock is taken over by the next run)."""
        if self._run_locked:
            return
        self._run_hold = self._hold_folder(self.args.output_dir)
        self._run_locked = True

    def _release_run_folder(self) -> None:
        if self._run_hold is not None:
            self._run_hold.release()
        self._run_hold, self._run_locked = None, False

    def _check_run_folder_held(self) -> None:
        """Before publishing into the run folder: this run still holds it (main process)."""
        if self._run_hold is not None:
            self._run_hold.check_held()

    def _claim_output_dir(self) -> None:
        """A fresh run must not mix its checkpoints and final model with another run's (rotation, "last" and
        loading would pick the other run's): refuse, or with `overwrite_output_dir` delete the old checkpoints."""
        if self._output_dir_claimed:
            return
        output_dir = self.args.output_dir
        previous = [os.path.basename(c) for c in _checkpoints(output_dir)]
        if os.path.isfile(os.path.join(output_dir, "config.json")):
            previous.append("a final model (config.json)")
        if previous and not self.args.overwrite_output_dir:
            shown = ", ".join(previous[:5]) + (f" and {len(previous) - 5} more" if len(previous) > 5 else "")
            raise FileExistsError(
                f"output_dir {output_dir!r} holds another run ({shown}). Pass --resume_from_checkpoint last to "
                "continue it, --overwrite_output_dir to replace it, or choose another --output_dir."
            )
        if previous:
            logger.warning(
                "overwrite_output_dir: deleting the previous run's checkpoints in %s; its final model is replaced "
                "when this run saves its own.",
                output_dir,
            )
            if self.args.should_save:
                for checkpoint in _checkpoints(output_dir):
                    shutil.rmtree(checkpoint)
            self.accelerator.wait_for_everyone()
        self._output_dir_claimed = True

    @property
    def zero_stage(self) -> int | None:
        """The DeepSpeed ZeRO stage, or None without DeepSpeed."""
        return self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None

    @property
    def shards_weights(self) -> bool:
        """Whether weights are sharded across ranks (ZeRO-3, FSDP): every forward then gathers them collectively."""
        return self.zero_stage == 3 or self.is_fsdp_enabled

    def _check_final_save_can_gather(self) -> None:
        """Under ZeRO-3 the end-of-run save needs the whole model gathered (LoRA is merged and the exports are
        written from it). Without `stage3_gather_16bit_weights_on_model_save` DeepSpeed refuses to gather, and the
        run would fail (or leave only a raw ZeRO checkpoint) after training: refuse it before training instead."""
        if self.zero_stage != 3:
            return
        zero = self.accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
            raise ValueError(
                "DeepSpeed ZeRO-3 with stage3_gather_16bit_weights_on_model_save false: the final save needs the "
                "whole model gathered (to merge LoRA and write the sentence-transformers export), and DeepSpeed "
                'refuses to gather it. Set "zero_optimization": {"stage3_gather_16bit_weights_on_model_save": true} '
                "in the DeepSpeed config (accelerate config: zero3_save_16bit_model: true, as "
                "recipes/accelerate/zero3.yaml does)."
            )

    def _check_finite(self, loss: torch.Tensor) -> None:
        if torch.isfinite(loss.detach()).all():
            return
        checkpoints = _checkpoints(self.args.output_dir) if self.args.output_dir else []
        good = last_healthy_checkpoint(self.args.output_dir) if checkpoints else None
        failed = [os.path.basename(c) for c in checkpoints if (_read_health(c) or {}).get("healthy") is False]
        if good:
            where = f"Last good checkpoint: {good} (finite loss, weights and embeddings). "
        elif checkpoints:
            where = "No checkpoint passed the health check (finite loss, weights and embeddings). "
        else:
            where = "No checkpoint was written yet. "
        if failed:
            where += f"Diverged already, do not resume from: {', '.join(failed)}. "
        raise NonFiniteLossError(
            f"The loss became {loss.item()} at step {self.state.global_step + 1} (epoch {self.state.epoch}); "
            "training stopped before these gradients reached any weight. "
            + where
            + "Try a lower learning rate, bf16 instead of fp16, a larger temperature, or inspect this batch's rows."
        )

    # ------------------------------------------------------------------ saving
    def _save_checkpoint(self, model, trial):
        """Write each checkpoint to a staging folder and rename it into place: never a half-written checkpoint.

        The parent writes into `<run_dir>/.staging/checkpoint-N`; once every rank is done, the main process records
        the checkpoint's health (`CHECKPOINT_HEALTH_FILE`), renames it to `<run_dir>/checkpoint-N`, fixes the paths
        the parent recorded (best checkpoint, trainer_state.json), rotates old checkpoints and only then starts a
        Hub push of the final folder. A failed save (a full disk) removes the staging folder.
        """
        from transformers.trainer_utils import rotate_checkpoints

        if self._complete_at_resume:
            return  # the epoch-end save of a run that trained nothing would rewrite the checkpoint it resumed from
        self._lock_run_folder()  # held since the run's claim, unless the Trainer's loop was driven by hand
        run_dir = self._get_output_dir(trial=trial)
        final = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        staging_root = os.path.join(run_dir, f".staging-{self._staging_tag}")
        staged = os.path.join(staging_root, os.path.basename(final))
        if self.args.should_save:
            _remove_leftovers(run_dir, ".staging*")  # what killed saves left (this run holds the folder)
        self.accelerator.wait_for_everyone()  # before any rank writes its part (DeepSpeed: every rank does)
        original_get_output_dir, original_push = self._get_output_dir, self._push_from_checkpoint
        self._get_output_dir = lambda trial=None: staging_root
        self._push_from_checkpoint = lambda *args, **kwargs: None  # pushed below, from the final folder
        try:
            with disk_full_as_clear_error(final, os.path.basename(final)):
                super()._save_checkpoint(model, trial)
                self._save_resume_state(staged)
        except BaseException:
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            self._get_output_dir, self._push_from_checkpoint = original_get_output_dir, original_push
        self.accelerator.wait_for_everyone()
        health = self._checkpoint_health()
        if self.args.should_save:
            with open(os.path.join(staged, CHECKPOINT_HEALTH_FILE), "w") as f:
                json.dump(health, f, indent=2)
            self._check_run_folder_held()
            publish_dir(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
            keep = self.state.best_model_checkpoint
            if not health["healthy"]:
                logger.warning(
                    "%s holds diverged weights or degenerate embeddings (%s); resume from the last good checkpoint "
                    "(%s) with a lower learning rate.",
                    final,
                    health,
                    last_healthy_checkpoint(run_dir),
                )
                keep = keep or last_healthy_checkpoint(run_dir)  # rotation must not delete the last good one
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit, best_model_checkpoint=keep
            )
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub:
            self._push_from_checkpoint(final)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """`Trainer._load_from_checkpoint`, also for a model whose `save_pretrained` writes other parameter names
        than its own: transformers 5 reverts its weight conversions on save (a Qwen2-VL policy's
        `model.language_model.*` is saved as `model.*`) but Trainer loads the file with `load_state_dict(strict=False)`,
        which then matches nothing and only warns (transformers issue 43701): a resumed GRPO run went on from its
        initial weights. Such a checkpoint is loaded by the model's own `from_pretrained`, which converts the names (a
        second copy of the weights on the CPU while it is copied in)."""
        from transformers import PreTrainedModel

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        saved = _saved_weight_names(resume_from_checkpoint)
        if (
            self.is_deepspeed_enabled
            or self.is_fsdp_enabled
            or not isinstance(target, PreTrainedModel)
            or saved is None
            or saved <= target.state_dict().keys()
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(target.parameters()).dtype
        loaded = type(target).from_pretrained(resume_from_checkpoint, dtype=dtype, device_map=None)
        target.load_state_dict(loaded.state_dict(), strict=True)

    def _checkpoint_health(self) -> dict[str, Any]:
        """Whether the weights being checkpointed are usable: the last training loss, every weight and the
        embeddings of a few fixed probe texts are finite, and no probe embedding is a zero vector.

        A diverging run can keep a finite loss for a step while its weights blow up (to ~1e6 with a huge learning
        rate) and every embedding collapses to zero; the NaN stop must not call such a checkpoint "good". Sharded
        weights (ZeRO-3, FSDP): every rank checks its shard and runs the probe forward (it gathers collectively).
        """
        everywhere = self.shards_weights
        if not (everywhere or self.args.should_save):
            return {}
        model = self.inference_model()
        local = [getattr(p, "ds_tensor", p) for p in model.parameters()]  # ZeRO-3 keeps the shard in ds_tensor
        local = [p.to_local() if hasattr(p, "to_local") else p for p in local]  # FSDP2 DTensors
        finite = torch.stack([torch.isfinite(p).all() for p in local if p.numel()]).all()
        if everywhere:
            finite = self.accelerator.gather(finite.reshape(1).to(self.args.device)).all()
        probes = model.encode(list(_PROBE_TEXTS), batch_size=len(_PROBE_TEXTS))
        loss = float(self._last_train_loss) if self._last_train_loss is not None else None
        health = {
            "global_step": self.state.global_step,
            "last_loss": loss,
            "weights_finite": bool(finite),
            "degenerate_probe_embeddings": count_degenerate_rows(probes),
        }
        health["healthy"] = (
            (loss is None or math.isfinite(loss))
            and health["weights_finite"]
            and health["degenerate_probe_embeddings"] == 0
        )
        return health

    @destroy_process_group_at_exit()
    def save_for_inference(self, output_dir: str | None = None, model_card_data: dict | None = None) -> str:
        """Save the final model to `output_dir` loadable by `MultimodalEmbeddingModel.from_pretrained` (LoRA merged)
        and, unless disabled, its sentence-transformers export in `<output_dir>/sentence_transformers`.

        The trainer's `save_model` gathers sharded weights (DeepSpeed ZeRO-3, FSDP) first; merging and exporting
        then work from that complete copy on disk, so they are correct whatever the parallelism. Everything (weights,
        processor, card, export) is written to a staging folder beside `output_dir` and published in one rename, so a
        kill at any point leaves the previous model or the new one, never a mix; the run's checkpoints and other
        files in `output_dir` are kept. (A model outside a trainer: `mm_embed_trl.export.save_model_for_inference`.)
        The save holds `output_dir`'s lock (see `_lock_run_folder`); saved into the run folder, it ends the run's hold.
        """
        output_dir = pathlib.Path(output_dir or self.args.output_dir).absolute()
        run_folder = output_dir == pathlib.Path(self.args.output_dir).absolute()
        hold = self._hold_folder(output_dir)  # the run's own lock when saving into its folder: another hold on it
        staging = output_dir.parent / f".{output_dir.name}.final-save-{self._staging_tag}"  # alike on every rank
        try:
            if self.args.should_save:
                _remove_leftovers(output_dir.parent, f"{glob.escape('.' + output_dir.name)}.final-save*")
                staging.mkdir(parents=True)
            self.accelerator.wait_for_everyone()
            self._publish_final_save(output_dir, staging, hold, model_card_data)
        finally:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if hold is not None:
                hold.release()
            if run_folder:
                self._release_run_folder()  # the run is complete: the folder is free
        self.accelerator.wait_for_everyone()
        return str(output_dir)

    def _publish_final_save(self, output_dir: pathlib.Path, staging: pathlib.Path, hold, model_card_data) -> None:
        """Write the final model and its exports into `staging` (weights gathered on every rank), then publish it as
        `output_dir` in one rename, if this run still holds that folder's lock."""
        from ..export.final_save import is_run_state, save_model_files, write_inference_extras

        with disk_full_as_clear_error(output_dir, "the final model"):
            self._save_final_weights(str(staging))
            self.accelerator.wait_for_everyone()
            if not self.args.should_save:
                return
            with without_zero3_init():  # plain, whole copies loaded on this process only
                saved = MultimodalEmbeddingModel.from_pretrained(staging)
                if saved.has_lora:
                    saved.merge_lora()
                    save_model_files(saved, staging)
                if self.args.save_sentence_transformers:
                    card = {"training_args": self.args, "method": self.method_card(), **(model_card_data or {})}
                    write_inference_extras(
                        saved, staging, published_as=output_dir, model_card_data=card,
                        generation=self._generation_settings(),
                        video_inputs=self.args.sentence_transformers_video_inputs,
                    )
            if hold is not None:
                hold.check_held()
            publish_dir(staging, output_dir, keep_existing=is_run_state)


def _remove_leftovers(folder, pattern: str) -> None:
    """Remove the entries of `folder` matching `pattern`: staging folders of killed saves (call it only while holding
    the run folder's lock, so that no live run is writing them)."""
    for leftover in pathlib.Path(folder).glob(pattern):
        shutil.rmtree(leftover, ignore_errors=True)


def _checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of a run, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [m for m in map(_CHECKPOINT_NAME.fullmatch, os.listdir(output_dir)) if m]
    paths = [os.path.join(output_dir, m.group(0)) for m in sorted(found, key=lambda m: int(m.group(1)))]
    return [p for p in paths if os.path.isdir(p)]


def _saved_weight_names(checkpoint: str) -> set[str] | None:
    """The parameter names in a checkpoint's safetensors weights (one file or an index), None without them."""
    index = os.path.join(checkpoint, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    single = os.path.join(checkpoint, "model.safetensors")
    if not os.path.isfile(single):
        return None
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return set(f.keys())


def _read_health(checkpoint: str) -> dict | None:
    try:
        with open(os.path.join(checkpoint, CHECKPOINT_HEALTH_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # written before health records existed, or by another tool: unknown


def last_healthy_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of `output_dir` whose health record says its weights and embeddings are usable."""
    return next((c for c in reversed(_checkpoints(output_dir)) if (_read_health(c) or {}).get("healthy")), None)


def latest_complete_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint of `output_dir` the Trainer can resume from (trainer state and weights present).

    Checkpoints are published by rename once complete (see `EmbeddingTrainer._save_checkpoint`); the check also
    skips folders copied or written by other means that lack a part.
    """
    weights = ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors", "pytorch_model.bin")
    for checkpoint in reversed(_checkpoints(output_dir)):
        if os.path.isfile(os.path.join(checkpoint, "trainer_state.json")) and any(
            os.path.isfile(os.path.join(checkpoint, name)) for name in weights
        ):
            return checkpoint
    return None


@contextlib.contextmanager
def without_zero3_init():
    """Load a model normally although ZeRO-3 is configured: transformers would otherwise partition it with
    `deepspeed.zero.Init`, a collective that hangs when only the main process loads."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = ref() if ref is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
