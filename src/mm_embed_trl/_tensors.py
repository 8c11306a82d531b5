"""Small tensor helpers shared across the package."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """Yield the tensors inside ``obj``: a tensor, a mapping (BatchEncoding, ModelOutput) or a list/tuple, nested."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value)
