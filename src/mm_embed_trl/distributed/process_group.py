"""The process group's end: destroyed before the interpreter shuts down, whenever the process is ending cleanly.

Why. gloo runs each collective on its own worker threads ("pt_gloo_runloop"). When a process exits with its group
alive, such a thread can still be releasing a finished work object when the interpreter finalizes; it then needs the
GIL, Python ends the thread (`pthread_exit`), the unwind crosses a `noexcept` C++ frame and `std::terminate` kills the
process: SIGABRT, "terminate called without an active exception" (pytorch/pytorch#190489), after every file was
saved. Seen here in a gdb backtrace of the aborting rank; a bare 2-process script of 20 gloo collectives aborted at
exit in 4 of 10 runs under CPU load. A job whose exit code is non-zero after a complete run reads as a failed run to a
scheduler or CI. `destroy_process_group` shuts every backend down and joins those threads while Python still runs,
but only when nothing else holds the group: a `DistributedDataParallel` model (its C++ reducer), a DeepSpeed engine or
an FSDP mesh that lives until the interpreter clears its modules keeps the group, and its threads, alive (seen here
in every trainer's 2-process run; a GRPO step aborted this way in CI). gloo offers no call that joins them then. So
the handler then waits, with the GIL released, until gloo's collective threads have gone quiet (asleep, not scheduled
between two looks at `/proc`): a thread that is idle when the interpreter finalizes never asks for the GIL.

Where. `import mm_embed_trl` registers `destroy_process_group_on_clean_exit` with `atexit` (see the package's
`__init__`), so every process that imports the library gets it: the trainers, the examples, a user's own script that
drives `Accelerator` or `torch.distributed` directly, the tests' multi-process scripts and the benchmarks. The
handler does nothing unless `torch.distributed` was imported and a group is alive.

When not. Destroying the group while this process still has a collective in flight (a peer stopped half-way) joins a
thread that waits on that peer: the exit would hang for the collective timeout instead of failing. So the group is
left alone when the process is ending on an uncaught exception (the interpreter has set `sys.last_value` by the
time `atexit` runs), or when a unit of work wrapped in `destroy_process_group_at_exit` (the trainers' `train()` and
final save) raised, even if the caller caught it. Such a process may still abort at exit: its exit code is non-zero
either way. If the shutdown of a clean process still takes longer than `MM_EMBED_TRL_EXIT_TIMEOUT` seconds (default
60), a watchdog ends the process with exit code 1 and says why, rather than letting it hang.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

__all__ = ["destroy_process_group_at_exit", "destroy_process_group_on_clean_exit", "wait_for_quiet_comm_threads"]

_state = {"clean": True}
# The native threads that run gloo's collectives and release their work objects: "pt_gloo_runloop". Not gloo's
# transport thread "gloo_tcp_loop": it polls its sockets every 10 ms whatever happens (so it never looks quiet) and
# never touches Python objects. Waiting for it made every exit of a process whose group was held (a DDP model: every
# multi-process training run) sleep the full 10 s of the wait below.
COMM_THREAD_PREFIXES = ("pt_gloo",)


def _comm_thread_activity(prefixes: tuple[str, ...]) -> dict[int, tuple[str, str]] | None:
    """``{thread id: (state, times scheduled)}`` of this process's threads whose name starts with one of
    ``prefixes``, from ``/proc`` (Linux); ``None`` where there is no ``/proc``."""
    task = f"/proc/{os.getpid()}/task"
    try:
        thread_ids = os.listdir(task)
    except OSError:
        return None
    out = {}
    for tid in thread_ids:
        try:
            with open(f"{task}/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if not name.startswith(prefixes):
            continue
        try:  # third field: how many times the thread was put on a CPU (exact, unlike the tick-based times)
            with open(f"{task}/{tid}/schedstat") as f:
                ran = f.read().split()[2]
        except (OSError, IndexError):
            ran = f"{fields[11]}+{fields[12]}"  # user + system time, in clock ticks
        out[int(tid)] = (fields[0], ran)
    return out


def wait_for_quiet_comm_threads(
    timeout: float = 10.0, interval: float = 0.02, prefixes: tuple[str, ...] = COMM_THREAD_PREFIXES
) -> bool:
    """Sleep (the GIL released) until every communication thread of this process is quiet: asleep at two looks
    ``interval`` apart and not scheduled in between. True once quiet (at once when there is none), False after
    ``timeout`` seconds or where ``/proc`` cannot tell (then after one ``interval``)."""
    deadline = time.monotonic() + timeout
    before = _comm_thread_activity(prefixes)
    if before is None:
        time.sleep(interval)
        return False
    while before:
        time.sleep(interval)
        now = _comm_thread_activity(prefixes)
        if all(state == "S" and now.get(tid) == (state, ran) for tid, (state, ran) in before.items()):
            return True
        if time.monotonic() > deadline:
            return False
        before = now
    return True


def _ending_on_an_uncaught_exception() -> bool:
    return getattr(sys, "last_exc", None) is not None or getattr(sys, "last_value", None) is not None


def _exit_timeout() -> float:
    try:
        return float(os.environ.get("MM_EMBED_TRL_EXIT_TIMEOUT", "60"))
    except ValueError:
        return 60.0


def destroy_process_group_on_clean_exit() -> None:
    """The `atexit` handler: destroy the default process group (and every subgroup) if one is alive and the process
    is ending cleanly. Registered by `import mm_embed_trl`; safe to call more than once."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return
    if not _state["clean"] or _ending_on_an_uncaught_exception():
        return
    done = threading.Event()
    timeout = _exit_timeout()

    def watchdog() -> None:
        if not done.wait(timeout):
            sys.stderr.write(
                f"mm_embed_trl: destroying the process group at exit took over {timeout:.0f} s (a collective of this "
                "process still waits on a peer); exiting with code 1 instead of hanging.\n"
            )
            sys.stderr.flush()
            os._exit(1)

    threading.Thread(target=watchdog, name="mm_embed_trl-exit-watchdog", daemon=True).start()
    try:
        distributed.destroy_process_group()
        wait_for_quiet_comm_threads(timeout=min(10.0, timeout / 2))  # threads the destroy could not join
    finally:
        done.set()


@contextlib.contextmanager
def destroy_process_group_at_exit():
    """Wrap a unit of distributed work (a `train()`, a final save). If it raises, the process group is left alone at
    exit (a peer may still be inside a collective with this process); once a later unit completes, the process
    counts as clean again and its group is destroyed at exit. Processes with no wrapped work are clean unless they
    end on an uncaught exception."""
    _state["clean"] = False
    yield
    _state["clean"] = True
