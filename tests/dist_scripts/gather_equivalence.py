"""N processes × B ≡ 1 process × N·B, for the gathered losses and for GradCache under real DDP.

Launched by ``tests/test_gather.py`` with ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU); also
runs under ``accelerate launch --multi_gpu --num_processes 2``. Every rank takes its (uneven) slice of one
global batch, runs each scenario and saves ``rank{r}.pt`` with the loss it computed, its parameter
gradients after DDP's averaging, and how many DDP all-reduces (comm-hook calls) the step made. The test
compares these with a single process on the full batch (built by :func:`build_problem`, shared so both
sides use identical data and initial weights).

Scenarios:
    hardneg / distill          plain DDP forward, gather_with_grad, loss × distributed_loss_scale
    gradcache_hardneg          the same through GradCache (chunk 2, three sides) with model=ddp
    gradcache_no_sync          GradCache step inside an outer ddp.no_sync() then a synced step (accumulation)
    gradcache_static_graph     DDP(static_graph=True), two GradCache iterations
    gradcache_find_unused      DDP(find_unused_parameters=True) with an unused parameter
    naive_gather               the UniME bug: positives all-gathered without putting the local slice back
"""

from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from mm_embed_trl.distributed import (
    GradCache,
    distributed_loss_scale,
    gather_no_grad,
    gather_with_grad,
    rank,
    world_size,
)
from mm_embed_trl.losses import distill_kl_loss, duplicate_mask_from_ids, hard_negative_infonce_loss

# Uneven on purpose: rank 0 holds 3 rows, rank 1 holds 5.
RANK_SIZES = (3, 5)
IN_DIM, EMB_DIM, TEACHER_DIM, NUM_NEG = 6, 8, 10, 2
HARDNEG_KWARGS = {"temperature": 0.05, "margin": 0.1, "top_k": 3, "symmetric": True}
DISTILL_KWARGS = {"temperature": 0.1, "reduction": "sum"}


class Encoder(nn.Module):
    def __init__(self, with_unused: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, EMB_DIM))
        # A parameter the forward never touches (like a frozen-out branch): needs find_unused_parameters.
        self.unused = nn.Linear(2, 2) if with_unused else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_problem() -> dict:
    """The global batch and the initial model, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    total = sum(RANK_SIZES)
    data = {
        "xq": torch.randn(total, IN_DIM, generator=g),
        "xp": torch.randn(total, IN_DIM, generator=g),
        "xn": torch.randn(total, NUM_NEG, IN_DIM, generator=g),
        "teacher": torch.randn(total, TEACHER_DIM, generator=g),
        # Content ids of the positives: rows 1 and 6 (on different ranks) share a target.
        "ids": torch.tensor([10, 11, 12, 13, 14, 15, 11, 17], dtype=torch.long),
    }
    torch.manual_seed(99)
    data["model"] = Encoder()
    torch.manual_seed(99)
    data["model_unused"] = Encoder(with_unused=True)
    return data


def hardneg_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The loss on the *global* batch: in-batch positives + explicit negatives, duplicates masked."""
    return hard_negative_infonce_loss(
        q, p, n.view(q.shape[0], NUM_NEG, EMB_DIM), candidate_duplicate_mask=duplicate_mask_from_ids(ids, ids),
        **HARDNEG_KWARGS,
    ).loss


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return distill_kl_loss(student, teacher, **DISTILL_KWARGS)


def local_slice(t: torch.Tensor, r: int) -> torch.Tensor:
    start = sum(RANK_SIZES[:r])
    return t[start : start + RANK_SIZES[r]]


def counting_ddp(model: nn.Module, **kwargs) -> tuple[DDP, dict]:
    ddp = DDP(copy.deepcopy(model), **kwargs)
    counter = {"allreduce": 0}

    def hook(state, bucket):
        counter["allreduce"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    ddp.register_comm_hook(None, hook)
    return ddp, counter


def grads_of(module: nn.Module) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.detach().clone() for p in module.parameters()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    r, w = rank(), world_size()
    assert w == len(RANK_SIZES), f"run with {len(RANK_SIZES)} processes, got {w}"
    torch.set_num_threads(1)
    prob = build_problem()
    xq, xp = local_slice(prob["xq"], r), local_slice(prob["xp"], r)
    xn, teacher, ids = local_slice(prob["xn"], r), local_slice(prob["teacher"], r), local_slice(prob["ids"], r)
    scale = distributed_loss_scale()
    results: dict = {"rank": r, "world_size": w, "scale": scale}

    # gather basics: uneven sizes, offsets, dtypes, autograd only on the local slice
    probe = torch.full((RANK_SIZES[r], 3), float(r + 1), requires_grad=True)
    gathered, offset = gather_with_grad(probe, return_offset=True)
    gathered.sum().backward()
    results["gather"] = {
        "offset": offset,
        "shape": tuple(gathered.shape),
        "values": gathered.detach(),
        "local_grad": probe.grad.clone(),
        "ids": gather_no_grad(ids),
        "bools": gather_no_grad(ids % 2 == 1),
    }

    def embed_all(module, q_in, p_in, n_in):
        out = module(torch.cat([q_in, p_in, n_in.reshape(-1, IN_DIM)]))
        b = q_in.shape[0]
        return out[:b], out[b : 2 * b], out[2 * b :]

    # hardneg: plain DDP
    ddp, counter = counting_ddp(prob["model"])
    q, p, n = embed_all(ddp, xq, xp, xn)
    loss = hardneg_loss(gather_with_grad(q), gather_with_grad(p), gather_with_grad(n), gather_no_grad(ids))
    (loss * scale).backward()
    results["hardneg"] = {"loss": loss.item(), "grads": grads_of(ddp.module), "allreduce": counter["allreduce"]}

    # distill: plain DDP
    ddp, counter = counting_ddp(prob["model"])
    loss = distill_loss(gather_with_grad(ddp(xq)), gather_no_grad(teacher))
    (loss * scale).backward()
    results["distill"] = {"loss": loss.item(), "grads": grads_of(ddp.module), "allreduce": counter["allreduce"]}

    def gradcache_step(ddp: DDP) -> float:
        cache = GradCache(chunk_size=2)
        q, hq = cache.embed(ddp, xq, name="query")
        p, hp = cache.embed(ddp, xp, name="positive")
        n, hn = cache.embed(ddp, xn.reshape(-1, IN_DIM), name="negative")
        loss = hardneg_loss(gather_with_grad(q), gather_with_grad(p), gather_with_grad(n), gather_no_grad(ids))
        cache.attach(loss, [hq, hp, hn], model=ddp)
        (loss * scale).backward()
        return loss.item()

    # GradCache under DDP: one all-reduce per step, same gradients
    ddp, counter = counting_ddp(prob["model"])
    loss_value = gradcache_step(ddp)
    results["gradcache_hardneg"] = {
        "loss": loss_value, "grads": grads_of(ddp.module), "allreduce": counter["allreduce"]
    }

    # Gradient accumulation: a GradCache step inside an outer no_sync must not all-reduce at all
    ddp, counter = counting_ddp(prob["model"])
    with ddp.no_sync():
        gradcache_step(ddp)
    inside = counter["allreduce"]
    gradcache_step(ddp)
    results["gradcache_no_sync"] = {
        "allreduce_inside_no_sync": inside,
        "allreduce_after": counter["allreduce"] - inside,
        "grads": grads_of(ddp.module),  # two accumulated identical micro-batches: 2 × the plain gradient
    }

    # Static-graph DDP: two iterations (the first one records the graph)
    ddp, counter = counting_ddp(prob["model"], static_graph=True)
    per_iter = []
    for _ in range(2):
        ddp.zero_grad(set_to_none=True)
        before = counter["allreduce"]
        gradcache_step(ddp)
        per_iter.append({"grads": grads_of(ddp.module), "allreduce": counter["allreduce"] - before})
    results["gradcache_static_graph"] = per_iter

    # find_unused_parameters=True with a parameter the forward never uses
    ddp, counter = counting_ddp(prob["model_unused"], find_unused_parameters=True)
    gradcache_step(ddp)
    results["gradcache_find_unused"] = {"grads": grads_of(ddp.module), "allreduce": counter["allreduce"]}

    # The trap: positives all-gathered with no gradient at all (local slice not put back)
    ddp, counter = counting_ddp(prob["model"])
    q, p, n = embed_all(ddp, xq, xp, xn)
    loss = hardneg_loss(gather_with_grad(q), gather_no_grad(p), gather_with_grad(n), gather_no_grad(ids))
    (loss * scale).backward()
    results["naive_gather"] = {"loss": loss.item(), "grads": grads_of(ddp.module)}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(results, out / f"rank{r}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
