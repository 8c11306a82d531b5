"""One run per run folder: a second run into the same `--output_dir` is refused while the first holds it (from its
claim to its final publish), with an error naming the other run; a dead holder's lock is taken over.

Before the lock, two runs started at once into one `--output_dir` both exited 0 and printed "Saved to", sharing
fixed staging paths: the folder ended without config.json/weights, or with one run's model among the other's
checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path

import launching
import pytest

from mm_embed_trl._files import (
    RunFolderLock,
    RunFolderLockedError,
    _process_start,
    hold_run_folder,
    run_folder_lock_path,
)

ROOT = Path(__file__).resolve().parents[1]


def _plant(folder: Path, *, host: str | None = None, pid: int | None = None, pid_started=None, age: float = 0.0):
    """Write the lock of `folder` as another run would have (its record, its heartbeat `age` seconds ago)."""
    pid = os.getppid() if pid is None else pid  # the process that started the tests: alive throughout
    record = {
        "host": host or socket.gethostname(), "pid": pid,
        "pid_started": _process_start(pid) if pid_started is None else pid_started,
        "started": "2026-01-01 00:00:00 UTC", "command": "train_hardneg.py --output_dir elsewhere", "token": "theirs",
    }
    path = run_folder_lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid  # reaped: no process has it (pids are not reused this fast)


def test_a_live_holder_on_this_host_is_refused_by_name(tmp_path):
    path = _plant(tmp_path / "run")
    before = path.read_bytes()
    with pytest.raises(RunFolderLockedError, match=rf"'{tmp_path / 'run'}' is in use by another run: pid "
                       rf"{os.getppid()} on host '{socket.gethostname()}', started 2026-01-01 .*train_hardneg.py"):
        hold_run_folder(tmp_path / "run")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.lock"]  # no temporary file left


@pytest.mark.parametrize(
    ("holder", "reason"),
    [
        ({"pid": "dead"}, r"its pid \d+ is gone"),
        ({"pid_started": 1.0}, r"now belongs to a process started later"),  # a recycled pid
        ({"host": "other-host", "age": 700}, r"no heartbeat from host 'other-host' for 70\d s"),
    ],
    ids=["pid gone", "pid recycled", "other host, no heartbeat"],
)
def test_a_dead_runs_lock_is_taken_over_with_a_warning(holder, reason, tmp_path, caplog):
    if holder.get("pid") == "dead":
        holder = {**holder, "pid": _dead_pid()}
    path = _plant(tmp_path / "run", **holder)
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl._files"):
        hold = hold_run_folder(tmp_path / "run")
    try:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert any(r.levelno == logging.WARNING and "run that is gone" in r.message for r in caplog.records)
        assert any(__import__("re").search(reason, r.message) for r in caplog.records), caplog.text
    finally:
        hold.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # released: no lock, nothing moved aside left


def test_another_hosts_lock_with_a_recent_heartbeat_is_respected(tmp_path):
    _plant(tmp_path / "run", host="other-host", age=60)
    with pytest.raises(RunFolderLockedError, match=r"pid \d+ on host 'other-host'.*after 600 s without a heartbeat"):
        hold_run_folder(tmp_path / "run")
    path = _plant(tmp_path / "garbled", age=0)
    path.write_text("not a record")  # unreadable (another tool's): judged by its age alone
    with pytest.raises(RunFolderLockedError, match="a lock file this package cannot read"):
        hold_run_folder(tmp_path / "garbled")
    os.utime(path, (time.time() - 700, time.time() - 700))
    hold_run_folder(tmp_path / "garbled").release()


def test_holds_of_one_process_share_the_lock_and_the_last_release_frees_it(tmp_path):
    first = hold_run_folder(tmp_path / "run")
    second = hold_run_folder(tmp_path / "run")  # a second trainer of this process, same folder
    path = run_folder_lock_path(tmp_path / "run")
    assert second.lock is first.lock and path.exists()
    first.release()
    first.release()  # idempotent: does not drop the other hold
    assert path.exists()
    second.release()
    assert not path.exists()
    third = hold_run_folder(tmp_path / "run")  # free again
    third.release()


def test_a_lost_lock_is_noticed_before_publishing_and_not_removed(tmp_path):
    hold = hold_run_folder(tmp_path / "run")
    hold.check_held()
    path = _plant(tmp_path / "run", host="other-host")  # e.g. broken by another host after a long freeze
    with pytest.raises(RunFolderLockedError, match="lost its lock on .*nothing was published"):
        hold.check_held()
    hold.release()
    assert json.loads(path.read_text())["token"] == "theirs"  # the other run's lock stays


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    lock = RunFolderLock(tmp_path / "run", heartbeat=0.05)
    lock.acquire()
    try:
        os.utime(lock.path, (time.time() - 500, time.time() - 500))
        deadline = time.monotonic() + 10
        while time.time() - lock.path.stat().st_mtime > 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.time() - lock.path.stat().st_mtime < 100
    finally:
        lock.release()
    assert not lock.path.exists()


def test_a_trainer_refuses_a_busy_output_dir_before_any_work(tiny_backbone, shapes_data, tmp_path):
    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel

    out = tmp_path / "run"
    config = HardNegContrastiveConfig(
        output_dir=str(out), per_device_train_batch_size=8, report_to="none", use_cpu=True, max_steps=1,
        num_negatives=0, image_root=str(shapes_data.image_root), save_strategy="steps", save_steps=1,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=shapes_data["train"].select(range(8)))
    planted = _plant(out)
    for call in (trainer.train, lambda: trainer.train(resume_from_checkpoint=str(out)), trainer.save_for_inference):
        with pytest.raises(RunFolderLockedError, match=f"pid {os.getppid()} "):
            call()
    assert not out.exists() or not any(out.iterdir())  # nothing written

    planted.unlink()  # the other run is done: this one trains and publishes, and frees the folder
    (out / ".staging").mkdir(parents=True)  # what killed saves of an earlier run left
    (tmp_path / ".run.final-save").mkdir()
    (tmp_path / ".run.final-save-0badf00d").mkdir()
    trainer.train()
    trainer.save_for_inference()
    assert (out / "checkpoint-1").is_dir() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and not list(out.glob(".*"))


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_dir_is_refused_and_the_first_publishes_whole(tmp_path):
    from mm_embed_trl import MultimodalEmbeddingModel

    out = tmp_path / "run"
    args = [
        "--output_dir", out, "--generated_train_size", "64", "--generated_eval_size", "16",
        "--per_device_train_batch_size", "8", "--max_steps", "24", "--save_strategy", "steps", "--save_steps", "8",
        "--evaluate_before_training", "false", "--logging_steps", "1",
    ]
    script = ROOT / "examples" / "train_hardneg.py"
    runs = [launching.spawn(script, *args, cwd=tmp_path) for _ in range(2)]  # at once
    outputs = []
    for run in runs:
        try:
            outputs.append(run.communicate(timeout=600))
        except subprocess.TimeoutExpired:
            for other in runs:
                launching.kill_tree(other)
            raise
    codes = [run.returncode for run in runs]
    assert sorted(codes)[0] == 0 and codes.count(0) == 1, f"exit codes {codes}: both runs wrote into one output_dir"
    winner, loser = (0, 1) if codes[0] == 0 else (1, 0)
    refusal = "".join(outputs[loser])
    assert f"is in use by another run: pid {runs[winner].pid} " in refusal, refusal[-4000:]
    assert "Saved to" not in outputs[loser][0]
    model = MultimodalEmbeddingModel.from_pretrained(out)  # the first run's model, whole
    assert model.encode(["a red circle"]).isfinite().all()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-16", "checkpoint-24", "checkpoint-8"]
    assert not list(tmp_path.glob(".run*")) and not list(out.glob(".*"))  # no lock, no staging folder left
