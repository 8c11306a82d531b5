"""The process group's end: destroyed before the interpreter shuts down, whenever the process is ending cleanly.

Why. gloo runs each collective on its own worker threads ("pt_gloo_runloop"). When a process exits with its group
alive, such a thread can still be releasing a finished work object when the interpreter finalizes; it then needs the
GIL, Python ends the thread (`pthread_exit`), the unwind crosses a `noexcept` C++ frame and `std::terminate` kills the
process: SIGABRT, "terminate called without an active exception" (pytorch/pytorch#190489), after every file was
saved. Seen here in a gdb backtrace of the aborting rank; a bare 2-process script of 20 gloo collectives aborted at
exit in 4 of 10 runs under CPU load. A job whose exit code is non-zero after a complete run reads as a failed run to a
scheduler or CI. `destroy_process_group` shuts every backend down and joins those threads while Python still runs.

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

__all__ = ["destroy_process_group_at_exit", "destroy_process_group_on_clean_exit"]

_state = {"clean": True}


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
