"""Folders that are never half-written: build a folder beside its destination, then publish it by rename.

Every folder this package writes (checkpoints, the final save, exports, the tiny-backbone and generated-data caches)
goes through these helpers, so that

- a kill at any moment leaves the previous folder or the new one, never a mix: the new folder is complete before a
  rename publishes it, and an existing destination is swapped for it in one ``renameat2(RENAME_EXCHANGE)`` (Linux;
  elsewhere two renames, with the old folder kept aside in between);
- a full disk raises one :class:`DiskFullError` naming the path, and no staging folder is left behind;
- files get the mode the umask gives every other file (safetensors writes weights 0600 through a private temporary
  file, ``tempfile.mkdtemp`` makes 0700 folders).
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
from collections.abc import Callable, Iterator

logger = logging.getLogger(__name__)

__all__ = [
    "DiskFullError",
    "disk_full_as_clear_error",
    "follow_umask",
    "make_staging_dir",
    "publish_dir",
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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file through a temporary sibling and a rename: readers see the old or the new file."""
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        with disk_full_as_clear_error(path, f"{path.name}"):
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
