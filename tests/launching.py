"""The one way tests launch a script in its own process(es): 1 plain process, `torchrun` or `accelerate launch`.

Every launch gets the same environment (this checkout's `src` first on the path, offline hub, one thread per
process, DeepSpeed's CPU accelerator), a free port, a timeout that kills the whole process tree (the launcher and
every rank), and its output captured: a failed launch fails the test with the command, the exit status, whether a
rank aborted at exit after its work (the gloo exit abort, see `mm_embed_trl.distributed.process_group`) and the end
of its output.

Several machines are simulated on localhost by several `accelerate launch` commands, one per machine (`--num_machines`,
`--machine_rank`, one `--main_process_port` shared; `spawn_machines`, `run_machines`), as a cluster runs one per node.

When `MM_EMBED_TRL_LAUNCH_LOG` names a file, every launch appends one JSON line to it (test, launcher, processes,
exit status, abort at exit, seconds): `benchmarks/exit_aborts.py` counts aborts over repeated runs this way.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("python", "torchrun", "accelerate")
# What a rank that died at exit leaves in the output: libstdc++'s message, torchrun's and Python's report of signal 6.
_ABORT_SIGNS = re.compile(
    r"terminate called without an active exception|exitcode\s*:\s*-6\b|Signal 6 \(SIGABRT\)|died with <Signals.SIGABRT"
)


def free_port() -> int:
    """A TCP port free right now on localhost (for `accelerate launch --main_process_port`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The environment of every launch: this checkout's package first, no hub, one intra-op thread per process (two
    ranks share 2 cores), DeepSpeed on its CPU accelerator."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env.update(
        HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
    )
    env.update(extra)
    return env


def command(script, *args, processes: int = 1, launcher: str | None = None, launcher_args=(),
            port: int | None = None) -> list[str]:
    """The command line: `python script` for 1 process (unless `launcher` says otherwise), else `torchrun
    --standalone` (its own free port) or `accelerate launch` (`--main_process_port port`, a free one by default;
    `launcher_args` add e.g. `--config_file`, `--multi_gpu` being the default without one). A `script` of the form
    `"-m package.module"` runs that module, with every launcher."""
    launcher = launcher or ("python" if processes == 1 else "torchrun")
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    if launcher == "python":
        if processes != 1:
            raise ValueError("a plain python launch runs 1 process; use launcher='torchrun' or 'accelerate'")
        head = [sys.executable]
    elif launcher == "torchrun":
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    else:
        launcher_args = list(launcher_args)
        if processes > 1 and "--config_file" not in launcher_args:
            launcher_args = ["--multi_gpu", *launcher_args]
        head = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
                "--main_process_port", str(port or free_port()), *launcher_args]
    target = str(script).split(" ", 1) if str(script).startswith("-m ") else [str(script)]
    return [*head, *target, *map(str, args)]


@dataclass
class Finished:
    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def aborted_at_exit(self) -> bool:
        return self.returncode in (-signal.SIGABRT, 128 + signal.SIGABRT) or bool(_ABORT_SIGNS.search(self.output))

    def describe(self, tail: int = 6000) -> str:
        what = "timed out" if self.timed_out else f"exit status {self.returncode}"
        if self.aborted_at_exit:
            what += " - a rank ABORTED (SIGABRT, the gloo exit abort)"
        return (
            f"{' '.join(self.command)}\n{what} after {self.seconds:.0f} s\n"
            f"--- stdout (end) ---\n{self.stdout[-tail // 3:]}\n--- stderr (end) ---\n{self.stderr[-tail:]}"
        )


def spawn(script, *args, processes: int = 1, launcher: str | None = None, launcher_args=(), env=None, cwd=None,
          port: int | None = None, **popen_kwargs) -> subprocess.Popen:
    """Start a launch without waiting (for tests that kill it mid-run): its own session, so `kill_tree` reaches the
    launcher and every rank."""
    cmd = command(script, *args, processes=processes, launcher=launcher, launcher_args=launcher_args, port=port)
    return _popen(cmd, env, cwd, **popen_kwargs)


def _popen(cmd, env, cwd, **popen_kwargs) -> subprocess.Popen:
    popen_kwargs.setdefault("stdout", subprocess.PIPE)
    popen_kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([str(part) for part in cmd], env=env or launch_env(), cwd=cwd, start_new_session=True,
                            text=True, **popen_kwargs)


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the launcher and every process below it (torch's elastic agent starts ranks in their own groups)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(proc.pid)
        for process in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)


def spawn_machines(script, *args, machines: int = 2, processes: int = 2, launcher_args=(), env=None, cwd=None,
                   **popen_kwargs) -> list[subprocess.Popen]:
    """Start `machines` simulated machines on localhost, each its own `accelerate launch` (machine rank 0 first, as
    on a cluster's nodes): `--num_machines machines --machine_rank r --main_process_ip 127.0.0.1` and one free
    `--main_process_port` for all. `processes` is accelerate's: the total over the machines."""
    if machines < 2 or processes % machines:
        raise ValueError(f"{machines} machines cannot share {processes} processes evenly")
    port = free_port()
    return [
        spawn(script, *args, processes=processes, launcher="accelerate", env=env, cwd=cwd, port=port,
              launcher_args=[*launcher_args, "--num_machines", str(machines), "--machine_rank", str(rank),
                             "--main_process_ip", "127.0.0.1"], **popen_kwargs)
        for rank in range(machines)
    ]


def _finish(proc: subprocess.Popen, start: float, timeout: float, on_timeout) -> Finished:
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(0.0, start + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        on_timeout()
        stdout, stderr = proc.communicate()
    return Finished(proc.args, proc.returncode, stdout, stderr, time.monotonic() - start, timed_out)


def _check(finished: Finished, what: str = "launch") -> None:
    if finished.timed_out or finished.returncode != 0:
        pytest.fail(f"{what} failed: {finished.describe()}", pytrace=False)


def run(script, *args, processes: int = 1, launcher: str | None = None, launcher_args=(), env=None, cwd=None,
        timeout: float = 600, check: bool = True) -> Finished:
    """Run a launch to its end. With `check`, anything but exit status 0 fails the test with `Finished.describe`."""
    cmd = command(script, *args, processes=processes, launcher=launcher, launcher_args=launcher_args)
    launcher = launcher or ("python" if processes == 1 else "torchrun")
    return run_command(cmd, env=env, cwd=cwd, timeout=timeout, check=check, launcher=launcher, processes=processes)


def run_command(cmd: list[str], *, env=None, cwd=None, timeout: float = 600, check: bool = True,
                launcher: str = "command", processes: int = 1) -> Finished:
    """`run` for a command line of the test's own (a job script that launches the processes itself): the same
    environment, own session, timeout that kills the whole tree and report."""
    start = time.monotonic()
    proc = _popen(cmd, env, cwd)
    finished = _finish(proc, start, timeout, lambda: kill_tree(proc))
    _log(finished, launcher, processes)
    if check:
        _check(finished)
    return finished


def run_machines(script, *args, machines: int = 2, processes: int = 2, launcher_args=(), env=None, cwd=None,
                 timeout: float = 600, check: bool = True) -> list[Finished]:
    """Run `spawn_machines` to its end, one `Finished` per machine. Past `timeout`, every machine's process tree is
    killed. With `check`, a machine whose exit status is not 0 fails the test."""
    start = time.monotonic()
    procs = spawn_machines(script, *args, machines=machines, processes=processes, launcher_args=launcher_args,
                           env=env, cwd=cwd)

    def kill_all() -> None:
        for proc in procs:
            kill_tree(proc)

    # one thread per machine reads its pipes: a machine blocked on a full pipe would stall the others' collectives
    with ThreadPoolExecutor(len(procs)) as pool:
        finished = list(pool.map(lambda proc: _finish(proc, start, timeout, kill_all), procs))
    for rank, machine in enumerate(finished):
        _log(machine, "accelerate", processes)
        if check:
            _check(machine, f"machine {rank} of {machines}")
    return finished


def _log(finished: Finished, launcher: str, processes: int) -> None:
    path = os.environ.get("MM_EMBED_TRL_LAUNCH_LOG")
    if not path:
        return
    record = {
        "test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0],
        "launcher": launcher,
        "processes": processes,
        "returncode": finished.returncode,
        "aborted_at_exit": finished.aborted_at_exit,
        "timed_out": finished.timed_out,
        "seconds": round(finished.seconds, 2),
    }
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
