"""The training methods of this library, registered by their trainer classes as they are created.

A trainer class that declares its own ``method_key`` (see ``EmbeddingTrainerMixin``) registers itself when Python
creates it (``EmbeddingTrainerMixin.__init_subclass__``). Whatever lists the methods iterates this registry: the
``--method`` lookup (``trainers/identity.py``), the package's exports of trainers and configs (``mm_embed_trl`` and
``mm_embed_trl.trainers``), the tests of run options and ``--help``, and the README's table (:func:`method_table`).

The built-in methods are the ``*_trainer`` modules of this package (found on disk: a new one needs no line here).
:func:`iter_method_trainers` imports them one at a time, only as far as an iteration goes, so ``import mm_embed_trl``
imports none and TRL (``grpo_trainer``) is imported only when a search reaches it. A method defined in another
package registers as soon as its module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Iterator
from pathlib import Path

__all__ = ["builtin_method_modules", "iter_method_trainers", "method_table", "method_trainers", "register_method",
           "unregister_method"]

_METHODS: dict[str, type] = {}  # method key -> trainer class, in the order of registration


def register_method(trainer: type) -> None:
    """Register ``trainer`` under its ``method_key`` (called on class creation; re-creating the same class, e.g. on a
    module reload, replaces it).

    Raises:
        ValueError: another class already holds the key.
    """
    known = _METHODS.get(trainer.method_key)
    if known is not None and (known.__module__, known.__qualname__) != (trainer.__module__, trainer.__qualname__):
        raise ValueError(
            f"Method key {trainer.method_key!r} of {trainer.__module__}.{trainer.__qualname__} is already "
            f"registered by {known.__module__}.{known.__qualname__}: give the new method its own method_key."
        )
    _METHODS[trainer.method_key] = trainer


def unregister_method(method_key: str) -> None:
    """Forget a method (one defined for a while, as the guide's test does); unknown keys are ignored."""
    _METHODS.pop(method_key, None)


def builtin_method_modules() -> list[str]:
    """The modules of this package that define method trainers (``<method>_trainer.py``), sorted."""
    here = Path(__file__).parent
    return sorted(f"{__package__}.{m.name}" for m in pkgutil.iter_modules([str(here)]) if m.name.endswith("_trainer"))


def iter_method_trainers(mentioning: str | None = None) -> Iterator[type]:
    """Every registered trainer: those already imported first, then each built-in module's as it is imported.
    ``mentioning`` (a class name being looked up): the modules whose source names it are imported first, so that
    finding ``HardNegContrastiveTrainer`` does not import TRL's GRPO on the way."""
    seen: set[str] = set()

    def new_ones() -> Iterator[type]:
        for key, trainer in list(_METHODS.items()):
            if key not in seen:
                seen.add(key)
                yield trainer

    yield from new_ones()
    modules = builtin_method_modules()
    if mentioning:
        word = re.compile(rf"\b{re.escape(mentioning)}\b")
        here = Path(__file__).parent
        modules.sort(key=lambda m: not word.search((here / f"{m.rpartition('.')[2]}.py").read_text(encoding="utf-8")))
    for module in modules:
        importlib.import_module(module)
        yield from new_ones()


def _table_order(trainer: type) -> tuple:
    paper = getattr(trainer, "_paper", None) or {}
    return (paper.get("id") is None, paper.get("id") or "", trainer.method_title or "", trainer.method_key)


def method_trainers() -> list[type]:
    """Every method trainer (all built-in modules imported), by paper (oldest arXiv id first), then by title."""
    return sorted(iter_method_trainers(), key=_table_order)


def method_table() -> str:
    """The README's table of methods (``tests/test_layout.py`` holds the README to it)."""
    rows = ["| method | trainer | paper |", "|---|---|---|"]
    for trainer in method_trainers():
        paper = getattr(trainer, "_paper", None) or {}
        link = f"[arXiv {paper['id']}](https://arxiv.org/abs/{paper['id']})" if paper.get("id") else ""
        rows.append(f"| {trainer.method_title} | `{trainer.__name__}` | {link} |")
    return "\n".join(rows)
