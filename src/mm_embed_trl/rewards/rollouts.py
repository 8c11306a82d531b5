"""A retrieval reward in TRL's reward-function interface: it embeds the rollouts with the policy, on every rank.

TRL calls each reward function on every rank, in the same order, with that rank's rows:
``f(prompts=..., completions=..., completion_ids=..., **columns, log_metric=..., ...) -> list[float]``. A retrieval
reward scores a rollout against the rollouts of *every* rank, so :class:`RolloutRetrievalReward` embeds its rank's
rollouts, gathers the pool (a collective, which every rank reaches as TRL calls the function everywhere), scores it
with a reward of :data:`~mm_embed_trl.rewards.RETRIEVAL_REWARDS` and returns its own rows' rewards. Its diagnostics go
through TRL's ``log_metric``. So the retrieval reward sits in TRL's reward table as any other reward function, and
TRL's ``_calculate_rewards`` runs unchanged.

What embeds a rollout is handed in (``embed_rollouts``): the trainer's forward of the policy over prompt +
completion (:func:`mm_embed_trl.modeling.generative.embed_completions`, as ``encode(mode="generative")`` embeds).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..distributed import gather_no_grad, gather_with_grad
from .retrieval import RetrievalRewardOutput

__all__ = ["RolloutRetrievalReward"]

SIDES = {"query": 0, "target": 1}

# (columns of the local rows, their completion ids) -> ((N, D) L2-normalised embeddings, (N,) bool: wrote <gen_emb>)
EmbedRollouts = Callable[[dict[str, list], Sequence[Sequence[int]]], tuple[Tensor, Tensor]]


class RolloutRetrievalReward:
    """TRL reward function: each rollout's retrieval reward within its pool of rollouts (gathered from every rank).

    Args:
        name: the reward's name in ``RETRIEVAL_REWARDS`` (TRL names the reward column ``retrieval_<name>``).
        reward: the retrieval reward (``RETRIEVAL_REWARDS[name]``).
        embed_rollouts: embeds the local rollouts (see the module docstring).
        num_generations: ``G``, rollouts per side of a pair.
        pool_rows: rows of the gathered batch that compete (consecutive blocks of this many rows form a pool).
        mask_duplicates: pairs with an identical query or target (their ``content_id``) are no negatives.
        empty_reasoning: completion ids -> the same completions with their reasoning emptied; with
            ``sensitivity_rows > 0`` the first that many local rollouts are re-embedded so, and the mean cosine
            distance is logged as ``diagnostics/reasoning_shift``.
        sensitivity_rows: see ``empty_reasoning`` (0: off).

    Columns read from the rows: ``side`` (``"query"`` / ``"target"``), ``pair_id``, ``content_id``; all columns are
    handed on to ``embed_rollouts``.
    """

    def __init__(
        self,
        name: str,
        reward: Callable[..., RetrievalRewardOutput],
        embed_rollouts: EmbedRollouts,
        *,
        num_generations: int,
        pool_rows: int,
        mask_duplicates: bool = True,
        empty_reasoning: Callable[[Sequence[Sequence[int]]], list[list[int]]] | None = None,
        sensitivity_rows: int = 0,
    ):
        self.__name__ = f"retrieval_{name}"  # TRL's name of the reward column and its logged mean
        self.reward = reward
        self.embed_rollouts = embed_rollouts
        self.num_generations = num_generations
        self.pool_rows = pool_rows
        self.mask_duplicates = mask_duplicates
        self.empty_reasoning = empty_reasoning
        self.sensitivity_rows = sensitivity_rows

    def __call__(
        self,
        prompts: list,
        completions: list,
        completion_ids: Sequence[Sequence[int]],
        *,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        columns = {k: v for k, v in kwargs.items() if isinstance(v, list) and len(v) == len(completion_ids)}
        embeddings, found = self.embed_rollouts(columns, completion_ids)
        device = embeddings.device
        side = torch.tensor([SIDES[s] for s in columns["side"]], device=device)
        pair_id = torch.tensor([int(p) for p in columns["pair_id"]], device=device)
        content = torch.tensor([int(c) for c in columns["content_id"]], device=device)
        all_embeddings, offset = gather_with_grad(embeddings.detach(), return_offset=True)
        all_side, all_pair, all_found = gather_no_grad(side), gather_no_grad(pair_id), gather_no_grad(found)
        all_content = gather_no_grad(content)
        out = self.reward(
            all_embeddings,
            all_side,
            all_pair,
            self.num_generations,
            pool_id=torch.arange(len(all_side), device=device) // self.pool_rows,
            content_ids=all_content if self.mask_duplicates else None,
        )
        log = log_metric or (lambda name, value: None)
        self._log_pool(log, out, all_embeddings, all_side, all_pair, all_found)
        if self.sensitivity_rows and self.empty_reasoning is not None:
            log("diagnostics/reasoning_shift", self._reasoning_shift(columns, completion_ids, embeddings))
        return out.reward[offset : offset + len(completion_ids)].tolist()

    def _log_pool(self, log, out: RetrievalRewardOutput, embeddings, side, pair_id, found) -> None:
        """Per side: the reward, its rank and gap parts, the share of rollouts that wrote ``<gen_emb>``; and the mean
        cosine between the rollouts of one group (one side of one pair), over the gathered pool."""
        for name, value in SIDES.items():
            rows = side == value
            log(f"retrieval/{name}/reward", out.reward[rows].mean().item())
            log(f"retrieval/{name}/rank", out.rank[rows].mean().item())
            log(f"retrieval/{name}/gap", out.gap[rows].mean().item())
            log(f"gen_emb_found_rate/{name}", found[rows].float().mean().item())
        groups = defaultdict(list)
        for row, key in enumerate(zip(pair_id.tolist(), side.tolist())):
            groups[key].append(row)
        grouped = embeddings[torch.tensor(list(groups.values()), device=embeddings.device)]  # (groups, G, D)
        sims = grouped @ grouped.transpose(1, 2)
        g = grouped.shape[1]
        off_diagonal = (sims.sum(dim=(1, 2)) - sims.diagonal(dim1=1, dim2=2).sum(dim=1)) / (g * (g - 1))
        log("diagnostics/group_self_similarity", off_diagonal.mean().item())

    def _reasoning_shift(self, columns, completion_ids, embeddings: Tensor) -> float:
        """Mean 1 - cos(embedding, embedding of the same completion with its reasoning emptied) over the first
        ``sensitivity_rows`` local rollouts (TRL's ``log_metric`` averages it over ranks)."""
        k = min(self.sensitivity_rows, len(completion_ids))
        first = {key: values[:k] for key, values in columns.items()}
        moved, _ = self.embed_rollouts(first, self.empty_reasoning(completion_ids[:k]))
        return float((1.0 - (embeddings[:k] * moved).sum(dim=-1)).mean())
