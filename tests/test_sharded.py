"""GradCache and mixed-modality batches under DeepSpeed ZeRO-1/2/3 (on DeepSpeed's CPU accelerator) and FSDP2, with
2 gloo processes.

Reference: the plain (non-cached) step under ZeRO-1. Every ZeRO stage and FSDP2, with and without GradCache, must
reach the same parameters after one optimizer step. accelerate enables FSDP only on accelerators, so the script
switches it on for CPU (FSDP2 itself runs there). Chunks of 3 rows of the generated data mix image and text-only
queries, so ranks run text-only chunks while the other runs images: without the blank-image forward ZeRO-3 hangs
and without coalesced reduction ZeRO-2's gradients are wrong (both measured before the fixes). The `_videos` cases
turn a third of the image queries into videos, so a chunk may hold a video, images or neither (the text-only-rank
rule for videos under ZeRO-3 and FSDP2).
"""

from __future__ import annotations

from pathlib import Path

import launching
import pytest
import torch
from numerics import TINY_IMAGE_BACKWARD, TINY_IMAGE_FORWARD, assert_close, assert_loss_close, rounding_rtol

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "sharded_step.py"


def _run(tmp_path, name, *extra, check=True):
    out = tmp_path / f"{name}.pt"
    return launching.run(SCRIPT, out, *extra, processes=2, timeout=300, check=check), out


def _result(tmp_path, name, *extra):
    _, out = _run(tmp_path, name, *extra)
    return torch.load(out)


@pytest.fixture(scope="module")
def plain_zero1(tmp_path_factory):
    return _result(tmp_path_factory.mktemp("plain"), "plain", "--stage", "1")


@pytest.fixture(scope="module")
def plain_zero1_videos(tmp_path_factory):
    return _result(tmp_path_factory.mktemp("plain_videos"), "plain_videos", "--stage", "1", "--videos")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,extra",
    [
        ("zero1_gradcache", ["--stage", "1", "--chunk", "3"]),
        ("zero2_gradcache", ["--stage", "2", "--chunk", "3"]),
        ("zero3_gradcache", ["--stage", "3", "--chunk", "3"]),
        ("zero3_plain", ["--stage", "3"]),
        ("fsdp_plain", ["--fsdp"]),
        ("fsdp_gradcache", ["--fsdp", "--chunk", "3"]),
        # an older DeepSpeed: one engine.backward per chunk with the accumulation boundary held open
        ("zero1_gradcache_without_coalesce", ["--stage", "1", "--chunk", "3", "--without_coalesce"]),
        # video queries beside image and text-only ones: chunks and ranks differ in which vision inputs they hold
        ("zero3_gradcache_videos", ["--stage", "3", "--chunk", "3", "--videos"]),
        ("fsdp_gradcache_videos", ["--fsdp", "--chunk", "3", "--videos"]),
    ],
)
def test_step_equals_the_plain_zero1_step(tmp_path, request, name, extra):
    plain_zero1 = request.getfixturevalue("plain_zero1_videos" if "--videos" in extra else "plain_zero1")
    result = _result(tmp_path, name, *extra)
    assert result["engine"] == ("fsdp" if "--fsdp" in extra else "deepspeed")
    # The same step computed another way (chunks, shards): rounding only. The script's AdamW step with eps=1 moves
    # each weight by ~lr x its gradient, so the updates compare like the gradients (temperature 0.05).
    assert_loss_close(result["loss"], plain_zero1["loss"], rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / 0.05))
    grad_rtol = rounding_rtol(**TINY_IMAGE_BACKWARD, gain=1 / 0.05)
    for key, value in plain_zero1["params"].items():
        assert result["params"][key].shape == value.shape, key  # gathered, not a ZeRO-3 shard
        start = plain_zero1["initial"][key]
        assert torch.equal(result["initial"][key], start), key
        assert_close(result["params"][key] - start, value - start, rtol=grad_rtol, msg=key)


@pytest.mark.slow
def test_zero2_gradcache_without_coalescing_is_refused(tmp_path):
    finished, _ = _run(tmp_path, "refused", "--stage", "2", "--chunk", "3", "--without_coalesce", check=False)
    assert finished.returncode != 0
    assert "needs DeepSpeed's `engine.coalesce_grad_reduction`" in finished.output
