"""GradCache under DeepSpeed, on DeepSpeed's CPU accelerator with 2 gloo processes.

ZeRO-1 with GradCache (one engine.backward per chunk, accumulation boundary held open until the last) must give
the same update as the non-cached step; ZeRO-2, whose gradients were measured to differ, must be refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "deepspeed_gradcache_step.py"


def _run(tmp_path, name, *extra):
    out = tmp_path / f"{name}.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), str(out), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


@pytest.mark.slow
def test_zero1_gradcache_equals_the_plain_step(tmp_path):
    results = {}
    for name, extra in (("plain", []), ("gradcache", ["--chunk", "3"])):
        proc, out = _run(tmp_path, name, "--stage", "1", *extra)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        results[name] = torch.load(out)
    plain, cached = results["plain"], results["gradcache"]
    assert cached["loss"] == pytest.approx(plain["loss"], abs=1e-5)
    for key, value in plain["params"].items():
        torch.testing.assert_close(cached["params"][key], value, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_zero2_gradcache_is_refused(tmp_path):
    proc, _ = _run(tmp_path, "zero2", "--stage", "2", "--chunk", "3")
    assert proc.returncode != 0
    assert "under DeepSpeed ZeRO-2 is not supported" in proc.stdout + proc.stderr
