"""Evaluators that embed with ``model.encode`` and score retrieval, plus a Trainer callback that runs them.

Any model with ``encode(inputs, side=..., batch_size=..., show_progress_bar=...) -> (N, D) tensor`` works
(``MultimodalEmbeddingModel`` does). Inputs are what ``mm_embed_trl.data.schema.to_embedding_input`` accepts:
a str, a PIL image, an ``(image, text)`` tuple or a ``{"text", "image"}`` dict. Images given as paths (or
``datasets.Image`` values) are loaded here, block by block, so a large eval set never sits in memory decoded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import TrainerCallback

from ..data.images import image_identity
from ..data.schema import (
    EVAL_QUERY_IMAGE,
    EVAL_QUERY_TEXT,
    EVAL_TARGET_IMAGES,
    EVAL_TARGET_TEXTS,
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_TEXT,
    QUERY_IMAGE,
    QUERY_TEXT,
    row_negatives,
    split_input,
)
from .metrics import _PER_K, _check_k_values, candidate_list_metrics, ranking_metrics, retrieval_metrics
from .mmeb import load_mmeb_eval, validate_mmeb_eval_rows

__all__ = ["RetrievalEvaluator", "MMEBEvaluator", "EmbeddingEvalCallback", "ReasoningFormatEvaluator"]

logger = logging.getLogger(__name__)


class _Item(NamedTuple):
    """A parsed input: text (or None) and an image value not loaded yet (PIL image, path, datasets.Image dict,
    ... or None). A distinct type so already-parsed items are never re-read with the ambiguous tuple rule."""

    text: str | None
    image: Any


# --------------------------------------------------------------------------------------------------------------
# Inputs: parse once (cheap, validates early), load images lazily at encode time
# --------------------------------------------------------------------------------------------------------------


def _split_input(value: Any, where: str) -> _Item:
    """Parse a user input into (text, image value) without loading anything (``schema.split_input``)."""
    if isinstance(value, _Item):
        return value
    return _Item(*split_input(value, where=where))


def _row_item(text: Any, image: Any, where: str) -> _Item:
    """(text, image) from named row columns (a dict, so no tuple-order rule is involved)."""
    return _split_input({"text": text, "image": image}, where)


def _materialize(item: _Item, image_root: str | None, where: str) -> Any:
    """(text, image value) -> an input for ``model.encode`` with the image loaded as a PIL image."""
    from PIL import Image

    text, image = item
    if image is not None and not isinstance(image, Image.Image):
        from ..data.images import load_image  # imported lazily: keeps this module importable on its own

        image = load_image(image, image_root, where=where)
    if image is None:
        return text
    if text is None:
        return image
    return {"text": text, "image": image}


def _encode_items(
    model: Any,
    items: Sequence[_Item],
    *,
    side: str,
    batch_size: int,
    show_progress_bar: bool | None,
    image_root: str | None,
    block_size: int,
    what: str,
    labels: Sequence[str] | None = None,
    encode_kwargs: Mapping[str, Any] | None = None,
) -> Tensor | dict[str, Tensor]:
    """Embed ``items`` with ``model.encode`` in blocks of ``block_size`` (images decoded one block at a time).

    ``labels[i]`` names item i in image-loading errors (e.g. "row 12 query"); ``f"{what} #{i}"`` by default.
    ``encode_kwargs`` go to ``encode`` (e.g. ``mode="both"``, which returns a dict: then so does this function;
    ``num_samples=k`` gives (N, k, D)).
    """
    blocks = range(0, len(items), block_size)
    outer = blocks
    inner_progress = show_progress_bar
    if show_progress_bar and len(blocks) > 1:
        from tqdm.auto import tqdm

        outer = tqdm(blocks, desc=f"Encoding {what} ({len(items)})")
        inner_progress = False
    chunks = []
    for start in outer:
        block = items[start : start + block_size]
        inputs = [
            _materialize(item, image_root, labels[start + i] if labels is not None else f"{what} #{start + i}")
            for i, item in enumerate(block)
        ]
        out = model.encode(
            inputs, side=side, batch_size=batch_size, show_progress_bar=inner_progress, **(encode_kwargs or {})
        )
        named = out if isinstance(out, Mapping) else {"": out}
        for key, emb in named.items():
            emb = torch.as_tensor(emb)
            if emb.ndim not in (2, 3) or emb.shape[0] != len(inputs):
                raise ValueError(
                    f"model.encode returned shape {tuple(emb.shape)} for {len(inputs)} {what} inputs; "
                    "expected (num_inputs, dim) (or (num_inputs, samples, dim))."
                )
            named[key] = emb.detach().float().cpu()
        chunks.append(named)
    # Normalise defensively: the metrics use dot products as cosine similarities.
    joined = {key: F.normalize(torch.cat([c[key] for c in chunks]), dim=-1) for key in chunks[0]}
    return joined[""] if list(joined) == [""] else joined


class _Deduper:
    """Assigns one index per distinct (text, image) input, keeping the first occurrence (and its label)."""

    def __init__(self):
        self.items: list[_Item] = []
        self.labels: list[str] = []
        self._index: dict[Any, int] = {}

    def add(self, item: _Item, label: str) -> int:
        key = (item.text, image_identity(item.image))
        idx = self._index.get(key)
        if idx is None:
            idx = self._index[key] = len(self.items)
            self.items.append(item)
            self.labels.append(label)
        return idx

    def add_row(self, text: Any, image: Any, where: str) -> int:
        """Parse named row columns (text, image) and add them; ``where`` labels the input in errors."""
        return self.add(_row_item(text, image, where), where)


# --------------------------------------------------------------------------------------------------------------
# Retrieval over a shared corpus
# --------------------------------------------------------------------------------------------------------------


class RetrievalEvaluator:
    """Recall/MRR/NDCG/... of queries retrieving from one shared corpus (metrics: :func:`retrieval_metrics`).

    Args:
        queries: query inputs (str, PIL image, ``(image, text)``, ``{"text", "image"}``; images may be paths).
        corpus: document inputs, same forms.
        relevant: for each query, the set of relevant corpus indices.
        name: prefix of every metric key (``f"{name}_recall@1"``); none when empty.
        k_values: cutoffs reported for every metric.
        batch_size: passed to ``model.encode``.
        query_side, corpus_side: the ``side`` (prompt) used to encode each.
        show_progress_bar: passed to ``model.encode`` (None lets the model decide).
        main_metric: the key (without name) of the headline metric; ``self.primary_metric`` is its full key.
        image_root: folder that relative image paths are resolved against.
        chunk_size: queries scored at once (memory bound of the metric computation).
        encode_block_size: inputs whose images are decoded and encoded per ``model.encode`` call.
        encode_kwargs: passed to ``model.encode``. UME-R1 models: ``{"mode": "both", "max_new_tokens": 512}`` reports
            ``disc_*``, ``gen_*`` and the per-query ``oracle_*`` from one generation per input; ``{"mode":
            "generative", "do_sample": True, "num_samples": k}`` adds ``pass@k_*`` (queries sampled k times, the
            corpus greedy). The full query x corpus score matrices are held for these.
    """

    greater_is_better = True

    def __init__(
        self,
        queries: Sequence[Any],
        corpus: Sequence[Any],
        relevant: Sequence[Iterable[int]],
        *,
        name: str = "",
        k_values: Iterable[int] = (1, 5, 10),
        batch_size: int = 32,
        query_side: str = "query",
        corpus_side: str = "document",
        show_progress_bar: bool | None = None,
        main_metric: str = "recall@1",
        image_root: str | None = None,
        chunk_size: int = 1024,
        encode_block_size: int = 1024,
        encode_kwargs: Mapping[str, Any] | None = None,
    ):
        if not queries:
            raise ValueError("RetrievalEvaluator needs at least one query.")
        if not corpus:
            raise ValueError("RetrievalEvaluator needs a non-empty corpus.")
        if len(relevant) != len(queries):
            raise ValueError(
                f"relevant has {len(relevant)} entries for {len(queries)} queries; give one set of corpus "
                "indices per query."
            )
        self.queries = [_split_input(q, f"query #{i}") for i, q in enumerate(queries)]
        self.corpus = [_split_input(d, f"corpus document #{i}") for i, d in enumerate(corpus)]
        self.relevant = [set(int(j) for j in rel) for rel in relevant]
        for i, rel in enumerate(self.relevant):
            bad = [j for j in rel if not 0 <= j < len(self.corpus)]
            if bad:
                raise ValueError(
                    f"relevant[{i}] holds corpus indices {sorted(bad)} outside [0, {len(self.corpus)})."
                )
        if not any(self.relevant):
            raise ValueError("No query has a relevant corpus document; every query needs at least one.")
        self.k_values = _check_k_values(k_values)
        valid_metrics = [f"{m}@{k}" for m in _PER_K for k in self.k_values] + ["mrr"]
        if main_metric not in valid_metrics:
            raise ValueError(f"main_metric '{main_metric}' is not computed; choose one of {valid_metrics}.")
        if batch_size < 1 or chunk_size < 1 or encode_block_size < 1:
            raise ValueError("batch_size, chunk_size and encode_block_size must all be >= 1.")
        self.name = name
        self.batch_size = batch_size
        self.query_side = query_side
        self.corpus_side = corpus_side
        self.show_progress_bar = show_progress_bar
        self.main_metric = main_metric
        self.encode_kwargs = dict(encode_kwargs or {})
        mode = self.encode_kwargs.get("mode", "discriminative")
        # UME-R1 modes report per embedding kind; the headline is the generative one
        head = main_metric if mode == "discriminative" else f"gen_{main_metric}"
        self.primary_metric = f"{name}_{head}" if name else head
        self.image_root = image_root
        self.chunk_size = chunk_size
        self.encode_block_size = encode_block_size
        self._query_labels = [f"query #{i}" for i in range(len(self.queries))]
        self._corpus_labels = [f"corpus document #{i}" for i in range(len(self.corpus))]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, queries={len(self.queries)}, corpus={len(self.corpus)}, "
            f"k_values={self.k_values})"
        )

    @classmethod
    def _with_labels(cls, queries: _Deduper, corpus: _Deduper, relevant: list[set[int]], **kwargs: Any):
        """Build from de-duplicated rows, keeping each input's row label for error messages."""
        evaluator = cls(queries.items, corpus.items, relevant, **kwargs)
        evaluator._query_labels, evaluator._corpus_labels = queries.labels, corpus.labels
        return evaluator

    def _encode(self, model: Any, items: Sequence[_Item], side: str, what: str, labels: Sequence[str], **kwargs):
        return _encode_items(
            model,
            items,
            side=side,
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress_bar,
            image_root=self.image_root,
            block_size=self.encode_block_size,
            what=f"{self.name + ' ' if self.name else ''}{what}",
            labels=labels,
            encode_kwargs={**self.encode_kwargs, **kwargs},
        )

    def compute_metrics(self, query_embeddings: Tensor, corpus_embeddings: Tensor) -> dict[str, float]:
        """Metrics from precomputed (normalised) embeddings, keys prefixed with the evaluator name."""
        metrics = retrieval_metrics(
            query_embeddings, corpus_embeddings, self.relevant, k_values=self.k_values, chunk_size=self.chunk_size
        )
        return {f"{self.name}_{k}" if self.name else k: v for k, v in metrics.items()}

    def _prefixed(self, metrics: Mapping[str, float], mode: str) -> dict[str, float]:
        parts = [p for p in (self.name, mode) if p]
        return {"_".join(parts + [k]): v for k, v in metrics.items()}

    def compute_generative_metrics(
        self, queries: Mapping[str, Tensor], corpus: Mapping[str, Tensor]
    ) -> dict[str, float]:
        """Metrics of UME-R1's embeddings: ``disc_*`` and ``gen_*`` (each side embedded in that mode), ``oracle_*``
        (per query the better of the two: an upper bound, not a method) and, for sampled query embeddings
        (N, k, D), ``pass@k_*`` (per query the best of its k samples, against the greedy corpus)."""
        ranking = dict(relevant=self.relevant, k_values=self.k_values, chunk_size=self.chunk_size)
        scores: dict[str, Tensor] = {}
        if "discriminative" in queries:
            scores["disc"] = queries["discriminative"] @ corpus["discriminative"].T
        gen_q = queries.get("generative")
        samples = None
        if gen_q is not None and gen_q.ndim == 3:  # k samples per query: score each, keep sample 0 as "the" query
            samples = torch.einsum("qkd,nd->kqn", gen_q, corpus["generative"])
            gen_q = gen_q[:, 0]
        if gen_q is not None:
            scores["gen"] = gen_q @ corpus["generative"].T
        metrics: dict[str, float] = {}
        for mode, matrix in scores.items():
            metrics.update(self._prefixed(ranking_metrics(matrix, **ranking), mode))
        if len(scores) == 2:
            metrics.update(self._prefixed(ranking_metrics(self._best_of(list(scores.values())), **ranking), "oracle"))
        if samples is not None:
            best = self._best_of(list(samples))
            metrics.update(self._prefixed(ranking_metrics(best, **ranking), f"pass@{samples.shape[0]}"))
        return metrics

    def _best_of(self, candidates: Sequence[Tensor]) -> Tensor:
        """Per query, the score row (among ``candidates``) that ranks its best relevant document highest."""
        relevant = torch.zeros_like(candidates[0], dtype=torch.bool)
        for i, rel in enumerate(self.relevant):
            relevant[i, list(rel)] = True
        ranks = []
        for scores in candidates:
            best = scores.masked_fill(~relevant, float("-inf")).amax(dim=1, keepdim=True)
            ranks.append((scores > best).sum(dim=1))
        choice = torch.stack(ranks).argmin(dim=0)  # ties: the first candidate
        return torch.stack(list(candidates))[choice, torch.arange(len(choice))]

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        """Embed queries and corpus with ``model.encode`` and return the metrics."""
        query_emb = self._encode(model, self.queries, self.query_side, "queries", self._query_labels)
        # pass@k samples the queries; the corpus is embedded once, greedily
        greedy = {"num_samples": 1, "do_sample": False} if self.encode_kwargs.get("num_samples", 1) > 1 else {}
        corpus_emb = self._encode(model, self.corpus, self.corpus_side, "corpus", self._corpus_labels, **greedy)
        # mode="generative" returns one (N, D) tensor: still the gen_* metrics (the primary metric names them)
        if isinstance(query_emb, Mapping) or self.encode_kwargs.get("mode", "discriminative") != "discriminative":
            named = (lambda e: e if isinstance(e, Mapping) else {"generative": e})
            metrics = self.compute_generative_metrics(named(query_emb), named(corpus_emb))
        else:
            metrics = self.compute_metrics(query_emb, corpus_emb)
        logger.info(
            "%s: %d queries, %d documents, %s = %.4f",
            self.name or type(self).__name__,
            len(self.queries),
            len(self.corpus),
            self.primary_metric,
            metrics[self.primary_metric],
        )
        return metrics

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        image_root: str | None = None,
        *,
        include_negatives: bool = False,
        **kwargs: Any,
    ) -> RetrievalEvaluator:
        """Build from MMEB-train rows (``qry``, ``qry_image_path``, ``pos_text``, ``pos_image_path``, ...).

        Queries are the distinct (``qry``, ``qry_image_path``) inputs and the corpus the distinct positives
        (identical (text, image) targets are one document, so a query's relevant set is right even when many
        rows share a positive, e.g. classification labels). Rows repeating a query add their positive to that
        query's relevant set. With ``include_negatives`` the rows' ``neg_text`` / ``neg_image_path`` join the
        corpus as distractors. Other keyword arguments go to the constructor.
        """
        queries, corpus = _Deduper(), _Deduper()
        relevant: dict[int, set[int]] = {}
        for i, row in enumerate(rows):
            for col in (QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE):
                if col not in row:
                    raise ValueError(
                        f"row {i} lacks column '{col}'; MMEB-train rows need "
                        f"{[QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE]} (got {sorted(row)})."
                    )
            q = queries.add_row(row[QUERY_TEXT], row[QUERY_IMAGE], f"row {i} query ({QUERY_TEXT}/{QUERY_IMAGE})")
            p = corpus.add_row(row[POS_TEXT], row[POS_IMAGE], f"row {i} positive ({POS_TEXT}/{POS_IMAGE})")
            relevant.setdefault(q, set()).add(p)
            if include_negatives and (NEG_TEXT in row or NEG_IMAGE in row):
                for j, (t, im) in enumerate(row_negatives(row, where=f"row {i}")):
                    corpus.add_row(t, im, f"row {i} negative {j} ({NEG_TEXT}/{NEG_IMAGE})")
        if not queries.items:
            raise ValueError("from_rows got no rows.")
        rel = [relevant[q] for q in range(len(queries.items))]
        return cls._with_labels(queries, corpus, rel, image_root=image_root, **kwargs)

    @classmethod
    def from_mmeb_eval(
        cls,
        path_or_dataset: Any,
        subset: str | None = None,
        *,
        split: str = "test",
        image_root: str | None = None,
        max_queries: int | None = None,
        **kwargs: Any,
    ) -> RetrievalEvaluator:
        """Pool an MMEB-eval task into one corpus: every distinct candidate of every row is a document and each
        query's first target is its relevant one. (A harder, corpus-wide variant of MMEB's own protocol; use
        :class:`MMEBEvaluator` for the official per-query candidate lists.) ``name`` defaults to ``subset``.
        """
        rows = load_mmeb_eval(path_or_dataset, subset, split=split, image_root=image_root, max_queries=max_queries)
        queries, corpus = _Deduper(), _Deduper()
        relevant: dict[int, set[int]] = {}
        for i, row in enumerate(rows):
            q = queries.add_row(row[EVAL_QUERY_TEXT], row[EVAL_QUERY_IMAGE], f"row {i} query")
            targets = [
                corpus.add_row(t, im, f"row {i} candidate {j}")
                for j, (t, im) in enumerate(zip(row[EVAL_TARGET_TEXTS], row[EVAL_TARGET_IMAGES]))
            ]
            relevant.setdefault(q, set()).add(targets[0])
        kwargs.setdefault("name", subset or "")
        rel = [relevant[q] for q in range(len(queries.items))]
        return cls._with_labels(queries, corpus, rel, image_root=image_root, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# MMEB: each query against its own candidate list
# --------------------------------------------------------------------------------------------------------------


class MMEBEvaluator:
    """MMEB protocol: each query ranks its own candidates (MMEB-eval rows); reports ``precision@1``.

    As in VLM2Vec's ``eval.py``, queries and candidates are embedded once per distinct (text, image) value and
    a query is correct when ``argmax`` over its candidates is candidate 0 (ties with the best count as correct).
    With ``k_values`` the per-list ``mrr``, ``recall@k`` and ``ndcg@k`` (one relevant item) are added.

    Args:
        rows: MMEB-eval rows (``qry_text``, ``qry_img_path``, ``tgt_text`` list, ``tgt_img_path`` list).
        name: metric key prefix (``f"{name}_precision@1"``).
        image_root: folder that relative image paths are resolved against.
        k_values: optional extra cutoffs; ``()`` reports precision@1 only.
        batch_size, query_side, candidate_side, show_progress_bar: passed to ``model.encode``.
        chunk_size: rows scored at once; encode_block_size: inputs decoded and encoded per ``encode`` call.
    """

    greater_is_better = True

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        name: str = "",
        image_root: str | None = None,
        k_values: Iterable[int] = (),
        batch_size: int = 32,
        query_side: str = "query",
        candidate_side: str = "document",
        show_progress_bar: bool | None = None,
        chunk_size: int = 1024,
        encode_block_size: int = 1024,
    ):
        rows = validate_mmeb_eval_rows(rows, image_root=image_root)
        queries, candidates = _Deduper(), _Deduper()
        query_index: list[int] = []
        cand_lists: list[list[int]] = []
        for i, row in enumerate(rows):
            query_index.append(queries.add_row(row[EVAL_QUERY_TEXT], row[EVAL_QUERY_IMAGE], f"row {i} query"))
            cand_lists.append(
                [
                    candidates.add_row(t, im, f"row {i} candidate {j}")
                    for j, (t, im) in enumerate(zip(row[EVAL_TARGET_TEXTS], row[EVAL_TARGET_IMAGES]))
                ]
            )
        self.queries, self.candidates = queries.items, candidates.items
        self._query_labels, self._candidate_labels = queries.labels, candidates.labels
        self.query_index = torch.tensor(query_index, dtype=torch.long)
        self.lengths = torch.tensor([len(c) for c in cand_lists], dtype=torch.long)
        # Padded (rows, max candidates) index into the distinct candidates; padding columns are masked by lengths.
        self.candidate_index = torch.zeros(len(rows), int(self.lengths.max()), dtype=torch.long)
        for i, c in enumerate(cand_lists):
            self.candidate_index[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        self.k_values = _check_k_values(k_values) if k_values else ()
        self.name = name
        self.image_root = image_root
        self.batch_size = batch_size
        self.query_side = query_side
        self.candidate_side = candidate_side
        self.show_progress_bar = show_progress_bar
        self.chunk_size = chunk_size
        self.encode_block_size = encode_block_size
        self.primary_metric = f"{name}_precision@1" if name else "precision@1"

    def __len__(self) -> int:
        return len(self.query_index)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, rows={len(self)}, distinct queries={len(self.queries)}, "
            f"distinct candidates={len(self.candidates)})"
        )

    @classmethod
    def load(
        cls,
        path_or_dataset: Any,
        subset: str | None = None,
        *,
        split: str = "test",
        image_root: str | None = None,
        max_queries: int | None = None,
        **kwargs: Any,
    ) -> MMEBEvaluator:
        """Load rows with :func:`load_mmeb_eval` (hub id, file, folder, Dataset); ``name`` defaults to subset."""
        rows = load_mmeb_eval(path_or_dataset, subset, split=split, image_root=image_root, max_queries=max_queries)
        kwargs.setdefault("name", subset or "")
        return cls(rows, image_root=image_root, **kwargs)

    def compute_metrics(self, query_embeddings: Tensor, candidate_embeddings: Tensor) -> dict[str, float]:
        """Metrics from embeddings of the distinct queries (``self.queries``) and candidates (``self.candidates``)."""
        if query_embeddings.shape[0] != len(self.queries) or candidate_embeddings.shape[0] != len(self.candidates):
            raise ValueError(
                f"expected embeddings of {len(self.queries)} distinct queries and {len(self.candidates)} distinct "
                f"candidates, got {query_embeddings.shape[0]} and {candidate_embeddings.shape[0]}."
            )
        totals: dict[str, float] = {}
        num_rows = len(self.query_index)
        cand = candidate_embeddings.to(query_embeddings.dtype)
        for start in range(0, num_rows, self.chunk_size):
            end = min(start + self.chunk_size, num_rows)
            scores = query_embeddings[self.query_index[start:end]] @ cand.T  # (b, distinct candidates)
            scores = scores.gather(1, self.candidate_index[start:end])  # (b, max candidates)
            chunk = candidate_list_metrics(scores, self.lengths[start:end], k_values=self.k_values)
            for key, value in chunk.items():  # means -> weighted sums, exact over chunks
                totals[key] = totals.get(key, 0.0) + value * (end - start)
        return {f"{self.name}_{k}" if self.name else k: v / num_rows for k, v in totals.items()}

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        """Embed distinct queries and candidates with ``model.encode`` and return the metrics."""
        prefix = f"{self.name} " if self.name else ""
        common = dict(
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress_bar,
            image_root=self.image_root,
            block_size=self.encode_block_size,
        )
        query_emb = _encode_items(
            model, self.queries, side=self.query_side, what=f"{prefix}queries", labels=self._query_labels, **common
        )
        cand_emb = _encode_items(
            model,
            self.candidates,
            side=self.candidate_side,
            what=f"{prefix}candidates",
            labels=self._candidate_labels,
            **common,
        )
        metrics = self.compute_metrics(query_emb, cand_emb)
        logger.info(
            "%s: %d rows, %s = %.4f", self.name or "MMEB", len(self), self.primary_metric, metrics[self.primary_metric]
        )
        return metrics


# --------------------------------------------------------------------------------------------------------------
# Trainer callback
# --------------------------------------------------------------------------------------------------------------


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

    The evaluators run on the world main process only, on the unwrapped model switched to eval mode under
    ``torch.no_grad`` (its train/eval mode is restored afterwards); with ``sync_across_processes`` the
    results are broadcast to the other ranks. Running a forward on one rank only does not suit sharded
    models (DeepSpeed ZeRO-3 / FSDP): evaluate after training there.

    Metrics go through ``trainer.log`` (log history, reporting integrations) when the callback knows the
    trainer (``trainer=`` or :meth:`attach`); otherwise they are appended to ``state.log_history`` directly.
    Every run is kept in ``self.history`` as ``{"event", "step", "epoch", **metrics}``.

    Args:
        evaluators: one evaluator, a list of them, or a ``{name: evaluator}`` dict.
        trainer: the Trainer, for logging through ``trainer.log``.
        eval_steps: also evaluate every ``eval_steps`` optimizer steps (works without an eval dataset).
        evaluate_on_evaluate: run whenever the Trainer evaluates.
        evaluate_on_train_begin: run once before training ("step 0" baseline).
        evaluate_on_train_end: run once after training.
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
            # on_evaluate per eval dataset): reuse, don't re-run or re-log.
            return self._last[1]
        is_main = bool(getattr(state, "is_world_process_zero", True))
        metrics = None
        if is_main:
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
        if self.evaluate_on_train_end:
            self._run("train_end", state, model)


class ReasoningFormatEvaluator:
    """How often a UME-R1 model's own generations follow the format ``<think>...</think><answer>...<gen_emb>``.

    Generates (greedily, ``model.encode(mode="generative", return_reasoning=True)``) for ``inputs`` and reports
    ``{name}_format_rate`` (UME-R1's format check, :func:`mm_embed_trl.data.reasoning.follows_format`) and
    ``{name}_gen_emb_rate`` (completions that wrote ``<gen_emb>`` at all).
    """

    greater_is_better = True

    def __init__(self, inputs: Sequence[Any], *, name: str = "heldout", side: str = "query", image_root=None,
                 batch_size: int = 32, max_new_tokens: int = 512):
        if not inputs:
            raise ValueError("ReasoningFormatEvaluator needs at least one input.")
        self.items = [_split_input(x, f"input #{i}") for i, x in enumerate(inputs)]
        self.name, self.side, self.image_root = name, side, image_root
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.primary_metric = f"{name}_format_rate"

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], image_root=None, *, limit: int = 64, **kwargs):
        """Queries (and positives) of MMEB-train rows, the first ``limit`` of them."""
        inputs = []
        for row in rows:
            inputs.append(_row_item(row[QUERY_TEXT], row.get(QUERY_IMAGE), "query"))
            if len(inputs) >= limit:
                break
        return cls(inputs, image_root=image_root, **kwargs)

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        from ..data.reasoning import follows_format

        inputs = [_materialize(item, self.image_root, f"input #{i}") for i, item in enumerate(self.items)]
        _, texts = model.encode(inputs, side=self.side, mode="generative", batch_size=self.batch_size,
                                max_new_tokens=self.max_new_tokens, return_reasoning=True, show_progress_bar=False)
        gen_token = model.config.generative_pooling_token
        return {
            f"{self.name}_format_rate": sum(map(follows_format, texts)) / len(texts),
            f"{self.name}_gen_emb_rate": sum(gen_token in t for t in texts) / len(texts),
        }
