"""Multi-node training, simulated on localhost: each "machine" is its own `accelerate launch` (`--num_machines 2
--machine_rank r`, one rendezvous port), as a cluster runs one per node (`recipes/slurm/train.sbatch`).

Two machines train to exactly the weights of one machine with the same processes and global batch; when a machine
dies (killed: its peers see the connection reset) or freezes (stopped: nothing tells its peers), the other ends
with a non-zero exit status, within `--ddp_timeout`, instead of hanging; a machine that never joins is given up
after the rendezvous timeout. The SLURM script, run with stand-ins for `srun` and `scontrol`, starts one launch per
node that meet in one process group.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import launching
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "recipes" / "accelerate"
HARDNEG = ROOT / "examples" / "train_hardneg.py"
# The hard-negative example on its built-in tiny backbone and generated data: 2 processes x 8 rows, no evaluation
# before training and no sentence-transformers export (the weights are what is compared).
TINY_RUN = [
    "--generated_train_size", 64, "--generated_eval_size", 8, "--max_eval_samples", 8,
    "--per_device_train_batch_size", 8, "--evaluate_before_training", "false", "--save_sentence_transformers", "false",
    "--logging_steps", 1, "--disable_tqdm", "true",
]
# Small enough to keep the frozen-machine case short; large enough for rank 0's set-up (data generation) while the
# other ranks wait in a barrier under the same timeout, with room for a loaded CI machine (15 s passed here on a busy
# 2-core box).
DDP_TIMEOUT = 30
# A CPU box: the configs' bf16 off (as tests/test_examples.py does with zero3.yaml).
CPU = ["--mixed_precision", "no"]
MACHINE_KEYS = {"num_machines", "num_processes", "machine_rank", "main_process_ip", "main_process_port"}


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


@pytest.mark.parametrize(
    ("single", "multi"), [("ddp.yaml", "multi_node_ddp.yaml"), ("zero3.yaml", "multi_node_zero3.yaml")]
)
def test_multi_node_configs_are_the_single_node_ones_plus_the_machine_keys(single, multi):
    one, many = (yaml.safe_load((ACCELERATE / name).read_text()) for name in (single, multi))
    many_ds = many.pop("deepspeed_config", None)
    if many_ds is not None:  # the launcher that runs from every node, as srun does
        assert many_ds.pop("deepspeed_multinode_launcher") == "standard"
        assert many_ds == one.pop("deepspeed_config")
    assert {k: v for k, v in many.items() if k not in MACHINE_KEYS} == {
        k: v for k, v in one.items() if k not in MACHINE_KEYS
    }
    assert many["num_machines"] > 1 and many["num_processes"] % many["num_machines"] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("single", "multi", "engine"),
    [
        ("ddp.yaml", "multi_node_ddp.yaml", "MULTI_CPU"),
        # DeepSpeed's standard multi-node launcher (torchrun on every machine), on its CPU accelerator
        ("zero3.yaml", "multi_node_zero3.yaml", "DeepSpeed ZeRO-3"),
    ],
    ids=["ddp", "zero3"],
)
def test_two_machines_train_to_the_weights_of_one_machine(tmp_path, single, multi, engine):
    if engine.startswith("DeepSpeed"):
        pytest.importorskip("deepspeed")
    # A cache of this test's own: the first run builds the tiny backbone under its engine (under ZeRO-3 the main
    # process built it alone inside deepspeed.zero.Init, whose collectives the waiting ranks never joined: a hang).
    env = launching.launch_env(MM_EMBED_TRL_CACHE=str(tmp_path / "cache"))
    run = [HARDNEG, *TINY_RUN, "--max_steps", 4]
    launching.run(
        *run, "--output_dir", tmp_path / "one", processes=2, launcher="accelerate", env=env, cwd=tmp_path,
        launcher_args=["--config_file", ACCELERATE / single, *CPU], timeout=300,
    )
    machines = launching.run_machines(
        *run, "--output_dir", tmp_path / "two", machines=2, processes=2, env=env, cwd=tmp_path, timeout=300,
        launcher_args=["--config_file", ACCELERATE / multi, *CPU],
    )
    log = machines[0].output
    assert f"Training with {engine} on 2 process(es)" in log
    assert "'num_valid_negatives': '15'" in log  # each row's negatives came from both machines: 2 x 8 targets - 1
    one, two = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert one.keys() == two.keys()
    for name in one:
        # the same ranks compute the same sums in the same order (gloo over TCP either way): only where the
        # processes run differs, so the weights are bit-identical
        assert torch.equal(one[name], two[name]), name


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victim", "sig"),
    [(1, signal.SIGKILL), (0, signal.SIGKILL), (1, signal.SIGSTOP)],
    ids=["machine-1-killed", "machine-0-killed", "machine-1-frozen"],
)
def test_when_a_machine_dies_the_other_ends_within_the_timeout(tmp_path, tiny_backbone, victim, sig):
    tiny_backbone("qwen2_vl")  # built before the launch: the set-up then waits on no more than data generation
    run_dir = tmp_path / "run"
    machines = launching.spawn_machines(
        HARDNEG, *TINY_RUN, "--max_steps", 1000, "--save_strategy", "steps", "--save_steps", 2,
        "--ddp_timeout", DDP_TIMEOUT, "--output_dir", run_dir, machines=2, processes=2, cwd=tmp_path,
        launcher_args=["--config_file", ACCELERATE / "multi_node_ddp.yaml", *CPU], stdout=subprocess.DEVNULL,
    )
    survivor = machines[1 - victim]
    try:
        first = run_dir / "checkpoint-2"  # published by rename: present means both machines are training
        deadline = time.monotonic() + 240
        while not first.is_dir() and all(m.poll() is None for m in machines) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.is_dir() and all(m.poll() is None for m in machines), "the run did not reach step 2"
        launching.kill_tree(machines[victim], sig)
        hit = time.monotonic()
        try:
            _, err = survivor.communicate(timeout=DDP_TIMEOUT + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"machine {1 - victim} still runs {DDP_TIMEOUT + 60} s after machine {victim} stopped")
        took = time.monotonic() - hit
    finally:
        for machine in machines:
            launching.kill_tree(machine)
            machine.communicate()
    assert survivor.returncode != 0, err[-4000:]
    assert not (run_dir / "model.safetensors").exists()  # no final save from half a job
    if sig == signal.SIGSTOP:
        # a frozen machine keeps its connections open: only the collective timeout ends the wait. gloo words it
        # after the operation that waited ("Timed out waiting ... for recv operation"), or, for the operation that
        # shares the timed-out pair (under load: the backward's all-reduce), "Application timeout caused pair closure"
        assert re.search(r"Timed out|Application timeout caused pair closure", err), err[-4000:]
        assert DDP_TIMEOUT - 2 < took < DDP_TIMEOUT + 45, (took, err[-4000:])
    else:
        assert took < 45, (took, err[-4000:])  # the peer's connection reset fails the next collective at once


@pytest.mark.slow
def test_a_machine_that_never_joins_is_given_up_after_the_rendezvous_timeout(tmp_path):
    launch = launching.command(
        ROOT / "tests" / "dist_scripts" / "roll_call.py", processes=2, launcher="accelerate",
        launcher_args=["--num_machines", 2, "--machine_rank", 0, "--main_process_ip", "127.0.0.1",
                       "--rdzv_conf", "timeout=5"],
    )
    finished = launching.run_command(launch, cwd=tmp_path, timeout=120, check=False, launcher="accelerate")
    assert not finished.timed_out and finished.returncode != 0, finished.describe()
    assert "waiting for clients. 1/2 clients joined" in finished.output, finished.describe()
    assert finished.seconds < 60, finished.describe()


SRUN = """#!/bin/bash
# srun on one machine: the command once per node of the allocation, all at once, SLURM_NODEID set
while [[ $1 == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
"""
SCONTROL = """#!/bin/bash
# scontrol show hostnames: every node is this machine
for ((node = 0; node < SLURM_NNODES; node++)); do echo 127.0.0.1; done
"""


@pytest.mark.slow
def test_slurm_script_starts_one_launch_per_node_that_meet(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = launching.launch_env(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_NNODES="2",
        SLURM_JOB_ID="4321", SLURM_JOB_NODELIST="node[1-2]", GPUS_PER_NODE="1", RDZV_TIMEOUT="60",
        MASTER_PORT=str(launching.free_port()),
    )
    finished = launching.run_command(
        ["bash", ROOT / "recipes" / "slurm" / "train.sbatch", ROOT / "tests" / "dist_scripts" / "roll_call.py"],
        env=env, cwd=ROOT, timeout=180, launcher="sbatch", processes=2,
    )
    log = finished.output
    assert "2 nodes x 1 processes, rendezvous at 127.0.0.1:" in log
    for rank in (0, 1):  # machine rank = SLURM_NODEID, one process each, one group of 2 (0 + 1 = 1)
        assert f"rank {rank} of 2 on machine {rank}, local rank 0: sum 1" in log, finished.describe()
