"""Looking a trainer up by the method it runs: what the export CLI's ``--method`` names (a key such as
``"unime_stage2"`` or an alias such as ``"hardneg"``).

The identity itself (TRL's ``_name`` and ``_paper``, the method key, its aliases, the card's title and description)
is declared on each trainer class and read through ``method_card()``; this module only searches the registry of
methods (``trainers/registry.py``), which imports the built-in trainer modules as far as a search goes.
"""

from __future__ import annotations

from .registry import iter_method_trainers, method_trainers

__all__ = ["UNTRAINED_METHOD", "canonical_method", "method_keys", "trainer_for_method"]

# The card of a model that no trainer of this library trained (the backbone wrapped with pooling).
UNTRAINED_METHOD = "none"
_UNTRAINED_ALIASES = ("baseline", "untrained")


def method_keys() -> list[str]:
    """Every method key ``trainer_for_method`` knows, sorted (``"none"``: the untrained baseline)."""
    return sorted([UNTRAINED_METHOD, *(trainer.method_key for trainer in method_trainers())])


def _short_aliases() -> list[str]:
    """Each trainer's first alias (its short name) and the baseline's, for error messages."""
    shorts = [trainer.method_aliases[0] for trainer in method_trainers() if trainer.method_aliases]
    return [*shorts, _UNTRAINED_ALIASES[0]]


def _matches(key: str, canonical: str, aliases: tuple[str, ...]) -> bool:
    return key == canonical or key in aliases or key.replace("_", "") in aliases


def trainer_for_method(name: str) -> type | None:
    """The trainer class whose method key or alias is ``name`` (case, ``-`` and spaces ignored); None for the
    untrained baseline (``"none"``, ``"baseline"``, ``"untrained"``).

    Raises:
        ValueError: no trainer declares ``name``.
    """
    key = str(name).strip().lower().replace("-", "_").replace(" ", "_")
    if _matches(key, UNTRAINED_METHOD, _UNTRAINED_ALIASES):
        return None
    for trainer in iter_method_trainers():
        if _matches(key, trainer.method_key, trainer.method_aliases):
            return trainer
    raise ValueError(
        f"Unknown training method {name!r}; use one of {method_keys()} (aliases: {', '.join(_short_aliases())})."
    )


def canonical_method(name: str | None) -> str:
    """The method key that ``name`` stands for (``"none"`` for None and the untrained baseline)."""
    trainer = None if name is None else trainer_for_method(name)
    return UNTRAINED_METHOD if trainer is None else trainer.method_key
