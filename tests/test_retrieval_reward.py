"""UME-R1's retrieval reward, its reciprocal-rank alternative and the format reward, against independent references:
a NumPy port of UME-R1's ``_score_completions`` (Kikcer/lume @08891de, grpo_trainer.py L729-876), a per-row loop
reference with explicit candidate sets, and hand-computed planted similarity matrices."""

from __future__ import annotations

import doctest
import importlib
import math

import numpy as np
import pytest
import torch

from mm_embed_trl.losses import (
    RetrievalRewardOutput,
    reciprocal_rank_reward,
    ume_r1_format_reward,
    ume_r1_retrieval_reward,
)

# ----------------------------------------------------------------------------------------------- references


def ume_r1_score_completions(qry: np.ndarray, tgt: np.ndarray, G: int):
    """NumPy port of UME-R1's reward loop: ``qry``/``tgt`` are (P*G, D) with pair g's rollouts at rows g*G..g*G+G-1.

    ``logits_per_qry = all_qry @ all_target.T``; rank = |topk(row, G) ∩ own block| / G; gap = mean(own) −
    mean(rest); reward = rank * gap. ``torch.topk`` tie order is replaced by a stable argsort (random inputs
    have no ties).
    """
    S = qry @ tgt.T
    n = S.shape[0]
    rank, gap = np.zeros(n), np.zeros(n)
    for i in range(n):
        g = i // G
        row = S[i]
        positive = row[g * G : (g + 1) * G]
        negative = np.concatenate([row[: g * G], row[(g + 1) * G :]])
        top = np.argsort(-row, kind="stable")[:G]
        rank[i] = ((top >= g * G) & (top < (g + 1) * G)).sum() / G
        gap[i] = positive.mean() - negative.mean()
    return rank * gap, rank, gap


def loop_reference(E, side, pair, G, duplicate_pairs=frozenset()):
    """Per-row reference with explicit candidate sets and the tie rule "negatives rank ahead at equal scores".

    ``duplicate_pairs`` holds unordered pairs {g, h} whose rollouts are never negatives of each other.
    Returns dict of per-row lists: reward, rank, gap, rr (reciprocal-rank reward), has_negative.
    """
    E = np.asarray(E, dtype=np.float64)
    E = E / np.linalg.norm(E, axis=1, keepdims=True)
    n = len(side)
    out = {k: [] for k in ("reward", "rank", "gap", "rr", "has_negative")}
    for i in range(n):
        pos = [j for j in range(n) if side[j] != side[i] and pair[j] == pair[i]]
        neg = [
            j
            for j in range(n)
            if side[j] != side[i] and pair[j] != pair[i] and frozenset((pair[i], pair[j])) not in duplicate_pairs
        ]
        assert len(pos) == G
        s = {j: float(E[i] @ E[j]) for j in pos + neg}
        ordered = sorted(pos + neg, key=lambda j: (-s[j], j in pos))  # negatives first at equal scores
        rank = sum(j in pos for j in ordered[:G]) / G
        if neg:
            gap = np.mean([s[j] for j in pos]) - np.mean([s[j] for j in neg])
            rr = np.mean([1.0 / (1 + sum(s[j] >= s[k] for j in neg)) for k in pos])
        else:
            gap, rr = 0.0, 0.0
        for key, value in zip(out, (rank * gap, rank, gap, rr, bool(neg))):
            out[key].append(value)
    return out


def paired_pool(num_pairs: int, G: int, dim: int = 16, noise: float = 1.5, seed: int = 0):
    """Rollouts in the sampler's layout [q0×G, t0×G, q1×G, t1×G, ...]: each pair around its own centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_pairs, dim))
    pair = np.repeat(np.arange(num_pairs), 2 * G)
    side = np.tile(np.repeat([0, 1], G), num_pairs)
    E = centres[pair] + noise * rng.normal(size=(len(pair), dim))
    return E / np.linalg.norm(E, axis=1, keepdims=True), side, pair


def as_tensors(E, side, pair, dtype=torch.float64):
    return torch.tensor(E, dtype=dtype), torch.tensor(side), torch.tensor(pair)


# ----------------------------------------------------------------------------------------------- UME-R1 parity


@pytest.mark.parametrize("num_pairs", [2, 5])
@pytest.mark.parametrize("G", [2, 4])
def test_matches_numpy_port_of_ume_r1_on_both_sides(num_pairs, G):
    E, side, pair = paired_pool(num_pairs, G, seed=10 * num_pairs + G)
    q, t = E[side == 0], E[side == 1]  # each in pair order, G consecutive rollouts per pair
    q_reward, q_rank, q_gap = ume_r1_score_completions(q, t, G)
    t_reward, t_rank, t_gap = ume_r1_score_completions(t, q, G)  # UME-R1 swaps the roles for the target side

    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=G)
    assert isinstance(out, RetrievalRewardOutput) and out.reward.dtype == torch.float64
    for got, want_q, want_t in ((out.reward, q_reward, t_reward), (out.rank, q_rank, t_rank), (out.gap, q_gap, t_gap)):
        np.testing.assert_allclose(got[side == 0].numpy(), want_q, rtol=0, atol=1e-12)  # float64 end to end
        np.testing.assert_allclose(got[side == 1].numpy(), want_t, rtol=0, atol=1e-12)
    assert 0 < out.rank.mean() < 1  # a non-trivial case: some rollouts miss their pair
    assert out.has_negative.all()
    torch.testing.assert_close(out.gap, out.pos_sim - out.neg_sim)


def test_float32_inputs_match_the_float64_reference():
    E, side, pair = paired_pool(5, 4, seed=3)
    ref = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=4)
    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair, dtype=torch.bfloat16), num_generations=4)
    assert out.reward.dtype == torch.float32  # half precision is upcast
    # bf16 inputs carry ~3 significant digits (rel. 4e-3 per feature): cosines move by up to ~1e-2, so only the
    # similarities are compared, loosely; a rank can legitimately flip when two candidates are that close.
    torch.testing.assert_close(out.pos_sim, ref.pos_sim.float(), atol=2e-2, rtol=0)
    out32 = ume_r1_retrieval_reward(*as_tensors(E, side, pair, dtype=torch.float32), num_generations=4)
    # float32: 16-term dot products of unit vectors, error ~1e-7 each; means over <= 36 of them stay below 1e-6.
    torch.testing.assert_close(out32.reward, ref.reward.float(), atol=1e-5, rtol=0)
    assert torch.equal(out32.rank, ref.rank.float())


def test_hand_computed_two_pair_case():
    """Planted query×target similarities (G=2): queries are basis vectors, each target's column is planted."""
    S = np.array(  # rows q0a q0b q1a q1b, columns t0a t0b t1a t1b
        [
            [0.6, 0.4, 0.2, 0.0],
            [0.3, 0.1, 0.2, 0.0],
            [0.1, 0.2, 0.5, 0.3],
            [0.4, 0.0, 0.1, 0.2],
        ]
    )
    queries = np.eye(4, 5)
    targets = np.concatenate([S.T, np.sqrt(1 - (S.T**2).sum(1, keepdims=True))], axis=1)  # unit norm, q·t = S
    E = np.concatenate([queries[:2], targets[:2], queries[2:], targets[2:]])
    side, pair = np.array([0, 0, 1, 1, 0, 0, 1, 1]), np.array([0, 0, 0, 0, 1, 1, 1, 1])
    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2)
    # By hand, row order q0a q0b t0a t0b q1a q1b t1a t1b:
    #   q0a: top-2 {t0a .6, t0b .4} -> rank 1;  gap (.6+.4)/2-(.2+0)/2 = .4;     r = .4
    #   q0b: top-2 {t0a .3, t1a .2} -> rank .5; gap .2-.1 = .1;                 r = .05
    #   t0a: vs queries (.6,.3 | .1,.4): top-2 {q0a .6, q1b .4} -> .5; gap .45-.25 = .2;  r = .1
    #   t0b: (.4,.1 | .2,0): top-2 {q0a, q1a} -> .5; gap .25-.1 = .15;            r = .075
    #   q1a: top-2 {t1a .5, t1b .3} -> 1; gap .4-.15 = .25;                      r = .25
    #   q1b: top-2 {t0a .4, t1b .2} -> .5; gap .15-.2 = -.05;                    r = -.025
    #   t1a: (.2,.2 | .5,.1): top-2 {q1a .5, a .2 negative} -> .5; gap .3-.2 = .1;  r = .05
    #   t1b: (0,0 | .3,.2): top-2 {q1a, q1b} -> 1; gap .25-0 = .25;               r = .25
    expected = {
        "rank": [1, 0.5, 0.5, 0.5, 1, 0.5, 0.5, 1],
        "gap": [0.4, 0.1, 0.2, 0.15, 0.25, -0.05, 0.1, 0.25],
        "reward": [0.4, 0.05, 0.1, 0.075, 0.25, -0.025, 0.05, 0.25],
        "pos_sim": [0.5, 0.2, 0.45, 0.25, 0.4, 0.15, 0.3, 0.25],
        "neg_sim": [0.1, 0.1, 0.25, 0.1, 0.15, 0.2, 0.2, 0.0],
    }
    for key, want in expected.items():
        np.testing.assert_allclose(getattr(out, key).numpy(), want, rtol=0, atol=1e-12, err_msg=key)


# ----------------------------------------------------------------------------------------------- row mapping, ties


def test_rows_are_matched_by_pair_id_and_side_not_by_position():
    E, side, pair = paired_pool(5, 4, seed=7)
    ref = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=4)
    perm = np.random.default_rng(0).permutation(len(side))
    arbitrary_ids = 1000 + 37 * pair  # pair ids need not be 0..P-1
    out = ume_r1_retrieval_reward(*as_tensors(E[perm], side[perm], arbitrary_ids[perm]), num_generations=4)
    for key in ("reward", "rank", "gap", "pos_sim", "neg_sim"):
        torch.testing.assert_close(getattr(out, key), getattr(ref, key)[perm], atol=1e-12, rtol=0)
    loop = loop_reference(E[perm], side[perm], arbitrary_ids[perm], 4)
    np.testing.assert_allclose(out.reward.numpy(), loop["reward"], atol=1e-12, rtol=0)


def test_tie_rule_negatives_rank_ahead_of_positives():
    """One-hot embeddings make similarities exact 0/1, so the ties are real float ties."""
    e = np.eye(4)
    # G=2. q0a = e0; its positives t0a = e0 (1.0), t0b = e1 (0.0); negatives t1a = e1 (0.0), t1b = e2 (0.0).
    E = np.stack([e[0], e[3], e[0], e[1], e[2], e[3], e[1], e[2]])
    side, pair = np.array([0, 0, 1, 1, 0, 0, 1, 1]), np.array([0, 0, 0, 0, 1, 1, 1, 1])
    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2)
    # q0a: t0a is first; second place is a three-way tie at 0 (t0b positive, t1a/t1b negative): a negative wins.
    assert out.rank[0].item() == 0.5
    np.testing.assert_allclose(out.rank.numpy(), loop_reference(E, side, pair, 2)["rank"], atol=0)
    # The rule does not depend on row order.
    for seed in range(5):
        perm = np.random.default_rng(seed).permutation(8)
        shuffled = ume_r1_retrieval_reward(*as_tensors(E[perm], side[perm], pair[perm]), num_generations=2)
        assert torch.equal(shuffled.rank, out.rank[perm])


def test_collapsed_embeddings_earn_nothing():
    """Every rollout identical: all scores tie, negatives win, rank 0 (an optimistic rule would give 1)."""
    E = np.ones((12, 3))
    side = np.tile(np.repeat([0, 1], 2), 3)
    pair = np.repeat(np.arange(3), 4)
    for fn in (ume_r1_retrieval_reward, reciprocal_rank_reward):
        out = fn(*as_tensors(E, side, pair), num_generations=2)
        assert out.rank.eq(0).all() and out.gap.abs().max() < 1e-12
    rr = reciprocal_rank_reward(*as_tensors(E, side, pair), num_generations=2).reward
    torch.testing.assert_close(rr, torch.full((12,), 1 / 5, dtype=torch.float64))  # 4 negatives all tie ahead


# ----------------------------------------------------------------------------------------------- duplicates, pools


def _content_ids(pair, side, query_content, target_content):
    return torch.tensor(np.where(side == 0, np.asarray(query_content)[pair], np.asarray(target_content)[pair]))


def test_duplicate_targets_and_queries_are_not_negatives():
    E, side, pair = paired_pool(4, 2, seed=5)
    # pairs 0 and 1 share a target (a label caption); pairs 1 and 2 share a query; pair 3 is distinct.
    ids = _content_ids(pair, side, query_content=[10, 11, 11, 13], target_content=[20, 20, 22, 23])
    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2, content_ids=ids)
    dup = {frozenset((0, 1)), frozenset((1, 2))}
    loop = loop_reference(E, side, pair, 2, duplicate_pairs=dup)
    for key in ("reward", "rank", "gap"):
        np.testing.assert_allclose(getattr(out, key).numpy(), loop[key], atol=1e-12, rtol=0, err_msg=key)
    plain = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2)
    assert not torch.allclose(plain.gap, out.gap)  # the mask changed something
    # The same through an explicit row-level mask.
    mask = torch.tensor([[frozenset((a, b)) in dup for b in pair] for a in pair])
    explicit = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2, duplicate_mask=mask)
    torch.testing.assert_close(explicit.reward, out.reward, atol=0, rtol=0)


def test_rows_that_lose_every_negative_get_zero_and_are_flagged():
    E, side, pair = paired_pool(3, 2, seed=1)
    # pair 0 shares its target with pair 1 and its query with pair 2: it has no negative left.
    ids = _content_ids(pair, side, query_content=[1, 2, 1], target_content=[5, 5, 7])
    for fn in (ume_r1_retrieval_reward, reciprocal_rank_reward):
        out = fn(*as_tensors(E, side, pair), num_generations=2, content_ids=ids)
        lost = torch.tensor(pair == 0)
        assert torch.equal(out.has_negative, ~lost)
        assert out.reward[lost].eq(0).all() and out.gap[lost].eq(0).all() and out.neg_sim[lost].isnan().all()
        assert out.reward[~lost].isfinite().all() and out.neg_sim[~lost].isfinite().all()
    loop = loop_reference(E, side, pair, 2, duplicate_pairs={frozenset((0, 1)), frozenset((0, 2))})
    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2, content_ids=ids)
    np.testing.assert_allclose(out.reward.numpy(), loop["reward"], atol=1e-12, rtol=0)


def test_pool_id_splits_the_pool():
    E1, side1, pair1 = paired_pool(3, 2, seed=1)
    E2, side2, pair2 = paired_pool(2, 2, seed=2)
    first = ume_r1_retrieval_reward(*as_tensors(E1, side1, pair1), num_generations=2)
    second = ume_r1_retrieval_reward(*as_tensors(E2, side2, pair2 + 3), num_generations=2)
    E, side, pair = np.concatenate([E1, E2]), np.concatenate([side1, side2]), np.concatenate([pair1, pair2 + 3])
    pool_id = torch.tensor([0] * len(side1) + [1] * len(side2))
    perm = np.random.default_rng(0).permutation(len(side))
    both = ume_r1_retrieval_reward(
        *as_tensors(E[perm], side[perm], pair[perm]), num_generations=2, pool_id=pool_id[perm]
    )
    torch.testing.assert_close(both.reward, torch.cat([first.reward, second.reward])[perm], atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------- errors


def test_single_pair_pool_raises_instead_of_nan():
    E, side, pair = paired_pool(1, 4)
    for fn in (ume_r1_retrieval_reward, reciprocal_rank_reward):
        with pytest.raises(ValueError, match="no rollout in the pool has one.*1 distinct pair"):
            fn(*as_tensors(E, side, pair), num_generations=4)
    E, side, pair = paired_pool(2, 2)
    same_target = _content_ids(pair, side, query_content=[1, 2], target_content=[3, 3])
    with pytest.raises(ValueError, match="after masking duplicates"):
        ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=2, content_ids=same_target)


def test_bad_pools_are_reported_with_the_pair():
    E, side, pair = paired_pool(3, 2)
    args = as_tensors(E, side, pair)
    with pytest.raises(ValueError, match="pair_id 1 has 1 target rollouts, expected num_generations=2"):
        keep = torch.ones(len(side), dtype=torch.bool)
        keep[7] = False  # one target rollout of pair 1 missing
        ume_r1_retrieval_reward(args[0][keep], args[1][keep], args[2][keep], num_generations=2)
    with pytest.raises(ValueError, match="pair_id 0 has 2 query rollouts, expected num_generations=4"):
        ume_r1_retrieval_reward(*args, num_generations=4)
    with pytest.raises(ValueError, match="pair_id 0 in pool 0 has 0 target rollouts"):
        split = torch.tensor([0, 0, 1, 1] + [0] * 8)  # pair 0's targets in another pool
        ume_r1_retrieval_reward(*args, num_generations=2, pool_id=split)
    with pytest.raises(ValueError, match="side must be 0"):
        ume_r1_retrieval_reward(args[0], args[1] * 2, args[2], num_generations=2)
    with pytest.raises(ValueError, match="not finite"):
        bad = args[0].clone()
        bad[3, 0] = float("nan")
        ume_r1_retrieval_reward(bad, args[1], args[2], num_generations=2)
    with pytest.raises(ValueError, match=r"pair_id must have shape \(12,\)"):
        ume_r1_retrieval_reward(args[0], args[1], args[2][:-1], num_generations=2)
    with pytest.raises(ValueError, match="content_ids differ"):
        ume_r1_retrieval_reward(*args, num_generations=2, content_ids=torch.arange(12))


# ----------------------------------------------------------------------------------------------- reciprocal rank


@pytest.mark.parametrize("G", [1, 2, 4])
def test_reciprocal_rank_matches_loop_reference(G):
    E, side, pair = paired_pool(5, G, seed=G)
    perm = np.random.default_rng(G).permutation(len(side))
    E, side, pair = E[perm], side[perm], pair[perm]
    out = reciprocal_rank_reward(*as_tensors(E, side, pair), num_generations=G)
    loop = loop_reference(E, side, pair, G)
    np.testing.assert_allclose(out.reward.numpy(), loop["rr"], atol=1e-12, rtol=0)
    main = ume_r1_retrieval_reward(*as_tensors(E, side, pair), num_generations=G)
    for key in ("rank", "gap", "pos_sim", "neg_sim", "has_negative"):  # same diagnostics as the main reward
        assert torch.equal(getattr(out, key), getattr(main, key))


def test_reciprocal_rank_with_one_rollout_is_the_classic_reciprocal_rank():
    E, side, pair = paired_pool(6, 1, seed=4)
    out = reciprocal_rank_reward(*as_tensors(E, side, pair), num_generations=1)
    S = E[side == 0] @ E[side == 1].T  # queries x targets, pair order
    ranks = 1 + (S > np.diag(S)[:, None]).sum(1)  # position of the true target (no ties in random data)
    np.testing.assert_allclose(out.reward[torch.tensor(side == 0)].numpy(), 1.0 / ranks, atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------------------------- format reward

UME_R1_PATTERN = r"<think>.*?</think>.*?\s*<answer>.*?\s*<gen_emb>"  # qwen_module.py format_reward_embed, verbatim


def test_format_reward_is_ume_r1_regex():
    import re

    from mm_embed_trl.data.templates import UME_R1_FORMAT as UME_R1_FORMAT_PATTERN

    assert UME_R1_FORMAT_PATTERN.pattern == UME_R1_PATTERN and UME_R1_FORMAT_PATTERN.flags & re.DOTALL
    cases = {
        "<think>a red\ncircle</think><answer>circle</answer><gen_emb>": 1.0,
        "<think>x</think> summary <answer>\n circle \n<gen_emb><|im_end|>": 1.0,
        "prefix <think></think><answer><gen_emb>": 1.0,
        "<think>x</think><gen_emb>": 0.0,  # no answer
        "<answer>x</answer><think>x</think><gen_emb>": 0.0,  # wrong order
        "<think>x</think><answer>x</answer>": 0.0,  # no embedding token
        "<think>x<answer>x<gen_emb>": 0.0,  # unclosed think
        "": 0.0,
    }
    texts = list(cases)
    assert ume_r1_format_reward(texts) == list(cases.values())
    assert [1.0 if re.search(UME_R1_PATTERN, t, re.DOTALL) else 0.0 for t in texts] == list(cases.values())


def test_format_reward_accepts_trl_formats_and_signature():
    good, bad = "<think>.</think><answer>a<gen_emb>", "a<gen_emb>"
    conversational = [
        [{"role": "assistant", "content": good}],
        [{"role": "assistant", "content": bad}],
        [
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "<think>.</think>"},
                    {"type": "text", "text": "<answer>a<gen_emb>"},
                ],
            }
        ],
        # a tool turn between assistant turns is not the model's text
        [{"role": "assistant", "content": "<think>.</think>"}, {"role": "tool", "content": "<answer><gen_emb>"}],
    ]
    # TRL's call: f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=..., log_metric=...)
    rewards = ume_r1_format_reward(
        prompts=[[{"role": "user", "content": "q"}]] * 4,
        completions=conversational,
        completion_ids=[[1, 2]] * 4,
        side=[0, 0, 1, 1],
        trainer_state=None,
    )
    assert rewards == [1.0, 0.0, 1.0, 0.0]
    assert ume_r1_format_reward([good, bad]) == [1.0, 0.0]
    with pytest.raises(TypeError, match=r"completions\[1\] has type int"):
        ume_r1_format_reward([good, 3])


def test_doctests():
    for name in ("", ".retrieval", ".reciprocal_rank", ".format"):
        result = doctest.testmod(importlib.import_module(f"mm_embed_trl.rewards{name}"))
        assert result.attempted > 0 and result.failed == 0, name


def test_no_nan_in_a_normal_pool():
    E, side, pair = paired_pool(5, 2)
    out = ume_r1_retrieval_reward(*as_tensors(E, side, pair, dtype=torch.float32), num_generations=2)
    assert all(math.isfinite(v) for v in out.reward.tolist())
