"""Loading the project's scripts (examples, benchmarks, CI helpers), which are files, not modules of the package."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_script(path: str | Path, name: str | None = None, *, register: bool = False) -> ModuleType:
    """The module of the script at `path` (relative to the repository root, or absolute), run afresh by each call.

    `register=True` also puts it in `sys.modules` under `name` (the file's stem by default): dataclasses defined in
    the script resolve their annotations through it.
    """
    path = ROOT / path
    name = name or path.stem
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
