"""The package layout's promises: one cache root for everything cached, the demo fixtures in their own wing."""

from __future__ import annotations

import importlib
import importlib.util
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


def test_the_removed_demo_shims_are_gone():
    """mm_embed_trl.tiny, .data.generated and .data.text_corpus re-exported the demo wing for a release (CHANGELOG)."""
    for old in ("mm_embed_trl.tiny", "mm_embed_trl.data.generated", "mm_embed_trl.data.text_corpus"):
        assert importlib.util.find_spec(old) is None, old


def test_tiny_cli_runs_from_the_demo_wing():
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    out = subprocess.run(
        [sys.executable, "-m", "mm_embed_trl.demo.tiny", "--help"], capture_output=True, text=True, env=env,
        timeout=120, check=True,
    ).stdout
    assert "--family" in out and "--output_dir" in out


def test_console_script_points_at_the_demo_wing():
    setup = (SRC.parent / "setup.py").read_text()
    target = re.search(r'"mm-embed-tiny=([\w.]+):(\w+)"', setup)
    assert target is not None
    module, attr = target.groups()
    assert module == "mm_embed_trl.demo.tiny" and callable(getattr(importlib.import_module(module), attr))


def test_run_level_options_are_declared_once_for_every_trainer_config(tmp_path):
    """image_root, on_bad_row, overwrite_output_dir and save_sentence_transformers come from EmbeddingRunArguments in
    the Trainer-based configs and in EmbeddingGRPOConfig (TRL's base): the same field, default and help text, and the
    same check of on_bad_row, in every config the CLI parses."""
    import dataclasses

    from mm_embed_trl import EmbeddingRunArguments, EmbeddingTrainingArguments
    from mm_embed_trl.trainers.registry import method_trainers

    shared = {f.name: f for f in dataclasses.fields(EmbeddingRunArguments)}
    assert set(shared) == {
        "image_root", "on_bad_row", "overwrite_output_dir", "save_sentence_transformers",  # the run
        "sentence_transformers_video_inputs",
        "prompt_template", "image_max_pixels", "video_fps", "video_max_frames", "video_max_pixels",  # model, inputs
        "freeze_vision_tower",
    }
    # a method may give one of the model's options its paper's default (as TRL's configs change TrainingArguments')
    method_defaults = {"prompt_template", "freeze_vision_tower"}
    for config in [EmbeddingTrainingArguments] + [trainer.config_class for trainer in method_trainers()]:
        assert issubclass(config, EmbeddingRunArguments), config
        fields = {f.name: f for f in dataclasses.fields(config)}
        redeclared = set(shared) & {
            name for cls in config.__mro__ if cls is not EmbeddingRunArguments
            for name in vars(cls).get("__annotations__", {})
        }
        assert redeclared <= method_defaults, (config, redeclared)
        for name, want in shared.items():
            if name not in redeclared:
                assert (fields[name].default, fields[name].metadata) == (want.default, want.metadata), (config, name)
        with pytest.raises(ValueError, match="on_bad_row must be 'raise' or 'skip'"):
            config(output_dir=str(tmp_path), on_bad_row="ignore", report_to="none")


def test_every_example_parser_prints_its_help():
    """`examples/train_*.py --help` formats every field's help text through argparse, where a bare `%` (as in "3%
    warm-up") is a format error that crashed the SFT example's --help."""
    from trl import ModelConfig, TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments
    from mm_embed_trl.trainers.registry import method_trainers

    for config in [trainer.config_class for trainer in method_trainers()]:
        text = TrlParser((EmbeddingScriptArguments, config, ModelConfig)).format_help()
        assert "--on_bad_row" in text and "--output_dir" in text, config


def test_the_registry_lists_every_method_and_the_readme_shows_it():
    """Every method trainer registered itself (the built-in modules, found on disk); the package exports each trainer
    and config by name, and the README's table is the registry's."""
    import mm_embed_trl
    from mm_embed_trl.trainers.registry import builtin_method_modules, method_table, method_trainers

    trainers = method_trainers()
    assert {t.__module__ for t in trainers} >= set(builtin_method_modules())
    assert [t.method_key for t in trainers] == ["unime_stage1", "unime_stage2", "ume_r1_sft", "ume_r1_rl"]
    for trainer in trainers:
        assert getattr(mm_embed_trl, trainer.__name__) is trainer
        assert getattr(mm_embed_trl, trainer.config_class.__name__) is trainer.config_class
        assert trainer.__name__ in mm_embed_trl.__all__ and trainer.config_class.__name__ in mm_embed_trl.__all__
    readme = (SRC.parent / "README.md").read_text()
    assert method_table() in readme, "regenerate the README's table with trainers.registry.method_table()"


def _package_imports() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from every import statement of src/mm_embed_trl (function-level
    ones included: a lazy import still ties two modules), read with `ast`; a package's ``__init__`` stands for it."""
    import ast

    package = SRC / "mm_embed_trl"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_package else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import module` imports the module; `from module import name` the module itself
                found = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            for target in found:
                while target and target not in modules:  # `a.b.c` of a module `a.b`
                    target = target.rpartition(".")[0]
                if target and target != name:
                    targets.add(target)
        graph[name] = targets
    return graph


def test_the_package_has_no_import_circles():
    """Modules that import each other (even lazily) cannot be read, tested or moved one at a time; issue 23 took the
    house to none (farm-studio draws the same graph). A package's `__init__` that re-exports its modules is the
    package's face and is left out, as farm-studio leaves it out."""
    graph = _package_imports()
    faces = {name for name in graph if (SRC / name.replace(".", "/") / "__init__.py").is_file()}
    graph = {name: targets - faces for name, targets in graph.items() if name not in faces}
    circles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_looking_up_a_method_imports_only_its_own_trainer_module():
    """The registry imports trainer modules as a search needs them: the one that names the class first, so
    `from mm_embed_trl import HardNegContrastiveTrainer` does not pay for TRL's GRPO (it did, in file order)."""
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1")
    code = (
        "import sys\n"
        "from mm_embed_trl import HardNegContrastiveTrainer, DistillEmbedConfig\n"
        "print(sorted(m for m in sys.modules if m.startswith('mm_embed_trl.trainers.') and m.endswith('_trainer')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    assert out.stdout.split() == [
        "['mm_embed_trl.trainers.distill_trainer',", "'mm_embed_trl.trainers.hardneg_trainer']"
    ]
