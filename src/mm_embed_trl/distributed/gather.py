"""Cross-rank gathering of embeddings that keeps the local gradient, and the matching loss scale.

Contrastive losses want every query to see the targets of *every* rank as negatives, so embeddings are
all-gathered before the loss. ``torch.distributed.all_gather`` returns tensors without autograd history:
used naively, the gathered copy of this rank's own embeddings is a constant too, and the negatives (and,
if queries are gathered, everything) silently stop producing gradients — the bug in the loss published with
UniME's code (arXiv 2504.17432); the N processes x batch B = 1 process x batch N*B test is ``tests/test_gather.py``.

The scheme used here ("local slice"):

1. every rank gathers the embeddings of all ranks and puts its *own* tensor (with its autograd history)
   back in place of its gathered copy (:func:`gather_with_grad`); the other ranks' rows are constants;
2. every rank computes the **same global loss** ``L`` over the global batch;
3. the loss is multiplied by :func:`distributed_loss_scale` (= world size) before ``backward``.

Why 3 is right: rank ``r`` only back-propagates through its own rows, so its parameter gradient is
``∂L/∂e_r · ∂e_r/∂θ``. DDP (and DeepSpeed) *average* gradients over the ``W`` ranks, giving
``(1/W) Σ_r ∂L/∂e_r · ∂e_r/∂θ = (1/W) dL/dθ``. Scaling the loss by ``W`` therefore yields exactly the
gradient of single-process training on the global batch — with any per-rank batch sizes, since DDP
averages per rank, not per example. The reported loss value should be the *unscaled* ``L`` (identical on
all ranks). ``tests/test_gather.py`` proves N processes × B ≡ 1 process × N·B for the losses of this
package, uneven per-rank batches included.

All functions are identities (and :func:`distributed_loss_scale` is 1) when ``torch.distributed`` is
not initialised, so the same training code runs on one process.
"""

from __future__ import annotations

import math
from typing import Literal, overload

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "distributed_loss_scale",
    "gather_no_grad",
    "gather_sizes",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when ``torch.distributed`` is available and a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: dist.ProcessGroup | None = None) -> int:
    """Number of ranks in ``group`` (default group), 1 when ``torch.distributed`` is not initialised."""
    return dist.get_world_size(group) if is_distributed() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (default group), 0 when ``torch.distributed`` is not initialised."""
    return dist.get_rank(group) if is_distributed() else 0


def gather_sizes(
    num_rows: int, *, device: torch.device | str = "cpu", group: dist.ProcessGroup | None = None
) -> list[int]:
    """All ranks' first-dimension sizes (``[num_rows]`` on a single process).

    ``device`` must suit the backend (a CUDA device for NCCL); pass the device of the data being gathered.
    """
    if world_size(group) == 1:
        return [int(num_rows)]
    local = torch.tensor([num_rows], dtype=torch.long, device=device)
    sizes = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(sizes, local, group=group)
    return torch.cat(sizes).tolist()  # one device-to-host copy, not one per rank


# Dimensions a shape exchange carries; a tensor with more has the rest folded into the last slot as their product.
# Fixed, so every rank all-gathers a tensor of one size whatever shape it holds.
_SHAPE_SLOTS = 16


def _gather_shapes(
    shape: torch.Size, *, device: torch.device | str, group: dist.ProcessGroup | None
) -> list[tuple[int, ...]]:
    """All ranks' shapes, in the one all-gather that used to carry only the first-dimension sizes.

    Exact shapes, but for tensors of more than ``_SHAPE_SLOTS`` dimensions, whose trailing dimensions come as one
    product (ranks still compare their numbers of dimensions).
    """
    dims = [int(d) for d in shape]
    if len(dims) > _SHAPE_SLOTS:
        dims = dims[: _SHAPE_SLOTS - 1] + [math.prod(dims[_SHAPE_SLOTS - 1 :])]
    local = torch.tensor([len(shape), *dims, *[0] * (_SHAPE_SLOTS - len(dims))], dtype=torch.long, device=device)
    gathered = [torch.empty_like(local) for _ in range(world_size(group))]
    dist.all_gather(gathered, local, group=group)
    # One device-to-host copy, not one per rank. A folded shape keeps its true length by padding the fold with 1s.
    rows = torch.stack(gathered).tolist()
    return [tuple(slots[: min(ndim, _SHAPE_SLOTS)] + [1] * max(ndim - _SHAPE_SLOTS, 0)) for ndim, *slots in rows]


def _check_trailing_dims(shapes: list[tuple[int, ...]]) -> None:
    """Raise, on every rank alike (all hold the same ``shapes``), when ranks' tensors differ beyond dim 0."""
    if all(s[1:] == shapes[0][1:] for s in shapes):
        return
    per_rank = ", ".join(f"rank {r}: {tuple(s)}" for r, s in enumerate(shapes))
    raise ValueError(
        f"Cannot gather across ranks: the tensors differ beyond the first (batch) dimension ({per_rank}); only "
        "the first dimension may differ per rank. For explicit negatives ((B, K, D), K negatives per row) this "
        "means the ranks settled on different counts K: set num_negatives so every rank uses one count, or make "
        "every row of the dataset hold the same number of negatives."
    )


def _all_gather_rows(t: Tensor, group: dist.ProcessGroup | None) -> tuple[list[Tensor], list[int]]:
    """All-gather ``t`` along dim 0 (sizes may differ per rank); returns the per-rank pieces and sizes.

    The pieces carry no autograd history. Uneven sizes are handled by padding every rank to the largest
    size, gathering, then trimming (``all_gather`` needs equal shapes). Other dimensions must match on every
    rank; a ``ValueError`` naming each rank's shape says when they do not.
    """
    if t.dim() == 0:
        raise ValueError("gather expects a tensor with a first (batch) dimension, got a 0-dim tensor.")
    data = t.detach()
    # Some backends (gloo) do not all-gather bool tensors; move them as uint8.
    is_bool = data.dtype == torch.bool
    if is_bool:
        data = data.to(torch.uint8)
    data = data.contiguous()
    # The whole shape travels in the size exchange, so ranks whose other dimensions differ fail here with a
    # message, on every rank alike, rather than in (or hung on) the all_gather below.
    shapes = _gather_shapes(data.shape, device=data.device, group=group)
    _check_trailing_dims(shapes)
    sizes = [int(s[0]) for s in shapes]
    max_rows = max(sizes)
    if data.shape[0] < max_rows:
        pad = data.new_zeros((max_rows - data.shape[0], *data.shape[1:]))
        data = torch.cat([data, pad], dim=0)
    pieces = [torch.empty_like(data) for _ in sizes]
    dist.all_gather(pieces, data, group=group)
    pieces = [piece[:n] for piece, n in zip(pieces, sizes)]
    if is_bool:
        pieces = [piece.bool() for piece in pieces]
    return pieces, sizes


def gather_no_grad(t: Tensor, *, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0, without gradient (e.g. teacher embeddings, content ids).

    First-dimension sizes may differ per rank; other dimensions must match. Returns ``t.detach()`` when not
    distributed.
    """
    if world_size(group) == 1:
        return t.detach()
    pieces, _ = _all_gather_rows(t, group)
    return torch.cat(pieces, dim=0)


@overload
def gather_with_grad(
    t: Tensor, *, return_offset: Literal[False] = False, group: dist.ProcessGroup | None = None
) -> Tensor: ...
@overload
def gather_with_grad(
    t: Tensor, *, return_offset: Literal[True], group: dist.ProcessGroup | None = None
) -> tuple[Tensor, int]: ...


def gather_with_grad(
    t: Tensor, *, return_offset: bool = False, group: dist.ProcessGroup | None = None
) -> Tensor | tuple[Tensor, int]:
    """Concatenate ``t`` from all ranks along dim 0, keeping autograd for this rank's own rows.

    Rows of other ranks are constants; this rank's rows are ``t`` itself (so gradients reach the local
    encoder). Combine with :func:`distributed_loss_scale` — see the module docstring for why. First-dim
    sizes may differ per rank; the order is rank 0's rows, then rank 1's, ...

    Args:
        t: local tensor ``(n_local, ...)``.
        return_offset: also return the row offset of this rank's rows in the gathered tensor, so that
            e.g. ``global[offset:offset + n_local]`` is ``t``.
        group: process group (default: the default group).

    Returns:
        ``(sum(n_r), ...)`` tensor, or ``(tensor, offset)`` when ``return_offset``. Identity (offset 0) when
        not distributed.
    """
    if world_size(group) == 1:
        return (t, 0) if return_offset else t
    pieces, sizes = _all_gather_rows(t, group)
    me = rank(group)
    # The fix for the "gather without gradient" trap: put the local tensor (with history) back.
    pieces[me] = t
    out = torch.cat(pieces, dim=0)
    return (out, sum(sizes[:me])) if return_offset else out


def distributed_loss_scale(group: dist.ProcessGroup | None = None) -> float:
    """The factor (world size; 1.0 on one process) to multiply a gathered global loss by before backward.

    Under DDP/DeepSpeed gradient *averaging*, a loss over the global batch computed identically on every
    rank, with gradient only through the local slice (:func:`gather_with_grad`), yields ``1/W`` of the
    single-process gradient; multiplying by ``W`` restores it. Log the unscaled loss.
    """
    return float(world_size(group))
