"""Configuration of :class:`EmbeddingGRPOTrainer` (UME-R1 stage 2, RL with a retrieval reward)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
from trl import GRPOConfig

from ..modeling.generative import MISSING_TOKEN_POLICIES
from ..rewards import RETRIEVAL_REWARDS
from .arguments import EmbeddingRunArguments, adapt_to_cpu, setup_devices_with_timeout

RETRIEVAL_POOLS = ("micro_step", "generation_batch")
# Pairs in UME-R1's retrieval pool: one micro-step across its 64 GPUs of 2 rollouts per side each, G = 8.
UME_R1_POOL_PAIRS = 16


@dataclass
class EmbeddingGRPOConfig(EmbeddingRunArguments, GRPOConfig):
    r"""
    Configuration for [`EmbeddingGRPOTrainer`]: GRPO on both sides of (query, target) pairs with UME-R1's retrieval
    reward (Lan et al. 2025, arXiv 2511.00405). This class includes only the parameters that are specific to the
    embedding reward; for the GRPO ones (`num_generations`, `beta`, `epsilon`, `loss_type`, `use_vllm`, ...) see
    `trl.GRPOConfig`, whose options all keep working, and for the run-level ones (`image_root`, `on_bad_row`,
    `overwrite_output_dir`, `save_sentence_transformers`) [`EmbeddingRunArguments`]. TRL's defaults differ from
    UME-R1's: the recipe `recipes/grpo_qwen2vl_2b.yaml` sets UME-R1's (G = 8, temperature 1, top_k 50, β = 0.04 on
    the plain k3 KL, ε = 0.2 / ε_high = 0.28, lr 1e-6 decaying linearly, completions up to 2048 tokens,
    `loss_type="dr_grpo"`, a pool of 16 pairs per micro-step, 32 pairs per optimizer step, pairs in file order), and
    :meth:`ume_r1` returns them as a config (`docs/UME-R1.md` lists what still differs).

    Of the options every embedding config shares ([`EmbeddingRunArguments`]), two read differently here:
    `freeze_vision_tower` (default `False`) as UME-R1, which trains the vision encoder and projector in RL
    (`freeze_vision_modules=False` in its `grpo_embed.py`; the tiny CPU demo freezes them, as its SFT stage did,
    because a random vision tower's features are what its language model learned on), and `prompt_template`: the
    prompt of the rollouts, by default the one the model was trained with in SFT (saved in its config), or, for a
    model that was not, `"ume_r1_blank_image"` (UME-R1's prompt, a 28x28 white image before text-only inputs).

    > Parameters that control the retrieval reward

    Parameters:
        retrieval_reward (`str`, defaults to `"ume_r1"`): a name of `mm_embed_trl.rewards.RETRIEVAL_REWARDS`:
            `"ume_r1"` (rank x gap of each rollout's generative embedding against the other side's rollouts of the
            pool), `"reciprocal_rank"`; or `"none"` (only the reward functions passed to the trainer).
        retrieval_reward_weight (`float`, defaults to `1.0`): its weight next to the other rewards (UME-R1 sums
            format and retrieval rewards with weight 1).
        format_reward_weight (`float`, defaults to `1.0`): weight of the default format reward (used when the
            trainer gets no `reward_funcs`).
        retrieval_pool (`str`, defaults to `"micro_step"`): which rollouts compete: those of one micro-step across
            ranks (`per_device_train_batch_size x world` rows, UME-R1's pool) or the whole generation batch
            (`x steps_per_generation`). The pool size sets the reward's scale.
        mask_duplicate_targets (`bool`, defaults to `True`): a pair whose target is identical to this pair's (shared
            labels) or whose query is (several answers to one query) is no negative of this pair's rollouts, on
            either side (UME-R1 masks nothing).
        missing_gen_token (`str`, defaults to `"last_token"`): the embedding of a completion that never writes
            `<gen_emb>`, one of `encode`'s `missing_token` policies: the state at its last token (UME-R1 silently
            reads the prompt's copy of the token instead; here only the completion counts), `"zero"` (a zero vector:
            its similarities, hence its retrieval reward, are 0), `"discriminative"` (the prompt's `<disc_emb>`
            state) or `"error"`. Such completions are counted in `gen_emb_found_rate`.
        embedding_batch_size (`int`, *optional*): rows per no-grad embedding forward (default: the per-device batch).
        reasoning_sensitivity_rows (`int`, defaults to `8`): per generation batch, how many completions are
            re-embedded with their `<think>` emptied, to log how far the embedding moves when the reasoning changes
            (`diagnostics/reasoning_shift`; UME-R1's issue #12). 0 turns it off.

    > Parameters that control which groups fill the batch

    Parameters:
        dynamic_sampling_rounds (`int`, defaults to `0`): DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476,
            §3.2): a group whose G rewards are all equal has zero advantage, so it teaches nothing; while a rank holds
            fewer rows of groups with a spread than its generation batch, up to this many extra generation batches
            of other pairs are generated and scored (each its own retrieval pool), and the batch is rebuilt from
            the groups with a spread, topped up with zero-spread ones when the rounds run out. 0 keeps TRL's
            behaviour (UME-R1's). Each round costs a generation; `dynamic_sampling/*` logs the rounds and the
            share of kept groups with a spread.
    """

    # TRL's default of 8 rows cannot hold one pair: both sides x num_generations (8) rollouts
    per_device_train_batch_size: int = field(
        default=16,
        metadata={"help": "Rollouts per device and micro-step: a multiple of 2 x num_generations (whole pairs)."},
    )
    retrieval_reward: str = field(
        default="ume_r1",
        metadata={"help": "Retrieval reward: ume_r1 (rank x gap), reciprocal_rank, or none.",
                  "choices": [*RETRIEVAL_REWARDS, "none"]},
    )
    retrieval_reward_weight: float = field(default=1.0, metadata={"help": "Weight of the retrieval reward."})
    format_reward_weight: float = field(default=1.0, metadata={"help": "Weight of the default format reward."})
    retrieval_pool: str = field(
        default="micro_step",
        metadata={"help": "Rollouts that compete: one micro-step across ranks (UME-R1) or the generation batch.",
                  "choices": list(RETRIEVAL_POOLS)},
    )
    mask_duplicate_targets: bool = field(
        default=True, metadata={"help": "Pairs with an identical target or query are never each other's negatives."}
    )
    missing_gen_token: str = field(
        default="last_token",
        metadata={"help": "Embedding of a completion without <gen_emb>: last_token, discriminative, zero or error.",
                  "choices": list(MISSING_TOKEN_POLICIES)},
    )
    embedding_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per no-grad embedding forward (default: the per-device batch)."}
    )
    reasoning_sensitivity_rows: int = field(
        default=8, metadata={"help": "Completions re-embedded with an empty <think> per generation batch (0: off)."}
    )
    dynamic_sampling_rounds: int = field(
        default=0,
        metadata={"help": "DAPO's dynamic sampling: extra generation batches (at most) that replace groups whose "
                  "rewards do not spread (0: off, as UME-R1 and TRL)."},
    )

    def __post_init__(self):
        if self.retrieval_pool not in RETRIEVAL_POOLS:
            raise ValueError(f"retrieval_pool must be one of {RETRIEVAL_POOLS}, got {self.retrieval_pool!r}.")
        if self.missing_gen_token not in MISSING_TOKEN_POLICIES:
            raise ValueError(
                f"missing_gen_token must be one of {MISSING_TOKEN_POLICIES}, got {self.missing_gen_token!r}."
            )
        if self.retrieval_reward != "none" and self.retrieval_reward not in RETRIEVAL_REWARDS:  # the table, live
            raise ValueError(
                f"retrieval_reward must be one of {[*RETRIEVAL_REWARDS, 'none']}, got {self.retrieval_reward!r}."
            )
        if self.reasoning_sensitivity_rows < 0:
            raise ValueError("reasoning_sensitivity_rows must be >= 0.")
        # before TRL's checks, which divide by them
        for option, least in (("num_generations", 2), ("num_generations_eval", 1)):
            value = getattr(self, option)
            if value is not None and value < least:
                raise ValueError(
                    f"{option}={value}: GRPO needs at least {least} rollout(s) per prompt"
                    + (" to compare each with its group (UME-R1: 8)." if least == 2 else ".")
                )
        if self.dynamic_sampling_rounds < 0:
            raise ValueError(f"dynamic_sampling_rounds must be >= 0 (0: off), got {self.dynamic_sampling_rounds}.")
        if self.dynamic_sampling_rounds and self.per_device_train_batch_size % (2 * self.num_generations):
            raise ValueError(
                f"dynamic_sampling_rounds needs whole pairs on every rank: per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) must be a multiple of 2 x num_generations "
                f"({2 * self.num_generations})."
            )
        if self.dynamic_sampling_rounds and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(
                "dynamic_sampling_rounds tests each group's summed reward for a spread, as TRL's "
                "multi_objective_aggregation='sum_then_normalize' scores it; it does not support "
                f"{self.multi_objective_aggregation!r}."
            )
        adapt_to_cpu(self)  # as the other trainers' configs: a CPU-only machine trains on the CPU, in fp32
        super().__post_init__()
        if self.generation_batch_size % (2 * self.num_generations) != 0:
            raise ValueError(
                f"generation_batch_size ({self.generation_batch_size} = per_device_train_batch_size x processes x "
                f"steps_per_generation) must hold whole pairs: a multiple of 2 x num_generations "
                f"({2 * self.num_generations}), both sides of each pair rolled out num_generations times."
            )

    @property
    def row_contract(self) -> dict:
        """GRPO rolls out both sides of each pair; explicit negatives are not used."""
        return {"num_negatives": 0, "image_root": self.image_root}

    @cached_property
    def _setup_devices(self) -> torch.device:
        return setup_devices_with_timeout(self)

    @classmethod
    def ume_r1(cls, num_processes: int | None = None, **overrides) -> EmbeddingGRPOConfig:
        """A config with UME-R1's RL settings (its README run, `grpo_trainer.py` under transformers 4.49): ``overrides``
        win.

        UME-R1 ran 64 GPUs x ``per_device_train_batch_size=2`` rollouts *per side* (its sampler repeats each pair G=8
        times, and both sides are rolled out): one micro-step across ranks holds 64 x 2 / 8 = 16 pairs, its
        retrieval pool, and GA 2 makes 32 pairs per optimizer step. Here a row is one side's rollout, so the
        per-device batch that keeps that pool is 2 x G x 16 / ``num_processes`` rows (32 on 8 processes, 4 on 64),
        with GA 2. ``num_processes`` defaults to the launcher's ``WORLD_SIZE`` (1 without one).

        Sampling and objective as UME-R1's: top_k 50 (transformers 4.49's default, which its sampling config left
        in place; TRL samples the whole vocabulary), plain beta x k3 KL (TRL multiplies it by the importance ratio
        by default), the learning rate decaying linearly to 0 over the epoch, pairs in file order.
        """
        generations = overrides.get("num_generations", 8)
        settings = dict(
            num_generations=generations,
            temperature=1.0,
            top_k=50,
            beta=0.04,
            use_bias_correction_kl=False,
            epsilon=0.2,
            epsilon_high=0.28,
            learning_rate=1e-6,
            lr_scheduler_type="linear",
            max_completion_length=2048,
            loss_type="dr_grpo",
            steps_per_generation=1,
            num_train_epochs=1,
            gradient_accumulation_steps=2,
            shuffle_dataset=False,
        )
        if "per_device_train_batch_size" not in overrides:
            processes = num_processes or int(os.environ.get("WORLD_SIZE", "1"))
            pool_rows = 2 * generations * UME_R1_POOL_PAIRS
            if pool_rows % processes:
                raise ValueError(
                    f"UME-R1's pool of {UME_R1_POOL_PAIRS} pairs ({pool_rows} rollouts) does not split over "
                    f"{processes} processes; pass per_device_train_batch_size (a multiple of 2 x num_generations "
                    "across all processes)."
                )
            settings["per_device_train_batch_size"] = pool_rows // processes
        settings.update(overrides)
        return cls(**settings)
