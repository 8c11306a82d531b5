"""`EmbeddingGRPOTrainer`: UME-R1 stage 2, GRPO on both sides of each pair with a retrieval reward (on stock TRL)."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import gather, send_to_device
from trl import GRPOTrainer
from trl.models.utils import disable_gradient_checkpointing

from ..data.schema import ROW_INDEX_COLUMN, EmbeddingInput, is_missing
from ..data.templates import get_template
from ..modeling import MultimodalEmbeddingModel
from ..modeling.generative import apply_missing_token_policy, embed_completions
from ..modeling.modeling import lora_config_dict, with_lora_target
from ..modeling.preparation import prepare_embedding_tokens
from ..rewards import RETRIEVAL_REWARDS, RolloutRetrievalReward, ume_r1_format_reward
from .embedding_mixin import EmbeddingTrainerMixin, without_zero3_init
from .grpo_config import EmbeddingGRPOConfig
from .papers import UME_R1_PAPER

logger = logging.getLogger(__name__)

__all__ = ["EmbeddingGRPOTrainer"]

# TRL private methods this trainer overrides (their signatures are pinned by tests/test_grpo_trainer.py).
OVERRIDDEN_TRL_METHODS = (
    "_get_train_sampler",
    "_tokenize_prompts",
    "_calculate_rewards",
    "_generate_and_score_completions",
    "_get_per_token_logps_and_entropies",
    "_compute_loss",
)
# Row keys this trainer adds for TRL to carry: each prompt row's loaded input, and each rollout's processor tensors
# (pixel values and grids of its images and video; None for a text-only prompt), a list that TRL's buffer shuffles
# and splits with the rows.
ROW_INPUT = "embedding_input"
VISUAL_INPUTS = "visual_inputs"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)


def _cat_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` along dim 0, zero-padding the other dims to the largest (LLaVA-OneVision pads each processor
    call's image tiles to its own largest count; rows from several calls meet here)."""
    shape = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        if list(t.shape[1:]) != shape:
            pad = [p for d in reversed(range(1, t.dim())) for p in (0, shape[d - 1] - t.shape[d])]
            t = F.pad(t, pad)
        padded.append(t)
    return torch.cat(padded)


class EmbeddingGRPOTrainer(EmbeddingTrainerMixin, GRPOTrainer):
    r"""GRPO with UME-R1's retrieval reward, on TRL's own `GRPOTrainer` (UME-R1 stage 2).

    Each (query, target) pair of the dataset becomes two prompts (its query side and its target side, in UME-R1's
    prompt with ``<disc_emb>`` and the reasoning instruction), each rolled out ``num_generations`` (G) times; every
    advantage group is the G rollouts of one side of one pair, and a pair's 2G rollouts always sit in one generation
    batch (:class:`~mm_embed_trl.data.samplers.PairedRepeatSampler`). After generation, one no-grad forward of the
    policy embeds every rollout at the last ``<gen_emb>`` of its completion (never the prompt's copy); the embeddings
    of all ranks are gathered and each rollout earns

        r = format + rank x gap

    where ``rank`` is the share of its G positives (the other side's rollouts of its own pair) among its top-G
    candidates (the other side's rollouts of the pool) and ``gap`` its mean positive minus mean negative similarity
    (:func:`~mm_embed_trl.rewards.ume_r1_retrieval_reward`), queries scored against targets and targets against
    queries. The retrieval reward is a TRL reward function (:class:`~mm_embed_trl.rewards.RolloutRetrievalReward`, the
    reward picked by name from :data:`~mm_embed_trl.rewards.RETRIEVAL_REWARDS`). TRL then computes group advantages
    and the clipped GRPO loss with the KL to the reference, unchanged: every TRL option (vLLM generation, loss types,
    ``num_iterations``, PEFT, DeepSpeed) keeps working. Rewards are pluggable: pass TRL reward functions (they replace
    the default format reward) and/or set ``retrieval_reward``.

    Logged per side (``query``/``target``): the retrieval reward and its rank and gap parts, ``gen_emb_found_rate``,
    and two diagnostics UME-R1's users asked for (its issue #12): ``diagnostics/group_self_similarity`` (mean cosine
    between the rollouts of one group) and ``diagnostics/reasoning_shift`` (1 - cosine between a rollout's embedding and
    the embedding of the same completion with its ``<think>`` emptied).

    Paper: Lan et al., "UME-R1: Exploring Reasoning-Driven Generative Multimodal Embeddings", arXiv 2511.00405.

    Example:
    ```python
    from mm_embed_trl import EmbeddingGRPOConfig, EmbeddingGRPOTrainer

    args = EmbeddingGRPOConfig.ume_r1(output_dir="out-rl", bf16=True)   # UME-R1's settings
    trainer = EmbeddingGRPOTrainer(model="outputs/sft-reasoning", args=args, train_dataset=pairs)  # MMEB schema rows
    trainer.train()
    trainer.save_for_inference()   # out-rl/ + sentence_transformers/ (disc) + sentence_transformers_generative/
    ```
    """

    _tag_names = ["mm-embed-trl", "ume-r1", "grpo", "generative-embedding"]
    _name = "Embedding GRPO"
    _paper = UME_R1_PAPER  # TRL's create_model_card reads its title, id and citation
    config_class = EmbeddingGRPOConfig
    method_key = "ume_r1_rl"
    method_aliases = ("grpo", "embeddinggrpo", "embeddinggrpoconfig", "embeddinggrpotrainer", "ume_r1_stage2")
    method_title = "UME-R1 stage 2: reinforcement learning with a retrieval reward"
    method_short_title = "UME-R1 RL"
    method_description = (
        "GRPO on rollouts of both sides of each pair: the reward of a rollout is its format score plus the "
        "ranking of its generative embedding against all target rollouts times the similarity gap between its "
        "own target and the others."
    )

    def __init__(
        self,
        model: MultimodalEmbeddingModel | str,
        reward_funcs=None,
        args: EmbeddingGRPOConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        peft_config=None,
        **kwargs,
    ):
        from ..data.samplers import flatten_pairs

        if args is None:
            args = EmbeddingGRPOConfig(output_dir="grpo-output")
        if not isinstance(args, EmbeddingGRPOConfig):
            raise TypeError(f"EmbeddingGRPOTrainer needs an EmbeddingGRPOConfig, got {type(args).__name__}.")
        for unsupported in ("tools", "environment_factory", "rollout_func"):
            if kwargs.get(unsupported) is not None:
                raise ValueError(
                    f"EmbeddingGRPOTrainer does not take {unsupported}: its rollouts are the two sides of each pair, "
                    "embedded after generation. Use trl.GRPOTrainer for tool or environment rollouts."
                )
        if eval_dataset is not None:
            raise ValueError(
                "EmbeddingGRPOTrainer evaluates retrieval, not rewards: pass evaluators to the example's tail "
                "(RetrievalEvaluator with encode_kwargs={'mode': 'generative'}) instead of an eval_dataset."
            )
        if model is not None and not isinstance(model, (str, os.PathLike, MultimodalEmbeddingModel)):
            raise ValueError(
                "EmbeddingGRPOTrainer trains a generative MultimodalEmbeddingModel (the reasoning SFT stage's output, "
                "or MultimodalEmbeddingModel.from_pretrained(<backbone>, encoder_kind='generative'))."
            )
        self._prompt_rows = self._forward_visuals = None  # set while a generation batch / micro-batch is processed
        model, processing_class = self.prepare_embedding_model(
            model, processing_class, args, encoder_kind="generative"
        )
        self.embedding_model = model
        self.template = get_template(model.config.prompt_template)  # the SFT model's: rollouts look like its inputs
        # the retrieval reward's prompts, built from the rows as encode builds them (texts whole, as TRL's prompts)
        self._prompt_collator = model.make_collator(max_length=None)
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        tokenizer.padding_side = "left"  # TRL pads prompts on the left; mm_token_type_ids must be padded alike
        if hasattr(processing_class, "tokenizer"):
            processing_class.padding_side = "left"
        policy = model.backbone
        if args.beta != 0.0 and peft_config is None:
            # TRL rebuilds the reference model from the policy's name: point it at a plain copy of THIS policy (its
            # added tokens included), which also works offline.
            reference_dir = os.path.join(args.output_dir, "reference_policy")
            if args.process_index == 0 and not os.path.isfile(os.path.join(reference_dir, "config.json")):
                policy.save_pretrained(reference_dir)
                processing_class.save_pretrained(reference_dir)
            args.distributed_state.wait_for_everyone()
            policy.config._name_or_path = reference_dir
            policy.name_or_path = reference_dir
        if train_dataset is None:
            raise ValueError("EmbeddingGRPOTrainer needs a train_dataset of (query, target) pairs (MMEB-train schema).")
        import datasets

        if isinstance(train_dataset, datasets.IterableDataset):
            raise ValueError(
                "EmbeddingGRPOTrainer does not train on a stream (a datasets.IterableDataset): its sampler repeats "
                "each pair for its generations and keeps pairs in one generation batch, by index. Load the pairs as a "
                "map-style dataset (streaming=False; a memory-mapped Arrow file need not fit in memory)."
            )
        from ..data.validation import check_training_rows

        with args.main_process_first(desc="checking the dataset rows"):
            train_dataset = check_training_rows(
                train_dataset, what="training dataset", on_bad_row=args.on_bad_row, **args.row_contract
            )
        train_dataset = flatten_pairs(train_dataset)
        if reward_funcs is None:
            reward_funcs, weights = [ume_r1_format_reward], [args.format_reward_weight]
        else:
            reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
            weights = list(args.reward_weights) if args.reward_weights is not None else [1.0] * len(reward_funcs)
        self._retrieval_column = None
        if args.retrieval_reward != "none":
            self._retrieval_column = len(reward_funcs)
            reward_funcs = reward_funcs + [self._retrieval_reward_function(args)]
            weights = weights + [args.retrieval_reward_weight]
        args.reward_weights = weights
        if peft_config is not None:  # TRL wraps the policy; PEFT finds no modules of a VLM by itself
            peft_config = with_lora_target(peft_config)
        super().__init__(
            model=policy,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=train_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            peft_config=peft_config,
            **kwargs,
        )
        self._check_final_save_can_gather()
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            self._run_vision_tower_everywhere()

    def prepare_model(self, model: MultimodalEmbeddingModel, processing_class, args) -> None:
        if model.lm_head is None:
            raise ValueError(
                "EmbeddingGRPOTrainer trains a generative MultimodalEmbeddingModel (the reasoning SFT stage's output, "
                "or MultimodalEmbeddingModel.from_pretrained(<backbone>, encoder_kind='generative'))."
            )
        if args.prompt_template is None and model.config.generative_pooling_token is None:
            model.config.prompt_template = "ume_r1_blank_image"  # not trained by EmbeddingSFTTrainer: UME-R1's inputs
        self._disc_id, self._gen_id = prepare_embedding_tokens(model, processing_class)
        if model.has_lora:  # TRL trains the policy whole, or wraps it in adapters of its own (peft_config)
            model.merge_lora()

    def _run_vision_tower_everywhere(self) -> None:
        """Under DeepSpeed/FSDP every rank must run the same modules: text-only rollouts run the vision tower on a
        blank image (times 0) in the policy's and the reference model's forwards (see BlankImageHook)."""
        from ..modeling.modeling import BlankImageHook

        self.embedding_model.run_vision_tower_in_every_forward(self.processing_class, direct_backbone_calls=True)
        if self.ref_model is not None:
            reference = self.accelerator.unwrap_model(self.ref_model)
            BlankImageHook(getattr(reference, "model", reference), self.processing_class).hook_top_level(reference)

    # ------------------------------------------------------------------ EmbeddingTrainerMixin hooks
    def inference_model(self) -> MultimodalEmbeddingModel:
        return self.embedding_model  # its backbone is the policy TRL trains (the same modules)

    def _save_final_weights(self, directory: str) -> None:
        """The trained policy inside its `MultimodalEmbeddingModel` (config, pooling tokens, processor): sharded
        weights gathered (a collective), LoRA adapters merged: in place when whole; when sharded (ZeRO-3, FSDP) they
        are saved unmerged, in the format of `add_lora`, and `save_for_inference` merges that complete copy."""
        state = None
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            state = self.accelerator.get_state_dict(self.deepspeed if self.is_deepspeed_enabled else self.model)
        if not self.args.should_save:
            return
        policy = self.accelerator.unwrap_model(self.model)
        lora_config = None
        if hasattr(policy, "merge_and_unload"):  # PEFT
            if state is None:
                policy.merge_and_unload()  # in place, into the modules embedding_model holds
            else:
                # Sharded modules cannot be merged in place. The gathered keys are the PeftModel's, which is what
                # `encoder` holds in a model with adapters (`add_lora`): save that, with its LoRA config.
                lora_config = lora_config_dict(policy.peft_config[policy.active_adapter])
                # safetensors refuses aliased tensors and transformers knows the ties only by their non-PEFT names:
                # drop the tied copies (e.g. lm_head = embed_tokens), which loading ties again.
                tied = getattr(policy.get_base_model(), "all_tied_weights_keys", None) or {}
                for target, source in tied.items():
                    target, source = f"base_model.model.{target}", f"base_model.model.{source}"
                    if target in state and source in state and torch.equal(state[target], state[source]):
                        del state[target]
        if state is not None:
            state = {f"encoder.{name}": tensor for name, tensor in state.items()}
        # The model's own adapters were merged in __init__ (its lora_config is None): the config names adapters only
        # for the sharded ones saved unmerged here, and only in this file.
        config = self.embedding_model.config
        config.lora_config = lora_config
        try:
            with without_zero3_init():
                self.embedding_model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        finally:
            config.lora_config = None

    # ------------------------------------------------------------------ resume
    # A checkpoint between two generations (steps_per_generation x num_iterations micro-steps apart) keeps TRL's
    # buffer of the current generation: without it TRL generates anew on resume (its `_buffered_inputs` is None)
    # with the resumed weights and RNG, and the run leaves the path of an uninterrupted one.
    def _generation_buffer_file(self, checkpoint: str) -> str:
        return os.path.join(checkpoint, f"grpo_generation_buffer_rank{self.args.process_index}.pt")

    def _save_resume_state(self, directory: str) -> None:
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            return  # the next step generates anyway
        os.makedirs(directory, exist_ok=True)
        state = {"step": self._step, "world_size": self.args.world_size, "buffer": self._buffered_inputs}
        torch.save(state, self._generation_buffer_file(directory))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = self._generation_buffer_file(checkpoint) if checkpoint else None
        if path is None or not os.path.isfile(path):
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state["world_size"] != self.args.world_size:
            logger.warning(
                "%s was written by %d processes, this run has %d: its generation buffer cannot be split alike, so the "
                "resumed run generates anew at its first step (it will not match an uninterrupted run).",
                checkpoint, state["world_size"], self.args.world_size,
            )
            return
        self._step, self._buffered_inputs = state["step"], send_to_device(state["buffer"], self.accelerator.device)

    def _generation_settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.args.max_completion_length}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self._check_finite(loss)  # a NaN stops the run before its gradients reach a weight
        self._last_train_loss = loss.detach()
        return loss

    # ------------------------------------------------------------------ data layout
    def _get_train_sampler(self, dataset=None):
        from ..data.samplers import PairedRepeatSampler

        return PairedRepeatSampler(
            dataset if dataset is not None else self.train_dataset,
            num_generations=self.num_generations,
            generation_batch_size=self.args.generation_batch_size,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset,
            seed=self.args.seed,
        )

    def _generate_and_score_completions(self, inputs):
        output = self._score_rows(inputs)
        if self.args.dynamic_sampling_rounds and self.model.training:
            output = self._refill_zero_spread_groups(output)
        return output

    def _score_rows(self, inputs):
        # Rows hold the pair's text, image(s) and video; each is loaded now (only this generation batch's), and its
        # prompt is tokenized and processed by the collator SFT and encode use (`_tokenize_prompts`): TRL sees the
        # prompts' token ids and their tensors, never images, so videos take the path images take.
        prepared = []
        for row in inputs:
            inp = self.template.with_text_only_image(self._row_input(row))
            # "images": [] tells TRL that it has no image to process (it would read the "image" paths otherwise)
            prepared.append({**row, "prompt": self.template.build_messages(inp, row["side"]), ROW_INPUT: inp,
                             "images": []})
        self._prompt_rows = prepared
        try:
            output = super()._generate_and_score_completions(prepared)
            output[VISUAL_INPUTS] = self._forward_visuals
        finally:
            self._prompt_rows = self._forward_visuals = None
        return output

    def _row_input(self, row) -> EmbeddingInput:
        from ..data.images import load_images
        from ..data.videos import load_video

        # the pair's row in the user's dataset where the row check numbered it (pair_id counts the pairs left after
        # skipped rows: it pairs the sides, it does not name the row)
        number = row.get(ROW_INDEX_COLUMN)
        where = f"pair {row['pair_id']}" if number is None else f"dataset row {int(number)}"
        where += f" ({row['side']} side)"
        values = row.get("image")
        values = [v for v in (values if isinstance(values, list) else [values]) if not is_missing(v)]
        images = load_images(values, self.args.image_root, where_prefix=f"{where} image")
        video = load_video(row.get("video_frames") or row.get("video"), self.args.image_root,
                           where=f"{where} video", processor=self.processing_class)
        return EmbeddingInput(text=row.get("text"), image=images or None, video=video)

    def _tokenize_prompts(self, prompts):
        """Token ids of this generation batch's prompts and their tensors for `generate`, from the collator (one
        processor call per side); each row's own tensors are kept for the log-probability forwards."""
        from ..data.collators import IMAGE_KEYS, VIDEO_KEYS, split_batch

        rows = self._prompt_rows
        if rows is None or len(rows) != len(prompts):
            raise RuntimeError("EmbeddingGRPOTrainer tokenizes the prompts of the rows _score_rows prepared; TRL asked "
                               f"for {len(prompts)} prompts outside that call.")
        keys = ("pixel_values", "pixel_values_videos", *IMAGE_KEYS, *VIDEO_KEYS)
        prompt_ids: list = [None] * len(rows)
        visuals: list = [None] * len(rows)
        for side in dict.fromkeys(row["side"] for row in rows):
            index = [i for i, row in enumerate(rows) if row["side"] == side]
            enc = self._prompt_collator.encode_inputs([rows[i][ROW_INPUT] for i in index], side=side)
            for i, ids, mask, one in zip(index, enc["input_ids"], enc["attention_mask"], split_batch(enc, 1)):
                prompt_ids[i] = ids[mask.bool()].tolist()  # left-padded: the row's own tokens
                visuals[i] = {key: one[key].to(self.accelerator.device) for key in keys if key in one} or None
        self._forward_visuals = visuals
        fields = self._visual_forward_kwargs(visuals)
        if fields and self._takes_token_types:  # per prompt token, left-padded by TRL as it pads the ids
            fields["mm_token_type_ids"] = [self._multimodal_token_types(torch.tensor(ids)).tolist()
                                           for ids in prompt_ids]
        return prompt_ids, None, fields

    @property
    def _takes_token_types(self) -> bool:
        """Whether the backbone reads ``mm_token_type_ids`` (Qwen-VL's M-RoPE) beside its visual inputs."""
        return "mm_token_type_ids" in getattr(self.processing_class, "model_input_names", ())

    @staticmethod
    def _visual_forward_kwargs(visuals: Sequence[dict | None]) -> dict[str, torch.Tensor]:
        """The backbone's visual arguments for these rows: each row's tensors, concatenated in row order."""
        present = [v for v in visuals if v is not None]
        keys = dict.fromkeys(key for v in present for key in v)
        return {key: _cat_padded([v[key] for v in present if key in v]) for key in keys}

    def _multimodal_token_types(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Qwen-VL's ``mm_token_type_ids`` of prompt tokens: 1 for an image placeholder, 2 for a video one."""
        processor = self.processing_class
        types = torch.zeros_like(prompt_ids)
        for code, name in ((1, "image_token_id"), (2, "video_token_id")):
            token = getattr(processor, name, None)
            if token is not None:
                types[prompt_ids == token] = code
        return types

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **image_kwargs):
        """TRL's forward, with the rows' images and videos (`_forward_visuals`, row-aligned with ``input_ids``)
        passed to the backbone chunk by chunk: TRL itself passes image tensors only."""
        visuals = self._forward_visuals
        if visuals is None or all(v is None for v in visuals):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **image_kwargs)
        if len(visuals) != input_ids.shape[0]:
            raise RuntimeError(f"{len(visuals)} rows of visual inputs for a forward of {input_ids.shape[0]} rows.")
        batch_size = batch_size or input_ids.shape[0]
        parts = []
        for start in range(0, input_ids.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            extra = self._visual_forward_kwargs(visuals[rows])
            if extra and self._takes_token_types:
                types = self._multimodal_token_types(input_ids[rows])
                types[:, types.shape[1] - logits_to_keep:] = 0  # completion tokens are text
                extra["mm_token_type_ids"] = types
            forward = functools.partial(model, **extra) if extra else model
            parts.append(super()._get_per_token_logps_and_entropies(
                forward, input_ids[rows], attention_mask[rows], logits_to_keep, None, compute_entropy,
                compute_aux_loss, **image_kwargs))
        logps = torch.cat([p[0] for p in parts])
        entropies = torch.cat([p[1] for p in parts]) if compute_entropy else None
        aux_loss = torch.stack([p[2] for p in parts]).mean() if compute_aux_loss else None
        return logps, entropies, aux_loss

    def _compute_loss(self, model, inputs):
        self._forward_visuals = inputs.get(VISUAL_INPUTS)  # this micro-batch's rows, as TRL's buffer split them
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._forward_visuals = None

    # ------------------------------------------------------------------ dynamic sampling (DAPO)
    def _refill_zero_spread_groups(self, output: dict[str, Any]) -> dict[str, Any]:
        """Replace the local groups whose rewards do not spread by groups of extra generation batches (see
        :mod:`.dynamic_sampling`). Every rank runs the same rounds: the decision reads the gathered rewards."""
        from .dynamic_sampling import group_has_spread, select_rows

        g = self.num_generations
        rows = output["prompt_ids"].shape[0]  # local rollouts: whole groups (the config checks it)
        first = self.accelerator.process_index * (rows // g)
        outputs, informative = [output], []
        rounds = 0
        while True:
            spread = group_has_spread(self._round_rewards, self.reward_weights, g)[first:first + rows // g]
            informative += [(len(outputs) - 1, group) for group in spread.nonzero().flatten().tolist()]
            fewest = gather(torch.tensor([len(informative)], device=self.accelerator.device)).min().item()
            if fewest * g >= rows or rounds == self.args.dynamic_sampling_rounds:
                break
            outputs.append(self._score_rows(self._refill_rows()))
            rounds += 1
        zero_spread = [(0, group) for group in range(rows // g) if (0, group) not in informative]
        kept = (informative + zero_spread)[: rows // g]
        picks = [(k, group * g + j) for k, group in kept for j in range(g)]
        result = select_rows(outputs, picks, self.processing_class.tokenizer.pad_token_id)
        result["num_items_in_batch"] = gather(result["completion_mask"].sum()).sum()  # as TRL counts it
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["dynamic_sampling/rounds"].append(float(rounds))
        kept_spread = torch.tensor([min(len(informative), rows // g) / (rows // g)], device=self.accelerator.device)
        self._metrics[mode]["dynamic_sampling/kept_spread_fraction"].append(gather(kept_spread).mean().item())
        return result

    def _refill_rows(self) -> list[dict[str, Any]]:
        """The local rows of the next generation batch of a second pass over the pairs (its own shuffle), endless."""
        from ..data.samplers import PairedRepeatSampler

        if getattr(self, "_refill_iterator", None) is None:
            sampler = PairedRepeatSampler(self.train_dataset, num_generations=self.num_generations,
                                          generation_batch_size=self.args.generation_batch_size,
                                          shuffle=True, seed=self.args.seed + 1)
            self._refill_loader = self._get_dataloader(
                dataset=self.train_dataset, description="Dynamic sampling",
                batch_size=self._train_batch_size * self.args.steps_per_generation,
                sampler_fn=lambda dataset: sampler, is_training=True,
            )
            self._refill_epoch = 0
            self._refill_iterator = iter(self._refill_loader)
        try:
            return next(self._refill_iterator)
        except StopIteration:
            self._refill_epoch += 1
            self._refill_loader.set_epoch(self._refill_epoch)
            self._refill_iterator = iter(self._refill_loader)
            return next(self._refill_iterator)

    # ------------------------------------------------------------------ rewards
    def _retrieval_reward_function(self, args: EmbeddingGRPOConfig) -> RolloutRetrievalReward:
        """The retrieval reward as a TRL reward function, embedding the rollouts with this trainer's policy."""
        pool_rows = args.generation_batch_size
        if args.retrieval_pool == "micro_step":
            pool_rows = args.per_device_train_batch_size * args.world_size
        return RolloutRetrievalReward(
            args.retrieval_reward,
            RETRIEVAL_REWARDS[args.retrieval_reward],
            self._embed_rollouts,
            num_generations=args.num_generations,
            pool_rows=pool_rows,
            mask_duplicates=args.mask_duplicate_targets,
            empty_reasoning=self._empty_reasoning,
            sensitivity_rows=args.reasoning_sensitivity_rows,
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)  # (global N, funcs)
        self._round_rewards = rewards  # every function's, for dynamic sampling's spread test
        return rewards

    @torch.no_grad()
    def _embed_rollouts(self, columns: dict[str, list], completion_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """(L2-normalised generative embedding of each local rollout, whether it wrote ``<gen_emb>``): its prompt built
        from its row as encode builds it, then :func:`~mm_embed_trl.modeling.generative.embed_completions` through the
        policy as TRL wraps it, per side in chunks of ``embedding_batch_size`` rows."""
        size = self.args.embedding_batch_size or self.args.per_device_train_batch_size
        device = self.accelerator.device
        inputs = columns[ROW_INPUT]
        embeddings = [None] * len(inputs)
        found = torch.zeros(len(inputs), dtype=torch.bool, device=device)
        with (
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
            self.compute_loss_context_manager(),
        ):
            for side in dict.fromkeys(columns["side"]):
                rows = [i for i, s in enumerate(columns["side"]) if s == side]
                for start in range(0, len(rows), size):
                    chunk = rows[start : start + size]
                    prompt = self._prompt_collator.encode_inputs([inputs[i] for i in chunk], side=side)
                    prompt = {k: v.to(device) if torch.is_tensor(v) else v for k, v in prompt.items()}
                    out = embed_completions(
                        self.embedding_model, prompt, [completion_ids[i] for i in chunk], run_backbone=self.model
                    )
                    states = apply_missing_token_policy(out, self.args.missing_gen_token)
                    for i, state in zip(chunk, F.normalize(states.float(), dim=-1)):
                        embeddings[i] = state
                    found[chunk] = out.found
        return torch.stack(embeddings), found

    def _empty_reasoning(self, completion_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """The completions with their ``<think>`` emptied (the reasoning-shift diagnostic)."""
        tokenizer = self.processing_class.tokenizer
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=False)
        return [tokenizer(_THINK.sub("<think></think>", t), add_special_tokens=False)["input_ids"] for t in texts]
