"""Tolerances for comparing floating-point results, derived from the dtype and the computation (not guessed).

Two evaluations of the same function that differ only in the order of their additions (another BLAS kernel or CPU,
another thread count, chunks instead of one batch, a multi-process gather, float64 instead of float32) differ by
rounding alone. Each addition rounds with relative error at most ``eps`` (the unit roundoff); when the order is
arbitrary these errors behave like independent random signs, so a chain of ``N`` roundings drifts by about
``sqrt(N)·eps`` (the statistical rule of thumb of Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
§2.8; ``N·eps`` is the rarely reached worst case). A computation of ``depth`` chained reductions of ``terms`` values
each is such a chain of ``N = depth·terms`` roundings; whatever follows multiplies the drift by its condition
number (``gain``: for example ``1/τ`` for a softmax over cosine similarities at temperature ``τ``).
:func:`rounding_rtol` turns these numbers into a relative tolerance, with a ``safety`` factor for the constant the
estimate leaves out.

:func:`assert_close` compares **normwise**: ``|actual - expected| <= rtol · (|expected| + max|expected|)`` for every
entry, so an entry that is small by cancellation is judged against the size of the tensor it belongs to (elementwise
relative error is meaningless there), while a tensor that is wrong by a factor still fails.

Each test that uses these says what its ``terms``, ``depth`` and ``gain`` are. Both comparisons refuse a tolerance
that would let a 1% error pass (:data:`MAX_RTOL`): a derived tolerance can never grow so loose that its test cannot
fail on a wrong scale.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "MAX_RTOL",
    "TINY_BACKWARD",
    "TINY_FORWARD",
    "TINY_IMAGE_BACKWARD",
    "TINY_IMAGE_FORWARD",
    "assert_close",
    "assert_loss_close",
    "eps",
    "rounding_rtol",
]


# A 1% error (a wrong scale, a dropped term of that size) must always fail: normwise, 1% of an entry can hide under
# rtol · (|e| + max|e|) <= 2 · rtol · max|e| only when rtol >= 0.005.
MAX_RTOL = 0.004


def _check_rtol(rtol: float) -> None:
    if not 0 < rtol <= MAX_RTOL:
        raise ValueError(f"rtol={rtol:.3g} is outside (0, {MAX_RTOL}]: it would let a 1% error pass.")


def eps(dtype: torch.dtype = torch.float32) -> float:
    """Unit roundoff of ``dtype`` (half the gap between 1 and the next number): 2**-24 for float32."""
    return torch.finfo(dtype).eps / 2


def rounding_rtol(
    *, terms: int, depth: int = 1, gain: float = 1.0, dtype: torch.dtype = torch.float32, safety: float = 8.0
) -> float:
    """Relative tolerance for two evaluations of one function in ``dtype`` that differ only in rounding.

    Args:
        terms: the length of the longest reduction (a hidden size, a batch, a number of pairs).
        depth: how many such reductions are chained (layers x matmuls per layer; three times that with a backward).
        gain: the condition number of what follows (``1/τ`` for a softmax at temperature ``τ``).
        dtype: the precision of the computation under test (a float64 reference adds nothing).
        safety: the constant the ``sqrt(depth · terms)`` estimate leaves out.
    """
    return safety * gain * math.sqrt(depth * terms) * eps(dtype)


# The tiny backbones of mm_embed_trl.demo.tiny: 2 decoder layers of width 64 (heads of 16, MLP 128). A forward chains
# about 8 reductions of <= 128 terms per layer (norm, q/k/v projections, attention scores, attention-weighted values,
# output projection, MLP up and down) plus the final norm; an image first goes through the 2 vision layers and the
# merger (the same count again). A backward runs each reduction twice more (input and weight gradients).
TINY_FORWARD = dict(terms=128, depth=2 * 8 + 1)
TINY_BACKWARD = dict(terms=128, depth=3 * (2 * 8 + 1))
TINY_IMAGE_FORWARD = dict(terms=128, depth=2 * (2 * 8 + 1))
TINY_IMAGE_BACKWARD = dict(terms=128, depth=3 * 2 * (2 * 8 + 1))


def assert_close(actual, expected, *, rtol: float, msg: str | None = None) -> None:
    """Normwise comparison: every entry within ``rtol · (|expected| + max|expected|)`` of ``expected``."""
    _check_rtol(rtol)
    actual = torch.as_tensor(actual).detach()
    expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device).detach()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=msg)


def assert_loss_close(actual, expected, *, rtol: float) -> None:
    """A loss against its reference. Losses over cosine similarities are O(1) quantities whose rounding error is
    absolute (``rtol`` already carries the 1/τ gain), so the tolerance is ``rtol · max(1, |expected|)``."""
    _check_rtol(rtol)
    actual, expected = (float(x.detach()) if torch.is_tensor(x) else float(x) for x in (actual, expected))
    tol = rtol * max(1.0, abs(expected))
    diff = abs(actual - expected)
    assert diff <= tol, f"loss {actual!r} != {expected!r} (|diff| {diff:.3g} > {tol:.3g})"
