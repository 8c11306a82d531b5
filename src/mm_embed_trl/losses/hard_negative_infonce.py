"""InfoNCE with false-negative filtering and hard-negative sampling (UniME stage 2).

Reference: Gu et al., "Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs"
(UniME), arXiv 2504.17432, section "Hard Negative Enhanced Instruction Tuning".

For query ``q_i`` with positive ``p_i`` (all L2-normalised, similarity = cosine), the candidate set is

    C_i = {every row of ``candidates`` except i's own positive ``candidates[positive_index[i]]``}
          ∪ {the explicit negatives ``negatives[i, :]``}

minus any candidate marked as a *duplicate* of ``p_i`` (same content: never a negative — classification-
style data repeats label captions, and UniME's margin rule cannot remove exact copies, whose similarity
equals the positive's). Then:

1. **False-negative filter** (margin β): drop ``c`` when ``cos(q_i, c) > cos(q_i, p_i) + β``.
2. **Hard-negative sampling** (k): keep the ``k`` most similar remaining candidates ``N_i``. If only
   ``0 < m < k`` remain, the ``m`` survivors are repeated cyclically (hardest first) to fill ``k`` slots, as
   in the paper; a filtered candidate or the positive never enters (the published code's ``topk`` over
   ``-inf`` scores lets them back in).
3. **Loss**::

       ℓ_i = -log( exp(s(q_i, p_i)/τ) / (exp(s(q_i, p_i)/τ) + Σ_{n ∈ N_i} exp(s(q_i, n)/τ)) )
       L   = (1/B) Σ_i ℓ_i

   A query left with no negative contributes ``log 1 = 0`` (reported in the logs); if *no* query has a
   negative, a ``ValueError`` explains why.

With ``margin=None`` and ``top_k=None`` this is plain InfoNCE over all (non-duplicate) candidates; with
``candidates`` the (gathered) positives it equals ``cross_entropy(q @ p.T / τ, arange(B))``.
``symmetric=True`` averages it with the target→query InfoNCE (each ``p_i`` against all queries of the
batch; duplicate targets masked), as UME-R1 does.

Distributed use: gather queries, positives (and negatives / content ids) with
:func:`~mm_embed_trl.distributed.gather_with_grad` / ``gather_no_grad``, compute this loss on the global
batch on every rank, and multiply by :func:`~mm_embed_trl.distributed.distributed_loss_scale` before
backward.

Example::

    >>> import torch, torch.nn.functional as F
    >>> from mm_embed_trl.losses import hard_negative_infonce_loss
    >>> q, p = F.normalize(torch.randn(16, 32), dim=-1), F.normalize(torch.randn(16, 32), dim=-1)
    >>> out = hard_negative_infonce_loss(q, p, temperature=0.02, margin=0.1, top_k=8)
    >>> out.loss.shape, sorted(out.logs)[:2]
    (torch.Size([]), ['accuracy', 'filtered_fraction'])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "HardNegativeInfoNCELoss",
    "HardNegativeLossOutput",
    "duplicate_mask_from_ids",
    "hard_negative_infonce_loss",
]


@dataclass
class HardNegativeLossOutput:
    """Result of :func:`hard_negative_infonce_loss`.

    Attributes:
        loss: scalar loss (mean over queries; average of both directions when symmetric).
        logs: detached scalar tensors (call ``float()`` to log): ``filtered_fraction`` (share of queries with
            at least one candidate removed by the margin), ``mean_pos_sim``, ``mean_neg_sim`` (over distinct
            kept negatives), ``accuracy`` (share of queries whose positive scores strictly above every kept
            negative; vacuously true without negatives), ``num_valid_negatives`` (mean candidates left after
            masking and filtering, before top-k), ``num_kept_negatives`` (mean distinct negatives used),
            ``no_negative_fraction`` (share of queries left with no negative), and ``loss_q2t`` /
            ``loss_t2q`` (the two directions) when symmetric.
        negative_indices: ``(B, top_k)`` long, the column each negative slot used, -1 for empty slots (top-k
            mode only, else None). Columns ``0..N-1`` index ``candidates``; ``N + j`` is ``negatives[i, j]``.
        kept_mask: ``(B, N + K)`` bool, the distinct candidates used as negatives for each query.
    """

    loss: Tensor
    logs: dict[str, Tensor] = field(default_factory=dict)
    negative_indices: Tensor | None = None
    kept_mask: Tensor | None = None


def duplicate_mask_from_ids(query_target_ids: Tensor, candidate_ids: Tensor) -> Tensor:
    """``(B, N)`` bool mask, True where candidate ``j`` has the same content id as query ``i``'s positive.

    Args:
        query_target_ids: ``(B,)`` int64 content hashes of each query's positive target.
        candidate_ids: ``(N,)`` int64 content hashes of the candidates (e.g. the gathered positives' ids).

    The trainer hashes each target's (text, image bytes) to int64; equal ids mean identical content, which
    must never serve as a negative (the query's own positive is flagged too, harmlessly).
    """
    if query_target_ids.dim() != 1 or candidate_ids.dim() != 1:
        raise ValueError(
            f"duplicate_mask_from_ids expects 1-D id tensors, got shapes {tuple(query_target_ids.shape)} and "
            f"{tuple(candidate_ids.shape)}."
        )
    return query_target_ids.to(candidate_ids.device)[:, None] == candidate_ids[None, :]


def _check_2d(name: str, t: Tensor, dim: int | None = None) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a (rows, dim) tensor, got shape {tuple(t.shape)}.")
    if dim is not None and t.shape[1] != dim:
        raise ValueError(f"{name} has embedding dim {t.shape[1]}, but query has {dim}.")


def hard_negative_infonce_loss(
    query: Tensor,
    positive: Tensor,
    negatives: Tensor | None = None,
    *,
    candidates: Tensor | None = None,
    positive_index: Tensor | None = None,
    candidate_duplicate_mask: Tensor | None = None,
    negative_duplicate_mask: Tensor | None = None,
    temperature: float = 0.02,
    margin: float | None = 0.1,
    top_k: int | None = 8,
    symmetric: bool = False,
    normalize: bool = True,
) -> HardNegativeLossOutput:
    """UniME stage-2 InfoNCE with false-negative filter and top-k hard negatives (see module docstring).

    Args:
        query: ``(B, D)`` query embeddings.
        positive: ``(B, D)`` positive target of each query.
        negatives: optional ``(B, K, D)`` explicit negatives per query (they only compete for their own query).
        candidates: ``(N, D)`` targets shared by all queries (typically the gathered positives). Default:
            ``positive`` itself, with ``positive_index = arange(B)``.
        positive_index: ``(B,)`` long, index of query i's own positive in ``candidates`` (excluded from its
            negatives); a negative value means "not among the candidates". Required with ``candidates``.
        candidate_duplicate_mask: ``(B, N)`` bool, True where ``candidates[j]`` has the same content as
            query i's positive (never a negative); see :func:`duplicate_mask_from_ids`.
        negative_duplicate_mask: ``(B, K)`` bool, the same for the explicit negatives.
        temperature: τ (UniME: 0.02).
        margin: β of the false-negative filter (UniME: 0.1); None disables the filter.
        top_k: number of hard negatives k (UniME: 8); None keeps every remaining candidate.
        symmetric: add the target→query InfoNCE term (averaged with the query→target one).
        normalize: L2-normalise the inputs (idempotent for already normalised embeddings); the margin rule
            is defined on cosine similarities.

    Returns:
        :class:`HardNegativeLossOutput`.

    Raises:
        ValueError: on inconsistent shapes, or when every candidate of every query is excluded (nothing to
            contrast against).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}.")
    _check_2d("query", query)
    batch, dim = query.shape
    if batch == 0:
        raise ValueError("hard_negative_infonce_loss got an empty batch (query has 0 rows).")
    _check_2d("positive", positive, dim)
    if positive.shape[0] != batch:
        raise ValueError(f"positive has {positive.shape[0]} rows but query has {batch}; pass one positive per query.")
    if negatives is not None and (negatives.dim() != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim):
        raise ValueError(
            f"negatives must have shape (B={batch}, K, D={dim}), got {tuple(negatives.shape)}. Reshape a flat "
            "row-major (B*K, D) tensor with negatives.view(B, K, D)."
        )

    # Work in (at least) float32: with τ = 0.02, bf16 similarities are too coarse for the margin and logits.
    inputs = [t for t in (query, positive, negatives, candidates) if t is not None]
    work_dtype = torch.float64 if any(t.dtype == torch.float64 for t in inputs) else torch.float32

    def upcast(t: Tensor) -> Tensor:
        return t.to(work_dtype)

    q = upcast(query)
    p = upcast(positive)
    if candidates is None:
        if positive_index is not None:
            raise ValueError("positive_index is only meaningful together with candidates.")
        c = p
        positive_index = torch.arange(batch, device=query.device)
    else:
        _check_2d("candidates", candidates, dim)
        if positive_index is None:
            raise ValueError(
                "candidates was given without positive_index: pass the index of each query's own positive in "
                "candidates (or -1 if it is not among them)."
            )
        c = upcast(candidates)
    num_cand = c.shape[0]
    if positive_index.shape != (batch,):
        raise ValueError(f"positive_index must have shape ({batch},), got {tuple(positive_index.shape)}.")
    positive_index = positive_index.to(device=query.device, dtype=torch.long)
    if bool((positive_index >= num_cand).any()):
        bad = int(torch.nonzero(positive_index >= num_cand)[0, 0])
        raise ValueError(
            f"positive_index[{bad}] = {int(positive_index[bad])} is out of range for {num_cand} candidates."
        )
    n = upcast(negatives) if negatives is not None else None
    if normalize:
        q, p, c = F.normalize(q, dim=-1), F.normalize(p, dim=-1), F.normalize(c, dim=-1)
        n = F.normalize(n, dim=-1) if n is not None else None
    num_neg = n.shape[1] if n is not None else 0

    # Scores of every query against every column: [shared candidates | its own explicit negatives].
    pos_scores = (q * p).sum(-1)  # (B,)
    scores = q @ c.T  # (B, N)
    if n is not None:
        scores = torch.cat([scores, torch.einsum("bd,bkd->bk", q, n)], dim=1)  # (B, N + K)
    num_cols = num_cand + num_neg

    # valid[i, j]: column j may serve as a negative for query i.
    valid = torch.ones(batch, num_cols, dtype=torch.bool, device=query.device)
    rows = torch.arange(batch, device=query.device)
    has_own = positive_index >= 0
    valid[rows[has_own], positive_index[has_own]] = False
    dup = torch.zeros_like(valid)
    if candidate_duplicate_mask is not None:
        if candidate_duplicate_mask.shape != (batch, num_cand):
            raise ValueError(
                f"candidate_duplicate_mask must have shape ({batch}, {num_cand}), "
                f"got {tuple(candidate_duplicate_mask.shape)}."
            )
        dup[:, :num_cand] = candidate_duplicate_mask.to(device=query.device, dtype=torch.bool)
    if negative_duplicate_mask is not None:
        if negative_duplicate_mask.shape != (batch, num_neg):
            raise ValueError(
                f"negative_duplicate_mask must have shape ({batch}, {num_neg}), "
                f"got {tuple(negative_duplicate_mask.shape)}."
            )
        dup[:, num_cand:] = negative_duplicate_mask.to(device=query.device, dtype=torch.bool)
    valid &= ~dup

    # Selection is a discrete decision: make it on detached scores; gradients flow through the gathers below.
    sel_scores = scores.detach()
    if margin is not None:
        too_close = valid & (sel_scores > pos_scores.detach()[:, None] + margin)
        valid &= ~too_close
        filtered_fraction = too_close.any(dim=1).float().mean()
    else:
        filtered_fraction = torch.zeros((), device=query.device)
    num_valid = valid.sum(dim=1)  # (B,)

    if num_cols == 0:
        num_kept = torch.zeros_like(num_valid)
    elif top_k is None:
        neg_scores, neg_mask = scores, valid
        kept = valid
        negative_indices = None
        num_kept = num_valid
    else:
        k_avail = min(top_k, num_cols)
        # Valid columns sort first (invalid ones are -inf); the first num_kept picks are real negatives.
        _, order = sel_scores.masked_fill(~valid, float("-inf")).topk(k_avail, dim=1)
        num_kept = num_valid.clamp(max=k_avail)
        # Slot s takes pick (s mod num_kept): survivors repeat cyclically, never an invalid column.
        slots = torch.arange(top_k, device=query.device)[None, :]
        chosen = order.gather(1, slots % num_kept.clamp(min=1)[:, None])  # (B, top_k)
        has_neg = (num_kept > 0)[:, None]
        neg_scores, neg_mask = scores.gather(1, chosen), has_neg.expand(batch, top_k)
        negative_indices = chosen.masked_fill(~has_neg, -1)
        kept = torch.zeros_like(valid).scatter_(1, chosen, True) & has_neg
    if bool((num_kept == 0).all()):
        raise ValueError(
            f"hard_negative_infonce_loss: every candidate of every query was excluded ({batch} queries, "
            f"{num_cand} shared candidates, {num_neg} explicit negatives each, margin={margin}), so there is "
            "nothing to contrast against. Lower or disable the margin (margin=None), use a larger batch or "
            "explicit negatives, gather targets across ranks, and check the duplicate mask; a batch of 1 "
            "without gathering has no in-batch negatives."
        )

    # Excluded slots get -inf logits; the target logit is always finite, so softmax/CE stay NaN-free and
    # a row without negatives has logits [x, -inf, ...]: its loss and gradient are exactly 0.
    logits = torch.cat([pos_scores[:, None], neg_scores.masked_fill(~neg_mask, float("-inf"))], dim=1) / temperature
    target = torch.zeros(batch, dtype=torch.long, device=query.device)
    loss = F.cross_entropy(logits, target)

    with torch.no_grad():
        kept_scores = sel_scores.masked_fill(~kept, float("-inf"))
        max_neg = kept_scores.max(dim=1).values
        accuracy = (pos_scores.detach() > max_neg).float().mean()  # -inf max: vacuously correct
        num_kept_total = kept.sum()
        mean_neg = (sel_scores * kept).sum() / num_kept_total.clamp(min=1)
        logs: dict[str, Tensor] = {
            "filtered_fraction": filtered_fraction,
            "mean_pos_sim": pos_scores.detach().mean(),
            "mean_neg_sim": mean_neg,
            "accuracy": accuracy,
            "num_valid_negatives": num_valid.float().mean(),
            "num_kept_negatives": kept.sum(dim=1).float().mean(),
            "no_negative_fraction": (num_kept == 0).float().mean(),
        }

    if symmetric:
        loss_t2q = _target_to_query_loss(
            p, q, positive_index, candidate_duplicate_mask, candidates is None, temperature
        )
        logs["loss_q2t"] = loss.detach()
        logs["loss_t2q"] = loss_t2q.detach()
        loss = 0.5 * (loss + loss_t2q)

    return HardNegativeLossOutput(loss=loss, logs=logs, negative_indices=negative_indices, kept_mask=kept)


def _target_to_query_loss(
    p: Tensor,
    q: Tensor,
    positive_index: Tensor,
    candidate_duplicate_mask: Tensor | None,
    candidates_are_positives: bool,
    temperature: float,
) -> Tensor:
    """InfoNCE of each positive ``p_i`` against all queries of the batch (target ``q_i``).

    Query ``j`` is masked out for target ``i`` when target ``j`` is a duplicate of target ``i`` (then ``q_j``
    is as much a match for ``p_i`` as ``q_i``). The target-target duplicate relation is read from the
    candidate duplicate mask at the candidates' positive columns.
    """
    logits = (p @ q.T) / temperature  # (B, B)
    batch = p.shape[0]
    if candidate_duplicate_mask is not None:
        if candidates_are_positives:
            same_target = candidate_duplicate_mask.to(device=p.device, dtype=torch.bool)
        elif bool((positive_index >= 0).all()):
            same_target = candidate_duplicate_mask.to(device=p.device, dtype=torch.bool)[:, positive_index]
        else:
            raise ValueError(
                "symmetric=True with a duplicate mask needs every query's positive among the candidates "
                "(positive_index >= 0) to know which targets are duplicates of each other."
            )
        eye = torch.eye(batch, dtype=torch.bool, device=p.device)
        logits = logits.masked_fill(same_target & ~eye, float("-inf"))
    return F.cross_entropy(logits, torch.arange(batch, device=p.device))


class HardNegativeInfoNCELoss(nn.Module):
    """``nn.Module`` wrapper of :func:`hard_negative_infonce_loss` holding its options.

    Example::

        >>> import torch
        >>> from mm_embed_trl.losses import HardNegativeInfoNCELoss
        >>> loss_fn = HardNegativeInfoNCELoss(temperature=0.02, margin=0.1, top_k=8)
        >>> out = loss_fn(torch.randn(8, 16), torch.randn(8, 16))
        >>> out.loss.ndim
        0
    """

    def __init__(
        self,
        temperature: float = 0.02,
        margin: float | None = 0.1,
        top_k: int | None = 8,
        symmetric: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.margin = margin
        self.top_k = top_k
        self.symmetric = symmetric
        self.normalize = normalize

    def forward(
        self,
        query: Tensor,
        positive: Tensor,
        negatives: Tensor | None = None,
        *,
        candidates: Tensor | None = None,
        positive_index: Tensor | None = None,
        candidate_duplicate_mask: Tensor | None = None,
        negative_duplicate_mask: Tensor | None = None,
    ) -> HardNegativeLossOutput:
        return hard_negative_infonce_loss(
            query,
            positive,
            negatives,
            candidates=candidates,
            positive_index=positive_index,
            candidate_duplicate_mask=candidate_duplicate_mask,
            negative_duplicate_mask=negative_duplicate_mask,
            temperature=self.temperature,
            margin=self.margin,
            top_k=self.top_k,
            symmetric=self.symmetric,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, margin={self.margin}, top_k={self.top_k}, "
            f"symmetric={self.symmetric}, normalize={self.normalize}"
        )
