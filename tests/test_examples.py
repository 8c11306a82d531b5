"""The hard-negative example end to end, unchanged, under `accelerate launch` with 2 processes (gloo on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import launching
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [
        [],
        # the shipped ZeRO-3 config, on DeepSpeed's CPU accelerator: sharded weights, GradCache, mixed
        # image/text chunks, evaluation on every rank, gathered save and export
        ["--config_file", str(ROOT / "recipes" / "accelerate" / "zero3.yaml"), "--mixed_precision", "no"],
    ],
    ids=["ddp", "zero3"],
)
def test_train_hardneg_example_under_accelerate_with_two_processes(tmp_path, launcher):
    if "--config_file" in launcher:
        pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    log = launching.run(
        ROOT / "examples" / "train_hardneg.py",
        "--output_dir", out, "--num_train_epochs", 1, "--generated_train_size", 128, "--generated_eval_size", 32,
        "--per_device_train_batch_size", 16, "--gradient_cache_chunk_size", 8,
        processes=2, launcher="accelerate", launcher_args=launcher, cwd=tmp_path,
    ).output
    assert "built-in tiny random qwen2_vl backbone" in log and "generated shapes dataset" in log
    engine = "DeepSpeed ZeRO-3" if "--config_file" in launcher else "MULTI_CPU"
    assert f"Training with {engine} on 2 process(es)" in log
    # negatives came from both ranks: 2 x 16 targets minus the positive
    assert "'num_valid_negatives': '31'" in log
    report = json.loads((out / "retrieval_report.json").read_text())
    assert set(report) == {"before", "after"} and "heldout_mrr" in report["after"]

    import torch
    from numerics import TINY_FORWARD, assert_close, rounding_rtol
    from sentence_transformers import SentenceTransformer

    from mm_embed_trl import MultimodalEmbeddingModel

    model = MultimodalEmbeddingModel.from_pretrained(out)
    st = SentenceTransformer(str(out / "sentence_transformers"))
    texts = ["a red circle on the left", "two blue squares"]
    assert_close(torch.as_tensor(st.encode_query(texts)), model.encode(texts), rtol=rounding_rtol(**TINY_FORWARD))
    assert "unime" in (out / "README.md").read_text().lower()


def test_recipes_say_how_to_launch_them_with_shipped_launchers():
    """A recipe that sets GradCache names an accelerate config that exists (every shipped one runs GradCache)."""
    import re

    import yaml

    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        text = recipe.read_text()
        values = yaml.safe_load(text) or {}
        launchers = re.findall(r"--config_file\s+(\S+)", text)
        if values.get("gradient_cache_chunk_size"):
            assert launchers, f"{recipe.name}: say how to launch it"
            missing = [launcher for launcher in launchers if not (ROOT / launcher).is_file()]
            assert not missing, f"{recipe.name} launches with missing configs {missing}"


@pytest.mark.slow
def test_train_sft_reasoning_example_under_accelerate_with_two_processes(tmp_path):
    """UME-R1 SFT end to end on 2 gloo processes (GradCache): disc/gen/oracle report, model + both ST exports."""
    out = tmp_path / "run"
    log = launching.run(
        ROOT / "examples" / "train_sft_reasoning.py",
        "--output_dir", out, "--num_train_epochs", 1, "--generated_train_size", 64, "--generated_eval_size", 16,
        "--per_device_train_batch_size", 8, "--gradient_cache_chunk_size", 4, "--max_new_tokens", 12,
        processes=2, launcher="accelerate", cwd=tmp_path,
    ).output
    assert "Training with MULTI_CPU on 2 process(es)" in log
    report = json.loads((out / "retrieval_report.json").read_text())
    for key in ("heldout_disc_recall@1", "heldout_gen_recall@1", "heldout_oracle_recall@1", "heldout_format_rate"):
        assert key in report["after"] and key in report["before"], key

    import torch
    from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol
    from sentence_transformers import SentenceTransformer

    from mm_embed_trl import MultimodalEmbeddingModel

    model = MultimodalEmbeddingModel.from_pretrained(out)
    assert model.config.pooling_token == "<disc_emb>" and model.config.generative_pooling_token == "<gen_emb>"
    texts = ["a red circle on the left", "two blue squares"]
    st = SentenceTransformer(str(out / "sentence_transformers"))  # the discriminative export: no remote code
    assert_close(torch.as_tensor(st.encode_query(texts)), model.encode(texts), rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


@pytest.mark.slow
def test_train_grpo_example_under_accelerate_with_two_processes(tmp_path, tiny_backbone):
    """UME-R1 RL end to end on 2 gloo processes from an SFT-shaped start (tokens added): before/after report with
    disc, gen, oracle and format, then the model and both ST exports."""
    import torch

    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel

    start = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    EmbeddingSFTTrainer(model=start, args=EmbeddingSFTConfig(output_dir=str(tmp_path / "sft"), report_to="none"))
    start.save_pretrained(tmp_path / "sft-start")  # what the SFT stage leaves: <disc_emb>/<gen_emb> in the vocabulary
    out = tmp_path / "run"
    log = launching.run(
        ROOT / "examples" / "train_grpo.py",
        "--sft_output_dir", tmp_path / "sft-start", "--output_dir", out, "--max_steps", 2,
        "--generated_train_size", 32, "--generated_eval_size", 8, "--per_device_train_batch_size", 16,
        "--max_completion_length", 12, "--steps_per_generation", 1,
        processes=2, launcher="accelerate", cwd=tmp_path,
    ).output
    assert "Training with MULTI_CPU on 2 process(es)" in log and "RL from the tiny SFT model" in log
    report = json.loads((out / "retrieval_report.json").read_text())
    for key in ("heldout_disc_recall@1", "heldout_gen_recall@1", "heldout_oracle_recall@1", "heldout_format_rate"):
        assert key in report["after"] and key in report["before"], key
    saved = MultimodalEmbeddingModel.from_pretrained(out)
    assert not all(torch.equal(saved.state_dict()[k], v) for k, v in start.state_dict().items())  # it trained
    assert (out / "sentence_transformers" / "modules.json").is_file()
    assert (out / "sentence_transformers_generative" / "modules.json").is_file()


def test_hub_kernels_are_an_explicit_choice_of_every_example():
    from trl import ModelConfig, TrlParser

    from mm_embed_trl import HardNegContrastiveConfig
    from mm_embed_trl.scripts import EmbeddingScriptArguments, model_init_kwargs

    parser = TrlParser((EmbeddingScriptArguments, HardNegContrastiveConfig, ModelConfig))
    for argv, expected in (([], None), (["--use_hub_kernels", "true"], True)):
        script, _, model = parser.parse_args_and_config(["--output_dir", "/tmp/x", "--bf16", "false", *argv])
        assert model_init_kwargs(model, script).get("use_kernels") is expected


@pytest.mark.slow
def test_train_hardneg_example_streams_its_data_on_two_processes(tmp_path):
    """--streaming: each rank reads its own shard of the stream (dispatch_batches=False) and the loss sees both
    ranks' rows. The shards are unequal (33 rows: 17 and 16), 2 batches of 4 a step: after 2 steps rank 1 has run
    out where rank 0 still has a 1-row batch; its third step takes that batch and the first of its next pass, rank 1's
    the first two of its next pass (before, rank 0 trained a short accumulation window alone while rank 1 began its
    next pass, and the ranks' collectives no longer paired up: the run hung)."""
    out = tmp_path / "run"
    log = launching.run(
        ROOT / "examples" / "train_hardneg.py",
        "--output_dir", out, "--streaming", "true", "--max_steps", 3, "--generated_train_size", 33,
        "--generated_eval_size", 16, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2,
        "--evaluate_before_training", "false", "--logging_steps", 1, processes=2, launcher="accelerate", cwd=tmp_path,
        timeout=300,
    ).output
    assert "Training with MULTI_CPU on 2 process(es)" in log
    assert "'num_valid_negatives': '7'" in log  # 2 x 4 targets minus the positive: rows from both ranks
    assert log.count("'loss'") == 3
    assert (out / "sentence_transformers").is_dir()
