"""Cross-rank gathering: single-process identities, and the N×B ≡ 1×N·B proof with 2 real DDP processes.

The 2-process part launches ``tests/dist_scripts/gather_equivalence.py`` once with
``torchrun --standalone --nproc_per_node 2`` (gloo on CPU) and compares each rank's results with a
single process on the full, uneven (3 + 5 rows) global batch. Those tests are marked ``slow`` (the project's
marker for multi-process runs; about 10-20 s on 2 cores, mostly two ``import torch``); CI still runs them.
"""

from __future__ import annotations

import copy
from pathlib import Path

import launching
import pytest
import torch
from numerics import assert_close, assert_loss_close, rounding_rtol
from scripts import load_script

from mm_embed_trl.distributed import (
    distributed_loss_scale,
    gather_no_grad,
    gather_sizes,
    gather_with_grad,
    is_distributed,
    rank,
    world_size,
)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "gather_equivalence.py"
# Ranks embed their own 3 or 5 rows where the reference embeds all 8 at once: the same function, other rounding.
# The script's MLP reduces over <= 16 features, the losses over <= 24 candidates at temperature 0.05 (gain 20);
# the forward is 2 layers + 3 loss reductions, the backward twice that again.
LOSS_RTOL = rounding_rtol(terms=24, depth=2 + 3, gain=20)
GRAD_RTOL = rounding_rtol(terms=24, depth=3 * (2 + 3), gain=20)


def test_single_process_identities():
    assert not is_distributed()
    assert world_size() == 1 and rank() == 0 and distributed_loss_scale() == 1.0
    t = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(t) is t
    out, offset = gather_with_grad(t, return_offset=True)
    assert out is t and offset == 0
    g = gather_no_grad(t)
    assert not g.requires_grad and torch.equal(g, t)
    assert gather_sizes(3) == [3]


def _load_script_module():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gather_equivalence")
    launching.run(SCRIPT, "--out", out, processes=2)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return ranks, _load_script_module()


@pytest.fixture(scope="module")
def single_process(two_process_run):
    """The definition: one process, no DDP, no gather, the full global batch."""
    _, ge = two_process_run
    prob = ge.build_problem()
    total = sum(ge.RANK_SIZES)

    model = copy.deepcopy(prob["model"])
    out = model(torch.cat([prob["xq"], prob["xp"], prob["xn"].reshape(-1, ge.IN_DIM)]))
    hardneg = ge.hardneg_loss(out[:total], out[total : 2 * total], out[2 * total :], prob["ids"])
    hardneg.backward()
    hardneg_grads = [p.grad.clone() for p in model.parameters()]

    model = copy.deepcopy(prob["model"])
    distill = ge.distill_loss(model(prob["xq"]), prob["teacher"])
    distill.backward()
    distill_grads = [p.grad.clone() for p in model.parameters()]
    return {
        "hardneg": (hardneg.item(), hardneg_grads),
        "distill": (distill.item(), distill_grads),
    }


def assert_grads_close(got, want, what):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None, f"{what}: parameter {i} got no gradient"
        assert_close(a, b, rtol=GRAD_RTOL, msg=lambda m, i=i: f"{what}, parameter {i}: {m}")


@pytest.mark.slow
def test_gather_uneven_sizes_offsets_and_local_autograd(two_process_run):
    ranks, ge = two_process_run
    for r, res in enumerate(ranks):
        g = res["gather"]
        assert res["world_size"] == 2 and res["scale"] == 2.0
        assert g["offset"] == sum(ge.RANK_SIZES[:r]) and g["shape"] == (8, 3)
        # rank 0's 3 rows of 1s, then rank 1's 5 rows of 2s, in rank order on every rank
        assert torch.equal(g["values"], torch.cat([torch.full((3, 3), 1.0), torch.full((5, 3), 2.0)]))
        # the local slice carries autograd: d(sum)/d(local) = 1 everywhere
        assert torch.equal(g["local_grad"], torch.ones(ge.RANK_SIZES[r], 3))
        assert torch.equal(g["ids"], ge.build_problem()["ids"])
        assert g["bools"].dtype == torch.bool and torch.equal(g["bools"], ge.build_problem()["ids"] % 2 == 1)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["hardneg", "distill"])
def test_two_processes_match_one_process_on_the_global_batch(two_process_run, single_process, scenario):
    ranks, _ = two_process_run
    want_loss, want_grads = single_process[scenario]
    for r, res in enumerate(ranks):
        assert_loss_close(res[scenario]["loss"], want_loss, rtol=LOSS_RTOL)
        assert_grads_close(res[scenario]["grads"], want_grads, f"{scenario} rank {r}")


@pytest.mark.slow
def test_the_trap_gathering_without_the_local_slice_changes_gradients(two_process_run, single_process):
    """Proves the equivalence test can fail: all_gather without putting the local slice back (UniME's bug)."""
    ranks, _ = two_process_run
    want_loss, want_grads = single_process["hardneg"]
    res = ranks[0]["naive_gather"]
    assert_loss_close(res["loss"], want_loss, rtol=LOSS_RTOL)  # same value...
    with pytest.raises(AssertionError):
        assert_grads_close(res["grads"], want_grads, "naive gather")  # ...wrong gradient


@pytest.mark.slow
def test_gradcache_under_ddp_matches_and_all_reduces_once(two_process_run, single_process):
    ranks, _ = two_process_run
    want_loss, want_grads = single_process["hardneg"]
    buckets = ranks[0]["hardneg"]["allreduce"]  # all-reduces of one plain DDP step
    assert buckets >= 1
    for r, res in enumerate(ranks):
        gc = res["gradcache_hardneg"]
        assert_loss_close(gc["loss"], want_loss, rtol=LOSS_RTOL)
        assert_grads_close(gc["grads"], want_grads, f"GradCache rank {r}")
        # 3 sides × 2-3 chunks were re-run, yet DDP synchronised once (the last chunk)
        assert gc["allreduce"] == buckets

        acc = res["gradcache_no_sync"]
        assert acc["allreduce_inside_no_sync"] == 0 and acc["allreduce_after"] == buckets
        assert_grads_close(acc["grads"], [2 * g for g in want_grads], f"accumulated GradCache rank {r}")

        for it, step in enumerate(res["gradcache_static_graph"]):
            assert_grads_close(step["grads"], want_grads, f"static-graph GradCache rank {r} iteration {it}")
        assert res["gradcache_static_graph"][1]["allreduce"] == buckets

        unused = res["gradcache_find_unused"]
        n = len(want_grads)
        assert_grads_close(unused["grads"][:n], want_grads, f"find_unused GradCache rank {r}")
        assert all(g is None for g in unused["grads"][n:])  # the unused parameter stays untouched


class _ThreadRanks:
    """A fake process group for one process: each rank is a thread, `all_gather` meets at a barrier.

    Like a real backend, it refuses to all-gather tensors of different shapes (gloo errors, NCCL may hang).
    """

    def __init__(self, monkeypatch, world: int):
        import threading

        from mm_embed_trl.distributed import gather as gather_module

        self.world, self.local = world, threading.local()
        self.barrier = threading.Barrier(world, timeout=30)
        self.slots: list = [None] * world
        monkeypatch.setattr(gather_module, "world_size", lambda group=None: world)
        monkeypatch.setattr(gather_module, "rank", lambda group=None: self.local.rank)
        monkeypatch.setattr(torch.distributed, "all_gather", self.all_gather)

    def all_gather(self, outputs, tensor, group=None):
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        shapes = [tuple(s.shape) for s in self.slots]
        try:
            if len(set(shapes)) > 1:
                raise RuntimeError(f"backend: all_gather of mismatched shapes {shapes}")
            for out, piece in zip(outputs, self.slots):
                out.copy_(piece)
        finally:
            self.barrier.wait()  # nobody overwrites a slot before every rank has read them all

    def run(self, fn, per_rank_inputs):
        """`fn(input)` on every rank at once; each rank's result or exception."""
        import threading

        results: list = [None] * self.world

        def target(r):
            self.local.rank = r
            try:
                results[r] = fn(per_rank_inputs[r])
            except Exception as err:  # noqa: BLE001 - handed back to the test
                results[r] = err

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return results


@pytest.mark.parametrize(
    "shapes",
    [[(3, 2, 8), (2, 3, 8)], [(3, 8), (2, 1, 8)]],
    ids=["different-negative-counts", "different-ranks"],
)
def test_gather_refuses_ranks_whose_trailing_dims_differ_on_every_rank(monkeypatch, shapes):
    """Streams with num_negatives=None can settle on K negatives per row on one rank and another K elsewhere: a
    (B, K, D) gather must then fail with a clear message on every rank, not with a backend error or a hang."""
    ranks = _ThreadRanks(monkeypatch, world=2)
    for fn in (gather_with_grad, gather_no_grad):
        results = ranks.run(fn, [torch.randn(*s) for s in shapes])
        for err in results:
            assert isinstance(err, ValueError), err
            message = str(err)
            assert f"rank 0: {shapes[0]}" in message and f"rank 1: {shapes[1]}" in message, message
            assert "num_negatives" in message and "same number of negatives" in message, message


def test_gather_on_fake_ranks_pads_uneven_rows_and_keeps_local_autograd(monkeypatch):
    """The shape exchange leaves the ordinary path as it was: uneven rows, offsets, local autograd, bool tensors."""
    ranks = _ThreadRanks(monkeypatch, world=2)
    inputs = [torch.randn(3, 2, 4, requires_grad=True), torch.randn(5, 2, 4, requires_grad=True)]
    whole = torch.cat([t.detach() for t in inputs])
    for r, (out, offset) in enumerate(ranks.run(lambda t: gather_with_grad(t, return_offset=True), inputs)):
        assert torch.equal(out.detach(), whole) and offset == (0, 3)[r]
        out.sum().backward()
        assert torch.equal(inputs[r].grad, torch.ones_like(inputs[r]))
    for out in ranks.run(gather_no_grad, inputs):
        assert not out.requires_grad and torch.equal(out, whole)
    masks = [torch.tensor([True, False]), torch.tensor([False, True, True])]
    for out in ranks.run(gather_no_grad, masks):
        assert out.dtype == torch.bool and out.tolist() == [True, False, False, True, True]
