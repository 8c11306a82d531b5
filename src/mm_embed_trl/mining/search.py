"""Top-k inner-product search over a corpus too large to score at once: exact and chunked (torch), or faiss.

Scores are inner products of the (normalised) embeddings, so cosine similarities. The exact search scores one block
of queries against one block of the corpus at a time and keeps a running top-k per query, so memory is bounded by
``len(queries) x corpus_chunk_size`` scores whatever the corpus size (``8 x len(queries) x (k + corpus_chunk_size)``
bytes at most). Results are ordered by score, ties by the lower corpus index, in every
chunking: each (score, index) pair is folded into one int64 key whose order is that order, so ``torch.topk`` on the
keys is exact and deterministic. faiss orders its results the same way, but which of several items tied at the k-th
score make the cut is its own choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["SEARCH_BACKENDS", "SearchResult", "faiss_available", "search_top_k"]

SEARCH_BACKENDS = ("torch", "faiss")
_INDEX_BITS = 32  # corpus indices live in the low half of a key: corpora up to 2**32 - 1 items


class SearchResult(NamedTuple):
    """``scores`` (float32) and ``indices`` (int64, ``-1`` where fewer than k candidates are allowed), (nq, k) each,
    best first."""

    scores: torch.Tensor
    indices: torch.Tensor


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _fold(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (score descending, corpus index ascending); -inf scores (masked) get the lowest."""
    bits = scores.view(torch.int32).to(torch.int64)
    # IEEE floats order as their bit patterns for positives, reversed for negatives: flip the magnitude of negatives
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered << _INDEX_BITS) | ((1 << _INDEX_BITS) - 1 - indices)


def _chunk_top_keys(scores: torch.Tensor, first_index: int, k: int) -> torch.Tensor:
    """The keys of each row's k best (score, index) pairs in one chunk of scores.

    A float top-k first (folding every score into a key costs several passes over the chunk); where items tied with
    a row's k-th score were left out by top-k's own choice, that row's every score is folded, so the lower indices
    win the tie as in any other chunking.
    """
    scores = scores.float().masked_fill(torch.isnan(scores), -torch.inf)
    index = torch.arange(first_index, first_index + scores.shape[1], dtype=torch.int64, device=scores.device)
    if scores.shape[1] <= k:
        return _fold(scores, index)
    top = torch.topk(scores, k, dim=1, sorted=False)
    keys = _fold(top.values, top.indices + first_index)
    kth = top.values.min(dim=1, keepdim=True).values
    # a k-th score of -inf: the row has fewer than k allowed items here, and masked ones decode to "none" anyway
    tied = torch.isfinite(kth[:, 0]) & ((scores >= kth).sum(dim=1) > k)
    if tied.any():
        rows = tied.nonzero()[:, 0]
        keys[rows] = torch.topk(_fold(scores[rows], index), k, dim=1).values
    return keys


def _decode(keys: torch.Tensor) -> SearchResult:
    index = (1 << _INDEX_BITS) - 1 - (keys & ((1 << _INDEX_BITS) - 1))
    ordered = keys >> _INDEX_BITS
    bits = torch.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(torch.int32)
    scores = bits.view(torch.float32)
    valid = torch.isfinite(scores)
    return SearchResult(torch.where(valid, scores, -torch.inf), torch.where(valid, index, -1))


def _as_tensor(block, device) -> torch.Tensor:
    if not torch.is_tensor(block):  # a copy: memory-mapped blocks are read-only
        block = torch.from_numpy(np.array(block, dtype=np.float32))
    return block.to(device=device, dtype=torch.float32)


def search_top_k(
    queries,
    corpus,
    k: int,
    *,
    query_groups: Sequence[int] | np.ndarray | None = None,
    corpus_groups: Sequence[int] | np.ndarray | None = None,
    corpus_chunk_size: int = 8192,
    backend: str = "torch",
    device: str | torch.device | None = None,
) -> SearchResult:
    """The ``k`` corpus items of highest inner product with each query.

    Args:
        queries: (nq, D) array or tensor (one chunk of queries: its score block is ``nq x corpus_chunk_size``).
        corpus: (N, D) array, tensor or ``np.memmap``; read ``corpus_chunk_size`` rows at a time.
        k: results per query (fewer allowed candidates leave ``-1`` indices and ``-inf`` scores).
        query_groups, corpus_groups: optional int labels; a query only sees corpus items of its own label.
        backend: ``"torch"`` (exact, chunked) or ``"faiss"`` (``IndexFlatIP``, exact as well; needs ``faiss``;
            groups are then applied by searching each group's queries in that group's items).
        device: where the torch backend scores (default: the queries' device, else the CPU).
    """
    if backend not in SEARCH_BACKENDS:
        raise ValueError(f"backend must be one of {SEARCH_BACKENDS}, got {backend!r}.")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}.")
    if (query_groups is None) != (corpus_groups is None):
        raise ValueError("Pass both query_groups and corpus_groups, or neither.")
    if len(corpus) >= 1 << _INDEX_BITS:
        raise ValueError(f"The corpus holds {len(corpus)} items; this search indexes at most {(1 << _INDEX_BITS) - 1}.")
    if backend == "faiss":
        return _faiss_top_k(queries, corpus, k, query_groups, corpus_groups)
    device = torch.device(device) if device is not None else (queries.device if torch.is_tensor(queries) else None)
    q = _as_tensor(queries, device or "cpu")
    best = torch.full((q.shape[0], k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=q.device)
    qg = None if query_groups is None else torch.as_tensor(np.asarray(query_groups), device=q.device)
    for start in range(0, len(corpus), corpus_chunk_size):
        block = _as_tensor(corpus[start : start + corpus_chunk_size], q.device)
        scores = q @ block.T
        if qg is not None:
            cg = torch.as_tensor(np.asarray(corpus_groups[start : start + len(block)]), device=q.device)
            scores = scores.masked_fill(qg[:, None] != cg[None, :], -torch.inf)
        keys = torch.cat([best, _chunk_top_keys(scores, start, k)], dim=1)
        best = torch.topk(keys, k, dim=1, sorted=True).values
    return _decode(best)


def _faiss_top_k(queries, corpus, k, query_groups, corpus_groups) -> SearchResult:
    import faiss

    q = np.ascontiguousarray(torch.as_tensor(queries).float().cpu().numpy() if torch.is_tensor(queries) else queries,
                             dtype=np.float32)
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    indices = np.full((len(q), k), -1, dtype=np.int64)
    if query_groups is None:
        query_sets = [(np.arange(len(q)), None)]
    else:
        query_groups, corpus_groups = np.asarray(query_groups), np.asarray(corpus_groups)
        query_sets = [(np.flatnonzero(query_groups == g), np.flatnonzero(corpus_groups == g))
                      for g in np.unique(query_groups)]
    for rows, members in query_sets:
        index = faiss.IndexFlatIP(q.shape[1])
        items = np.asarray(corpus[:] if members is None else corpus[members], dtype=np.float32)
        if len(items) == 0:
            continue
        index.add(np.ascontiguousarray(items))
        found_scores, found = index.search(q[rows], min(k, len(items)))
        if members is not None:
            found = np.where(found >= 0, members[np.maximum(found, 0)], -1)
        # faiss breaks ties by its own order: re-sort each row as the torch backend does (score, then index)
        order = np.lexsort((np.where(found >= 0, found, np.iinfo(np.int64).max), -found_scores), axis=1)
        scores[rows, : found.shape[1]] = np.take_along_axis(found_scores, order, axis=1)
        indices[rows, : found.shape[1]] = np.take_along_axis(found, order, axis=1)
    return SearchResult(torch.from_numpy(scores), torch.from_numpy(indices))
