"""GradCache gives the gradients of the plain full-graph backward (single process).

The 2-process DDP checks (one all-reduce per step, outer no_sync, static graph, find_unused_parameters)
run in ``tests/dist_scripts/gather_equivalence.py`` and are asserted in ``tests/test_gather.py``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close, rounding_rtol
from torch import nn
from transformers import BatchEncoding

import mm_embed_trl.distributed.grad_cache as gc_module
from mm_embed_trl.distributed import GradCache, RandContext, split_into_chunks
from mm_embed_trl.losses import hard_negative_infonce_loss

BATCH, IN_DIM, EMB_DIM, CHUNK = 8, 6, 5, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN_DIM, 32), nn.Dropout(0.3), nn.Tanh(), nn.Linear(32, EMB_DIM))


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, IN_DIM, generator=g), torch.randn(BATCH, IN_DIM, generator=g)


def contrastive(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return hard_negative_infonce_loss(q, p, temperature=0.1, margin=None, top_k=3).loss


def reference_grads(model, xq, xp, *, seed: int, scale: float = 1.0, chunk: int = CHUNK):
    """Plain backward with the whole graph kept, chunks embedded in the same order under the same seed
    (so that dropout draws the same masks as GradCache's no-grad pass)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    q = torch.cat([model(c) for c in xq.split(chunk)])
    p = torch.cat([model(c) for c in xp.split(chunk)])
    loss = contrastive(q, p)
    (loss * scale).backward()
    return loss.detach(), [t.grad.clone() for t in model.parameters()]


def gradcache_grads(model, xq, xp, *, seed: int, scale: float = 1.0, chunk: int = CHUNK):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    cache = GradCache(chunk_size=chunk)
    q, hq = cache.embed(model, xq, name="query")
    p, hp = cache.embed(model, xp, name="positive")
    assert q.grad_fn is None and q.requires_grad  # no graph kept from the first pass
    loss = contrastive(q, p)
    assert cache.attach(loss, [hq, hp]) is loss
    (loss * scale).backward()
    return loss.detach(), [t.grad.clone() for t in model.parameters()]


# The fixture MLP: reductions of <= 32 terms; forward = 2 linear layers + the loss (normalise, logits, an 8-way
# softmax), backward twice that; logits are scaled by 1/temperature = 10.
GRADIENT_RTOL = rounding_rtol(terms=32, depth=3 * (2 + 3), gain=10)


def assert_same_gradients(expected, actual, rtol=GRADIENT_RTOL) -> None:
    """GradCache computes the same function as the plain backward in another order: rounding only."""
    assert len(expected) == len(actual)
    for i, (e, a) in enumerate(zip(expected, actual)):
        assert_close(a, e, rtol=rtol, msg=f"parameter {i}")


def test_dropout_is_active_in_the_fixture():
    model, (xq, _) = make_model(), make_data()
    assert not torch.equal(model(xq), model(xq))


def test_matches_full_graph_backward_with_dropout():
    model, (xq, xp) = make_model(), make_data()
    ref_loss, ref = reference_grads(model, xq, xp, seed=3)
    loss, got = gradcache_grads(model, xq, xp, seed=3)
    assert torch.equal(loss, ref_loss)  # both embed the same chunks in the same order: the same numbers
    assert_same_gradients(ref, got)


def test_without_rng_replay_gradients_differ(monkeypatch):
    """The previous test can fail: replaying with fresh dropout masks gives other gradients."""

    class NoReplay:
        def __init__(self, *objs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

    model, (xq, xp) = make_model(), make_data()
    _, ref = reference_grads(model, xq, xp, seed=3)
    monkeypatch.setattr(gc_module, "RandContext", NoReplay)
    _, got = gradcache_grads(model, xq, xp, seed=3)
    with pytest.raises(AssertionError):  # the tolerance of the test above sees fresh dropout masks
        assert_same_gradients(ref, got)


def test_grad_output_scaling_reaches_every_chunk():
    model, (xq, xp) = make_model(), make_data()
    _, full = reference_grads(model, xq, xp, seed=4)
    _, half = gradcache_grads(model, xq, xp, seed=4, scale=0.5)
    assert_same_gradients([0.5 * g for g in full], half)


def test_uneven_chunks_and_prechunked_mapping_inputs():
    """Batch 7 in chunks of 3 (3+3+1); inputs given as a list of BatchEncoding chunks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Dropout(0.2), nn.Linear(16, EMB_DIM))
    g = torch.Generator().manual_seed(5)
    xq, xp = torch.randn(7, IN_DIM, generator=g), torch.randn(7, IN_DIM, generator=g)

    def embed_fn(enc):
        return model(enc["x"]) * enc["gain"]

    torch.manual_seed(9)
    q = torch.cat([embed_fn({"x": c, "gain": 2.0}) for c in xq.split(3)])
    p = torch.cat([embed_fn({"x": c, "gain": 2.0}) for c in xp.split(3)])
    contrastive(q, p).backward()
    ref = [t.grad.clone() for t in model.parameters()]
    model.zero_grad(set_to_none=True)

    torch.manual_seed(9)
    cache = GradCache(chunk_size=3)
    q_chunks = split_into_chunks(BatchEncoding({"x": xq, "gain": 2.0}), 3)
    assert [type(c) for c in q_chunks] == [BatchEncoding] * 3 and [c["x"].shape[0] for c in q_chunks] == [3, 3, 1]
    q, hq = cache.embed(embed_fn, q_chunks)
    p, hp = cache.embed(embed_fn, {"x": xp, "gain": 2.0})  # whole mapping, split by chunk_size
    assert hq.chunk_sizes == hp.chunk_sizes == [3, 3, 1]
    cache.backward(contrastive(q, p), [hq, hp])
    assert_same_gradients(ref, [t.grad for t in model.parameters()])


def test_parameters_used_directly_by_the_loss_keep_their_gradient():
    """A learnable temperature lives in the loss graph, which attach leaves intact."""
    model, (xq, xp) = make_model(), make_data()
    model.eval()
    log_scale = nn.Parameter(torch.tensor(2.0))

    def loss_fn(q, p):
        return F.cross_entropy(F.normalize(q, dim=-1) @ F.normalize(p, dim=-1).T * log_scale.exp(), torch.arange(BATCH))

    loss_fn(model(xq), model(xp)).backward()
    ref = [t.grad.clone() for t in [*model.parameters(), log_scale]]
    model.zero_grad(set_to_none=True)
    log_scale.grad = None
    cache = GradCache(chunk_size=3)
    q, hq = cache.embed(model, xq)
    p, hp = cache.embed(model, xp)
    cache.attach(loss_fn(q, p), [hq, hp]).backward()
    got = [t.grad for t in [*model.parameters(), log_scale]]
    assert_same_gradients(ref, got, rounding_rtol(terms=32, depth=15, gain=math.exp(2)))  # logits x exp(2)


def test_autocast_state_is_replayed_in_backward():
    """embed under bf16 autocast, backward outside it (as the Trainer does): the re-forward runs under the
    same autocast, and the gradients agree with the plain bf16 backward up to bf16 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_DIM, 16), nn.Tanh(), nn.Linear(16, EMB_DIM))
    xq, xp = make_data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = torch.cat([model(c) for c in xq.split(CHUNK)])
        p = torch.cat([model(c) for c in xp.split(CHUNK)])
        loss = contrastive(q, p)
    assert q.dtype == torch.bfloat16
    loss.backward()
    ref = [t.grad.clone() for t in model.parameters()]
    model.zero_grad(set_to_none=True)

    seen = []

    def embed_fn(x):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return model(x)

    cache = GradCache(chunk_size=CHUNK)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, hq = cache.embed(embed_fn, xq)
        p, hp = cache.embed(embed_fn, xp)
        loss = cache.attach(contrastive(q, p), [hq, hp])
    seen.clear()
    loss.backward()
    assert seen == [(True, True, torch.bfloat16)] * 8
    for a, b in zip(ref, [t.grad for t in model.parameters()]):
        # the plain backward sums the chunks' weight gradients in bf16, GradCache in fp32: bf16-level gap
        assert (a - b).norm() / a.norm() < 2e-2


class FakeDDP(nn.Module):
    """Just the DDP surface GradCache uses; records whether each forward ran with sync enabled."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.require_backward_grad_sync = True
        self.forward_sync_flags: list[bool] = []

    @contextmanager
    def no_sync(self):
        previous, self.require_backward_grad_sync = self.require_backward_grad_sync, False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def forward(self, x):
        if torch.is_grad_enabled():
            self.forward_sync_flags.append(self.require_backward_grad_sync)
        return self.module(x)


def test_ddp_sync_plan_only_last_chunk_synchronises():
    model, (xq, xp) = make_model(), make_data()
    ddp = FakeDDP(model)
    cache = GradCache(chunk_size=CHUNK)
    q, hq = cache.embed(ddp, xq)
    p, hp = cache.embed(ddp, xp)
    cache.attach(contrastive(q, p), [hq, hp], model=ddp).backward()
    assert ddp.forward_sync_flags == [False] * 7 + [True]  # 2 sides × 4 chunks
    # Inside an outer no_sync (gradient accumulation), nothing synchronises and the flag is restored.
    ddp.forward_sync_flags.clear()
    q, hq = cache.embed(ddp, xq)
    p, hp = cache.embed(ddp, xp)
    loss = cache.attach(contrastive(q, p), [hq, hp], model=ddp)
    with ddp.no_sync():
        loss.backward()
    assert ddp.forward_sync_flags == [False] * 8
    assert ddp.require_backward_grad_sync is True


def test_misuse_is_reported():
    model, (xq, xp) = make_model(), make_data()
    cache = GradCache(chunk_size=CHUNK)
    q, hq = cache.embed(model, xq, name="query")
    p, hp = cache.embed(model, xp, name="positive")
    with pytest.raises(ValueError, match="'positive'"):
        cache.attach((q**2).sum(), [hq, hp])  # the loss never used p
    with pytest.raises(ValueError, match="the loss does not require grad"):
        cache.attach(contrastive(q, p).detach(), [hq, hp])
    loss = cache.attach(contrastive(q, p), [hq, hp])
    with pytest.raises(ValueError, match="already attached"):
        cache.attach(contrastive(q, p), [hq])
    # backward twice (retain_graph) must refuse to replay, i.e. to double-count, the chunks
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    with pytest.raises(TypeError, match="must return a tensor"):
        cache.embed(lambda chunk: {"emb": chunk.tolist()}, xq)
    with pytest.raises(ValueError, match="split_batch"):
        split_into_chunks({"input_ids": torch.zeros(4, 3), "pixel_values": torch.zeros(9, 2)}, 2)


def test_evaluation_mode_is_inert():
    model, (xq, xp) = make_model(), make_data()
    cache = GradCache(chunk_size=CHUNK)
    with torch.no_grad():
        q, hq = cache.embed(model, xq)
        p, hp = cache.embed(model, xp)
        loss = contrastive(q, p)
        assert cache.attach(loss, [hq, hp]) is loss
    assert not q.requires_grad and hq.rng_states == []


def test_rand_context_replays_and_restores_the_outer_stream():
    torch.manual_seed(123)
    ctx = RandContext(torch.zeros(1))
    first = torch.rand(3)
    after_first = torch.rand(3)
    torch.manual_seed(123)
    torch.rand(3)  # consume the same draw as `first`
    with ctx:
        replay = torch.rand(3)
    continued = torch.rand(3)
    assert torch.equal(first, replay)
    assert torch.equal(after_first, continued)  # the replay did not disturb the outer RNG


def test_several_outputs_per_chunk_and_a_direct_loss_term():
    """embed_fn returns (embedding a, embedding b, the chunk's summed squared activations as a (1,) tensor): one
    re-forward per chunk back-propagates all three, equal to the plain backward of the same total loss."""
    model, (xq, xp) = make_model(), make_data()
    model.eval()  # no dropout: the plain reference runs whole batches, GradCache chunks

    def outputs(x):
        hidden = model(x)
        return hidden[:, :3], hidden[:, 2:], (hidden**2).sum().view(1)

    def total(a, b, penalty, p):
        # two contrastive terms on two "embeddings" of one forward, plus a term on the parameters directly
        return contrastive(a, p[:, :3]) + contrastive(b, p[:, 2:]) + 0.1 * penalty.sum() / len(a)

    p_ref = model(xp)
    total(*outputs(xq), p_ref).backward()
    ref = [t.grad.clone() for t in model.parameters()]
    model.zero_grad(set_to_none=True)

    cache = GradCache(chunk_size=3)
    (a, b, penalty), hq = cache.embed(outputs, xq, name="query")
    assert penalty.shape == (3,) and hq.output_sizes == [[3, 3, 2], [3, 3, 2], [1, 1, 1]]
    p, hp = cache.embed(model, xp)
    cache.attach(total(a, b, penalty, p), [hq, hp]).backward()
    assert_same_gradients(ref, [t.grad for t in model.parameters()])

    # dict outputs come back as a dict; surrogate losses (DeepSpeed / FSDP path) give the same gradients
    model.zero_grad(set_to_none=True)
    named, hq = cache.embed(lambda x: dict(zip("abc", outputs(x))), xq)
    p, hp = cache.embed(model, xp)
    flags = []
    for surrogate, is_last in cache.surrogate_losses(total(named["a"], named["b"], named["c"], p), [hq, hp]):
        surrogate.backward()
        flags.append(is_last)
    assert flags == [False] * 5 + [True]  # 3 + 3 chunks, the last one reduces
    assert_same_gradients(ref, [t.grad for t in model.parameters()])


def test_surrogates_end_with_a_reducing_backward_when_the_last_chunk_is_frozen():
    """The chunk-wise path (DeepSpeed, FSDP) reduces at the surrogate flagged last; a batch whose last chunk has no
    trainable path still ends with one (a zero-gradient replay of a trainable chunk), as the DDP replay does."""
    model, (xq, xp) = make_model(), make_data()
    model.eval()
    frozen = nn.Linear(IN_DIM, EMB_DIM).requires_grad_(False)
    cache = GradCache(chunk_size=4)
    q, hq = cache.embed(model, xq)
    p, hp = cache.embed(frozen, xp)  # the last handle's chunks reach no trainable parameter
    items = list(cache.surrogate_losses(contrastive(q, p), [hq, hp]))
    assert [is_last for _, is_last in items] == [False, False, True]
    assert items[-1][0].detach().item() == 0.0 and items[-1][0].requires_grad
