"""Folders that are never half-written: build a folder beside its destination, then publish it by rename.

Every folder this package writes (checkpoints, the final save, exports, the tiny-backbone and generated-data caches)
goes through these helpers, so that

- a kill at any moment leaves the previous folder or the new one, never a mix: the new folder is complete before a
  rename publishes it, and an existing destination is swapped for it in one ``renameat2(RENAME_EXCHANGE)`` (Linux;
  elsewhere two renames, with the old folder kept aside in between);
- a full disk raises one :class:`DiskFullError` naming the path, and no staging folder is left behind;
- files get the mode the umask gives every other file (safetensors writes weights 0600 through a private temporary
  file, ``tempfile.mkdtemp`` makes 0700 folders).

A training run's folder is also locked from the run's claim to its final publish (:func:`hold_run_folder`), so two
runs never write into one folder, on one host or several sharing the filesystem; a dead run's lock is taken over.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import pathlib
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

__all__ = [
    "DiskFullError",
    "RunFolderHold",
    "RunFolderLock",
    "RunFolderLockedError",
    "disk_full_as_clear_error",
    "follow_umask",
    "hold_run_folder",
    "make_staging_dir",
    "publish_dir",
    "run_folder_lock_path",
    "staged_dir",
    "write_text_atomic",
]

# Below this much free space a failed write is taken for a full disk: writers word ENOSPC differently
# (torch.save: "basic_ios::clear" / "unexpected pos"; safetensors: "No space left on device (os error 28)").
_LOW_SPACE_BYTES = 16 * 2**20
_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class DiskFullError(OSError):
    """The device ran out of space while writing; nothing was published and the partial files were removed."""


def _umask() -> int:
    mask = os.umask(0o022)  # the only portable way to read it is to set it; restored at once
    os.umask(mask)
    return mask


def follow_umask(root: str | os.PathLike) -> None:
    """Widen the modes under ``root`` to what the umask gives new files (0666 & ~umask) and folders (0777 & ~umask).

    Writers that go through a private temporary file (safetensors) or ``tempfile.mkdtemp`` leave 0600 / 0700
    entries that other users of a shared run or cache folder cannot read. Modes are only widened, never narrowed.
    """
    mask = _umask()
    file_bits, dir_bits = 0o666 & ~mask, 0o777 & ~mask
    for dirpath, _dirnames, filenames in os.walk(root):
        for path, bits in ((dirpath, dir_bits), *((os.path.join(dirpath, f), file_bits) for f in filenames)):
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode & 0o7777
            if mode | bits != mode:
                os.chmod(path, mode | bits)


def make_staging_dir(final: str | os.PathLike, tag: str = "tmp") -> pathlib.Path:
    """Create a fresh hidden sibling ``.<name>.<tag>-<random>`` of ``final`` (same filesystem, so publishing it is
    one rename), with the mode the umask gives (``tempfile.mkdtemp`` would make it 0700)."""
    final = pathlib.Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:
        path = final.parent / f".{final.name}.{tag}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _free_bytes(path: pathlib.Path) -> int | None:
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def _disk_full_error(err: BaseException, path: pathlib.Path, what: str) -> DiskFullError | None:
    """A :class:`DiskFullError` for ``err`` when it means the device holding ``path`` is full, else None."""
    if isinstance(err, DiskFullError):
        return None
    if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit
        return None
    free = _free_bytes(path)
    full = (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        word in str(err) for word in _DISK_FULL_WORDS
    )
    if not full and (free is None or free >= _LOW_SPACE_BYTES):
        return None
    left = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
    return DiskFullError(
        errno.ENOSPC,
        f"No space left on device at {str(path)!r} ({left}) while writing {what}; nothing was published and the "
        f"partial files were removed (the writer said: {type(err).__name__}: {err}). Free some space or write "
        "elsewhere, then retry.",
    )


@contextlib.contextmanager
def disk_full_as_clear_error(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Re-raise a failed write into ``path`` that is due to a full device as one clear :class:`DiskFullError`."""
    try:
        yield
    except BaseException as err:
        clear = _disk_full_error(err, pathlib.Path(path), what)
        if clear is None:
            raise
        raise clear from err


@contextlib.contextmanager
def staged_dir(final: str | os.PathLike, *, what: str, tag: str = "tmp") -> Iterator[pathlib.Path]:
    """Yield a fresh staging sibling of ``final`` (see :func:`make_staging_dir`); publish it inside the block with
    :func:`publish_dir`. On any failure the staging folder is removed, and a full disk becomes a
    :class:`DiskFullError` naming ``final``."""
    final = pathlib.Path(final)
    staging = make_staging_dir(final, tag)
    try:
        with disk_full_as_clear_error(final, what):
            yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was published


def _link_tree(src: pathlib.Path, dst: pathlib.Path) -> None:
    """Recreate ``src`` at ``dst`` with hard links (no data copied; files written later through ``src``'s open
    handles, e.g. a log, land in the same inodes). Files that cannot be linked are copied."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        os.mkdir(dst)
        shutil.copymode(src, dst)
        for child in src.iterdir():
            _link_tree(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:  # a filesystem without hard links, or another mount inside the folder
            shutil.copy2(src, dst)


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # filesystem without exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def publish_dir(
    staging: str | os.PathLike, final: str | os.PathLike, *, keep_existing: Callable[[str], bool] | None = None
) -> None:
    """Make the finished ``staging`` folder the ``final`` one in a single step, replacing what ``final`` held.

    Args:
        keep_existing: entries of the existing ``final`` (by name) to carry over into the new one when the new one
            has no entry of that name, e.g. the checkpoints of a run whose final model is being replaced. They are
            hard-linked into ``staging`` before the swap, so ``final`` stays whole until the swap itself.
    """
    staging, final = pathlib.Path(staging), pathlib.Path(final)
    follow_umask(staging)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{str(final)!r} exists and is not a directory.")
    if final.is_dir() and keep_existing is not None:
        for entry in final.iterdir():
            if keep_existing(entry.name) and not os.path.lexists(staging / entry.name):
                _link_tree(entry, staging / entry.name)
    if not final.is_dir() or not any(final.iterdir()):
        os.replace(staging, final)  # also replaces an empty folder
        return
    if _exchange(staging, final):
        shutil.rmtree(staging, ignore_errors=True)  # now the old folder
        return
    old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
    os.rename(final, old)  # a kill right here leaves the complete old folder at `old`
    os.rename(staging, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_file(path: str | os.PathLike, *, suffix: str = "") -> Iterator[pathlib.Path]:
    """A hidden sibling of ``path`` to write; renamed onto ``path`` when the block ends without error, removed
    otherwise: readers see the old file or the whole new one, never part of it. ``suffix`` ends the sibling's name
    (for writers that add their own extension, e.g. ``numpy.savez``)."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}{suffix}")
    try:
        with disk_full_as_clear_error(path, f"{path.name}"):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file through a temporary sibling and a rename: readers see the old or the new file."""
    with staged_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# ------------------------------------------------------------------------------------------------ run folder lock
# A live holder refreshes its lock's mtime every HEARTBEAT_S; another host's lock left unrefreshed for
# STALE_LOCK_AFTER_S is taken for a dead run's (a holder on this host is checked directly, by pid and start time).
# The bound is many heartbeats long: a busy or briefly paused holder, or clocks a few minutes apart, keep their lock.
HEARTBEAT_S = 30.0
STALE_LOCK_AFTER_S = 600.0


class RunFolderLockedError(RuntimeError):
    """Another live run holds the run folder (or this run lost its lock); nothing of this run was published there."""


def run_folder_lock_path(folder: str | os.PathLike) -> pathlib.Path:
    """Where the lock of ``folder`` lives: ``.<name>.lock`` beside it (not inside: a final save swaps the folder)."""
    folder = pathlib.Path(folder).expanduser().absolute()
    return folder.parent / f".{folder.name}.lock"


def _process_start(pid: int) -> float | None:
    """When ``pid`` started (a recycled pid starts later than the one recorded), None when it does not exist."""
    import psutil

    try:
        return round(psutil.Process(pid).create_time(), 2)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # alive but not ours to inspect
        return -1.0


class RunFolderLock:
    """An exclusive claim on a run folder, held by one process from the run's claim to its final publish, against
    other processes and other hosts sharing the filesystem. Get one with :func:`hold_run_folder`.

    The lock is a file beside the folder (:func:`run_folder_lock_path`) that appears whole or not at all (a complete
    temporary file hard-linked into place, which fails when the lock exists, NFS included). It names its holder
    (host, pid and the pid's start time, command line, start time, a random token). A lock left by a dead run is
    taken over with a warning: on this host when its pid is gone or now belongs to a later process; from another
    host when its heartbeat (the holder's thread refreshes the file's mtime every ``heartbeat`` seconds) is older
    than ``stale_after`` seconds. A live holder's lock is an error that names it.
    """

    def __init__(
        self, folder: str | os.PathLike, *, stale_after: float = STALE_LOCK_AFTER_S, heartbeat: float = HEARTBEAT_S
    ):
        import socket

        self.folder = pathlib.Path(folder).expanduser().absolute()
        self.path = run_folder_lock_path(self.folder)
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_started": _process_start(os.getpid()),
            "started": _utc_now(),
            "command": " ".join(sys.argv)[:1000],
            "token": secrets.token_hex(8),
        }
        self._lost: str | None = None
        self._stop = None  # threading.Event of the heartbeat thread while held

    # -------------------------------------------------------------- acquire / release
    def acquire(self) -> None:
        """Take the lock (a dead run's is taken over); raises :class:`RunFolderLockedError` naming a live holder."""
        import json

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{self.record['token']}")
        tmp.write_text(json.dumps(self.record, indent=2) + "\n", encoding="utf-8")
        try:
            for _ in range(5):  # each round either takes the lock, refuses, or removed a dead run's lock
                try:
                    os.link(tmp, self.path)
                    break
                except FileExistsError:
                    holder, reason = self._judge_existing()
                    if reason is None:
                        raise RunFolderLockedError(self._busy_message(holder)) from None
                    self._break(holder, reason)
            else:
                raise RunFolderLockedError(f"Could not take the lock {self.path} (claimed and released by others "
                                           "in a loop); retry.")
        finally:
            tmp.unlink(missing_ok=True)
        self._lost = None
        self._start_heartbeat()

    def release(self) -> None:
        """Stop the heartbeat and remove the lock (if it is still this run's)."""
        if self._stop is None:
            return
        self._stop.set()
        self._stop = None
        if self._lost is None and self._owns_file():
            self.path.unlink(missing_ok=True)

    @property
    def held(self) -> bool:
        return self._stop is not None

    def check_held(self) -> None:
        """Raise :class:`RunFolderLockedError` unless this run still holds its lock: call right before publishing."""
        if self._lost is None and not self._owns_file():
            self._lost = "the lock file was removed or replaced by another run"
        if self._lost is not None:
            raise RunFolderLockedError(
                f"This run lost its lock on {str(self.folder)!r} ({self._lost}): another run may be writing there, so "
                "nothing was published. Check which run owns the folder, then save again or into another folder."
            )

    # -------------------------------------------------------------- internals
    def _read(self, path: pathlib.Path | None = None) -> dict | None:
        import json

        try:
            return json.loads((path or self.path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # not a lock this package wrote: judged by its age alone

    def _owns_file(self) -> bool:
        return (self._read() or {}).get("token") == self.record["token"]

    def _judge_existing(self) -> tuple[dict | None, str | None]:
        """(the existing lock's record, why it is stale or None while its holder lives)."""
        holder = self._read()
        if holder is None:
            return None, "it was just released"
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return holder, "it was just released"
        if holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int):
            started = _process_start(holder["pid"])
            if started is None:
                return holder, f"its pid {holder['pid']} is gone"
            recorded = holder.get("pid_started")
            if started != -1.0 and isinstance(recorded, (int, float)) and started > recorded + 1:
                return holder, f"its pid {holder['pid']} now belongs to a process started later"
            return holder, None
        if age > self.stale_after:
            return holder, f"no heartbeat from host {holder.get('host', '?')!r} for {age:.0f} s"
        return holder, None

    def _break(self, holder: dict | None, reason: str) -> None:
        """Remove a dead run's lock. It is moved aside first, so a lock that a live run created meanwhile (after
        ours was judged) is recognised by its token and put back."""
        if holder is None:
            return
        logger.warning("Taking over the lock %s of a run that is gone (%s): %s", self.path, reason, _describe(holder))
        aside = self.path.with_name(f"{self.path.name}.stale-{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved and moved.get("token") != holder.get("token"):
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
        aside.unlink(missing_ok=True)

    def _busy_message(self, holder: dict) -> str:
        return (
            f"output_dir {str(self.folder)!r} is in use by another run: {_describe(holder)}. Two runs in one folder "
            "would mix their checkpoints and final model. Wait for it to finish or stop it, or choose another "
            f"--output_dir. (Its lock is {self.path}; a lock whose run is gone is taken over by itself: at once on "
            f"this host, after {self.stale_after:.0f} s without a heartbeat from another host.)"
        )

    def _start_heartbeat(self) -> None:
        import threading

        stop = threading.Event()
        self._stop = stop

        def beat():
            while not stop.wait(self.heartbeat):
                if not self._owns_file():
                    self._lost = "the lock file was removed or replaced by another run"
                    logger.error("The lock %s is no longer this run's (%s).", self.path, self._lost)
                    return
                with contextlib.suppress(OSError):  # a transient error: the next beat retries
                    os.utime(self.path)

        threading.Thread(target=beat, name=f"lock heartbeat {self.folder.name}", daemon=True).start()


def _utc_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _describe(holder: dict) -> str:
    if not holder:
        return "a lock file this package cannot read"
    command = f", running {holder['command']!r}" if holder.get("command") else ""
    return (
        f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')!r}, started {holder.get('started', '?')}"
        f"{command}"
    )


class RunFolderHold:
    """One holder's share of a :class:`RunFolderLock` (see :func:`hold_run_folder`); ``release()`` is idempotent."""

    def __init__(self, lock: RunFolderLock):
        self.lock = lock
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        holders = _HELD.get(self.lock.path)
        if holders is not None and self in holders[1]:
            holders[1].remove(self)
            if not holders[1]:
                del _HELD[self.lock.path]
                self.lock.release()

    def check_held(self) -> None:
        """Raise :class:`RunFolderLockedError` unless the lock is still this run's (see `RunFolderLock.check_held`)."""
        self.lock.check_held()


# lock path -> (the lock this process holds, its holds)
_HELD: dict[pathlib.Path, tuple[RunFolderLock, list[RunFolderHold]]] = {}
_release_all_at_exit: list[bool] = []  # non-empty once the exit handler is registered


def hold_run_folder(folder: str | os.PathLike, *, stale_after: float = STALE_LOCK_AFTER_S) -> RunFolderHold:
    """A hold on the lock of the run folder ``folder`` (see :class:`RunFolderLock`): taken when this process does not
    hold it yet, shared otherwise (two trainers of one process may use a folder one after the other). The lock is
    released with its last hold, or when the process exits.

    Raises:
        RunFolderLockedError: another live run holds it.
    """
    path = run_folder_lock_path(folder)
    if path not in _HELD:
        lock = RunFolderLock(folder, stale_after=stale_after)
        lock.acquire()
        _HELD[path] = (lock, [])
        if not _release_all_at_exit:
            import atexit

            atexit.register(_release_all)
            _release_all_at_exit.append(True)
    lock, holds = _HELD[path]
    hold = RunFolderHold(lock)
    holds.append(hold)
    return hold


def _release_all() -> None:
    for lock, _ in list(_HELD.values()):
        if lock.record["pid"] == os.getpid():  # not in a forked child
            lock.release()
    _HELD.clear()
