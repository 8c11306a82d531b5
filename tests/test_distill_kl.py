"""UniME stage-1 batch-similarity KL against explicit Σ p log(p/q) references."""

from __future__ import annotations

import doctest

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close, assert_loss_close, rounding_rtol

import mm_embed_trl.losses.distill_kl as distill_module
from mm_embed_trl.losses import DistillKLLoss, distill_kl_loss


def reference_rows(student, teacher, temperature, direction, mask_diagonal=False, teacher_temperature=None):
    """Row-wise KL written out with Python loops in float64: Σ_j P(i,j) log(P(i,j) / Q(i,j))."""
    s = F.normalize(student.double(), dim=-1)
    t = F.normalize(teacher.double(), dim=-1)
    n = s.shape[0]
    rows = []
    for i in range(n):
        cols = [j for j in range(n) if not (mask_diagonal and j == i)]
        ps = torch.softmax(torch.stack([s[i] @ s[j] for j in cols]) / temperature, 0)
        pt = torch.softmax(torch.stack([t[i] @ t[j] for j in cols]) / (teacher_temperature or temperature), 0)
        p, q = (pt, ps) if direction == "teacher_student" else (ps, pt)
        rows.append(sum(p[k] * torch.log(p[k] / q[k]) for k in range(len(cols))))
    return torch.stack(rows)


@pytest.mark.parametrize("direction", ["teacher_student", "student_teacher"])
@pytest.mark.parametrize("mask_diagonal", [False, True])
@pytest.mark.parametrize("temperature", [0.02, 0.2])
def test_matches_explicit_reference(direction, mask_diagonal, temperature):
    g = torch.Generator().manual_seed(0)
    # Low dimension and a shared component: similarities spread widely, so rows are not one-hot even at τ=0.02.
    base = torch.randn(1, 4, generator=g)
    student = (base + 0.7 * torch.randn(6, 4, generator=g)).requires_grad_(True)
    teacher = base.repeat(1, 3) + 0.7 * torch.randn(6, 12, generator=g)  # different dim
    ref = reference_rows(student, teacher, temperature, direction, mask_diagonal)
    for reduction, expected in (("sum", ref.sum()), ("mean", ref.mean()), ("none", ref)):
        got = distill_kl_loss(
            student, teacher, temperature=temperature, direction=direction, reduction=reduction,
            mask_diagonal=mask_diagonal,
        )
        # float32 loss against the float64 reference: reductions over <= 12 features and 6 rows, logits x 1/tau
        assert_close(got.double(), expected.detach(), rtol=rounding_rtol(terms=12, depth=3, gain=1 / temperature))
    assert ref.sum().item() > 1e-3  # not a vacuous comparison
    # gradient w.r.t. the student against autograd through the reference (float64 on both sides)
    student64 = student.detach().double().requires_grad_(True)
    loss64 = distill_kl_loss(student64, teacher.double(), temperature=temperature, direction=direction,
                             mask_diagonal=mask_diagonal)
    assert loss64.dtype == torch.float64
    got_grad = torch.autograd.grad(loss64, student64)[0]
    want_grad = torch.autograd.grad(reference_rows(student64, teacher, temperature, direction, mask_diagonal).sum(),
                                    student64)[0]
    assert_close(got_grad, want_grad, rtol=rounding_rtol(terms=12, depth=9, gain=1 / temperature, dtype=torch.float64))


def test_mean_reduction_equals_kl_div_batchmean():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 16, generator=g)
    tau = 0.1
    log_ps = F.log_softmax(F.normalize(s, dim=-1) @ F.normalize(s, dim=-1).T / tau, dim=-1)
    pt = F.softmax(F.normalize(t, dim=-1) @ F.normalize(t, dim=-1).T / tau, dim=-1)
    expected = F.kl_div(log_ps, pt, reduction="batchmean")  # KL(P_t ‖ P_s) averaged over rows
    got = distill_kl_loss(s, t, temperature=tau, reduction="mean")
    assert_loss_close(got, expected, rtol=rounding_rtol(terms=16, depth=3, gain=1 / tau))  # other summation order


def test_direction_switch_changes_value():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    forward = distill_kl_loss(s, t, temperature=0.2)
    reverse = distill_kl_loss(s, t, temperature=0.2, direction="student_teacher")
    assert abs(float(forward) - float(reverse)) > 1e-4
    swapped = distill_kl_loss(t, s, temperature=0.2)  # KL(P_s‖P_t) = swap roles
    assert_loss_close(reverse, swapped, rtol=rounding_rtol(terms=4, depth=3, gain=1 / 0.2))


def test_zero_for_identical_similarity_structure_in_other_dimension():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(7, 6, generator=g)
    assert float(distill_kl_loss(teacher, teacher)) == 0.0
    # Same Gram matrix in a larger space: pad to 10 dims, rotate by a random orthogonal matrix, rescale.
    rotation, _ = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64))
    student = (F.pad(teacher.double(), (0, 4)) @ rotation * 3.0).float()
    # Equal Gram matrices up to float32 rounding of the rotated vectors (10-dim dot products, logits x 1/0.2)
    zero_tol = rounding_rtol(terms=10, depth=3, gain=1 / 0.2)
    assert_loss_close(distill_kl_loss(student, teacher, temperature=0.2), 0.0, rtol=zero_tol)
    reverse = distill_kl_loss(student, teacher, temperature=0.2, direction="student_teacher")
    assert_loss_close(reverse, 0.0, rtol=zero_tol)
    # ...whereas a student with a different structure is penalised.
    assert float(distill_kl_loss(torch.randn(7, 10, generator=g), teacher, temperature=0.2)) > 0.1


def test_teacher_is_constant_and_module_wrapper():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(4, 8, generator=g, requires_grad=True)
    t = torch.randn(4, 8, generator=g, requires_grad=True)
    module = DistillKLLoss(temperature=0.1, direction="student_teacher", reduction="mean", mask_diagonal=True)
    loss = module(s, t)
    # the module calls the function: the same computation
    assert torch.equal(
        loss, distill_kl_loss(s, t, temperature=0.1, direction="student_teacher", reduction="mean", mask_diagonal=True)
    )
    loss.backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()
    assert t.grad is None  # detach_teacher
    assert "direction='student_teacher'" in repr(module)


def test_teacher_temperature_and_bf16():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(5, 8, generator=g), torch.randn(5, 12, generator=g)
    ref = reference_rows(s, t, 0.1, "teacher_student", teacher_temperature=0.05).sum()
    got = distill_kl_loss(s, t, temperature=0.1, teacher_temperature=0.05)
    assert_loss_close(got, ref, rtol=rounding_rtol(terms=12, depth=3, gain=1 / 0.05))
    low = distill_kl_loss(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32 and torch.isfinite(low)


def test_validation_messages():
    with pytest.raises(ValueError, match="student has 3 rows but teacher has 4"):
        distill_kl_loss(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="direction"):
        distill_kl_loss(torch.randn(3, 4), torch.randn(3, 4), direction="sideways")
    with pytest.raises(ValueError, match="reduction"):
        distill_kl_loss(torch.randn(3, 4), torch.randn(3, 4), reduction="batchmean")
    with pytest.raises(ValueError, match="at least 2 rows"):
        distill_kl_loss(torch.randn(1, 4), torch.randn(1, 4), mask_diagonal=True)


def test_docstring_examples_run():
    result = doctest.testmod(distill_module)
    assert result.attempted > 0 and result.failed == 0
