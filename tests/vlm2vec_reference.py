"""A port of the per-query metrics of VLM2Vec's MMEB-V2 evaluation (``src/utils/eval_utils/metrics.py``,
``RankingMetrics.hit_at_k`` and ``ndcg_at_k``, at 6e1e1d4), kept as the independent reference of the library's
vectorised ``graded_ranking_metrics``: plain Python over ranked id lists, as VLM2Vec computes them."""

from __future__ import annotations

import numpy as np


def hit_at_k(prediction, true_labels, k):
    if not true_labels or k == 0:
        return 0.0
    return 1.0 if set(prediction[:k]) & set(true_labels) else 0.0


def ndcg_at_k(prediction, true_labels, k, rel_scores=None, form="linear"):
    def dcg(rel_list):
        if form == "linear":
            return sum(rel / np.log2(idx + 2) for idx, rel in enumerate(rel_list))
        return sum((2**rel - 1) / np.log2(idx + 2) for idx, rel in enumerate(rel_list))

    if rel_scores is None:
        label_set = set(true_labels)
        relevance = [1 if item in label_set else 0 for item in prediction[:k]]
        ideal_relevance = [1] * min(len(label_set), k)
    else:
        label_rels = dict(zip(true_labels, rel_scores))
        relevance = [label_rels.get(item, 0) for item in prediction[:k]]
        ideal_relevance = sorted(label_rels.values(), reverse=True)[:k]
    dcg_score = dcg(relevance)
    idcg_score = dcg(ideal_relevance) if ideal_relevance else 1
    return dcg_score / idcg_score if idcg_score > 0 else 0.0


def ranked(scores, names):
    """VLM2Vec's ranking of one query's candidates: ``np.argsort(-scores)`` (scores without ties here)."""
    return [names[i] for i in np.argsort(-np.asarray(scores))]
