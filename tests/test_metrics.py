"""Retrieval metrics against sentence-transformers' InformationRetrievalEvaluator, naive loops and scipy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mm_embed_trl.evaluation.metrics import (
    candidate_list_metrics,
    mmeb_precision_at_1,
    retrieval_metrics,
    similarity_spearman,
)

KS = (1, 3, 5, 10, 100)


def _random_case(num_queries=40, num_docs=60, dim=12, seed=0, quantize=None):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(num_queries, dim, generator=g), dim=-1)
    c = F.normalize(torch.randn(num_docs, dim, generator=g), dim=-1)
    if quantize:  # coarse values -> many exactly tied scores
        q, c = torch.round(q * quantize) / quantize, torch.round(c * quantize) / quantize
    rng = random.Random(seed)
    relevant = [set(rng.sample(range(num_docs), rng.randint(1, 6))) for _ in range(num_queries)]
    return q, c, relevant


def _st_metrics(q, c, relevant, ks=KS, corpus_chunk_size=17):
    """Run sentence-transformers' evaluator on precomputed embeddings (integer ids = our row indices)."""
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
    from sentence_transformers.util import dot_score

    class PrecomputedQueries:  # the evaluator only calls encode_query when corpus embeddings are given
        def encode_query(self, sentences, **kwargs):
            return q[[int(s[1:]) for s in sentences]]

    evaluator = InformationRetrievalEvaluator(
        queries={i: f"q{i}" for i in range(len(q))},
        corpus={j: f"d{j}" for j in range(len(c))},
        relevant_docs={i: rel for i, rel in enumerate(relevant)},
        corpus_chunk_size=corpus_chunk_size,
        mrr_at_k=list(ks),
        ndcg_at_k=list(ks),
        accuracy_at_k=list(ks),
        precision_recall_at_k=list(ks),
        map_at_k=list(ks),
        score_functions={"dot": dot_score},
    )
    scores = evaluator.compute_all_metrics(PrecomputedQueries(), corpus_embeddings=c)["dot"]
    return {name.replace("@k", f"@{k}"): float(v) for name, per_k in scores.items() for k, v in per_k.items()}


def _naive_ranking(scores_row):
    """Corpus indices in (score desc, index asc) order, by plain Python sorting."""
    return sorted(range(len(scores_row)), key=lambda j: (-scores_row[j], j))


@pytest.mark.parametrize("quantize", [None, 2], ids=["distinct-scores", "many-ties"])
def test_matches_sentence_transformers(quantize):
    q, c, relevant = _random_case(quantize=quantize)
    expected = _st_metrics(q, c, relevant)
    ours = retrieval_metrics(q, c, relevant, k_values=KS, chunk_size=7)
    assert set(expected) <= set(ours)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    if quantize:  # the tie case really has ties at ranking boundaries
        scores = q @ c.T
        assert any(len(set(row.tolist())) < len(row) for row in scores)


def test_chunk_size_and_mask_form_do_not_change_results():
    q, c, relevant = _random_case(quantize=2, seed=3)
    reference = retrieval_metrics(q, c, relevant, k_values=KS, chunk_size=1024)
    mask = torch.zeros(len(q), len(c), dtype=torch.bool)
    for i, rel in enumerate(relevant):
        mask[i, list(rel)] = True
    for kwargs in ({"chunk_size": 1}, {"chunk_size": 5}):
        assert retrieval_metrics(q, c, relevant, k_values=KS, **kwargs) == pytest.approx(reference, abs=1e-12)
    assert retrieval_metrics(q, c, mask, k_values=KS, chunk_size=6) == pytest.approx(reference, abs=1e-12)


def test_uncut_mrr_matches_naive_loop():
    q, c, relevant = _random_case(quantize=2, seed=5)
    scores = (q @ c.T).tolist()
    expected = 0.0
    for row, rel in zip(scores, relevant):
        order = _naive_ranking(row)
        expected += 1.0 / (next(r for r, j in enumerate(order) if j in rel) + 1)
    expected /= len(scores)
    assert retrieval_metrics(q, c, relevant, chunk_size=4)["mrr"] == pytest.approx(expected, abs=1e-12)


def test_hand_computed_tiny_case():
    # 1-D embeddings: scores are products, so rankings are easy to read off.
    corpus = torch.tensor([[0.9], [0.5], [0.1], [-0.3]])
    queries = torch.tensor([[1.0], [-1.0]])
    # query 0 ranks docs 0,1,2,3; relevant {1, 3} at ranks 2 and 4.
    # query 1 ranks docs 3,2,1,0; relevant {3} at rank 1.
    relevant = [{1, 3}, {3}]
    m = retrieval_metrics(queries, corpus, relevant, k_values=(1, 2, 4))
    assert m["accuracy@1"] == pytest.approx(0.5)
    assert m["accuracy@2"] == pytest.approx(1.0)
    assert m["precision@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["precision@4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    assert m["recall@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["recall@4"] == pytest.approx(1.0)
    assert m["mrr@1"] == pytest.approx((0 + 1) / 2)
    assert m["mrr@2"] == pytest.approx((1 / 2 + 1) / 2)
    assert m["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    # NDCG@4, query 0: DCG = 1/log2(3) + 1/log2(5), IDCG = 1 + 1/log2(3).
    ndcg_q0 = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert m["ndcg@4"] == pytest.approx((ndcg_q0 + 1.0) / 2)
    # MAP@4, query 0: (1/2 + 2/4) / min(4, 2) = 0.5; query 1: 1.
    assert m["map@4"] == pytest.approx((0.5 + 1.0) / 2)
    # MAP@1, query 0: no hit in top 1 -> 0; divisor min(1, 2) = 1.
    assert m["map@1"] == pytest.approx((0.0 + 1.0) / 2)


def test_ties_broken_by_lower_index():
    corpus = torch.tensor([[1.0], [1.0], [1.0]])
    query = torch.tensor([[1.0]])
    # All three tie: order is 0, 1, 2, so doc 2 sits at rank 3.
    m = retrieval_metrics(query, corpus, [{2}], k_values=(1, 2, 3))
    assert (m["recall@2"], m["recall@3"], m["mrr"]) == (0.0, 1.0, pytest.approx(1 / 3))
    m = retrieval_metrics(query, corpus, [{0}], k_values=(1,))
    assert m["recall@1"] == 1.0


def test_queries_without_relevant_docs_are_skipped_like_sentence_transformers():
    q, c, relevant = _random_case(num_queries=10, seed=7)
    with_empty = relevant[:5] + [set()] + relevant[5:]
    q_with_empty = torch.cat([q[:5], q[:1], q[5:]])
    assert retrieval_metrics(q_with_empty, c, with_empty) == pytest.approx(retrieval_metrics(q, c, relevant))
    with pytest.raises(ValueError, match="No query has a relevant"):
        retrieval_metrics(q[:2], c, [set(), set()])


def test_normalize_option_and_input_errors():
    q, c, relevant = _random_case(num_queries=8, seed=2)
    scaled = retrieval_metrics(q * 3.0, c * 0.5, relevant, normalize=True)
    assert scaled == pytest.approx(retrieval_metrics(q, c, relevant))
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(q, c[:, :5], relevant)
    with pytest.raises(ValueError, match=r"relevant\[1\]"):
        retrieval_metrics(q, c, [{0}, {len(c)}] + relevant[2:])
    with pytest.raises(ValueError, match="one set of relevant"):
        retrieval_metrics(q, c, relevant[:-1])
    with pytest.raises(ValueError, match="k_values"):
        retrieval_metrics(q, c, relevant, k_values=(0,))
    with pytest.raises(ValueError, match="shape"):
        retrieval_metrics(q, c, torch.zeros(3, 3, dtype=torch.bool))


# ---- MMEB precision@1 -------------------------------------------------------------------------------------------


def _naive_precision_at_1(q, candidate_lists):
    """VLM2Vec's loop: pred = np.argmax(candidates @ query); correct when pred == 0."""
    hits = [int(np.argmax(cands.numpy() @ qi.numpy()) == 0) for qi, cands in zip(q, candidate_lists)]
    return sum(hits) / len(hits)


def test_mmeb_precision_at_1_fixed_size_matches_loop():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    cands = F.normalize(torch.randn(30, 6, 8, generator=g), dim=-1)
    cands[:10, 0] = q[:10]  # make some queries clearly correct
    expected = _naive_precision_at_1(q, list(cands))
    assert 10 / 30 <= expected < 1.0
    assert mmeb_precision_at_1(q, cands) == pytest.approx(expected, abs=1e-12)


def test_mmeb_precision_at_1_flat_with_counts_matches_loop():
    g = torch.Generator().manual_seed(1)
    counts = [1, 4, 7, 2, 9, 3, 5, 5]
    q = F.normalize(torch.randn(len(counts), 8, generator=g), dim=-1)
    lists = [F.normalize(torch.randn(n, 8, generator=g), dim=-1) for n in counts]
    lists[2][0] = q[2]
    expected = _naive_precision_at_1(q, lists)
    assert mmeb_precision_at_1(q, torch.cat(lists), counts) == pytest.approx(expected, abs=1e-12)
    # a lone candidate is always right
    assert mmeb_precision_at_1(q[:1], lists[0], [1]) == 1.0


def test_mmeb_tie_with_candidate_zero_counts_as_correct():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    cands = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [1.0, 0.0]]])
    # row 0: tie at the top (np.argmax -> 0, correct); row 1: candidate 1 strictly better.
    assert mmeb_precision_at_1(q, cands) == pytest.approx(_naive_precision_at_1(q, list(cands))) == 0.5


def test_mmeb_input_errors():
    q = torch.randn(2, 4)
    with pytest.raises(ValueError, match="counts"):
        mmeb_precision_at_1(q, torch.randn(5, 4))
    with pytest.raises(ValueError, match="summing to 5"):
        mmeb_precision_at_1(q, torch.randn(5, 4), [2, 2])
    with pytest.raises(ValueError, match=r"\(Q, C, D\)"):
        mmeb_precision_at_1(q, torch.randn(3, 2, 4))


def test_candidate_list_metrics_matches_loop():
    g = torch.Generator().manual_seed(4)
    scores = torch.round(torch.randn(25, 9, generator=g) * 2) / 2  # ties included
    lengths = torch.randint(1, 10, (25,), generator=g)
    out = candidate_list_metrics(scores, lengths, k_values=(1, 3))
    ranks = []
    for row, n in zip(scores.tolist(), lengths.tolist()):
        ranks.append(1 + sum(s > row[0] for s in row[1:n]))
    assert out["precision@1"] == pytest.approx(np.mean([r == 1 for r in ranks]))
    assert out["recall@1"] == pytest.approx(out["precision@1"])
    assert out["recall@3"] == pytest.approx(np.mean([r <= 3 for r in ranks]))
    assert out["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]))
    assert out["ndcg@3"] == pytest.approx(np.mean([1 / math.log2(r + 1) if r <= 3 else 0.0 for r in ranks]))


# ---- similarity Spearman ----------------------------------------------------------------------------------------


def _scipy_similarity_spearman(a, b):
    from scipy.stats import spearmanr

    a = a.double().numpy()
    b = b.double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    iu = np.triu_indices(len(a), k=1)
    return spearmanr((a @ a.T)[iu], (b @ b.T)[iu]).statistic


def test_similarity_spearman_matches_scipy_with_different_dims():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 16, generator=g)
    b = a @ torch.randn(16, 7, generator=g) + 0.5 * torch.randn(40, 7, generator=g)  # related, other dim
    ours = similarity_spearman(a, b)
    assert ours == pytest.approx(_scipy_similarity_spearman(a, b), abs=1e-9)
    assert 0.2 < ours < 1.0
    assert similarity_spearman(a, a * 2.0) == pytest.approx(1.0)


def test_similarity_spearman_with_ties_matches_scipy():
    # Signed, scaled one-hot rows: every cosine is exactly -1, 0 or 1 whatever the rounding, so ties are exact
    # in both implementations.
    g = torch.Generator().manual_seed(1)

    def signed_one_hot(n, dim):
        rows = torch.zeros(n, dim)
        rows[torch.arange(n), torch.randint(0, dim, (n,), generator=g)] = 1.0
        return rows * torch.randint(1, 4, (n, 1), generator=g) * (torch.randint(0, 2, (n, 1), generator=g) * 2 - 1)

    a, b = signed_one_hot(25, 3), signed_one_hot(25, 5)
    assert similarity_spearman(a, b) == pytest.approx(_scipy_similarity_spearman(a, b), abs=1e-9)


def test_similarity_spearman_edge_cases():
    a = torch.randn(5, 3)
    assert math.isnan(similarity_spearman(a, torch.ones(5, 4)))  # constant similarities: undefined
    with pytest.raises(ValueError, match="same items"):
        similarity_spearman(a, torch.randn(6, 3))
    with pytest.raises(ValueError, match="at least 3"):
        similarity_spearman(a[:2], a[:2])


# ------------------------------------------------------------------------------------ the `evaluate` metric module
def test_evaluate_metric_loads_offline_and_matches_sentence_transformers(tmp_path, monkeypatch):
    """evaluate.load(RETRIEVAL_METRIC_PATH) (no hub) gives sentence-transformers' numbers on a shared corpus."""
    import evaluate

    from mm_embed_trl.evaluation import RETRIEVAL_METRIC_PATH

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    q, c, relevant = _random_case(quantize=2, seed=7)  # ties included
    metric = evaluate.load(RETRIEVAL_METRIC_PATH, cache_dir=str(tmp_path / "cache"))
    scores = (q.double() @ c.double().T).tolist()
    out = metric.compute(predictions=scores, references=[sorted(r) for r in relevant], k_values=list(KS))
    expected = _st_metrics(q.double(), c.double(), relevant)
    assert set(expected) <= set(out)
    for key, value in expected.items():  # ratios of counts in float64
        assert out[key] == pytest.approx(value, abs=1e-12), key
    with pytest.raises(ValueError, match="candidates"):
        metric.compute(predictions=[[0.1, 0.2], [0.3]], references=[[0], [0]])


def test_evaluate_metric_candidate_lists_match_mmeb_precision(tmp_path, monkeypatch):
    """The 'candidates' config: lists of different lengths, the correct one anywhere, VLM2Vec's tie rule."""
    import evaluate

    from mm_embed_trl.evaluation import RETRIEVAL_METRIC_PATH

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    g = torch.Generator().manual_seed(4)
    lists = [torch.round(torch.rand(n, generator=g) * 4) / 4 for n in (3, 5, 2, 7, 4, 6)]  # many ties
    correct = [1, 0, 1, 6, 2, 3]
    metric = evaluate.load(RETRIEVAL_METRIC_PATH, "candidates", cache_dir=str(tmp_path / "cache"))
    out = metric.compute(predictions=[x.tolist() for x in lists], references=correct, k_values=[1, 3])
    ranks = [1 + int((x > x[i]).sum()) for x, i in zip(lists, correct)]  # by hand: 1 + #strictly higher
    assert out["precision@1"] == pytest.approx(np.mean([r == 1 for r in ranks]), abs=1e-12)
    assert out["mrr"] == pytest.approx(np.mean([1 / r for r in ranks]), abs=1e-12)
    assert out["recall@3"] == pytest.approx(np.mean([r <= 3 for r in ranks]), abs=1e-12)
    with pytest.raises(ValueError, match="query 1"):
        metric.compute(predictions=[[0.1, 0.2], [0.3]], references=[0, 1])
