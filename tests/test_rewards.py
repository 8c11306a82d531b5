"""The rewards wing: the name table that the GRPO config and trainer read, the retrieval reward as a TRL reward
function, one missing-token vocabulary, UME-R1's SFT loss in named parts, and the deprecated paths in losses/."""

from __future__ import annotations

import doctest
import importlib
import sys
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

from mm_embed_trl.losses import UmeR1SFTLoss, hard_negative_infonce_loss
from mm_embed_trl.modeling.generative import MISSING_TOKEN_POLICIES, CompletionEmbeddings, apply_missing_token_policy
from mm_embed_trl.rewards import RETRIEVAL_REWARDS, RolloutRetrievalReward, ume_r1_retrieval_reward

G = 2


def _pool(pairs: int = 3):
    """Local rows of one rank: both sides of each pair, G rollouts each, and a completion per row."""
    columns = {"side": [], "pair_id": [], "content_id": [], "text": []}
    completions = []
    for pair in range(pairs):
        for side in ("query", "target"):
            for rollout in range(G):
                columns["side"].append(side)
                columns["pair_id"].append(pair)
                columns["content_id"].append(10 * pair + (side == "target"))
                columns["text"].append(f"{side} {pair}")
                completions.append([pair, rollout, int(side == "target")])
    return columns, completions


def _embed_by_ids(columns, completion_ids):
    """A stand-in for the policy: one fixed vector per completion (a function of its ids), all found."""
    rows = [torch.Generator().manual_seed(hash(tuple(c)) % 2**31) for c in completion_ids]
    vectors = torch.stack([torch.randn(8, generator=g) for g in rows])
    return F.normalize(vectors, dim=-1), torch.ones(len(completion_ids), dtype=torch.bool)


def test_rollout_retrieval_reward_scores_the_embedded_pool_and_logs_through_trl():
    columns, completions = _pool()
    logged = {}
    reward = RolloutRetrievalReward(
        "ume_r1", RETRIEVAL_REWARDS["ume_r1"], _embed_by_ids, num_generations=G, pool_rows=len(completions),
        empty_reasoning=lambda ids: [[*c, 99] for c in ids], sensitivity_rows=2,
    )
    got = reward(prompts=[None] * len(completions), completions=[""] * len(completions), completion_ids=completions,
                 log_metric=lambda name, value: logged.setdefault(name, value), trainer_state=None, **columns)
    embeddings, _ = _embed_by_ids(columns, completions)
    side = torch.tensor([int(s == "target") for s in columns["side"]])
    want = ume_r1_retrieval_reward(embeddings, side, torch.tensor(columns["pair_id"]), G,
                                   content_ids=torch.tensor(columns["content_id"]))
    assert reward.__name__ == "retrieval_ume_r1"  # TRL's name of the reward column
    assert got == want.reward.tolist()
    assert logged["retrieval/query/rank"] == pytest.approx(want.rank[side == 0].mean().item())
    assert logged["gen_emb_found_rate/target"] == 1.0
    assert {"diagnostics/group_self_similarity", "diagnostics/reasoning_shift"} <= logged.keys()
    assert logged["diagnostics/reasoning_shift"] > 0  # other ids, other vectors


def test_the_grpo_config_reads_the_reward_table(monkeypatch):
    from mm_embed_trl.trainers.grpo_config import EmbeddingGRPOConfig

    choices = {f.name: f.metadata.get("choices") for f in fields(EmbeddingGRPOConfig)}
    assert choices["retrieval_reward"] == [*RETRIEVAL_REWARDS, "none"]
    assert choices["missing_gen_token"] == list(MISSING_TOKEN_POLICIES)
    common = dict(output_dir="unused", num_generations=2, per_device_train_batch_size=8, use_cpu=True,
                  report_to="none")
    with pytest.raises(ValueError, match="retrieval_reward must be one of"):
        EmbeddingGRPOConfig(retrieval_reward="toy", **common)
    monkeypatch.setitem(RETRIEVAL_REWARDS, "toy", ume_r1_retrieval_reward)  # a new reward: one table entry
    assert EmbeddingGRPOConfig(retrieval_reward="toy", **common).retrieval_reward == "toy"


def test_one_missing_token_vocabulary():
    import mm_embed_trl.trainers.grpo_config as grpo_config

    assert grpo_config.MISSING_TOKEN_POLICIES is MISSING_TOKEN_POLICIES
    gen, disc = torch.ones(3, 2), torch.full((3, 2), 2.0)
    batch = CompletionEmbeddings(generative=gen, discriminative=disc, found=torch.tensor([True, False, True]))
    assert torch.equal(apply_missing_token_policy(batch, "last_token"), gen)
    assert apply_missing_token_policy(batch, "zero")[:, 0].tolist() == [1.0, 0.0, 1.0]
    assert apply_missing_token_policy(batch, "discriminative")[:, 0].tolist() == [1.0, 2.0, 1.0]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        apply_missing_token_policy(batch, "error")
    with pytest.raises(ValueError, match="is not one of"):
        apply_missing_token_policy(batch, "skip")


def test_ume_r1_sft_loss_is_the_weighted_sum_of_its_named_parts():
    g = torch.Generator().manual_seed(0)
    q_disc, t_disc, q_gen, t_gen = (F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(4))
    lm_q, lm_t = (torch.tensor(12.0), torch.tensor(4.0)), (torch.tensor(9.0), torch.tensor(0.0))
    loss_fn = UmeR1SFTLoss(temperature=0.05, disc_contrastive_weight=0.5, gen_contrastive_weight=2.0,
                           query_lm_weight=0.3, target_lm_weight=0.7, disc_gen_alignment_weight=0.1)
    parts = loss_fn(q_disc, t_disc, query_gen=q_gen, target_gen=t_gen, query_lm=lm_q, target_lm=lm_t,
                    output_dict=True)

    def infonce(q, t):
        return hard_negative_infonce_loss(q, t, temperature=0.05, margin=None, top_k=None, symmetric=True).loss

    assert torch.equal(parts["disc_contrastive_loss"], infonce(q_disc, t_disc))
    assert torch.equal(parts["gen_contrastive_loss"], infonce(q_gen, t_gen))
    assert torch.equal(parts["alignment_loss"], infonce(q_disc, t_gen))
    assert float(parts["query_lm_loss"]) == 3.0 and float(parts["target_lm_loss"]) == 9.0  # no tokens: the sum
    weighted = (0.5 * parts["disc_contrastive_loss"] + 2.0 * parts["gen_contrastive_loss"] + 0.3 * 3.0 + 0.7 * 9.0
                + 0.1 * parts["alignment_loss"])
    torch.testing.assert_close(parts["loss"], weighted)
    torch.testing.assert_close(loss_fn(q_disc, t_disc, query_gen=q_gen, target_gen=t_gen, query_lm=lm_q,
                                       target_lm=lm_t), parts["loss"])
    dume = loss_fn(q_disc, t_disc, output_dict=True)  # discriminative only: one term
    assert sorted(dume) == ["disc_accuracy", "disc_contrastive_loss", "loss"]
    result = doctest.testmod(importlib.import_module("mm_embed_trl.losses.ume_r1_sft"))
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("old, new", [("retrieval_reward", "retrieval"), ("reciprocal_rank", "reciprocal_rank"),
                                      ("format_reward", "format")])
def test_the_old_reward_paths_in_losses_still_work_and_warn(old, new, monkeypatch):
    monkeypatch.delitem(sys.modules, f"mm_embed_trl.losses.{old}", raising=False)
    with pytest.warns(DeprecationWarning, match=f"rewards.{new}"):
        module = importlib.import_module(f"mm_embed_trl.losses.{old}")
    current = importlib.import_module(f"mm_embed_trl.rewards.{new}")
    assert all(getattr(module, name) is getattr(current, name) for name in current.__all__)
    import mm_embed_trl.losses as losses

    with pytest.warns(DeprecationWarning, match="mm_embed_trl.rewards.ume_r1_retrieval_reward"):
        assert losses.ume_r1_retrieval_reward is ume_r1_retrieval_reward
