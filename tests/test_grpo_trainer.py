"""EmbeddingGRPOTrainer (UME-R1 stage 2) on stock TRL: the pinned private API, rollout embeddings and rewards against
an independent computation, the loss against UME-R1's objective, 1 vs 2 processes, bad input."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import launching
import pytest
import torch
from grpo_spies import capture_rewards
from numerics import TINY_IMAGE_BACKWARD, TINY_IMAGE_FORWARD, assert_close, assert_loss_close, rounding_rtol
from scripts import load_script

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.data.reasoning import format_reasoning
from mm_embed_trl.data.samplers import PairedRepeatSampler, flatten_pairs
from mm_embed_trl.losses import ume_r1_retrieval_reward
from mm_embed_trl.trainers.grpo_config import EmbeddingGRPOConfig
from mm_embed_trl.trainers.grpo_trainer import OVERRIDDEN_TRL_METHODS, ROW_INPUT, EmbeddingGRPOTrainer

ROOT = Path(__file__).resolve().parents[1]
G = 2


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"), num_generations=G, per_device_train_batch_size=8, max_completion_length=16,
        max_steps=1, logging_steps=1, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False,
        beta=0.04, epsilon_high=0.28, loss_type="dr_grpo", save_strategy="no", learning_rate=1e-5, seed=0,
        reasoning_sensitivity_rows=2, disable_tqdm=True,
    )
    defaults.update(kw)
    return EmbeddingGRPOConfig(**defaults)


def _model(tiny_backbone):
    torch.manual_seed(0)
    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")


def _fixed_completions(trainer, missing_every: int = 0):
    """Stub TRL's generation with fixed completions that depend on the prompt (so pairs differ) and write <gen_emb>
    (all but every `missing_every`-th row)."""
    tok = trainer.processing_class.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        out = []
        for i, ids in enumerate(prompt_ids):
            rollout = i % G  # the rollouts of one group differ, so their rewards do
            word = ["red", "blue", "green", "dark", "light"][(sum(ids) + 2 * rollout) % 5]
            text = format_reasoning(f"a {word} thing" + " with more words" * rollout, word)
            if missing_every and i % missing_every == 0:
                text = text.replace("<gen_emb>", "")
            out.append(tok(text, add_special_tokens=False)["input_ids"] + [end])
        return out, None

    trainer._generate_single_turn = generate


# ------------------------------------------------------------------------------------------ pinned private API
def test_the_overridden_trl_methods_keep_their_signatures():
    """EmbeddingGRPOTrainer overrides private methods of trl.GRPOTrainer (setup.py pins trl 1.16.*): fail loudly, naming
    the method, when an upgrade changes what they take."""
    from trl import GRPOTrainer

    expected = {
        "_get_train_sampler": ["self", "dataset"],
        "_tokenize_prompts": ["self", "prompts"],
        "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
        "_generate_and_score_completions": ["self", "inputs"],
        "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                  "has_tool_images"],  # stubbed by these tests
        "_compute_loss": ["self", "model", "inputs"],
        "_get_per_token_logps_and_entropies": [
            "self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
            "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
            "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
        ],
        "_save_checkpoint": ["self", "model", "trial"],  # EmbeddingTrainerMixin stages it
    }
    assert set(OVERRIDDEN_TRL_METHODS) <= set(expected)
    for name, params in expected.items():
        got = list(inspect.signature(getattr(GRPOTrainer, name)).parameters)
        assert got == params, f"trl.GRPOTrainer.{name} now takes {got}; EmbeddingGRPOTrainer was written for {params}"


# --------------------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("world", [1, 2, 3])
def test_paired_sampler_groups_sides_and_keeps_pairs_in_one_generation_batch(world, shapes_data):
    flat = flatten_pairs(shapes_data["train"].select(range(24)))
    assert flat[0]["side"] == "query" and flat[1]["side"] == "target" and flat[0]["pair_id"] == flat[1]["pair_id"]
    generation_batch = 2 * G * 2 * world  # 2 pairs per rank per generation
    sampler = PairedRepeatSampler(flat, G, generation_batch, repeat_count=2, shuffle=True, seed=1)
    order = list(sampler)
    assert len(order) == len(sampler)
    assert list(PairedRepeatSampler(flat, G, generation_batch, repeat_count=2, shuffle=True, seed=1)) == order
    for start in range(0, len(order), 2 * generation_batch):  # each generation batch, yielded twice
        batch = order[start : start + generation_batch]
        assert order[start + generation_batch : start + 2 * generation_batch] == batch
        pairs = set()
        for g in range(0, generation_batch, G):  # every advantage group: G copies of one side of one pair
            group = batch[g : g + G]
            assert len(set(group)) == 1
            pairs.add(group[0] // 2)
        for pair in pairs:  # both sides of every pair, in this batch only
            assert batch.count(2 * pair) == G and batch.count(2 * pair + 1) == G
        # TRL's sharding: rank p gets the p-th contiguous slice; together the slices are the batch
        slices = [batch[p * len(batch) // world : (p + 1) * len(batch) // world] for p in range(world)]
        assert sum(slices, []) == batch
    with pytest.raises(ValueError, match="multiple of 2 x num_generations"):
        PairedRepeatSampler(flat, 3, 8)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        PairedRepeatSampler(flat, G, 2 * G)


def test_flattened_rows_hash_their_own_input_so_shared_queries_and_targets_are_not_negatives():
    """Each flattened row's content_id hashes that row's own input (query text + image, or target text + image), as
    retrieval_pool's duplicate mask expects: a pair sharing its query with another is not that pair's target
    rollouts' negative (it was: both rows carried the target's hash), and one sharing its target is not the query
    rollouts' negative."""
    import datasets

    from mm_embed_trl.rewards import retrieval_pool

    pairs = datasets.Dataset.from_dict({
        "qry": ["a red circle", "a red circle", "two blue stars", "a green cross"],  # pairs 0 and 1: one query
        "qry_image_path": ["", "", "", ""],
        "pos_text": ["red", "round", "red", "green"],  # pairs 0 and 2: one target
        "pos_image_path": ["", "", "", ""],
    })
    flat = flatten_pairs(pairs)
    content = dict(zip(zip(flat["pair_id"], flat["side"]), flat["content_id"]))
    assert content[0, "query"] == content[1, "query"] != content[2, "query"]
    assert content[0, "target"] == content[2, "target"] != content[1, "target"]
    assert content[0, "query"] != content[0, "target"]
    side = torch.tensor([0 if s == "query" else 1 for s in flat["side"]])
    pool = retrieval_pool(torch.randn(len(flat), 8, generator=torch.Generator().manual_seed(0)), side,
                          torch.tensor(flat["pair_id"]), 1, content_ids=torch.tensor(flat["content_id"]))
    row = {key: i for i, key in enumerate(zip(flat["pair_id"], flat["side"]))}
    negatives_of = {key: {k for k, j in row.items() if pool.negative[i, j]} for key, i in row.items()}
    # pair 1 asks pair 0's query (its target is another answer to it), pair 2 has pair 0's target (its query is
    # another match for it): neither is a negative of pair 0, on either side; pair 3 shares nothing
    assert negatives_of[0, "query"] == {(3, "target")} and negatives_of[0, "target"] == {(3, "query")}
    assert negatives_of[1, "target"] == {(2, "query"), (3, "query")}
    assert negatives_of[3, "query"] == {(0, "target"), (1, "target"), (2, "target")}


def test_pairs_whose_images_are_a_datasets_image_column_roll_out_their_own_pixels(
    tiny_backbone, shapes_data, tmp_path
):
    """Images embedded in the dataset (a `datasets.Image` column, as a hub dataset holds them) reach the rollouts as
    their own pixels (flattening wrote the {"bytes", "path"} dicts into a string column and crashed), and images
    that datasets stored under one base name are still different inputs (their identity was the name)."""
    import datasets

    from mm_embed_trl.data.images import image_identity, load_image

    train = shapes_data["train"]
    rows = train.select([i for i, path in enumerate(train["qry_image_path"]) if path][:8])
    root = Path(shapes_data.image_root)
    embedded = rows.cast_column("qry_image_path", datasets.Value("string")).map(
        lambda row: {"qry_image_path": {"bytes": (root / row["qry_image_path"]).read_bytes(), "path": "image.png"}},
        features=datasets.Features({**rows.features, "qry_image_path": datasets.Image()}),
    )
    flat = flatten_pairs(embedded)
    queries = [row for row in flat if row["side"] == "query"]
    assert len({image_identity(row["image"]) for row in queries}) == len({row["qry_image_path"] for row in rows})
    trainer = EmbeddingGRPOTrainer(model=_model(tiny_backbone), args=_config(tmp_path, image_root=str(root)),
                                   train_dataset=embedded)
    _fixed_completions(trainer)
    captured = capture_rewards(trainer)
    trainer.train()
    import numpy as np

    for row in captured["inputs"]:
        if row["side"] == "query":
            pixels = np.asarray(row[ROW_INPUT].images[0])
            want = np.asarray(load_image(root / rows[row["pair_id"]]["qry_image_path"]))
            assert np.array_equal(pixels, want), row["pair_id"]
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


# ------------------------------------------------------------------------------- rollout embeddings and rewards
def test_rewards_are_the_retrieval_reward_of_independently_computed_rollout_embeddings(
    tiny_backbone, shapes_data, tmp_path
):
    model = _model(tiny_backbone)
    # learning rate 0: the step leaves the weights as they were when the rewards were computed
    config = _config(tmp_path, image_root=str(shapes_data.image_root), learning_rate=0.0)
    trainer = EmbeddingGRPOTrainer(model=model, args=config, train_dataset=shapes_data["train"].select(range(8)))
    _fixed_completions(trainer, missing_every=7)
    captured = capture_rewards(trainer)
    trainer.train()
    inputs, completions, rewards = captured["inputs"], captured["completions"], captured["rewards"]
    # the reference embeddings: our model's forward per row, prompt built from the row by the collator's template
    from PIL import Image

    from mm_embed_trl.data.images import load_image
    from mm_embed_trl.data.reasoning import append_completions
    from mm_embed_trl.data.schema import EmbeddingInput
    from mm_embed_trl.modeling.pooling import TokenPooling

    model.eval()
    tok = model.processor.tokenizer
    gen_id = tok.convert_tokens_to_ids("<gen_emb>")
    # a model no SFT run trained gets UME-R1's inputs: its prompt, a 28x28 white image before text-only sides
    assert trainer.template.name == model.config.prompt_template == "ume_r1_blank_image"
    assert any(not row["image"] for row in inputs) and all(len(row[ROW_INPUT].images) == 1 for row in inputs)
    collator = model.make_collator(template="ume_r1")
    reference, found = [], []
    with torch.no_grad():
        for row, completion in zip(inputs, completions):
            image = load_image(row["image"], str(shapes_data.image_root)) or Image.new("RGB", (28, 28), "white")
            prompt = collator.encode_inputs([EmbeddingInput(row["text"], image)], side=row["side"])
            batch = append_completions(prompt, [completion], tok.pad_token_id)
            out = model(**batch, pool_tokens={"gen": TokenPooling(gen_id, "completion")})
            reference.append(out.named_embeddings["gen"][0])
            found.append(bool(out.named_token_found["gen"][0]))
    reference = torch.stack(reference)
    side = torch.tensor([0 if r["side"] == "query" else 1 for r in inputs])
    pair = torch.tensor([r["pair_id"] for r in inputs])
    content = torch.tensor([r["content_id"] for r in inputs])
    want = ume_r1_retrieval_reward(reference, side, pair, G, content_ids=content, pool_id=torch.zeros_like(side))
    assert not all(found) and any(found)  # the missing-token rows took the last-token fallback
    # one float32 reduction chain through the tiny model, then similarities of 64 features
    assert_close(rewards[:, trainer._retrieval_column], want.reward, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    assert rewards[:, 0].tolist() == [float(f) for f in found]  # the format reward: 1 exactly where <gen_emb> is
    logged = trainer.state.log_history[0]
    for key in ("retrieval/query/rank", "retrieval/target/gap", "gen_emb_found_rate/query",
                "diagnostics/group_self_similarity", "diagnostics/reasoning_shift"):
        assert key in logged, key
    assert logged["gen_emb_found_rate/query"] < 1.0


def _loss_and_grad_against_ume_r1(trainer, tok, *, on_policy_kl_only: bool = False):
    """On a fixed buffer of query and target rollouts: (TRL's loss, its gradient on the LM head) and (UME-R1's loss,
    its gradient): UME-R1 sums each side's clipped policy term plus beta * k3 KL over the tokens, divides by
    max_completion_length and averages the sides (grpo_trainer.py L929-972). ``on_policy_kl_only``: old log-probs
    equal to the policy's and zero advantages, so only the KL term is left."""
    g = torch.Generator().manual_seed(0)
    rows, prompt_len, completion_len = 8, 6, 5
    prompt_ids = torch.randint(0, 1000, (rows, prompt_len), generator=g)
    completion_ids = torch.randint(0, 1000, (rows, completion_len), generator=g)
    completion_mask = torch.ones(rows, completion_len, dtype=torch.long)
    completion_mask[1, 3:] = 0
    completion_mask[6, 2:] = 0
    policy = trainer.model
    head = policy.lm_head.weight

    def logps_of_policy():
        logits = policy(input_ids=torch.cat([prompt_ids, completion_ids], 1)).logits[:, prompt_len - 1 : -1].float()
        return torch.log_softmax(logits, -1).gather(-1, completion_ids[..., None]).squeeze(-1)

    with torch.no_grad():
        logps = logps_of_policy()
    old = logps + 0.3 * torch.randn(rows, completion_len, generator=g)  # some ratios fall outside the clip range
    ref = logps + 0.2 * torch.randn(rows, completion_len, generator=g)
    advantages = torch.randn(rows, generator=g)
    if on_policy_kl_only:
        old, advantages = logps.clone(), torch.zeros(rows)
    inputs = {
        "prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
        "ref_per_token_logps": ref, "num_items_in_batch": completion_mask.sum(),
    }
    policy.train()
    trainer.current_gradient_accumulation_steps = 1
    policy.zero_grad()
    loss = trainer._compute_loss(policy, inputs)
    loss.backward()
    trl = (loss.detach(), head.grad.clone())
    beta, max_len = trainer.args.beta, trainer.args.max_completion_length

    def side_loss(r, logps):  # UME-R1, transcribed
        coef_1 = torch.exp(logps[r] - old[r])
        coef_2 = torch.clamp(coef_1, 1 - 0.2, 1 + 0.28)
        per_token = -torch.min(coef_1 * advantages[r, None], coef_2 * advantages[r, None])
        kl = torch.exp(ref[r] - logps[r]) - (ref[r] - logps[r]) - 1
        per_token = per_token + beta * kl
        return ((per_token * completion_mask[r]).sum(1) / max_len).mean()

    policy.zero_grad()
    logps = logps_of_policy()
    query_rows, target_rows = torch.arange(0, rows, 2), torch.arange(1, rows, 2)  # half of each, as in the sampler
    expected = (side_loss(query_rows, logps) + side_loss(target_rows, logps)) / 2
    expected.backward()
    return trl, (expected.detach(), head.grad.clone())


def test_loss_matches_ume_r1s_objective_on_a_fixed_buffer(tiny_backbone, shapes_data, tmp_path):
    """TRL's dr_grpo loss (beta 0.04, eps 0.2 / 0.28) with use_bias_correction_kl=False (UME-R1's preset) equals
    UME-R1's objective in value and gradient; TRL's default (the KL times the differentiable importance ratio)
    moves the gradient, even where the ratio is 1, which is why the preset and the recipe turn it off."""
    model = _model(tiny_backbone)
    args = _config(tmp_path, image_root=str(shapes_data.image_root), use_bias_correction_kl=False)
    trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(8)))
    tok = trainer.processing_class.tokenizer
    (loss, grad), (want_loss, want_grad) = _loss_and_grad_against_ume_r1(trainer, tok)
    # the vocabulary-wide log-softmax after the tiny model's forward; the gradient runs it back (x 3)
    assert_loss_close(loss, want_loss, rtol=rounding_rtol(terms=len(tok), depth=2 * 8 + 3))
    assert_close(grad, want_grad, rtol=rounding_rtol(terms=len(tok), depth=3 * (2 * 8 + 3)))
    # the KL term alone, on-policy (every importance ratio is 1): UME-R1's gradient without the correction...
    (_, kl_grad), (_, want_kl_grad) = _loss_and_grad_against_ume_r1(trainer, tok, on_policy_kl_only=True)
    assert_close(kl_grad, want_kl_grad, rtol=rounding_rtol(terms=len(tok), depth=3 * (2 * 8 + 3)))
    trainer.args.use_bias_correction_kl = True  # ...and TRL's default moves it by far more than rounding
    (_, corrected), _ = _loss_and_grad_against_ume_r1(trainer, tok, on_policy_kl_only=True)
    assert (corrected - want_kl_grad).norm() > 0.05 * want_kl_grad.norm()


# ----------------------------------------------------------------------------------------------------- bad input
def test_bad_configurations_and_data_are_clear_errors(tiny_backbone, shapes_data, tmp_path):
    with pytest.raises(ValueError, match="multiple of 2 x num_generations"):
        _config(tmp_path, per_device_train_batch_size=6)  # G=2: 6 rows cannot hold whole pairs of 2 x 2
    with pytest.raises(ValueError, match="retrieval_pool"):
        _config(tmp_path, retrieval_pool="everything")
    model = _model(tiny_backbone)
    args = _config(tmp_path, image_root=str(shapes_data.image_root))
    with pytest.raises(ValueError, match="lacks"):
        EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select_columns(
            ["qry", "qry_image_path"]))
    with pytest.raises(ValueError, match="at least 2"):
        EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(1)))
    with pytest.raises(ValueError, match="does not take tools"):
        EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"], tools=[print])
    base = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises(ValueError, match="generative MultimodalEmbeddingModel"):
        EmbeddingGRPOTrainer(model=base, args=args, train_dataset=shapes_data["train"])


@pytest.mark.parametrize(
    "option, value, least",
    [("num_generations", 0, 2), ("num_generations", 1, 2), ("num_generations", -2, 2),
     ("num_generations_eval", 0, 1), ("num_generations_eval", -2, 1)],
)
def test_too_few_generations_are_refused_naming_the_option(option, value, least, tmp_path):
    """--num_generations 0 failed inside TRL with a ZeroDivisionError."""
    with pytest.raises(ValueError, match=rf"{option}={value}.*at least {least}"):
        _config(tmp_path, **{option: value})


def test_rows_are_checked_for_what_grpo_uses(tmp_path):
    """GRPO uses no explicit negatives; the examples checked rows as if it did and refused negatives that differ in
    number. The config's row_contract is what the trainer and the examples check."""
    import datasets

    from mm_embed_trl.data.validation import check_training_rows

    rows = [{"qry": f"q{i}", "pos_text": f"t{i}", "neg_text": ["n"] * (i % 3)} for i in range(8)]
    assert len(check_training_rows(datasets.Dataset.from_list(rows), **_config(tmp_path).row_contract)) == 8


def test_the_run_ends_with_the_model_both_sentence_transformers_exports_and_a_card(
    tiny_backbone, shapes_data, instruct_generation_config, generation_settings, tmp_path
):
    """save_for_inference after RL: the trained policy inside its MultimodalEmbeddingModel (pooling tokens and the
    backbone's generation config kept), the discriminative ST export (no remote code) and the generative one
    (trust_remote_code) reproducing encode."""
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    model = _model(tiny_backbone)
    model.backbone.generation_config = instruct_generation_config(model.processor.tokenizer)
    expected = generation_settings(model)
    args = _config(tmp_path, beta=0.0, learning_rate=1e-3, image_root=str(shapes_data.image_root), max_steps=2)
    trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(16)))
    start = {k: v.clone() for k, v in model.state_dict().items()}  # after the trainer added UME-R1's tokens
    _fixed_completions(trainer)
    trainer.train()
    out = Path(trainer.save_for_inference())
    saved = MultimodalEmbeddingModel.from_pretrained(out)
    assert saved.config.generative_pooling_token == "<gen_emb>" and saved.config.pooling_token == "<disc_emb>"
    assert generation_settings(saved) == expected
    trained = saved.state_dict()
    # the RL update, not the start, was saved
    assert any(not torch.equal(trained[k], start[k]) for k in start if ".language_model.layers." in k)
    for name, value in trainer.embedding_model.state_dict().items():
        assert torch.equal(trained[name], value), name
    texts = ["a red circle on the left", "two blue squares"]
    rtol = rounding_rtol(**TINY_IMAGE_FORWARD)
    disc = SentenceTransformer(str(out / "sentence_transformers"))
    white = Image.new("RGB", (28, 28), "white")  # UME-R1's template: sentence-transformers is given its blank image
    assert_close(torch.as_tensor(disc.encode_query([{"text": t, "image": white} for t in texts])), saved.encode(texts),
                 rtol=rtol)
    gen = SentenceTransformer(str(out / "sentence_transformers_generative"), trust_remote_code=True)
    want = saved.encode(texts, mode="generative", max_new_tokens=16)  # the run's max_completion_length
    assert_close(torch.as_tensor(gen.encode_query(texts)), want, rtol=rtol)
    assert "2511.00405" in (out / "README.md").read_text()
    # a fresh run into this output_dir would mix two runs: refused, unless overwrite_output_dir
    rows = shapes_data["train"].select(range(8))
    again = EmbeddingGRPOTrainer(model=_model(tiny_backbone), args=args, train_dataset=rows)
    with pytest.raises(FileExistsError, match="holds another run"):
        again.train()


# UME-R1's RL run (README; grpo_trainer.py L494-503, L1056-1077): 64 GPUs x 2 rollouts of each side per GPU, G = 8,
# GA 2, a new generation and retrieval pool every micro-step.
UME_R1_GPUS, UME_R1_ROLLOUTS_PER_SIDE, UME_R1_G, UME_R1_GA = 64, 2, 8, 2


def _pairs_per_pool_and_step(args, processes: int) -> tuple[float, float]:
    """(pairs in one retrieval pool, pairs per optimizer step) of a config run on `processes` (a row is one side's
    rollout: a pair is 2 x G rows)."""
    rows_per_micro_step = args.per_device_train_batch_size * processes
    pool_rows = rows_per_micro_step * (1 if args.retrieval_pool == "micro_step" else args.steps_per_generation)
    pair_rows = 2 * args.num_generations
    return pool_rows / pair_rows, rows_per_micro_step * args.gradient_accumulation_steps / pair_rows


def test_ume_r1_preset_holds_the_papers_settings(tmp_path):
    ume_r1_pool = UME_R1_GPUS * UME_R1_ROLLOUTS_PER_SIDE / UME_R1_G  # its sampler repeats each pair G times
    assert (ume_r1_pool, ume_r1_pool * UME_R1_GA) == (16, 32)
    for processes in (1, 8, 16):  # (this machine runs 1: 64 would leave 4 rows per generation, under one pair)
        args = EmbeddingGRPOConfig.ume_r1(processes, output_dir=str(tmp_path), use_cpu=True, bf16=False)
        assert (args.num_generations, args.temperature, args.beta, args.epsilon, args.epsilon_high) == (
            8, 1.0, 0.04, 0.2, 0.28)
        assert (args.learning_rate, args.max_completion_length, args.loss_type) == (1e-6, 2048, "dr_grpo")
        assert args.steps_per_generation == 1 and args.retrieval_pool == "micro_step"
        assert (args.top_k, args.use_bias_correction_kl, args.lr_scheduler_type, args.shuffle_dataset) == (
            50, False, "linear", False)
        assert _pairs_per_pool_and_step(args, processes) == (ume_r1_pool, ume_r1_pool * UME_R1_GA)
    with pytest.raises(ValueError, match="does not split over 6 processes"):
        EmbeddingGRPOConfig.ume_r1(6, output_dir=str(tmp_path), use_cpu=True)


def test_rollouts_sample_as_ume_r1_whatever_the_policys_generation_config(
    tiny_backbone, shapes_data, instruct_generation_config, tmp_path
):
    """The generation TRL runs for the rollouts samples at the preset's temperature 1 and top_k 50 (UME-R1's, under
    transformers 4.49) even from a policy whose saved generation config is Qwen2-VL-Instruct's greedy-like one:
    what generate() resolves from TRL's config and the policy's."""
    model = _model(tiny_backbone)
    model.backbone.generation_config = instruct_generation_config(model.processor.tokenizer)
    preset = EmbeddingGRPOConfig.ume_r1(output_dir=str(tmp_path), use_cpu=True)
    args = _config(tmp_path, temperature=preset.temperature, top_k=preset.top_k, top_p=preset.top_p,
                   image_root=str(shapes_data.image_root))
    trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(8)))
    resolved, _ = trainer.model._prepare_generation_config(trainer.generation_config)
    assert (resolved.do_sample, resolved.temperature, resolved.top_k, resolved.top_p) == (True, 1.0, 50, 1.0)
    assert resolved.repetition_penalty == 1.0 and resolved.typical_p in (None, 1.0)


GRPO_STEP = ROOT / "tests" / "dist_scripts" / "grpo_step.py"


def _grpo_step(tmp_path, name, *options, processes=1, check=True):
    """Run tests/dist_scripts/grpo_step.py (1 process, or `processes` under torchrun); its saved results, or the
    finished process when `check` is False."""
    finished = launching.run(GRPO_STEP, tmp_path / f"{name}.pt", *options, processes=processes, check=check)
    if not check:
        return finished
    return torch.load(tmp_path / f"{name}.pt")


def _assert_same_step(one, two):
    """Rewards, advantages and loss of two runs of one GRPO step; returns the gain the rounding of the rewards goes
    through (for comparing what the gradients do)."""
    forward = rounding_rtol(**TINY_IMAGE_FORWARD)
    assert_close(two["rewards"], one["rewards"], rtol=forward)
    # advantages divide by each group's reward std (+ 1e-4): rounding of the rewards is amplified by 1 / that
    group_std = one["rewards"].nansum(dim=1).view(-1, G).std(dim=1)
    gain = 1.0 / (float(group_std.min()) + 1e-4)
    assert_close(two["advantages"], one["advantages"], rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=gain))
    assert_loss_close(two["loss"], one["loss"], rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=gain))
    return gain


@pytest.mark.slow
def test_two_processes_equal_one_process_on_fixed_completions(tmp_path):
    """2 gloo processes x 8 rollouts == 1 process x 16 on the same (stubbed) completions: the reward table (embedded
    and scored over every rank; next to a length reward that makes every group's rewards differ), the advantages, the
    loss and the update of every parameter."""
    one, two = _grpo_step(tmp_path, "single"), _grpo_step(tmp_path, "ddp", processes=2)
    assert one["world"] == 1 and two["world"] == 2
    gain = _assert_same_step(one, two)
    assert one["updates"].keys() == two["updates"].keys()
    # The policy gradient sum_i A_i grad log p_i cancels within each group (advantages sum to 0), so a tensor with a
    # small net gradient holds mostly rounding of large terms: compare the update of all parameters as ONE vector,
    # against its largest entry (still failing for a wrong scale of the loss or a missing rank's share).
    names = sorted(one["updates"])
    backward = rounding_rtol(**TINY_IMAGE_BACKWARD, gain=gain)
    assert_close(torch.cat([two["updates"][n].flatten() for n in names]),
                 torch.cat([one["updates"][n].flatten() for n in names]), rtol=backward)
    assert any(one["updates"][n].abs().max() > 0 for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp"])
def test_lora_sharded_saves_the_merged_model_of_the_single_process_run(tmp_path, engine):
    """A LoRA policy under DeepSpeed ZeRO-3 (its CPU accelerator) or FSDP2, on 2 processes: the adapters live in
    sharded modules, so the final save gathers them unmerged and merges them from that complete copy (this used to
    raise NotImplementedError). Same fixed completions as one process with LoRA: the same rewards, advantages and
    loss, and the saved models are plain (merged) ones whose weights moved alike. A ZeRO-3 config whose weights
    cannot be gathered on save is refused before training, not after it."""
    if engine == "zero3":
        pytest.importorskip("deepspeed")
    sharding = ["--stage", "3"] if engine == "zero3" else ["--fsdp"]
    one = _grpo_step(tmp_path, "single", "--lora", "--save", str(tmp_path / "single"))
    two = _grpo_step(tmp_path, engine, "--lora", *sharding, "--save", str(tmp_path / engine), processes=2)
    gain = _assert_same_step(one, two)
    # The weights before the step, by their merged names (LoRA's B starts at zero: base weights are the model's).
    start = {k.replace(".base_layer", ""): v for k, v in one["start"].items() if "lora_" not in k}
    saved = {}
    for name in ("single", engine):
        model = MultimodalEmbeddingModel.from_pretrained(tmp_path / name)
        assert not model.has_lora and model.config.lora_config is None
        saved[name] = model.backbone.state_dict()
        assert saved[name].keys() == start.keys(), name
    adapted = ("q_proj", "v_proj", "down_proj")
    for key, before in start.items():
        if not any(f"{module}.weight" in key for module in adapted):  # frozen under LoRA: bit-identical
            assert torch.equal(saved["single"][key], before) and torch.equal(saved[engine][key], before), key
    names = [k for k in start if any(f"{module}.weight" in k for module in adapted) and "visual" not in k]
    assert len(names) == 6  # 3 projections x 2 decoder layers
    updates = {run: torch.cat([(saved[run][k] - start[k]).flatten() for k in names]) for run in saved}
    assert all(float((saved["single"][k] - start[k]).abs().max()) > 0 for k in names)  # every adapted matrix moved
    # as in the DDP test: all merged updates as one vector against its largest entry
    assert_close(updates[engine], updates["single"], rtol=rounding_rtol(**TINY_IMAGE_BACKWARD, gain=gain))
    if engine != "zero3":
        return
    refused = _grpo_step(tmp_path, "refused", "--lora", "--stage", "3", "--no_gather_on_save", processes=2,
                         check=False)
    log = refused.output
    assert refused.returncode != 0 and "stage3_gather_16bit_weights_on_model_save false" in log
    assert "train_runtime" not in log  # before training


@pytest.mark.slow
def test_full_policy_under_zero3_saves_the_model_of_the_single_process_run(tmp_path):
    """Without LoRA, under ZeRO-3 on 2 processes (vision tower trained, as UME-R1 does; beta 0.04, so TRL's reference
    model is built from the saved SFT start under zero.Init): the policy gathered and saved inside its
    MultimodalEmbeddingModel equals the 1-process run's, every weight's update as one vector; and the 1-process save
    holds exactly the weights it trained."""
    pytest.importorskip("deepspeed")
    one = _grpo_step(tmp_path, "single", "--save", str(tmp_path / "single"))
    two = _grpo_step(tmp_path, "zero3", "--stage", "3", "--save", str(tmp_path / "zero3"), processes=2)
    gain = _assert_same_step(one, two)
    start = one["start"]
    runs = ("single", "zero3")
    saved = {run: MultimodalEmbeddingModel.from_pretrained(tmp_path / run).backbone.state_dict() for run in runs}
    assert saved["single"].keys() == saved["zero3"].keys() == start.keys()
    for name, update in one["updates"].items():  # the policy's parameter names are the backbone's
        assert torch.equal(saved["single"][name] - start[name], update), name
    names = sorted(one["updates"])
    assert sum(bool(one["updates"][n].any()) for n in names) > len(names) // 2  # a full step moved most tensors
    updates = {run: torch.cat([(saved[run][n] - start[n]).flatten() for n in names]) for run in saved}
    assert_close(updates["zero3"], updates["single"], rtol=rounding_rtol(**TINY_IMAGE_BACKWARD, gain=gain))


def test_recipes_parse_with_trl_parser_and_hold_ume_r1s_settings(tmp_path):
    """The 2B recipe carries the preset's (UME-R1's) settings; the tiny recipe is the example's no-argument default."""

    import yaml
    from trl import ModelConfig, TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments

    preset = EmbeddingGRPOConfig.ume_r1(8, output_dir=str(tmp_path), use_cpu=True, bf16=False)
    keys = ("num_generations", "temperature", "top_k", "beta", "use_bias_correction_kl", "epsilon", "epsilon_high",
            "learning_rate", "lr_scheduler_type", "max_completion_length", "loss_type", "steps_per_generation",
            "gradient_accumulation_steps", "shuffle_dataset", "retrieval_pool")
    for name in ("grpo_qwen2vl_2b.yaml", "grpo_tiny_cpu.yaml"):
        parser = TrlParser((EmbeddingScriptArguments, EmbeddingGRPOConfig, ModelConfig))
        _, args, _ = parser.parse_args_and_config(
            ["--config", str(ROOT / "recipes" / name), "--output_dir", str(tmp_path), "--bf16", "false"]
        )
        assert args.output_dir == str(tmp_path)  # the command line overrides the recipe
        if "2b" in name:
            assert {k: getattr(args, k) for k in keys} == {k: getattr(preset, k) for k in keys}
            # the processes of the accelerate config its launch line names: UME-R1's 16-pair pool, 32 pairs a step
            launch = re.search(r"--config_file (\S+)", (ROOT / "recipes" / name).read_text()).group(1)
            processes = yaml.safe_load((ROOT / launch).read_text())["num_processes"]
            ume_r1_pool = UME_R1_GPUS * UME_R1_ROLLOUTS_PER_SIDE / UME_R1_G
            assert _pairs_per_pool_and_step(args, processes) == (ume_r1_pool, ume_r1_pool * UME_R1_GA) == (16, 32)
            assert args.per_device_train_batch_size == preset.per_device_train_batch_size
    example = load_script("examples/train_grpo.py")
    recipe = yaml.safe_load((ROOT / "recipes" / "grpo_tiny_cpu.yaml").read_text())
    assert {k: recipe[k] for k in example.TINY_DEFAULTS} == example.TINY_DEFAULTS


def test_text_only_backbone_forwards_run_the_vision_tower_under_sharding(tiny_backbone, shapes_data, tmp_path):
    """ZeRO-3/FSDP gather each module's weights collectively: a text-only rollout on one rank must still run the
    vision tower that another rank runs on images. With the hook, direct backbone calls (TRL's policy and reference
    forwards) run it on a blank image in prefill only; outputs are unchanged and the vision tower gets a zero grad."""
    model = _model(tiny_backbone)
    args = _config(tmp_path, beta=0.04, image_root=str(shapes_data.image_root))
    trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"])
    backbone = model.backbone
    calls = []
    backbone.model.visual.register_forward_hook(lambda *a: calls.append(1))
    enc = trainer.processing_class.tokenizer(["a red circle", "two blue squares"], return_tensors="pt", padding=True)
    before = backbone(**enc).logits
    assert calls == []
    trainer._run_vision_tower_everywhere()  # what __init__ does under DeepSpeed / FSDP
    # once on a blank image, and once more on a blank video where the backbone takes videos (Qwen2-VL does)
    towers = 1 + (model._blank_image.video_inputs is not None)
    after = backbone(**enc).logits
    assert len(calls) == towers
    assert torch.equal(after, before)  # + 0 * features
    after.sum().backward()
    grads = [p.grad for p in backbone.model.visual.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # an explicit zero gradient, as on image ranks
    calls.clear()
    backbone.generate(**enc, max_new_tokens=4, do_sample=False)
    assert len(calls) == towers  # the prefill, not each cached decoding step
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    calls.clear()
    reference.model.visual.register_forward_hook(lambda *a: calls.append(1))
    reference(**enc)
    assert len(calls) == towers


def test_freeze_vision_tower_keeps_the_vision_weights_through_rl(tiny_backbone, shapes_data, tmp_path):
    """freeze_vision_tower=True (the tiny demo's setting): the RL steps update the language model, never the vision
    encoder or projector; the default (UME-R1's) trains them too."""
    for freeze in (True, False):
        model = _model(tiny_backbone)
        args = _config(tmp_path / str(freeze), beta=0.0, learning_rate=1e-3, image_root=str(shapes_data.image_root),
                       freeze_vision_tower=freeze, max_steps=2)
        trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(16)))
        start = {k: v.clone() for k, v in model.state_dict().items()}  # after the trainer added UME-R1's tokens
        _fixed_completions(trainer)
        trainer.train()
        moved = {k for k, v in model.state_dict().items() if not torch.equal(v, start[k])}
        vision_moved = {k for k in moved if ".visual." in k}
        assert any(".language_model.layers." in k for k in moved)
        assert bool(vision_moved) is not freeze, sorted(vision_moved)[:3]


@pytest.mark.slow
def test_resuming_loads_the_policy_weights_of_the_checkpoint(tiny_backbone, shapes_data, tmp_path):
    """`save_pretrained` writes a Qwen2-VL policy's `model.language_model.*` as `model.*` (transformers 5's original
    format); Trainer's resume loaded that file with plain `load_state_dict`, matched nothing, and went on from the
    initial weights with only a warning. (The whole kill -9 resume through the CLI: test_resume_cli.)"""
    args = _config(tmp_path, beta=0.0, learning_rate=1e-3, image_root=str(shapes_data.image_root), max_steps=1,
                   save_strategy="steps", save_steps=1)
    trained = EmbeddingGRPOTrainer(model=_model(tiny_backbone), args=args,
                                   train_dataset=shapes_data["train"].select(range(16)))
    _fixed_completions(trained)
    trained.train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    resumed = EmbeddingGRPOTrainer(model=_model(tiny_backbone), args=args,
                                   train_dataset=shapes_data["train"].select(range(16)))
    start = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    resumed._load_from_checkpoint(str(checkpoint))
    want, got = trained.model.state_dict(), resumed.model.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert any(not torch.equal(start[k], want[k]) for k in want)  # the step moved the weights


def test_a_retrieval_reward_added_to_the_table_is_the_trainers_reward_column(tiny_backbone, shapes_data, tmp_path,
                                                                              monkeypatch):
    """A new retrieval reward is one entry of mm_embed_trl.rewards.RETRIEVAL_REWARDS: the config accepts its name and
    the trainer's reward column is its value on the pool."""
    from mm_embed_trl.rewards import RETRIEVAL_REWARDS, RetrievalRewardOutput

    def rank_only(*args, **kwargs):
        out = ume_r1_retrieval_reward(*args, **kwargs)
        return RetrievalRewardOutput(out.rank, out.rank, out.gap, out.pos_sim, out.neg_sim, out.has_negative)

    monkeypatch.setitem(RETRIEVAL_REWARDS, "rank_only", rank_only)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), retrieval_reward="rank_only")
    trainer = EmbeddingGRPOTrainer(model=_model(tiny_backbone), args=config,
                                   train_dataset=shapes_data["train"].select(range(8)))
    reward = trainer.reward_funcs[trainer._retrieval_column]
    assert reward.reward is rank_only and reward.__name__ == "retrieval_rank_only"
    _fixed_completions(trainer)
    captured = capture_rewards(trainer)
    trainer.train()
    column = captured["rewards"][:, trainer._retrieval_column]
    assert set(column.tolist()) <= {0.0, 0.5, 1.0}  # ranks of G = 2 positives
    assert "retrieval/query/rank" in trainer.state.log_history[0]
