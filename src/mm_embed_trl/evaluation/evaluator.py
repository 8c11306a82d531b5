"""Evaluators that embed with ``model.encode`` and score: retrieval from one shared corpus
(:class:`RetrievalEvaluator`), MMEB's per-query candidate lists (:class:`MMEBEvaluator`) and UME-R1's reasoning
format (:class:`ReasoningFormatEvaluator`).

Any model with ``encode(inputs, side=..., batch_size=..., show_progress_bar=...) -> (N, D) tensor`` works
(``MultimodalEmbeddingModel`` does). Inputs and their lazy image loading: :mod:`.inputs`. The Trainer callback that
runs evaluators during training: :mod:`.callback`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..data.schema import (
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_TEXT,
    QUERY_VIDEO,
    row_negatives,
)
from ..modeling.generative import UME_R1_MAX_NEW_TOKENS
from .inputs import Deduper, EvalItem, encode_items, materialize, parse_input, row_input
from .metrics import _PER_K, _check_k_values, candidate_list_metrics, ranking_metrics, retrieval_metrics
from .mmeb import index_mmeb_rows, load_mmeb_eval, validate_mmeb_eval_rows

__all__ = ["RetrievalEvaluator", "MMEBEvaluator", "ReasoningFormatEvaluator"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------
# Retrieval over a shared corpus
# --------------------------------------------------------------------------------------------------------------


def _row_label(row: Mapping[str, Any], i: int, what: str, *columns: str) -> str:
    """``"row 3 query (qry/qry_image_path)"``: names the input's columns in errors (its video column when present)."""
    names = list(columns[:2]) + [c for c in columns[2:] if c in row]
    return f"row {i} {what} ({'/'.join(names)})"


class RetrievalEvaluator:
    """Recall/MRR/NDCG/... of queries retrieving from one shared corpus (metrics: :func:`retrieval_metrics`).

    Args:
        queries: query inputs (str, PIL image, ``(image, text)``, ``{"text", "image", "video"}``; images may be
            paths; a video is a video file, a frame folder or a list of frames, sampled as ``model.processor`` is set
            to).
        corpus: document inputs, same forms.
        relevant: for each query, the set of relevant corpus indices.
        name: prefix of every metric key (``f"{name}_recall@1"``); none when empty.
        k_values: cutoffs reported for every metric.
        batch_size: passed to ``model.encode``.
        query_side, corpus_side: the ``side`` (prompt) used to encode each.
        query_instruction: the task instruction of the queries (``model.encode(..., instruction=)``: the system
            message of GME and Qwen3-VL-Embedding, a text prefix otherwise); the corpus keeps its side's.
        show_progress_bar: passed to ``model.encode`` (None lets the model decide).
        main_metric: the key (without name) of the headline metric; ``self.primary_metric`` is its full key.
        image_root: folder that relative image (and video) paths are resolved against.
        chunk_size: queries scored at once (memory bound of the metric computation).
        encode_block_size: inputs whose images and videos are decoded and encoded per ``model.encode`` call.
        encode_kwargs: passed to ``model.encode``. UME-R1 models: ``{"mode": "both", "max_new_tokens": 8192}`` reports
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
        query_instruction: str | None = None,
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
        self.queries = [parse_input(q, f"query #{i}") for i, q in enumerate(queries)]
        self.corpus = [parse_input(d, f"corpus document #{i}") for i, d in enumerate(corpus)]
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
        self.query_instruction = query_instruction
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
    def _with_labels(cls, queries: Deduper, corpus: Deduper, relevant: list[set[int]], **kwargs: Any):
        """Build from de-duplicated rows, keeping each input's row label for error messages."""
        evaluator = cls(queries.items, corpus.items, relevant, **kwargs)
        evaluator._query_labels, evaluator._corpus_labels = queries.labels, corpus.labels
        return evaluator

    def _encode(self, model: Any, items: Sequence[EvalItem], side: str, what: str, labels: Sequence[str], **kwargs):
        return encode_items(
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
        instruction = {} if self.query_instruction is None else {"instruction": self.query_instruction}
        query_emb = self._encode(model, self.queries, self.query_side, "queries", self._query_labels, **instruction)
        # pass@k samples the queries; the corpus is embedded once, greedily
        greedy = {"num_samples": 1, "do_sample": False} if self.encode_kwargs.get("num_samples", 1) > 1 else {}
        corpus_emb = self._encode(model, self.corpus, self.corpus_side, "corpus", self._corpus_labels, **greedy)
        # mode="generative" returns one (N, D) tensor: still the gen_* metrics (the primary metric names them)
        if isinstance(query_emb, Mapping) or self.encode_kwargs.get("mode", "discriminative") != "discriminative":

            def named(e):
                return e if isinstance(e, Mapping) else {"generative": e}

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

        Queries are the distinct (``qry``, ``qry_image_path``, ``qry_video_path``) inputs and the corpus the distinct
        positives (``pos_text``, ``pos_image_path``, ``pos_video_path``; the video columns are optional). Identical
        (text, image, video) targets are one document, so a query's relevant set is right even when many rows share
        a positive, e.g. classification labels. Rows repeating a query add their positive to that query's relevant
        set. With ``include_negatives`` the rows' ``neg_text`` / ``neg_image_path`` join the corpus as distractors.
        Other keyword arguments go to the constructor.
        """
        queries, corpus = Deduper(), Deduper()
        relevant: dict[int, set[int]] = {}
        for i, row in enumerate(rows):
            for col in (QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE):
                if col not in row:
                    raise ValueError(
                        f"row {i} lacks column '{col}'; MMEB-train rows need "
                        f"{[QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE]} (got {sorted(row)})."
                    )
            q = queries.add_row(
                row[QUERY_TEXT],
                row[QUERY_IMAGE],
                _row_label(row, i, "query", QUERY_TEXT, QUERY_IMAGE, QUERY_VIDEO),
                row.get(QUERY_VIDEO),
            )
            p = corpus.add_row(
                row[POS_TEXT],
                row[POS_IMAGE],
                _row_label(row, i, "positive", POS_TEXT, POS_IMAGE, POS_VIDEO),
                row.get(POS_VIDEO),
            )
            relevant.setdefault(q, set()).add(p)
            if include_negatives and (NEG_TEXT in row or NEG_IMAGE in row):
                for j, t, im in row_negatives(row, where=f"row {i}", with_index=True):  # j: the row's own index
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
        index = index_mmeb_rows(rows)
        relevant: dict[int, set[int]] = {}
        for q, candidates in zip(index.query_index, index.candidate_lists):
            relevant.setdefault(q, set()).add(candidates[0])  # MMEB: the first target is the correct one
        kwargs.setdefault("name", subset or "")
        rel = [relevant[q] for q in range(len(index.queries.items))]
        return cls._with_labels(index.queries, index.candidates, rel, image_root=image_root, **kwargs)


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
        index = index_mmeb_rows(rows)
        queries, candidates, query_index, cand_lists = index
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
        query_emb = encode_items(
            model, self.queries, side=self.query_side, what=f"{prefix}queries", labels=self._query_labels, **common
        )
        cand_emb = encode_items(
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


class ReasoningFormatEvaluator:
    """How often a UME-R1 model's own generations follow the format ``<think>...</think><answer>...<gen_emb>``.

    Generates (greedily, ``model.encode(mode="generative", return_reasoning=True)``) for ``inputs`` and reports
    ``{name}_format_rate`` (UME-R1's format check, :func:`mm_embed_trl.data.reasoning.follows_format`) and
    ``{name}_gen_emb_rate`` (completions that wrote ``<gen_emb>`` at all).
    """

    greater_is_better = True

    def __init__(self, inputs: Sequence[Any], *, name: str = "heldout", side: str = "query", image_root=None,
                 batch_size: int = 32, max_new_tokens: int = UME_R1_MAX_NEW_TOKENS):
        if not inputs:
            raise ValueError("ReasoningFormatEvaluator needs at least one input.")
        self.items = [parse_input(x, f"input #{i}") for i, x in enumerate(inputs)]
        self.name, self.side, self.image_root = name, side, image_root
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.primary_metric = f"{name}_format_rate"

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], image_root=None, *, limit: int = 64, **kwargs):
        """The queries of the first ``limit`` MMEB-train rows (``qry``, ``qry_image_path`` and, when present,
        ``qry_video_path``), one input per row; positives are not used."""
        inputs = []
        for i, row in enumerate(rows):
            inputs.append(row_input(row[QUERY_TEXT], row.get(QUERY_IMAGE), f"row {i} query", row.get(QUERY_VIDEO)))
            if len(inputs) >= limit:
                break
        return cls(inputs, image_root=image_root, **kwargs)

    @torch.no_grad()
    def __call__(self, model: Any) -> dict[str, float]:
        from ..data.reasoning import follows_format

        processor = getattr(model, "processor", None)  # its saved video sampling, as model.encode samples a video
        inputs = [
            materialize(item, self.image_root, f"input #{i}", processor) for i, item in enumerate(self.items)
        ]
        _, texts = model.encode(inputs, side=self.side, mode="generative", batch_size=self.batch_size,
                                max_new_tokens=self.max_new_tokens, return_reasoning=True, show_progress_bar=False)
        gen_token = model.config.generative_pooling_token
        return {
            f"{self.name}_format_rate": sum(map(follows_format, texts)) / len(texts),
            f"{self.name}_gen_emb_rate": sum(gen_token in t for t in texts) / len(texts),
        }
