"""Retrieval metrics on embeddings: vectorised torch, bounded memory, deterministic ties.

All functions take embeddings that are expected to be L2-normalised, so a dot product is the cosine
similarity (pass ``normalize=True`` where offered if they are not).

Definitions (binary relevance, ranks counted from 1, ``rel_q`` = the set of relevant documents of query ``q``)
follow sentence-transformers' ``InformationRetrievalEvaluator`` exactly, so numbers are comparable:

- ``accuracy@k``: 1 if any relevant document is in the top k, averaged over queries.
- ``precision@k``: (#relevant in top k) / k  (k, not min(k, N), as in sentence-transformers).
- ``recall@k``: (#relevant in top k) / |rel_q|.
- ``mrr@k``: 1 / rank of the first relevant document if that rank is <= k, else 0.
- ``ndcg@k``: DCG@k / IDCG@k with gain 1 and discount ``1 / log2(rank + 1)``; IDCG puts
  min(|rel_q|, k) relevant documents first.
- ``map@k``: sum over relevant hits at rank r <= k of (#relevant in top r) / r, divided by min(k, |rel_q|).
- ``mrr`` (no cutoff): 1 / rank of the first relevant document in the full ranking.

Ranking order is (score descending, corpus index ascending), the same total order sentence-transformers
uses for integer corpus ids, so ties never make results depend on chunk sizes or on ``torch.topk``'s
unspecified tie order. Queries without any relevant document are skipped (as sentence-transformers does).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ranking_metrics",
    "retrieval_metrics",
    "candidate_list_metrics",
    "graded_ranking_metrics",
    "mmeb_precision_at_1",
    "similarity_spearman",
]


_PER_K = ("accuracy", "precision", "recall", "mrr", "ndcg", "map")  # metrics reported at every cutoff


def _check_k_values(k_values: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(sorted(set(int(k) for k in k_values)))
    if not ks or ks[0] < 1:
        raise ValueError(f"k_values must be a non-empty collection of positive integers, got {tuple(k_values)}.")
    return ks


def _check_embeddings(name: str, emb: Tensor, ndim: int = 2) -> Tensor:
    if not isinstance(emb, Tensor):
        emb = torch.as_tensor(emb)
    if emb.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(emb.shape)}.")
    if not emb.is_floating_point():
        emb = emb.float()
    return emb


def _topk_deterministic(scores: Tensor, k: int) -> Tensor:
    """Indices of the top ``k`` columns of each row, ordered by (score desc, index asc).

    ``torch.topk`` picks an arbitrary subset among values tied at the k-th score; rows where that matters are
    re-selected so the lowest indices win, which makes the result a pure function of the scores.
    """
    values, idx = scores.topk(k, dim=1, largest=True, sorted=True)
    threshold = values[:, -1:]
    ambiguous = (scores >= threshold).sum(dim=1) > k
    if bool(ambiguous.any()):
        rows = ambiguous.nonzero().squeeze(1)
        s, t = scores[rows], threshold[rows]
        above, at = s > t, s == t
        need = k - above.sum(dim=1, keepdim=True)
        # Keep every score above the threshold plus the first `need` tied columns (lowest indices).
        take = above | (at & (at.cumsum(dim=1) <= need))
        idx[rows] = take.nonzero()[:, 1].view(len(rows), k)
    # Final order: sort the chosen indices ascending, then a stable sort by score descending keeps ties in
    # index order.
    idx = idx.sort(dim=1).values
    order = scores.gather(1, idx).sort(dim=1, descending=True, stable=True).indices
    return idx.gather(1, order)


class _RelevanceLookup:
    """Dense per-chunk relevance masks from either a (Q, N) bool tensor or a list of index sets."""

    def __init__(self, relevant: Sequence[Iterable[int]] | Tensor, num_queries: int, num_docs: int):
        self.num_docs = num_docs
        if isinstance(relevant, Tensor):
            if relevant.shape != (num_queries, num_docs):
                raise ValueError(
                    f"relevant mask must have shape (num_queries, num_docs) = {(num_queries, num_docs)}, "
                    f"got {tuple(relevant.shape)}."
                )
            self.mask = relevant.bool()
            self.counts = self.mask.sum(dim=1)
            return
        if len(relevant) != num_queries:
            raise ValueError(
                f"relevant has {len(relevant)} entries but there are {num_queries} queries; give one set of "
                "relevant corpus indices per query."
            )
        self.mask = None
        # Flatten the sets once (data conversion, not per-query metric work); chunks then slice this CSR layout.
        per_query = [sorted(set(int(i) for i in rel)) for rel in relevant]
        counts = torch.tensor([len(r) for r in per_query], dtype=torch.long)
        flat = torch.tensor(list(itertools.chain.from_iterable(per_query)), dtype=torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_docs):
            bad_q = int(torch.repeat_interleave(torch.arange(num_queries), counts)[(flat < 0) | (flat >= num_docs)][0])
            raise ValueError(
                f"relevant[{bad_q}] = {per_query[bad_q]} holds a corpus index outside [0, {num_docs}); "
                "relevant sets must index rows of corpus_embeddings."
            )
        self.counts = counts
        self.flat = flat
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])

    def chunk(self, start: int, end: int, device: torch.device) -> Tensor:
        if self.mask is not None:
            return self.mask[start:end].to(device)
        lo, hi = int(self.offsets[start]), int(self.offsets[end])
        rows = torch.repeat_interleave(torch.arange(end - start), self.counts[start:end])
        mask = torch.zeros(end - start, self.num_docs, dtype=torch.bool, device=device)
        mask[rows.to(device), self.flat[lo:hi].to(device)] = True
        return mask


@torch.no_grad()
def retrieval_metrics(
    query_embeddings: Tensor,
    corpus_embeddings: Tensor,
    relevant: Sequence[Iterable[int]] | Tensor,
    *,
    k_values: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
    normalize: bool = False,
) -> dict[str, float]:
    """Information-retrieval metrics of queries against a shared corpus.

    Args:
        query_embeddings: (Q, D) query vectors, L2-normalised (score = dot product = cosine).
        corpus_embeddings: (N, D) document vectors, L2-normalised.
        relevant: for each query, the set of relevant corpus row indices; or a (Q, N) bool mask.
        k_values: cutoffs; every metric is reported at each of them.
        chunk_size: number of queries scored at once: peak memory is about ``chunk_size * N * 6`` bytes.
        normalize: L2-normalise both sides first (for embeddings that are not normalised yet).

    Returns:
        ``{"accuracy@k", "precision@k", "recall@k", "mrr@k", "ndcg@k", "map@k"}`` for each k, plus
        ``"mrr"`` (uncut). Values are Python floats averaged over queries with at least one relevant document;
        see the module docstring for the exact definitions (identical to sentence-transformers').
    """
    q = _check_embeddings("query_embeddings", query_embeddings)
    c = _check_embeddings("corpus_embeddings", corpus_embeddings)
    if q.shape[1] != c.shape[1]:
        raise ValueError(
            f"query_embeddings have dimension {q.shape[1]} but corpus_embeddings have {c.shape[1]}; "
            "both sides must come from the same embedding space."
        )
    if normalize:
        q, c = F.normalize(q, dim=-1), F.normalize(c, dim=-1)
    c = c.to(q.dtype)
    return _ranking_metrics(lambda start, end: q[start:end] @ c.T, q.shape[0], c.shape[0], relevant, k_values,
                            chunk_size, q.device)


@torch.no_grad()
def ranking_metrics(
    scores: Tensor,
    relevant: Sequence[Iterable[int]] | Tensor,
    *,
    k_values: Iterable[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[str, float]:
    """:func:`retrieval_metrics` on precomputed scores: ``scores[q, j]`` is query q's score of corpus document j
    (any similarity, higher is better). Same metrics, definitions and tie order."""
    scores = _check_embeddings("scores", scores)
    return _ranking_metrics(lambda start, end: scores[start:end], scores.shape[0], scores.shape[1], relevant,
                            k_values, chunk_size, scores.device)


def _ranking_metrics(score_rows, num_queries, num_docs, relevant, k_values, chunk_size, device) -> dict[str, float]:
    """The metrics, with ``score_rows(start, end)`` giving the (end - start, N) scores of a chunk of queries."""
    if num_docs == 0:
        raise ValueError("The corpus is empty; retrieval needs at least one document.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    ks = _check_k_values(k_values)
    lookup = _RelevanceLookup(relevant, num_queries, num_docs)

    max_k = min(ks[-1], num_docs)
    positions = torch.arange(max_k, device=device, dtype=torch.float64)
    discounts = 1.0 / torch.log2(positions + 2.0)  # rank r (1-based) -> 1 / log2(r + 1)
    # IDCG@k for |rel| relevant documents = sum of the first min(|rel|, k) discounts (k may exceed N).
    ideal_dcg = torch.cumsum(1.0 / torch.log2(torch.arange(ks[-1], device=device, dtype=torch.float64) + 2.0), 0)
    doc_index = torch.arange(num_docs, device=device)

    sums = {f"{m}@{k}": torch.zeros((), dtype=torch.float64, device=device) for m in _PER_K for k in ks}
    sums["mrr"] = torch.zeros((), dtype=torch.float64, device=device)
    num_evaluated = 0

    for start in range(0, num_queries, chunk_size):
        end = min(start + chunk_size, num_queries)
        n_rel = lookup.counts[start:end].to(device)
        keep = n_rel > 0
        if not bool(keep.any()):
            continue
        scores = score_rows(start, end)  # (b, N)
        rel_mask = lookup.chunk(start, end, device)
        scores, rel_mask, n_rel = scores[keep], rel_mask[keep], n_rel[keep]
        num_evaluated += int(keep.sum())
        n_rel_f = n_rel.to(torch.float64)

        top = _topk_deterministic(scores, max_k)
        hits = rel_mask.gather(1, top).to(torch.float64)  # (b, max_k)
        cum_hits = hits.cumsum(dim=1)
        first_hit = torch.where(hits.bool(), positions, float(max_k)).amin(dim=1)  # 0-based, max_k if none
        prec_at_rank = cum_hits / (positions + 1.0)

        for k in ks:
            kk = min(k, max_k)
            n_correct = cum_hits[:, kk - 1]
            sums[f"accuracy@{k}"] += (n_correct > 0).to(torch.float64).sum()
            sums[f"precision@{k}"] += (n_correct / k).sum()
            sums[f"recall@{k}"] += (n_correct / n_rel_f).sum()
            sums[f"mrr@{k}"] += torch.where(first_hit < kk, 1.0 / (first_hit + 1.0), 0.0).sum()
            dcg = (hits[:, :kk] * discounts[:kk]).sum(dim=1)
            idcg = ideal_dcg[torch.clamp(n_rel, max=k) - 1]
            sums[f"ndcg@{k}"] += (dcg / idcg).sum()
            ap = (prec_at_rank[:, :kk] * hits[:, :kk]).sum(dim=1) / torch.clamp(n_rel, max=k).to(torch.float64)
            sums[f"map@{k}"] += ap.sum()

        # Uncut MRR: the first relevant document in (score desc, index asc) order is the best-scoring relevant
        # one with the lowest index; its rank is 1 + #docs ordered before it.
        best = scores.masked_fill(~rel_mask, float("-inf")).amax(dim=1, keepdim=True)
        best_idx = torch.where(rel_mask & (scores == best), doc_index, num_docs).amin(dim=1, keepdim=True)
        before = (scores > best) | ((scores == best) & (doc_index < best_idx))
        sums["mrr"] += (1.0 / (before.sum(dim=1).to(torch.float64) + 1.0)).sum()

    if num_evaluated == 0:
        raise ValueError("No query has a relevant document; give at least one relevant corpus index per query.")
    return {key: float(value) / num_evaluated for key, value in sums.items()}


@torch.no_grad()
def candidate_list_metrics(
    scores: Tensor,
    lengths: Tensor | Sequence[int] | None = None,
    *,
    k_values: Iterable[int] = (),
) -> dict[str, float]:
    """MMEB-style metrics of per-query candidate lists whose candidate 0 is the correct one.

    Args:
        scores: (Q, C) similarity of each query to its own candidates (padding columns may hold anything).
        lengths: number of real candidates of each query (columns ``>= lengths[q]`` are padding); all C if None.
        k_values: optional cutoffs for ``hit@k`` (= recall@k = accuracy@k, one relevant item) and ``ndcg@k``.

    Returns:
        ``{"precision@1": ...}`` plus ``"mrr"`` and, for each k, ``"recall@k"`` and ``"ndcg@k"`` when
        ``k_values`` is given. Ties follow VLM2Vec's ``np.argmax`` (first maximum wins): candidate 0 counts as
        correct when no other candidate scores strictly higher, and its rank is 1 + #candidates scoring
        strictly higher.
    """
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"scores must have shape (num_queries, num_candidates >= 1), got {tuple(scores.shape)}.")
    num_queries, width = scores.shape
    if num_queries == 0:
        raise ValueError("scores holds no query.")
    valid = torch.ones_like(scores, dtype=torch.bool)
    if lengths is not None:
        lengths = torch.as_tensor(lengths, device=scores.device)
        if lengths.shape != (num_queries,) or bool((lengths < 1).any()) or bool((lengths > width).any()):
            raise ValueError(
                f"lengths must hold one count in [1, {width}] per query ({num_queries}), got {lengths.tolist()}."
            )
        valid = torch.arange(width, device=scores.device) < lengths[:, None]
    correct = scores[:, :1]
    n_higher = ((scores > correct) & valid).sum(dim=1)  # never counts column 0 itself
    rank = n_higher.to(torch.float64) + 1.0
    out = {"precision@1": float((n_higher == 0).to(torch.float64).mean())}
    ks = _check_k_values(k_values) if k_values else ()
    if ks:
        out["mrr"] = float((1.0 / rank).mean())
    for k in ks:
        out[f"recall@{k}"] = float((rank <= k).to(torch.float64).mean())
        out[f"ndcg@{k}"] = float(torch.where(rank <= k, 1.0 / torch.log2(rank + 1.0), 0.0).mean())
    return out


@torch.no_grad()
def graded_ranking_metrics(scores: Tensor, gains: Tensor, *, k_values: Iterable[int] = (1, 5)) -> dict[str, Tensor]:
    """Per-query ``hit@k`` and ``ndcg_linear@k`` with graded relevance, as MMEB-V2 reports them (VLM2Vec's
    ``RankingMetrics``: Hit@1 for image and video tasks, NDCG@5 with linear gain for visual documents).

    Args:
        scores: (Q, N) scores, higher is better; ``-inf`` marks a column that is not a candidate of that query (its
            gain is ignored).
        gains: (Q, N) relevance of each document to each query, 0 for irrelevant (MMEB-V2's qrels ``score``).
        k_values: cutoffs.

    Returns:
        ``{"hit@k": (Q,), "ndcg_linear@k": (Q,)}`` float64 tensors: hit@k = 1 if a relevant document is among the
        top k; ndcg_linear@k = sum over the top k of gain / log2(rank + 1), over the same sum for the documents
        sorted by gain (0 for a query without relevant documents, as VLM2Vec). Ranking order is (score descending,
        column ascending), so ties never depend on the sort's algorithm.
    """
    if scores.ndim != 2 or scores.shape != gains.shape or scores.shape[1] == 0:
        raise ValueError(
            f"scores and gains must be (num_queries, num_documents >= 1) of one shape, got {tuple(scores.shape)} and "
            f"{tuple(gains.shape)}."
        )
    ks = _check_k_values(k_values)
    max_k = min(ks[-1], scores.shape[1])
    gains = gains.to(torch.float64).masked_fill(scores == float("-inf"), 0.0)  # not a candidate of that query
    top = _topk_deterministic(scores.to(torch.float64), max_k)
    ranked = gains.gather(1, top)
    ideal = gains.topk(max_k, dim=1).values
    discounts = 1.0 / torch.log2(torch.arange(max_k, dtype=torch.float64, device=scores.device) + 2.0)
    out = {}
    for k in ks:
        kk = min(k, max_k)
        out[f"hit@{k}"] = (ranked[:, :kk] > 0).any(dim=1).to(torch.float64)
        dcg, idcg = (ranked[:, :kk] * discounts[:kk]).sum(dim=1), (ideal[:, :kk] * discounts[:kk]).sum(dim=1)
        out[f"ndcg_linear@{k}"] = torch.where(idcg > 0, dcg / idcg.clamp_min(1e-300), 0.0)
    return out


@torch.no_grad()
def mmeb_precision_at_1(
    query_embeddings: Tensor,
    candidate_embeddings: Tensor,
    counts: Tensor | Sequence[int] | None = None,
) -> float:
    """MMEB precision@1: each query against its own candidate list, candidate 0 being the correct one.

    Matches VLM2Vec's ``eval.py``: ``pred = np.argmax(candidates @ query)`` and a hit when ``pred == 0``; so a
    tie with the best score counts as correct (``argmax`` returns the first maximum).

    Args:
        query_embeddings: (Q, D), L2-normalised.
        candidate_embeddings: (Q, C, D) for fixed-size lists, or a flat (sum_i C_i, D) tensor of every query's
            candidates concatenated in query order, with ``counts`` giving each C_i.
        counts: per-query candidate counts, required with flat candidates.
    """
    q = _check_embeddings("query_embeddings", query_embeddings)
    cand = candidate_embeddings if isinstance(candidate_embeddings, Tensor) else torch.as_tensor(candidate_embeddings)
    if cand.ndim == 3:
        if counts is not None:
            raise ValueError("counts is only used with flat (sum C_i, D) candidate_embeddings; drop it for (Q, C, D).")
        if cand.shape[0] != q.shape[0] or cand.shape[2] != q.shape[1]:
            raise ValueError(
                f"candidate_embeddings of shape {tuple(cand.shape)} do not match query_embeddings "
                f"{tuple(q.shape)}; expected (Q, C, D) = ({q.shape[0]}, C, {q.shape[1]})."
            )
        scores = torch.einsum("qd,qcd->qc", q, cand.to(q.dtype))
        return candidate_list_metrics(scores)["precision@1"]
    if cand.ndim != 2 or counts is None:
        raise ValueError(
            "candidate_embeddings must be (Q, C, D), or flat (sum C_i, D) together with counts; got shape "
            f"{tuple(cand.shape)} and counts={'given' if counts is not None else 'None'}."
        )
    counts = torch.as_tensor(counts, dtype=torch.long, device=q.device)
    if counts.shape != (q.shape[0],) or int(counts.sum()) != cand.shape[0] or bool((counts < 1).any()):
        raise ValueError(
            f"counts must give one positive candidate count per query ({q.shape[0]}) summing to "
            f"{cand.shape[0]} (the rows of candidate_embeddings); got {counts.tolist()}."
        )
    segment = torch.repeat_interleave(torch.arange(q.shape[0], device=q.device), counts)
    flat_scores = (cand.to(q.dtype) * q[segment]).sum(dim=1)
    # Scatter into a padded (Q, max C) matrix; candidate_list_metrics ignores the padding via lengths.
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)[:-1]])
    column = torch.arange(cand.shape[0], device=q.device) - starts[segment]
    padded = flat_scores.new_full((q.shape[0], int(counts.max())), float("-inf"))
    padded[segment, column] = flat_scores
    return candidate_list_metrics(padded, counts)["precision@1"]


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method="average")``)."""
    sorted_x, order = torch.sort(x, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    group_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0  # mean of start..end
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


@torch.no_grad()
def similarity_spearman(a_emb: Tensor, b_emb: Tensor) -> float:
    """Spearman correlation between the pairwise cosine similarities of two embeddings of the same rows.

    Used for student/teacher agreement in distillation: ``a_emb`` (N, D_a) and ``b_emb`` (N, D_b) embed the
    same N items (dimensions may differ); the N(N-1)/2 upper-triangular cosine similarities of each are ranked
    (ties averaged, as ``scipy.stats.spearmanr``) and correlated. Memory is O(N^2): use a sample of rows for
    large N. Returns NaN when either side's similarities are all equal (the correlation is undefined).
    """
    a = _check_embeddings("a_emb", a_emb).to(torch.float64)
    b = _check_embeddings("b_emb", b_emb).to(device=a.device, dtype=torch.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a_emb has {a.shape[0]} rows but b_emb has {b.shape[0]}; they must embed the same items.")
    n = a.shape[0]
    if n < 3:
        raise ValueError(f"similarity_spearman needs at least 3 rows (2 pairs), got {n}.")
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    iu = torch.triu_indices(n, n, offset=1, device=a.device)
    ra = _average_ranks((a @ a.T)[iu[0], iu[1]])
    rb = _average_ranks((b @ b.T)[iu[0], iu[1]])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
    if float(denom) == 0.0:
        return math.nan
    return float((ra * rb).sum() / denom)
