"""benchmarks/gpu_qwen2vl_2b.py: its CPU smoke mode runs every measurement, and its port of UME-R1's evaluation loop
reads the state UME-R1 reads."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/gpu_qwen2vl_2b.py")


def test_eval_twomode_index_rule(bench):
    # UME-R1 eval_twomode.py: the state that fed the token after the last <gen_emb> (generate's hidden_states[j+1]
    # holds the step that took token j as input); -1 (the last step) when the token is absent or ends the output
    gen = 7
    assert bench._gen_embedding_idx([[1, gen, 2, 3, 4]], gen) == [2]
    assert bench._gen_embedding_idx([[gen, 1, gen, 2, 3]], gen) == [3]  # the last occurrence
    assert bench._gen_embedding_idx([[1, 2, gen, 3], [1, 2, 3, gen], [1, 2, 3]], gen) == [-1, -1, -1]


def test_smoke_mode_measures_everything(bench, tiny_backbone, tmp_path):
    report = bench.main(["--smoke", "--out", str(tmp_path)])
    work = bench.WORKLOADS["smoke"]
    assert (tmp_path / "gpu_qwen2vl_2b.json").is_file()
    for key in ("sft", "sft_grad_cache", "grpo"):
        assert report[key]["step_s"] > 0 and report[key]["peak_gib"] > 0
    assert report["sft_grad_cache"]["grad_cache_chunk"] == work["grad_cache_chunk"]
    grpo = report["grpo"]
    assert grpo["rollouts"] == 2 * work["num_generations"] * work["grpo_pairs"]
    assert grpo["completion_tokens"] == work["max_completion_length"]  # forced to full length
    assert 0 < grpo["generation_share"] < 1 and math.isfinite(grpo["rollout_tokens_per_s"])
    encode = report["encode"]
    assert encode["ours"]["dim"] == encode["eval_twomode"]["dim"] == 64  # the tiny backbone's width
    assert encode["ours"]["inputs_per_s"] > 0 and encode["eval_twomode"]["inputs_per_s"] > 0
    assert "GradCache on/off" in bench.table(report)
