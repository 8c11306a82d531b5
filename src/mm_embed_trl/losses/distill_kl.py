"""Batch-similarity KL distillation (UniME stage 1, "textual discriminative knowledge distillation").

Reference: Gu et al., UniME, arXiv 2504.17432. For a batch of ``n`` texts with student embeddings ``s_i``
and (offline, precomputed) teacher embeddings ``t_i``, both L2-normalised inside this function:

    P_s(i, ·) = softmax_j(s_i · s_j / τ),      P_t(i, ·) = softmax_j(t_i · t_j / τ_t)
    L = Σ_i KL(P_t(i) ‖ P_s(i))        (direction="teacher_student", the usual distillation direction)
      = Σ_i Σ_j P_t(i, j) (log P_t(i, j) − log P_s(i, j))

``direction="student_teacher"`` computes ``Σ_i KL(P_s(i) ‖ P_t(i))`` (the order the paper prints).
``reduction="sum"`` (default, the paper's Σ_i) sums over rows; ``"mean"`` averages over rows
(``batchmean``: the scale then does not grow with the batch); ``"none"`` returns the ``(n,)`` row terms.
Only ``n × n`` similarity matrices are compared, so student and teacher dimensions may differ, and the
loss is invariant to any rotation of either embedding space.

The diagonal (each text against itself, similarity 1) is included by default, as in UniME's formula (arXiv
2504.17432), whose softmax runs over the whole batch.
Note that with τ = 0.02 the self-similarity dominates each row (a pair at cosine 0.8 gets ``e^{-10}`` of
the mass of the diagonal), so the signal comes mostly from close pairs; ``mask_diagonal=True`` drops the
diagonal and distils the distribution over the *other* texts only.

Distributed use: gather the student embeddings with :func:`~mm_embed_trl.distributed.gather_with_grad`
and the teacher's with ``gather_no_grad``, compute the full ``n × n`` loss on every rank, and multiply by
:func:`~mm_embed_trl.distributed.distributed_loss_scale` before backward: the gradients then equal a
single process on the global batch (proved in ``tests/test_gather.py``). The teacher is treated as a
constant (``detach_teacher``).

Example::

    >>> import torch
    >>> from mm_embed_trl.losses import distill_kl_loss
    >>> student, teacher = torch.randn(8, 64), torch.randn(8, 384)
    >>> distill_kl_loss(student, teacher, temperature=0.02).ndim
    0
    >>> float(distill_kl_loss(teacher, teacher))  # identical similarity structure
    0.0
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DistillKLLoss", "distill_kl_loss"]

Direction = Literal["teacher_student", "student_teacher"]
Reduction = Literal["sum", "mean", "none"]


def _at_least_float32(x: Tensor) -> Tensor:
    """Half precision is too coarse for logits of size 1/τ = 50; float64 inputs stay float64."""
    return x if x.dtype == torch.float64 else x.float()


def _row_log_probs(x: Tensor, temperature: float, mask_diagonal: bool, normalize: bool) -> Tensor:
    x = _at_least_float32(x)
    if normalize:
        x = F.normalize(x, dim=-1)
    logits = x @ x.T / temperature
    if mask_diagonal:
        # Drop the diagonal by reshaping instead of filling -inf: KL terms 0·(-inf − -inf) would be NaN.
        n = logits.shape[0]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=logits.device)
        logits = logits[off_diagonal].view(n, n - 1)
    return F.log_softmax(logits, dim=-1)


def distill_kl_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    temperature: float = 0.02,
    teacher_temperature: float | None = None,
    direction: Direction = "teacher_student",
    reduction: Reduction = "sum",
    mask_diagonal: bool = False,
    normalize: bool = True,
    detach_teacher: bool = True,
) -> Tensor:
    """KL divergence between the student's and the teacher's in-batch similarity distributions.

    Args:
        student: ``(n, D_s)`` student embeddings (gradient flows here).
        teacher: ``(n, D_t)`` teacher embeddings, same rows in the same order; ``D_t`` may differ from ``D_s``.
        temperature: τ of the student softmax (and of the teacher's unless ``teacher_temperature`` is set).
        teacher_temperature: τ_t of the teacher softmax; None = ``temperature``.
        direction: ``"teacher_student"`` = KL(P_t ‖ P_s) (default), ``"student_teacher"`` = KL(P_s ‖ P_t).
        reduction: ``"sum"`` over rows (paper, default), ``"mean"`` over rows, or ``"none"`` → ``(n,)``.
        mask_diagonal: exclude each row's self-similarity (needs n >= 2; with n = 2 each row keeps one
            entry and the loss is 0).
        normalize: L2-normalise both inputs first (the paper's setting; the KL is then rotation-invariant).
        detach_teacher: treat the teacher as a constant (it is precomputed offline in UniME).

    Returns:
        Scalar loss (or ``(n,)`` with ``reduction="none"``), float32 (float64 for float64 inputs).
    """
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"distill_kl_loss expects (n, dim) tensors, got student {tuple(student.shape)} and "
            f"teacher {tuple(teacher.shape)}."
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student has {student.shape[0]} rows but teacher has {teacher.shape[0]}: pass the teacher embedding "
            "of every student row, in the same order (gather both across ranks the same way)."
        )
    n = student.shape[0]
    if n == 0:
        raise ValueError("distill_kl_loss got an empty batch.")
    if mask_diagonal and n < 2:
        raise ValueError("mask_diagonal=True needs at least 2 rows (each row is compared with the others).")
    if temperature <= 0 or (teacher_temperature is not None and teacher_temperature <= 0):
        raise ValueError(f"temperatures must be > 0, got {temperature} and {teacher_temperature}.")
    if direction not in ("teacher_student", "student_teacher"):
        raise ValueError(f"direction must be 'teacher_student' or 'student_teacher', got {direction!r}.")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}.")

    if detach_teacher:
        teacher = teacher.detach()
    log_ps = _row_log_probs(student, temperature, mask_diagonal, normalize)
    log_pt = _row_log_probs(teacher, teacher_temperature or temperature, mask_diagonal, normalize)
    if log_ps.dtype != log_pt.dtype:  # one side float64: compare in float64
        log_ps, log_pt = log_ps.double(), log_pt.double()
    if direction == "teacher_student":
        rows = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(dim=1)  # KL(P_t ‖ P_s)
    else:
        rows = F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(dim=1)  # KL(P_s ‖ P_t)
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.mean()
    return rows


class DistillKLLoss(nn.Module):
    """``nn.Module`` wrapper of :func:`distill_kl_loss` holding its options.

    Example::

        >>> import torch
        >>> from mm_embed_trl.losses import DistillKLLoss
        >>> DistillKLLoss(temperature=0.05)(torch.randn(4, 8), torch.randn(4, 16)).ndim
        0
    """

    def __init__(
        self,
        temperature: float = 0.02,
        teacher_temperature: float | None = None,
        direction: Direction = "teacher_student",
        reduction: Reduction = "sum",
        mask_diagonal: bool = False,
        normalize: bool = True,
        detach_teacher: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.teacher_temperature = teacher_temperature
        self.direction = direction
        self.reduction = reduction
        self.mask_diagonal = mask_diagonal
        self.normalize = normalize
        self.detach_teacher = detach_teacher

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return distill_kl_loss(
            student,
            teacher,
            temperature=self.temperature,
            teacher_temperature=self.teacher_temperature,
            direction=self.direction,
            reduction=self.reduction,
            mask_diagonal=self.mask_diagonal,
            normalize=self.normalize,
            detach_teacher=self.detach_teacher,
        )

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, teacher_temperature={self.teacher_temperature}, "
            f"direction={self.direction!r}, reduction={self.reduction!r}, mask_diagonal={self.mask_diagonal}"
        )
