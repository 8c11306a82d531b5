"""DAPO's dynamic sampling (EmbeddingGRPOConfig.dynamic_sampling_rounds): groups whose rewards do not spread are
replaced by groups with a spread from extra generation batches, each row kept as it was scored."""

from __future__ import annotations

import pytest
import torch

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.data.reasoning import format_reasoning
from mm_embed_trl.trainers.dynamic_sampling import group_has_spread, select_rows
from mm_embed_trl.trainers.grpo_config import EmbeddingGRPOConfig
from mm_embed_trl.trainers.grpo_trainer import VISUAL_INPUTS, EmbeddingGRPOTrainer

G = 2


def test_group_spread_is_trls_zero_std_test():
    nan = float("nan")
    rewards = torch.tensor([
        [1.0, 0.5], [1.0, 0.5],     # equal rows: no spread
        [1.0, 0.5], [0.0, 0.5],     # the first function differs
        [1.0, 0.2], [1.0, 0.7],     # the second differs, but its weight is 0 below
        [nan, nan], [1.0, 0.5],     # an unscored row is left out: one scored row has no spread
        [nan, 0.5], [0.0, 0.5],     # NaN counts as 0 inside a scored row (nansum): equal
    ])
    assert group_has_spread(rewards, torch.tensor([1.0, 1.0]), 2).tolist() == [False, True, True, False, False]
    assert group_has_spread(rewards, torch.tensor([1.0, 0.0]), 2).tolist() == [False, True, False, False, False]


def test_selected_rows_keep_their_tokens_padding_and_images():
    def output(prompts, completions, images):
        """A TRL-style output from unpadded rows: prompts left-padded, completions right-padded with 0."""
        p, c = max(map(len, prompts)), max(map(len, completions))
        ids = torch.tensor([[0] * (p - len(x)) + x for x in prompts])
        comp = torch.tensor([x + [0] * (c - len(x)) for x in completions])
        types = torch.tensor([[0] * (p - len(x)) + [1] * len(x) for x in prompts])
        types = torch.cat([types, torch.zeros_like(comp)], dim=1)
        out = {"prompt_ids": ids, "prompt_mask": (ids != 0).long(), "completion_ids": comp,
               "completion_mask": (comp != 0).long(), "advantages": torch.arange(len(prompts), dtype=torch.float),
               "old_per_token_logps": comp.float() / 10, "mm_token_type_ids": types,
               "num_items_in_batch": torch.tensor(99)}
        if images:
            grids = [torch.tensor([[1, 1, n]]) for n in images if n]
            out.update(pixel_values=torch.cat([torch.full((n, 3), float(i)) for i, n in enumerate(images) if n]),
                       image_grid_thw=torch.cat(grids), num_images=[int(n > 0) for n in images])
        return out

    a = output([[5, 6], [7]], [[8, 9, 10], [11]], images=[2, 0])
    b = output([[1, 2, 3, 4]], [[12, 13]], images=None)  # a text-only round: no image keys at all
    got = select_rows([a, b], [(1, 0), (0, 0), (0, 1)], pad_token_id=0)
    assert got["prompt_ids"].tolist() == [[1, 2, 3, 4], [0, 0, 5, 6], [0, 0, 0, 7]]
    assert got["prompt_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1]]
    assert got["completion_ids"].tolist() == [[12, 13, 0], [8, 9, 10], [11, 0, 0]]
    assert got["completion_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    # per-token values are copied, padding is 0
    assert torch.equal(got["old_per_token_logps"], torch.tensor([[12, 13, 0], [8, 9, 10], [11, 0, 0]]).float() / 10)
    assert got["advantages"].tolist() == [0.0, 0.0, 1.0]
    # prompt part left-padded, completion part right-padded: still aligned with the ids
    assert got["mm_token_type_ids"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0, 0]]
    assert got["num_images"] == [0, 1, 0]
    assert got["pixel_values"].tolist() == [[0.0] * 3] * 2  # row 0 of `a`'s two patches, no others
    assert got["image_grid_thw"].tolist() == [[1, 1, 2]]
    assert got["num_items_in_batch"].item() == 99  # left to the caller


def _trainer(tiny_backbone, shapes_data, tmp_path, rounds, spread_sides=("target",)):
    """A trainer whose stubbed generation gives the G rollouts of a group identical completions (zero spread) on the
    sides not in `spread_sides`, and on the others completions whose format rewards differ."""
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    config = EmbeddingGRPOConfig(
        output_dir=str(tmp_path / "out"), num_generations=G, per_device_train_batch_size=8, max_completion_length=16,
        max_steps=1, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, beta=0.0,
        loss_type="dr_grpo", save_strategy="no", learning_rate=0.0, seed=0, reasoning_sensitivity_rows=0,
        disable_tqdm=True, image_root=str(shapes_data.image_root), dynamic_sampling_rounds=rounds,
    )
    trainer = EmbeddingGRPOTrainer(model=model, args=config, train_dataset=shapes_data["train"].select(range(24)))
    tok = trainer.processing_class.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out = []
        for i, ids in enumerate(prompt_ids):  # rows [q0 x G, t0 x G, q1 x G, ...]: side = group parity
            side = ("query", "target")[(i // G) % 2]
            word = ["red", "blue", "green", "dark", "light"][sum(ids) % 5]
            text = format_reasoning(f"a {word} thing", word)
            if side in spread_sides and i % G:  # its format reward (0) differs from the group's first rollout's (1)
                text = f"a {word} thing"
            out.append(tok(text, add_special_tokens=False)["input_ids"] + [end])
        return out, None

    trainer._generate_single_turn = generate
    rounds_seen = []
    score = trainer._score_rows

    def spy(inputs):
        rounds_seen.append(score(inputs))
        return rounds_seen[-1]

    trainer._score_rows = spy
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch, rounds_seen


def _row(output, i):
    """(prompt ids, completion ids, advantage) of one row without its padding."""
    prompt = output["prompt_ids"][i][output["prompt_mask"][i].bool()].tolist()
    completion = output["completion_ids"][i][output["completion_mask"][i].bool()].tolist()
    return prompt, completion, output["advantages"][i].item()


def test_zero_spread_groups_are_replaced_by_groups_of_a_new_generation_batch(tiny_backbone, shapes_data, tmp_path):
    trainer, batch, rounds = _trainer(tiny_backbone, shapes_data, tmp_path, rounds=3)
    got = trainer._generate_and_score_completions(batch)
    # 8 rows = 4 groups; each generation batch has 2 with a spread (the target sides): one extra round fills it
    assert len(rounds) == 2
    assert trainer._metrics["train"]["dynamic_sampling/rounds"] == [1.0]
    assert trainer._metrics["train"]["dynamic_sampling/kept_spread_fraction"] == [1.0]
    expected = [(k, i) for k in (0, 1) for i in (2, 3, 6, 7)]  # target groups of round 0, then of round 1
    assert [_row(got, j) for j in range(8)] == [_row(rounds[k], i) for k, i in expected]
    assert (got["advantages"].view(-1, G).abs().amax(dim=1) > 0.5).all()  # every kept group teaches something
    assert got["num_items_in_batch"].item() == got["completion_mask"].sum().item()
    # each row's images follow it
    for j, (k, i) in enumerate(expected):
        mine, source = got[VISUAL_INPUTS][j], rounds[k][VISUAL_INPUTS][i]
        assert (mine is None) == (source is None)
        assert mine is None or (mine.keys() == source.keys() and all(torch.equal(mine[x], source[x]) for x in mine))
    # and TRL's own loss runs on the rebuilt batch
    trainer.current_gradient_accumulation_steps = 1
    assert torch.isfinite(trainer._compute_loss(trainer.model, got))


def test_when_the_rounds_run_out_zero_spread_groups_of_the_first_batch_fill_it(tiny_backbone, shapes_data, tmp_path):
    trainer, batch, rounds = _trainer(tiny_backbone, shapes_data, tmp_path, rounds=2, spread_sides=())
    got = trainer._generate_and_score_completions(batch)
    assert len(rounds) == 3  # the first batch and 2 extra rounds, none with a spread
    assert trainer._metrics["train"]["dynamic_sampling/kept_spread_fraction"] == [0.0]
    assert [_row(got, j) for j in range(8)] == [_row(rounds[0], i) for i in range(8)]


def test_off_by_default_and_bad_settings_are_clear_errors(tiny_backbone, shapes_data, tmp_path):
    trainer, batch, rounds = _trainer(tiny_backbone, shapes_data, tmp_path, rounds=0)
    got = trainer._generate_and_score_completions(batch)
    assert len(rounds) == 1 and got is rounds[0] and "dynamic_sampling/rounds" not in trainer._metrics["train"]
    with pytest.raises(ValueError, match="dynamic_sampling_rounds must be >= 0"):
        EmbeddingGRPOConfig(output_dir=str(tmp_path), dynamic_sampling_rounds=-1)
    with pytest.raises(ValueError, match="whole pairs on every rank"):
        EmbeddingGRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=6,
                            steps_per_generation=2, dynamic_sampling_rounds=1)
    with pytest.raises(ValueError, match="sum_then_normalize"):
        EmbeddingGRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=8,
                            multi_objective_aggregation="normalize_then_sum", dynamic_sampling_rounds=1)
