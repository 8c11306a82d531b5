"""The package layout's promises: one cache root for everything cached, and the demo fixtures' old import paths."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_cache_reader_uses_one_root_with_home_expanded(tmp_path, monkeypatch):
    from mm_embed_trl.demo.generated import shapes_cache_dir
    from mm_embed_trl.demo.tiny import get_tiny_backbone
    from mm_embed_trl.teacher import teacher_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MM_EMBED_TRL_CACHE", "~/cache")
    root = tmp_path / "home" / "cache"
    assert Path(teacher_cache_dir()) == root / "teacher"
    assert shapes_cache_dir({"seed": 0}).parent == root
    assert get_tiny_backbone("text").parent == root / "tiny"  # was <cwd>/~/cache/tiny: `~` not expanded
    monkeypatch.delenv("MM_EMBED_TRL_CACHE")
    assert Path(teacher_cache_dir()) == tmp_path / "home" / ".cache" / "mm_embed_trl" / "teacher"


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("mm_embed_trl.tiny", "mm_embed_trl.demo.tiny"),
        ("mm_embed_trl.data.generated", "mm_embed_trl.demo.generated"),
        ("mm_embed_trl.data.text_corpus", "mm_embed_trl.demo.text_corpus"),
    ],
)
def test_old_demo_import_paths_re_export_the_demo_wing(old, new):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    assert old_module.__all__ == new_module.__all__
    for name in new_module.__all__:
        assert getattr(old_module, name) is getattr(new_module, name), name


@pytest.mark.parametrize("module", ["mm_embed_trl.tiny", "mm_embed_trl.demo.tiny"])
def test_tiny_cli_runs_from_old_and_new_module(module):
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=env, timeout=120, check=True
    ).stdout
    assert "--family" in out and "--output_dir" in out


def test_console_script_points_at_the_demo_wing():
    setup = (SRC.parent / "setup.py").read_text()
    target = re.search(r'"mm-embed-tiny=([\w.]+):(\w+)"', setup)
    assert target is not None
    module, attr = target.groups()
    assert module == "mm_embed_trl.demo.tiny" and callable(getattr(importlib.import_module(module), attr))
