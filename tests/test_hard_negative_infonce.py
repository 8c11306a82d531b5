"""UniME stage-2 loss against a naive per-query reference, plus the planted-duplicate / filter cases."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close, assert_loss_close, rounding_rtol

import mm_embed_trl.losses.hard_negative_infonce as hn_module
from mm_embed_trl.losses import (
    HardNegativeInfoNCELoss,
    duplicate_mask_from_ids,
    hard_negative_infonce_loss,
)


def reference_loss(
    query,
    positive,
    negatives=None,
    *,
    candidates=None,
    positive_index=None,
    dup=None,
    neg_dup=None,
    temperature,
    margin,
    top_k,
    symmetric=False,
):
    """Straight transcription of the method, one query at a time, in float64 (differentiable)."""
    # .item() below reads values only (selection is discrete); the loss keeps the graph
    q = F.normalize(query.double(), dim=-1)
    p = F.normalize(positive.double(), dim=-1)
    if candidates is None:
        c, pos_idx = p, list(range(len(q)))
    else:
        c, pos_idx = F.normalize(candidates.double(), dim=-1), [int(i) for i in positive_index]
    n = F.normalize(negatives.double(), dim=-1) if negatives is not None else None
    losses, picked = [], []
    for i in range(len(q)):
        s_pos = torch.dot(q[i], p[i])
        pool = []  # (score, column)
        for j in range(len(c)):
            if j == pos_idx[i] or (dup is not None and bool(dup[i][j])):
                continue
            pool.append((torch.dot(q[i], c[j]), j))
        if n is not None:
            for j in range(n.shape[1]):
                if neg_dup is not None and bool(neg_dup[i][j]):
                    continue
                pool.append((torch.dot(q[i], n[i, j]), len(c) + j))
        if margin is not None:
            pool = [(s, col) for s, col in pool if not s.item() > s_pos.item() + margin]
        pool.sort(key=lambda item: -item[0].item())
        if top_k is not None:
            pool = pool[:top_k]
            chosen = [pool[slot % len(pool)] for slot in range(top_k)] if pool else []
        else:
            chosen = pool
        picked.append([col for _, col in chosen])
        logits = torch.stack([s_pos] + [s for s, _ in chosen]) / temperature
        losses.append(torch.logsumexp(logits, 0) - logits[0])
    loss = torch.stack(losses).mean()
    if symmetric:
        back = []
        for i in range(len(q)):
            terms = [torch.dot(p[i], q[i])]
            for j in range(len(q)):
                if j == i:
                    continue
                same_target = dup is not None and bool(dup[i][pos_idx[j]])
                if not same_target:
                    terms.append(torch.dot(p[i], q[j]))
            logits = torch.stack(terms) / temperature
            back.append(torch.logsumexp(logits, 0) - logits[0])
        loss = 0.5 * (loss + torch.stack(back).mean())
    return loss, picked


def _unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=-1)


CONFIGS = [
    {"margin": None, "top_k": None},
    {"margin": 0.1, "top_k": None},
    {"margin": None, "top_k": 3},
    {"margin": 0.1, "top_k": 3},
    {"margin": 0.05, "top_k": 4, "negatives": 2},
    {"margin": 0.1, "top_k": 3, "negatives": 2, "duplicates": True},
    {"margin": 0.1, "top_k": 8, "negatives": 1, "duplicates": True},  # fewer than k survivors: repetition
    {"margin": 0.1, "top_k": 3, "negatives": 2, "duplicates": True, "symmetric": True},
    {"margin": None, "top_k": None, "duplicates": True, "symmetric": True},
    {"margin": 0.1, "top_k": 3, "explicit_candidates": True, "duplicates": True, "negatives": 2},
    {"margin": 0.1, "top_k": 3, "explicit_candidates": True, "duplicates": True, "symmetric": True},
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_query_reference(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    batch, dim = 6, 5  # small dim: similarities spread widely, so the margin filter really fires
    # queries near their positives, so positives are typically (not always) the best match
    p = _unit(batch, dim, generator=g)
    q = F.normalize(p + 0.8 * torch.randn(batch, dim, generator=g), dim=-1).requires_grad_(True)
    p.requires_grad_(True)
    neg = _unit(batch, cfg["negatives"], dim, generator=g).requires_grad_(True) if cfg.get("negatives") else None
    ids = torch.tensor([0, 1, 2, 1, 4, 0])  # rows 1/3 and 0/5 share a target
    kwargs, ref_kwargs = {}, {}
    if cfg.get("explicit_candidates"):
        # candidates = the positives plus 3 extra targets; query 2's own positive is deliberately not among
        # them in the non-symmetric case (positive_index -1)
        extra = _unit(3, dim, generator=g)
        cands = torch.cat([p, extra])
        cand_ids = torch.cat([ids, torch.tensor([7, 1, 9])])  # extra row 7 duplicates target id 1
        pos_index = torch.arange(batch)
        if not cfg.get("symmetric"):
            pos_index = pos_index.clone()
            pos_index[2] = -1
        kwargs.update(candidates=cands, positive_index=pos_index)
        ref_kwargs.update(candidates=cands, positive_index=pos_index)
    else:
        cand_ids = ids
    if cfg.get("duplicates"):
        dup = duplicate_mask_from_ids(ids, cand_ids)
        kwargs["candidate_duplicate_mask"] = dup
        ref_kwargs["dup"] = dup
    common = {
        "temperature": 0.05, "margin": cfg["margin"], "top_k": cfg["top_k"], "symmetric": cfg.get("symmetric", False)
    }

    out = hard_negative_infonce_loss(q, p, neg, **kwargs, **common)
    ref, picked = reference_loss(q, p, neg, **ref_kwargs, **common)
    assert out.loss.dtype == torch.float32
    # float32 loss against the float64 transcription: 5-dim similarities, softmax over <= 12 candidates, x 1/0.05
    assert_loss_close(out.loss, ref, rtol=rounding_rtol(terms=12, depth=3, gain=1 / 0.05))
    if cfg["top_k"] is not None:
        assert out.negative_indices.tolist() == [row if row else [-1] * cfg["top_k"] for row in picked]

    # Gradients w.r.t. every input, against autograd through the reference.
    tensors = [t for t in (q, p, neg) if t is not None]
    got = torch.autograd.grad(out.loss, tensors, allow_unused=True, materialize_grads=True)
    want = torch.autograd.grad(ref, tensors, allow_unused=True, materialize_grads=True)
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        assert_close(a.double(), b.double(), rtol=rounding_rtol(terms=12, depth=9, gain=1 / 0.05))


def test_plain_infonce_equals_cross_entropy_over_similarity_matrix():
    g = torch.Generator().manual_seed(3)
    q, p = _unit(10, 16, generator=g), _unit(10, 16, generator=g)
    out = hard_negative_infonce_loss(q, p, temperature=0.02, margin=None, top_k=None)
    expected = F.cross_entropy(q @ p.T / 0.02, torch.arange(10))
    # the same cross-entropy in other reduction orders: 16-dim similarities, 10-way softmax, logits x 1/0.02
    ce_rtol = rounding_rtol(terms=16, depth=3, gain=1 / 0.02)
    assert_loss_close(out.loss, expected, rtol=ce_rtol)
    # symmetric plain mode = mean of both directions (the UME-R1 loss)
    out = hard_negative_infonce_loss(q, p, temperature=0.02, margin=None, top_k=None, symmetric=True)
    expected_sym = 0.5 * (expected + F.cross_entropy(p @ q.T / 0.02, torch.arange(10)))
    assert_loss_close(out.loss, expected_sym, rtol=ce_rtol)


def _planted_batch():
    """Query 0's positive has an exact copy (candidate 4) and a near-duplicate (candidate 5)."""
    g = torch.Generator().manual_seed(7)
    dim = 16
    p = _unit(4, dim, generator=g)
    q = F.normalize(p + 0.6 * torch.randn(4, dim, generator=g), dim=-1)
    exact_copy = p[0:1].clone()
    # Closer to q_0 than p_0 is, by far more than the margin: a likely false negative.
    near = F.normalize(q[0:1] + 0.05 * torch.randn(1, dim, generator=g), dim=-1)
    cands = torch.cat([p, exact_copy, near])
    ids = torch.tensor([100, 101, 102, 103])
    cand_ids = torch.tensor([100, 101, 102, 103, 100, 555])
    assert float(q[0] @ near[0]) > float(q[0] @ p[0]) + 0.1
    return q, p, cands, ids, cand_ids


def test_exact_duplicate_of_positive_removed_only_by_the_duplicate_mask():
    q, p, cands, ids, cand_ids = _planted_batch()
    common = {"candidates": cands, "positive_index": torch.arange(4), "temperature": 0.02, "margin": 0.1, "top_k": 2}
    # Without the mask the exact copy survives the margin rule (its score equals the positive's) and,
    # being the hardest remaining candidate, is picked as a negative (classification-style MMEB data shares
    # label captions across queries).
    out = hard_negative_infonce_loss(q, p, **common)
    assert 4 in out.negative_indices[0].tolist()
    out = hard_negative_infonce_loss(q, p, candidate_duplicate_mask=duplicate_mask_from_ids(ids, cand_ids), **common)
    assert 4 not in out.negative_indices[0].tolist()
    # In plain mode (all candidates kept), the copy is masked for row 0 only: rows 1-3 keep it as a negative.
    out = hard_negative_infonce_loss(
        q, p, candidates=cands, positive_index=torch.arange(4),
        candidate_duplicate_mask=duplicate_mask_from_ids(ids, cand_ids), temperature=0.02, margin=None, top_k=None,
    )
    assert not out.kept_mask[0, 4] and out.kept_mask[1:, 4].all()


def test_near_duplicate_filtered_by_margin_and_back_without_it():
    q, p, cands, ids, cand_ids = _planted_batch()
    dup = duplicate_mask_from_ids(ids, cand_ids)
    common = {
        "candidates": cands, "positive_index": torch.arange(4), "candidate_duplicate_mask": dup, "temperature": 0.02
    }
    out = hard_negative_infonce_loss(q, p, margin=0.1, top_k=2, **common)
    assert 5 not in out.negative_indices[0].tolist()
    assert out.logs["filtered_fraction"] >= 0.25  # at least query 0 lost a candidate
    out_off = hard_negative_infonce_loss(q, p, margin=None, top_k=2, **common)
    assert int(out_off.negative_indices[0, 0]) == 5  # the hardest one when the filter is off
    assert float(out_off.logs["filtered_fraction"]) == 0.0


def test_fewer_survivors_than_k_repeat_and_never_admit_positive_or_filtered():
    g = torch.Generator().manual_seed(11)
    q, p = _unit(3, 8, generator=g), _unit(3, 8, generator=g)
    out = hard_negative_infonce_loss(q, p, temperature=0.05, margin=None, top_k=8)
    for i in range(3):
        row = out.negative_indices[i].tolist()
        others = sorted({0, 1, 2} - {i}, key=lambda j: -float(q[i] @ p[j]))
        assert row == [others[s % 2] for s in range(8)]  # hardest first, then cyclic repetition
        assert i not in row
    # Filtered candidates never re-enter, even when that leaves fewer than k.
    q, p, cands, ids, cand_ids = _planted_batch()
    out = hard_negative_infonce_loss(
        q, p, candidates=cands, positive_index=torch.arange(4), temperature=0.02, margin=0.1, top_k=8,
        candidate_duplicate_mask=duplicate_mask_from_ids(ids, cand_ids),
    )
    for i in range(4):
        row = set(out.negative_indices[i].tolist())
        assert i not in row and -1 not in row
        scores = (F.normalize(cands, dim=-1) @ q[i]).tolist()
        pos_score = float(q[i] @ p[i])
        assert all(scores[j] <= pos_score + 0.1 for j in row)
    assert 4 not in out.negative_indices[0].tolist() and 5 not in out.negative_indices[0].tolist()


def test_query_without_any_negative_contributes_zero_and_is_logged():
    g = torch.Generator().manual_seed(5)
    q, p = _unit(4, 8, generator=g), _unit(4, 8, generator=g)
    q.requires_grad_(True)
    # Query 0's only candidates are duplicates of its positive (ids equal), the others have negatives.
    ids = torch.tensor([1, 1, 1, 1])
    ids_cand = torch.tensor([1, 1, 1, 1])
    dup = duplicate_mask_from_ids(ids, ids_cand)
    dup[1:] = False
    out = hard_negative_infonce_loss(q, p, candidate_duplicate_mask=dup, temperature=0.05, margin=None, top_k=2)
    assert out.negative_indices[0].tolist() == [-1, -1]
    assert float(out.logs["no_negative_fraction"]) == pytest.approx(0.25)
    ref, _ = reference_loss(q, p, dup=dup, temperature=0.05, margin=None, top_k=2)
    assert_loss_close(out.loss, ref, rtol=rounding_rtol(terms=8, depth=3, gain=1 / 0.05))
    (grad,) = torch.autograd.grad(out.loss, q)
    assert torch.isfinite(grad).all()
    assert torch.count_nonzero(grad[0]) == 0  # the lone query gets no gradient from its own row


def test_all_filtered_raises_clear_error():
    g = torch.Generator().manual_seed(0)
    q, p = _unit(1, 8, generator=g), _unit(1, 8, generator=g)
    with pytest.raises(ValueError, match="batch of 1"):
        hard_negative_infonce_loss(q, p)
    q, p = _unit(4, 8, generator=g), _unit(4, 8, generator=g)
    with pytest.raises(ValueError, match="Lower or disable the margin"):
        hard_negative_infonce_loss(q, p, margin=-3.0)  # every candidate beats pos - 3


def test_logs_match_hand_computation():
    g = torch.Generator().manual_seed(21)
    q, p = _unit(5, 6, generator=g), _unit(5, 6, generator=g)
    out = hard_negative_infonce_loss(q, p, temperature=0.05, margin=None, top_k=2)
    sims = q @ p.T
    pos = sims.diag()
    kept_scores, accurate = [], []
    for i in range(5):
        row = sorted((float(sims[i, j]) for j in range(5) if j != i), reverse=True)[:2]
        kept_scores += row
        accurate.append(float(pos[i]) > max(row))
    # means of 5 and 10 float32 similarities (6-dim dot products) against Python float sums of the same values
    sim_tol = rounding_rtol(terms=10, depth=2)
    assert float(out.logs["mean_pos_sim"]) == pytest.approx(float(pos.mean()), abs=sim_tol)
    assert float(out.logs["mean_neg_sim"]) == pytest.approx(sum(kept_scores) / len(kept_scores), abs=sim_tol)
    assert float(out.logs["accuracy"]) == pytest.approx(sum(accurate) / 5)
    assert float(out.logs["num_valid_negatives"]) == 4.0
    assert float(out.logs["num_kept_negatives"]) == 2.0


def test_module_wrapper_and_bf16_inputs():
    g = torch.Generator().manual_seed(2)
    q, p, n = _unit(6, 8, generator=g), _unit(6, 8, generator=g), _unit(6, 2, 8, generator=g)
    module = HardNegativeInfoNCELoss(temperature=0.05, margin=0.1, top_k=3, symmetric=True)
    expected = hard_negative_infonce_loss(q, p, n, temperature=0.05, margin=0.1, top_k=3, symmetric=True).loss
    assert torch.equal(module(q, p, n).loss, expected)  # the module calls the function: the same computation
    assert "top_k=3" in repr(module)
    low = module(q.bfloat16(), p.bfloat16(), n.bfloat16()).loss
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_duplicate_mask_from_ids():
    mask = duplicate_mask_from_ids(torch.tensor([5, 6, 5]), torch.tensor([5, 7, 6, 5]))
    assert mask.tolist() == [[True, False, False, True], [False, False, True, False], [True, False, False, True]]
    with pytest.raises(ValueError, match="1-D"):
        duplicate_mask_from_ids(torch.zeros(2, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long))


def test_input_validation_messages():
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="positive has 3 rows"):
        hard_negative_infonce_loss(q, p[:3])
    with pytest.raises(ValueError, match="negatives must have shape"):
        hard_negative_infonce_loss(q, p, torch.randn(8, 8))
    with pytest.raises(ValueError, match="without positive_index"):
        hard_negative_infonce_loss(q, p, candidates=p)
    with pytest.raises(ValueError, match=r"positive_index\[1\] = 9 is out of range"):
        hard_negative_infonce_loss(q, p, candidates=p, positive_index=torch.tensor([0, 9, 2, 3]))
    with pytest.raises(ValueError, match="candidate_duplicate_mask must have shape"):
        hard_negative_infonce_loss(q, p, candidate_duplicate_mask=torch.zeros(4, 3, dtype=torch.bool))


def test_docstring_examples_run():
    result = doctest.testmod(hn_module, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0
