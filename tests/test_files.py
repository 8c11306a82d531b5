"""mm_embed_trl._files: staged folders published by rename, modes that follow the umask, a full disk as one error."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import pytest

from mm_embed_trl import _files
from mm_embed_trl._files import DiskFullError, follow_umask, make_staging_dir, publish_dir, staged_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """umask(value) sets the process umask for the test; the previous one is restored afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield os.umask
    os.umask(previous)


def _folder(path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_publish_replaces_a_folder_and_carries_over_what_is_kept(exchange, tmp_path, monkeypatch):
    swapped = []
    real_exchange = _files._exchange
    monkeypatch.setattr(
        _files, "_exchange", lambda a, b: swapped.append(exchange and real_exchange(a, b)) or swapped[-1]
    )
    final = _folder(tmp_path / "run", {"model.bin": "old", "stale.bin": "old", "checkpoint-1/state": "ckpt"})
    log = open(final / "train.log", "a")  # a log still being written: later lines must land in the new folder
    staging = _folder(make_staging_dir(final), {"model.bin": "new"})
    publish_dir(staging, final, keep_existing=lambda name: not name.endswith(".bin"))
    assert {str(p.relative_to(final)) for p in final.rglob("*")} == {
        "model.bin", "checkpoint-1", "checkpoint-1/state", "train.log"
    }
    assert (final / "model.bin").read_text() == "new" and (final / "checkpoint-1" / "state").read_text() == "ckpt"
    log.write("after the save\n")
    log.close()
    assert (final / "train.log").read_text() == "after the save\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging or old folder left
    if exchange and swapped != [True]:
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE): only the two-rename path ran")


def test_publish_into_a_missing_or_empty_folder_and_refuses_a_file(tmp_path):
    for final in (tmp_path / "missing", tmp_path / "empty"):
        if final.name == "empty":
            final.mkdir()
        publish_dir(_folder(make_staging_dir(final), {"a": "1"}), final)
        assert (final / "a").read_text() == "1"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        publish_dir(_folder(make_staging_dir(tmp_path / "file"), {"a": "1"}), tmp_path / "file")


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_staging_folders_and_published_files_follow_the_umask(mask, tmp_path, umask):
    """safetensors writes weights 0600 (through a private temporary file); published files follow the umask."""
    import torch
    from safetensors.torch import save_file

    umask(mask)
    final = tmp_path / "model"
    staging = make_staging_dir(final)
    assert _mode(staging) == 0o777 & ~mask  # tempfile.mkdtemp would give 0700
    save_file({"w": torch.zeros(2)}, str(staging / "model.safetensors"))
    (staging / "config.json").write_text("{}")
    publish_dir(staging, final)
    assert _mode(final / "model.safetensors") == _mode(final / "config.json") == 0o666 & ~mask
    assert _mode(final) == 0o777 & ~mask


def test_follow_umask_only_widens(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "f"
    path.write_text("x")
    os.chmod(path, 0o640)
    follow_umask(tmp_path)
    assert _mode(path) == 0o640  # a stricter umask narrows nothing


def test_staged_dir_removes_the_staging_folder_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(final, what="the thing") as staging:
            (staging / "partial").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.mark.parametrize(
    "error, free",
    [
        (OSError(errno.ENOSPC, "No space left on device"), 10**12),
        # torch.save's C++ writer on a full disk: no errno, but the device is full
        (RuntimeError("basic_ios::clear: iostream error"), 4096),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 0),
        (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), 10**12),
    ],
    ids=["ENOSPC", "torch-basic_ios", "torch-unexpected-pos", "safetensors"],
)
def test_a_full_disk_is_one_clear_error_and_leaves_no_staging_folder(error, free, tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 10**12 - free, free))
    final = tmp_path / "export"
    with pytest.raises(DiskFullError, match=r"No space left on device at .*export.* while writing the export") as info:
        with staged_dir(final, what="the export") as staging:
            (staging / "weights").write_text("partial")
            raise error
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is error
    assert list(tmp_path.iterdir()) == []


def test_other_failures_are_not_called_a_full_disk(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="basic_ios"):
        with staged_dir(tmp_path / "x", what="it"):
            raise RuntimeError("basic_ios::clear: iostream error")
