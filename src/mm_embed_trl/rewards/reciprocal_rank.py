"""Reciprocal-rank retrieval reward: a drop-in alternative to UME-R1's ``rank × gap``.

Reference: the reciprocal rank of information retrieval (mean reciprocal rank, MRR); an alternative to the
embedding reward of UME-R1 (Lan et al., arXiv 2511.00405), not part of that paper.

Same pool, positives ``P_i`` and negatives ``N_i`` as :func:`~mm_embed_trl.rewards.ume_r1_retrieval_reward`. Each of
row ``i``'s ``G`` positives is ranked against the negatives only (other positives do not push it down), and
the reward is its mean reciprocal rank::

    rank_ik = 1 + |{j ∈ N_i : S_ij ≥ S_ik}|              (negatives win ties)
    r_i     = (1/G) Σ_{k ∈ P_i} 1 / rank_ik               ∈ [1/(1+|N_i|), 1]

Unlike ``rank × gap`` it is never negative, it keeps rewarding a positive that climbs from 10th to 2nd place
(top-G counts only the first G places), and it is invariant to any monotone transform of the similarities:
it rewards the order, not the margin. Rows without negatives get ``reward = 0``, as in
:func:`~mm_embed_trl.rewards.ume_r1_retrieval_reward`, whose diagnostics (``rank``, ``gap``, ``pos_sim``,
``neg_sim``) are returned too.

Relations: with ``G = 1`` this is the per-query reciprocal rank whose mean is MRR; swap it in for
:func:`~mm_embed_trl.rewards.ume_r1_retrieval_reward` (same signature and output type).

Example::

    >>> import torch
    >>> from mm_embed_trl.rewards import reciprocal_rank_reward
    >>> side, pair_id = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    >>> E = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])  # t0 is closer to q1 than to q0
    >>> reciprocal_rank_reward(E, side, pair_id, num_generations=1).reward.tolist()
    [1.0, 0.5, 1.0, 1.0]
"""

from __future__ import annotations

import torch
from torch import Tensor

from .retrieval import RetrievalRewardOutput, positive_negative_means, retrieval_pool, top_g_rank

__all__ = ["reciprocal_rank_reward"]


def reciprocal_rank_reward(
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
    """Mean reciprocal rank of each row's positives among its negatives (see the module docstring).

    Arguments are those of :func:`~mm_embed_trl.rewards.retrieval_pool`; returns a
    :class:`~mm_embed_trl.rewards.RetrievalRewardOutput` whose ``reward`` is the reciprocal rank.
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
    scores = pool.scores
    num_cols = scores.shape[1]
    # Non-negatives sort to the front at -inf; searchsorted(side="left") counts entries strictly below a score,
    # so num_cols minus it counts the negatives scoring >= it.
    negative_sorted = torch.sort(scores.masked_fill(~pool.negative, float("-inf")), dim=1).values
    below = torch.searchsorted(negative_sorted, scores.contiguous(), side="left")
    reciprocal = 1.0 / (1 + num_cols - below).to(scores.dtype)
    rr = (reciprocal * pool.positive).sum(dim=1) / num_generations

    rank = top_g_rank(pool, num_generations)
    pos_sim, neg_sim, has_negative = positive_negative_means(pool)
    gap = torch.where(has_negative, pos_sim - neg_sim, 0.0)
    return RetrievalRewardOutput(
        reward=torch.where(has_negative, rr, 0.0),
        rank=rank,
        gap=gap,
        pos_sim=pos_sim,
        neg_sim=neg_sim,
        has_negative=has_negative,
    )
