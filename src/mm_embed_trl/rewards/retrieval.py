"""UME-R1's retrieval reward for embedding rollouts (the RL stage's ``r_emb``).

Reference: Lan et al., "UME-R1: Exploring Reasoning-Driven Generative Multimodal Embeddings",
arXiv 2511.00405, section on the embedding reward; public code ``_score_completions`` of its
``VLMGRPOTrainer`` (``src/r1-train/src/open_r1/trainer/grpo_trainer.py``).

The pool holds ``N`` rollout embeddings ``E`` (L2-normalised, gathered from every rank), each with a
``side`` (0 = query, 1 = target) and a ``pair_id``; every pair has exactly ``G`` rollouts on each side. For
a rollout ``i`` of pair ``g`` on one side, the *candidates* are the rollouts of the **other** side of the
pool, its *positives* ``P_i`` the ``G`` rollouts of the other side of pair ``g`` and its *negatives* ``N_i``
all other candidates, minus those marked as duplicates (identical content: never a negative). Then::

    S_ij   = E_i · E_j                                   (cosine; no temperature)
    rank_i = |top-G_j∈P_i∪N_i(S_ij) ∩ P_i| / G          ∈ {0, 1/G, …, 1}
    gap_i  = mean_{j∈P_i} S_ij − mean_{j∈N_i} S_ij
    r_i    = rank_i × gap_i

Query rollouts are scored against target rollouts and target rollouts against query rollouts
(UME-R1 calls its scorer twice with the roles swapped). Rows are matched by ``pair_id`` and ``side``,
never by position, so the pool may come in any order (TRL's groups straddle ranks).

**Tie rule.** UME-R1 uses ``torch.topk``, whose order among equal scores is implementation-defined. Here
the top-G list is ordered by score, and at equal scores a *negative ranks ahead of a positive*: a positive
only counts if it is strictly ahead of enough negatives. The rule is pessimistic (a collapsed encoder whose
rollouts all score the same earns rank 0, not 1) and independent of the row order. Ties are exact float
equality of ``S``.

**No negatives.** A pool with a single pair (or where the duplicate mask removes every negative) has no
negatives: the mean over ``N_i`` is undefined (UME-R1 would produce NaN, which TRL's ``nansum`` then
silently drops). That raises a ``ValueError``. Rows of a mixed pool that lost all their negatives to the
duplicate mask get ``gap = reward = 0`` and ``neg_sim = NaN`` and are flagged by ``has_negative = False``.

**Which pool.** The caller decides which rollouts compete by what it passes in: UME-R1 scores the rollouts
of one micro-step (``per_device × world`` per side); TRL's generation batch spans ``steps_per_generation``
micro-steps. ``pool_id`` splits one call into independent pools (rows only compete within their pool).

Relations: with ``G = 1``, rank is top-1 retrieval accuracy against the other side's pool and gap the
positive-vs-mean-negative margin of in-batch InfoNCE (:func:`~mm_embed_trl.losses.hard_negative_infonce_loss`
with ``margin=None, top_k=None``); :func:`~mm_embed_trl.rewards.reciprocal_rank_reward` is a drop-in
alternative with the same signature.

Example::

    >>> import torch, torch.nn.functional as F
    >>> from mm_embed_trl.rewards import ume_r1_retrieval_reward
    >>> G, pairs = 2, 3
    >>> side = torch.tensor([0, 0, 1, 1] * pairs)               # [q0×G, t0×G, q1×G, t1×G, ...]
    >>> pair_id = torch.arange(pairs).repeat_interleave(2 * G)
    >>> E = F.normalize(torch.randn(pairs, 8), dim=-1)[pair_id]  # every rollout of a pair embeds alike
    >>> out = ume_r1_retrieval_reward(E, side, pair_id, num_generations=G)
    >>> out.rank.tolist()                                       # each rollout retrieves its own pair
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    >>> bool((out.reward == out.gap).all())
    True
"""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RetrievalPool",
    "RetrievalReward",
    "RetrievalRewardOutput",
    "positive_negative_means",
    "retrieval_pool",
    "top_g_rank",
    "ume_r1_retrieval_reward",
]


class RetrievalRewardOutput(NamedTuple):
    """Per-row result of :func:`ume_r1_retrieval_reward` (all ``(N,)`` tensors in the pool's row order).

    Attributes:
        reward: ``rank × gap`` (the value added to the format reward).
        rank: share of the row's ``G`` positives in its top-``G`` candidates.
        gap: ``pos_sim − neg_sim`` (0 for rows without negatives).
        pos_sim: mean similarity to the row's positives.
        neg_sim: mean similarity to its negatives (NaN for rows without negatives; log it with ``nanmean``).
        has_negative: bool, whether the row had at least one negative.
    """

    reward: Tensor
    rank: Tensor
    gap: Tensor
    pos_sim: Tensor
    neg_sim: Tensor
    has_negative: Tensor


class RetrievalPool(NamedTuple):
    """Scores and masks of a rollout pool, shared by the retrieval rewards (all ``(N, N)``).

    Attributes:
        scores: ``S = E Eᵀ`` in float32 (float64 for float64 inputs).
        positive: True where column j is one of row i's ``G`` positives (the other side of its pair).
        negative: True where column j is a negative of row i (other side, other pair, not a duplicate).
    """

    scores: Tensor
    positive: Tensor
    negative: Tensor


class RetrievalReward(Protocol):
    """The signature every retrieval reward has (the values of :data:`~mm_embed_trl.rewards.RETRIEVAL_REWARDS`).

    Arguments are those of :func:`retrieval_pool` (which a reward calls first, for its scores and masks); the result
    holds one value per row of ``embeddings``, in their order.
    """

    def __call__(
        self,
        embeddings: Tensor,
        side: Tensor,
        pair_id: Tensor,
        num_generations: int,
        *,
        duplicate_mask: Tensor | None = None,
        content_ids: Tensor | None = None,
        pool_id: Tensor | None = None,
        normalize: bool = True,
    ) -> RetrievalRewardOutput: ...


def _check_rows(name: str, t: Tensor | None, n: int) -> None:
    if t is not None and t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) (one value per row of embeddings), got {tuple(t.shape)}.")


def retrieval_pool(
    embeddings: Tensor,
    side: Tensor,
    pair_id: Tensor,
    num_generations: int,
    *,
    duplicate_mask: Tensor | None = None,
    content_ids: Tensor | None = None,
    pool_id: Tensor | None = None,
    normalize: bool = True,
) -> RetrievalPool:
    """Similarities and positive / negative masks of a pool of rollouts; validates the pool's structure.

    Args:
        embeddings: ``(N, D)`` rollout embeddings (upcast to at least float32).
        side: ``(N,)`` int, 0 for a query rollout, 1 for a target rollout.
        pair_id: ``(N,)`` int, the pair each rollout belongs to (any integers, unique per pair).
        num_generations: ``G``, rollouts per side per pair.
        duplicate_mask: optional ``(N, N)`` bool, True where row j must not be a negative of row i.
        content_ids: optional ``(N,)`` int64 hash of each row's own input (prompt text + image), equal for
            the ``G`` rollouts of one pair side. Pairs ``g ≠ h`` are duplicates when their targets are
            identical (shared label captions) *or* their queries are identical (several answers to one
            query): then each side of ``h`` is as good a match for ``g``'s rollouts as ``g``'s own.
        pool_id: optional ``(N,)`` int; rows only compete with rows of the same pool id. A pair must lie in
            one pool.
        normalize: L2-normalise the embeddings first (idempotent for normalised inputs).

    Raises:
        ValueError: on bad shapes or side values, a pair without exactly ``G`` rollouts on each side (within
            its pool), non-finite embeddings, content ids that differ among one pair side's rollouts, or a
            pool in which no row has a negative (e.g. a single pair).
    """
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}.")
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be an (N, D) tensor, got shape {tuple(embeddings.shape)}.")
    n = embeddings.shape[0]
    for name, t in (("side", side), ("pair_id", pair_id), ("content_ids", content_ids), ("pool_id", pool_id)):
        _check_rows(name, t, n)
    if duplicate_mask is not None and duplicate_mask.shape != (n, n):
        raise ValueError(f"duplicate_mask must have shape ({n}, {n}), got {tuple(duplicate_mask.shape)}.")
    device = embeddings.device
    side, pair_id = side.to(device), pair_id.to(device)

    work_dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    e = embeddings.to(work_dtype)
    if normalize:
        e = F.normalize(e, dim=-1)
    scores = e @ e.T

    other_side = side[:, None] != side[None, :]
    if pool_id is not None:
        pool_id = pool_id.to(device)
        other_side = other_side & (pool_id[:, None] == pool_id[None, :])
    same_pair = pair_id[:, None] == pair_id[None, :]
    positive = other_side & same_pair
    negative = other_side & ~same_pair
    content_ok = torch.ones((), dtype=torch.bool, device=device)
    if content_ids is not None:
        c = content_ids.to(device)
        # Content of each row's positives (the other side of its pair): min and max agree when consistent.
        lo = torch.where(positive, c[None, :], torch.iinfo(c.dtype).max).amin(dim=1)
        hi = torch.where(positive, c[None, :], torch.iinfo(c.dtype).min).amax(dim=1)
        content_ok = (lo == hi).all()
        # j duplicates i's positive, or j's partner side (lo[j]) is the same input as i.
        negative = negative & ~((c[None, :] == lo[:, None]) | (lo[None, :] == c[:, None]))
    if duplicate_mask is not None:
        negative = negative & ~duplicate_mask.to(device=device, dtype=torch.bool)

    # One host sync for every structural check; details are computed only on failure.
    checks = torch.stack(
        [
            ((side == 0) | (side == 1)).all(),
            (positive.sum(dim=1) == num_generations).all(),
            torch.isfinite(e).all(),
            content_ok,
            negative.any(),
        ]
    ).tolist()
    sides_ok, counts_ok, finite_ok, content_ok, any_negative = checks
    if not sides_ok:
        bad = sorted(set(side[(side != 0) & (side != 1)].tolist()))
        raise ValueError(f"side must be 0 (query) or 1 (target) for every row; found values {bad}.")
    if not counts_ok:
        _raise_bad_groups(side, pair_id, pool_id, num_generations)
    if not finite_ok:
        rows = torch.nonzero(~torch.isfinite(e).all(dim=1)).flatten().tolist()
        raise ValueError(f"embeddings of rows {rows[:10]} are not finite (NaN/inf); check the embedding forward.")
    if not content_ok:
        raise ValueError(
            "content_ids differ among the rollouts of one pair side; give every rollout the hash of its prompt "
            "(the G rollouts of one side of a pair share it)."
        )
    if not any_negative:
        num_pairs = len(set(pair_id.tolist()))
        masked = "" if duplicate_mask is None and content_ids is None else " after masking duplicates"
        raise ValueError(
            f"The retrieval reward needs negatives, but no rollout in the pool has one{masked} ({num_pairs} "
            f"distinct pair(s), {n} rows): a pool with one pair has no negatives. Put at least 2 pairs with "
            "different content in each pool (a generation batch of >= 4 * num_generations rows)."
        )
    return RetrievalPool(scores=scores, positive=positive, negative=negative)


def _raise_bad_groups(side: Tensor, pair_id: Tensor, pool_id: Tensor | None, num_generations: int) -> None:
    """Name the first pair whose rollout count on one side (within its pool) is not G (failure path only)."""
    pools = pool_id.tolist() if pool_id is not None else [None] * len(side)
    counts = Counter(zip(pools, pair_id.tolist(), side.tolist()))
    for pool, pair in dict.fromkeys((pool, pair) for pool, pair, _ in counts):
        for side_value, side_name in ((0, "query"), (1, "target")):
            count = counts.get((pool, pair, side_value), 0)
            if count != num_generations:
                where = f"pair_id {pair}" + ("" if pool is None else f" in pool {pool}")
                raise ValueError(
                    f"{where} has {count} {side_name} rollouts, expected num_generations={num_generations} on "
                    "each side (rows are matched by pair_id and side; a pair must lie in one pool)."
                )
    raise AssertionError("unreachable: the per-row positive count disagreed with the per-pair counts")


def top_g_rank(pool: RetrievalPool, num_generations: int) -> Tensor:
    """``(N,)`` share of each row's positives among its top-G candidates (negatives win ties).

    The order is lexicographic on (score descending, negative before positive): a stable sort on the
    positive flag followed by a stable sort on the score.
    """
    candidate = pool.positive | pool.negative
    scores = pool.scores.masked_fill(~candidate, float("-inf"))
    by_flag = torch.sort(pool.positive.to(torch.int8), dim=1, stable=True).indices  # negatives first
    by_score = torch.sort(scores.gather(1, by_flag), dim=1, descending=True, stable=True).indices
    top = by_flag.gather(1, by_score[:, :num_generations])
    return pool.positive.gather(1, top).sum(dim=1).to(scores.dtype) / num_generations


def positive_negative_means(pool: RetrievalPool) -> tuple[Tensor, Tensor, Tensor]:
    """``(pos_sim, neg_sim, has_negative)`` per row; ``neg_sim`` is NaN for rows without negatives."""
    s = pool.scores
    pos_sim = (s * pool.positive).sum(dim=1) / pool.positive.sum(dim=1)
    num_neg = pool.negative.sum(dim=1)
    has_negative = num_neg > 0
    neg_sim = torch.where(has_negative, (s * pool.negative).sum(dim=1) / num_neg.clamp(min=1), float("nan"))
    return pos_sim, neg_sim, has_negative


def ume_r1_retrieval_reward(
    embeddings: Tensor,
    side: Tensor,
    pair_id: Tensor,
    num_generations: int,
    *,
    duplicate_mask: Tensor | None = None,
    content_ids: Tensor | None = None,
    pool_id: Tensor | None = None,
    normalize: bool = True,
) -> RetrievalRewardOutput:
    """UME-R1's ``r_emb = rank × gap`` for every rollout of the pool (see the module docstring).

    Arguments are those of :func:`retrieval_pool`. Returns a :class:`RetrievalRewardOutput` of ``(N,)``
    tensors on the embeddings' device (no host sync beyond the one validation check).
    """
    pool = retrieval_pool(
        embeddings,
        side,
        pair_id,
        num_generations,
        duplicate_mask=duplicate_mask,
        content_ids=content_ids,
        pool_id=pool_id,
        normalize=normalize,
    )
    rank = top_g_rank(pool, num_generations)
    pos_sim, neg_sim, has_negative = positive_negative_means(pool)
    gap = torch.where(has_negative, pos_sim - neg_sim, 0.0)
    return RetrievalRewardOutput(
        reward=rank * gap, rank=rank, gap=gap, pos_sim=pos_sim, neg_sim=neg_sim, has_negative=has_negative
    )
