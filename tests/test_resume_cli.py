"""kill -9 mid-run, then `--resume_from_checkpoint last` through the example's CLI: the resumed run ends with the
same weights as a run that was never interrupted (both examples; 1 and 2 processes).

Before the fix the examples accepted `--resume_from_checkpoint` and ignored it: the "resumed" run started at step 0
and overwrote the checkpoints. The kill lands right after the first checkpoint is published, while the run is still
training (asserted), so the resumed run must restore weights, optimizer, scheduler, RNG and data position.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 16, 4

EXAMPLES = {
    # small data, no before/after evaluation cost beyond one pass: only the weights are compared
    "hardneg": [
        "--generated_train_size", "128", "--generated_eval_size", "16", "--per_device_train_batch_size", "8",
    ],
    "distill": [
        "--generated_train_size", "256", "--generated_eval_size", "16", "--per_device_train_batch_size", "8",
    ],
}


def _command(example: str, nproc: int, output_dir: Path, port: int, extra=()) -> list[str]:
    script = str(ROOT / "examples" / f"train_{example}.py")
    launcher = [sys.executable]
    if nproc > 1:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                    "--main_process_port", str(port)]
    return [
        *launcher, script, *EXAMPLES[example], "--output_dir", str(output_dir), "--max_steps", str(MAX_STEPS),
        "--save_steps", str(SAVE_STEPS), "--save_strategy", "steps", "--evaluate_before_training", "false",
        "--save_sentence_transformers", "false", "--logging_steps", "1", *extra,
    ]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _run(cmd, env, cwd):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


@pytest.mark.slow
# Both examples and both process counts, without their full product (each case is three runs, ~50 s): the resume path
# is the trainers' shared mixin, and the 2-process case is the one that needs the whole process tree killed.
@pytest.mark.parametrize(("example", "nproc"), [("hardneg", 2), ("distill", 1)])
def test_kill_9_then_resume_last_reaches_the_uninterrupted_weights(example, nproc, tmp_path):
    import torch

    port = 29550 + 2 * list(EXAMPLES).index(example) + nproc
    env = _env()
    _run(_command(example, nproc, tmp_path / "full", port), env, tmp_path)

    run_dir = tmp_path / "interrupted"
    proc = subprocess.Popen(
        _command(example, nproc, run_dir, port), env=env, cwd=tmp_path, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    first = run_dir / f"checkpoint-{SAVE_STEPS}"  # published by rename: present means complete
    deadline = time.monotonic() + 300
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    still_training = proc.poll() is None
    # the launcher and every rank, mid-run (torch's elastic agent starts the ranks in their own process groups)
    for process in [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert first.is_dir(), err[-4000:]
    assert still_training, "the run finished before it could be killed: raise MAX_STEPS"
    assert not (run_dir / "model.safetensors").exists()

    log = _run(_command(example, nproc, run_dir, port, ["--resume_from_checkpoint", "last"]), env, tmp_path)
    assert "Resuming from" in log and "checkpoint-" in log
    full, resumed = _weights(tmp_path / "full"), _weights(run_dir)
    assert full.keys() == resumed.keys()
    for name in full:
        # the same computations in the same order: bit-identical (a restart at step 0 differs everywhere)
        assert torch.equal(resumed[name], full[name]), name
