"""kill -9 mid-run, then `--resume_from_checkpoint last` through the example's CLI: the resumed run ends with the
same weights as a run that was never interrupted (the UniME examples and GRPO; 1 and 2 processes).

Before the fix the examples accepted `--resume_from_checkpoint` and ignored it: the "resumed" run started at step 0
and overwrote the checkpoints. The kill lands right after the first checkpoint is published, while the run is still
training (asserted), so the resumed run must restore weights, optimizer, scheduler, RNG and data position.

GRPO diverged after the resume point for two reasons: Trainer loaded the policy's checkpoint with plain
`load_state_dict`, which matched none of the names `save_pretrained` had written (transformers 5 saves a Qwen2-VL's
`model.language_model.*` as `model.*`), so the run went on from its initial weights; and a checkpoint between two
generations (here step 4 of generations every 3 steps) lost TRL's buffer of completions, which the resumed run
generated anew with other weights.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import launching
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
    # a mixture of three generated sources (1:1:2, a global batch of 8 from one source): an epoch of 6 steps, so the
    # kill lands mid-epoch and the resumed run crosses two epochs
    "hardneg_mixture": [
        "--config", ROOT / "recipes" / "hardneg_mixture_tiny_cpu.yaml", "--generated_train_size", "16",
        "--generated_eval_size", "8", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
        "--num_hard_negatives", "3",
    ],
    # a generation every 3 steps: checkpoint-4 falls between two; 4 pairs x 2 sides x 2 rollouts per step
    "grpo": [
        "--generated_train_size", "64", "--generated_eval_size", "8", "--per_device_train_batch_size", "8",
        "--num_generations", "2", "--steps_per_generation", "3", "--max_completion_length", "8",
        "--learning_rate", "1e-3",
    ],
}


def _launch(example: str, nproc: int, output_dir: Path, *extra) -> dict:
    """The example's script, arguments and launcher, as `launching.run` / `launching.spawn` take them."""
    args = [
        *EXAMPLES[example], "--output_dir", output_dir, "--max_steps", MAX_STEPS, "--save_steps", SAVE_STEPS,
        "--save_strategy", "steps", "--evaluate_before_training", "false", "--save_sentence_transformers", "false",
        "--logging_steps", 1, *extra,
    ]
    launcher = "accelerate" if nproc > 1 else "python"
    script = ROOT / "examples" / f"train_{example.split('_')[0]}.py"  # hardneg_mixture: train_hardneg.py
    return {"script": script, "args": args, "processes": nproc, "launcher": launcher}


def _run(launch: dict, cwd) -> str:
    return launching.run(launch["script"], *launch["args"], processes=launch["processes"],
                         launcher=launch["launcher"], cwd=cwd).output


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


@pytest.mark.slow
# Both examples and both process counts, without their full product (each case is three runs, ~50 s): the resume path
# is the trainers' shared mixin, and the 2-process case is the one that needs the whole process tree killed.
@pytest.mark.parametrize(
    ("example", "nproc"), [("hardneg", 2), ("distill", 1), ("grpo", 1), ("hardneg_mixture", 2)]
)
def test_kill_9_then_resume_last_reaches_the_uninterrupted_weights(example, nproc, tmp_path, tiny_backbone):
    import torch

    # GRPO starts from the SFT stage's output: the tiny backbone stands in for it
    start = ["--sft_output_dir", tiny_backbone("qwen2_vl")] if example == "grpo" else []
    _run(_launch(example, nproc, tmp_path / "full", *start), tmp_path)

    run_dir = tmp_path / "interrupted"
    launch = _launch(example, nproc, run_dir, *start)
    proc = launching.spawn(
        launch["script"], *launch["args"], processes=nproc, launcher=launch["launcher"], cwd=tmp_path,
        stdout=subprocess.DEVNULL,
    )
    first = run_dir / f"checkpoint-{SAVE_STEPS}"  # published by rename: present means complete
    deadline = time.monotonic() + 300
    while not first.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    still_training = proc.poll() is None
    launching.kill_tree(proc)  # the launcher and every rank, mid-run
    _, err = proc.communicate()
    assert first.is_dir(), err[-4000:]
    assert still_training, "the run finished before it could be killed: raise MAX_STEPS"
    assert not (run_dir / "model.safetensors").exists()

    log = _run(_launch(example, nproc, run_dir, *start, "--resume_from_checkpoint", "last"), tmp_path)
    assert "Resuming from" in log and "checkpoint-" in log
    full, resumed = _weights(tmp_path / "full"), _weights(run_dir)
    assert full.keys() == resumed.keys()
    for name in full:
        # the same computations in the same order: bit-identical (a restart at step 0 differs everywhere)
        assert torch.equal(resumed[name], full[name]), name
