"""GradCache: contrastive losses over batches far larger than what fits in memory with a graph.

Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021,
arXiv 2101.06983); used by VLM2Vec, UniME and sentence-transformers' ``CachedMultipleNegativesRankingLoss``.

Three steps:

1. :meth:`GradCache.embed` runs ``embed_fn`` on every chunk **without** a graph, recording each chunk's
   RNG state (and autocast state), and returns the concatenated embeddings as a fresh leaf tensor with
   ``requires_grad=True``.
2. The caller computes the loss from those embeddings as usual (gathering across ranks, scaling, ...).
   :meth:`GradCache.attach` registers a hook so that the gradient w.r.t. the cached embeddings — which
   autograd computes anyway when ``loss.backward()`` runs — triggers step 3.
3. Inside that backward, each chunk is re-embedded **with** a graph under the replayed RNG state, and its
   slice of the embedding gradient is back-propagated into the model
   (``torch.autograd.backward(emb_chunk, grad_chunk)``).

Memory is bounded by one chunk's activations. Because the hook fires from inside the ordinary backward,
the embedding gradient already carries every scaling applied to the loss afterwards (gradient
accumulation division, fp16 loss scaling, :func:`~mm_embed_trl.distributed.distributed_loss_scale`), and
a single ``loss.backward()`` / ``accelerator.backward(loss)`` drives everything: the trainer needs no
special backward. The loss graph is left untouched, so parameters used directly by the loss (a learnable
temperature) get their gradient normally.

Under DDP, pass ``model=`` (the DDP-wrapped module): every chunk but the last one is re-run inside
``model.no_sync()``, and the last one synchronises only if synchronisation was enabled when the backward
ran (an outer ``no_sync`` for gradient accumulation is respected) — so gradients are all-reduced once per
step, not once per chunk. Static-graph DDP (first iteration) and ``find_unused_parameters=True`` are
handled like sentence-transformers does.

What the tests prove, on CPU: ``tests/test_grad_cache.py`` — gradients equal a plain full-graph backward
(dropout included, thanks to the RNG replay; failing without it), gradient-output scaling, several
embedding "sides", autocast replay; ``tests/test_gather.py`` (2 real DDP processes on gloo) — equal
gradients with exactly one all-reduce per step (none inside an outer ``no_sync``), also with
``static_graph`` and ``find_unused_parameters``. Not exercised here: CUDA RNG replay (same code path as
``torch.utils.checkpoint``) and NCCL.
DeepSpeed and FSDP: re-running chunks inside ONE backward clashes with their per-backward gradient reduction
(Tevatron's issue #206), so :meth:`GradCache.surrogate_losses` instead yields one surrogate per chunk for its
own backward; the trainer reduces once per step (DeepSpeed's ``coalesce_grad_reduction``, FSDP's ``no_sync``).
``tests/test_sharded.py`` checks ZeRO-1/2/3 and FSDP2 against the non-cached step on CPU.

Several outputs per chunk: ``embed_fn`` may return a tuple (or dict) of tensors, e.g. two pooled embeddings of one
forward (UME-R1's ``<disc_emb>`` and ``<gen_emb>``) and the chunk's summed language-model loss as a ``(1,)`` tensor.
Each becomes its own cached leaf (concatenated over chunks along dim 0); the loss may use all of them, and the
replay back-propagates every output of a chunk together, from one re-forward. A term that depends on the parameters
directly (a chunk's cross-entropy) is thus cached like an embedding: the gradient w.r.t. its leaf carries every
scaling of the loss, exactly as for the embeddings.

Caveats: the loss must be back-propagated with ``backward()`` (not ``torch.autograd.grad`` restricted
to other inputs), once per :meth:`GradCache.embed` call; ``embed_fn`` must be deterministic given the RNG
state (no data-dependent randomness outside torch's generators).
"""

from __future__ import annotations

from collections import UserDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._tensors import iter_tensors

__all__ = ["CacheHandle", "GradCache", "RandContext", "split_into_chunks"]


class RandContext:
    """Snapshot of the CPU and CUDA RNG states at construction; ``with ctx:`` replays it.

    On entering, the current RNG states are saved (``torch.random.fork_rng``) and the snapshot is
    installed; on exit the saved states are restored, so replaying never disturbs the caller's RNG stream.
    CUDA states are captured for every CUDA device holding a tensor in ``objs`` and for the current CUDA
    device when CUDA is initialised (the model may move CPU inputs to the GPU before using dropout).
    Reference: https://github.com/luyug/GradCache (``RandContext``).
    """

    def __init__(self, *objs: Any) -> None:
        self.cpu_state = torch.get_rng_state()
        devices = {t.device.index for obj in objs for t in iter_tensors(obj) if t.device.type == "cuda"}
        devices.discard(None)
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            devices.add(torch.cuda.current_device())
        self.cuda_devices = sorted(devices)
        self.cuda_states = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self._fork: AbstractContextManager | None = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.cuda_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        for device, state in zip(self.cuda_devices, self.cuda_states):
            torch.cuda.set_rng_state(state, device)

    def __exit__(self, *exc: object) -> None:
        assert self._fork is not None
        self._fork.__exit__(*exc)
        self._fork = None


class _AutocastState:
    """Autocast settings at construction, re-entered for the replay.

    The re-forward runs inside ``backward()``, where the Trainer's autocast context is no longer active;
    without this, a bf16/fp16 first pass would be replayed in fp32 and the cached gradients would belong
    to a different function (``torch.utils.checkpoint`` does the same).
    """

    def __init__(self) -> None:
        cache = torch.is_autocast_cache_enabled()
        self.kwargs: dict[str, dict[str, Any]] = {}
        for device_type in ("cpu", "cuda"):
            if device_type == "cpu" or (torch.cuda.is_available() and torch.amp.is_autocast_available(device_type)):
                self.kwargs[device_type] = {
                    "enabled": torch.is_autocast_enabled(device_type),
                    "dtype": torch.get_autocast_dtype(device_type),
                    "cache_enabled": cache,
                }

    @contextmanager
    def replay(self) -> Iterator[None]:
        with ExitStack() as stack:
            for device_type, kwargs in self.kwargs.items():
                stack.enter_context(torch.autocast(device_type, **kwargs))
            yield


def split_into_chunks(batch: Any, chunk_size: int) -> list[Any]:
    """Split a tensor, or a mapping of tensors sharing their first dimension, into row chunks.

    Non-tensor mapping values are copied into every chunk. Inputs whose tensors do not share one batch
    dimension (e.g. Qwen2-VL ``pixel_values``, flattened over image patches) cannot be cut row-wise here:
    split them with ``mm_embed_trl.data.collators.split_batch`` and pass the list of chunks instead.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if isinstance(batch, Tensor):
        return list(batch.split(chunk_size, dim=0))
    if isinstance(batch, Mapping):
        sizes = {key: value.shape[0] for key, value in batch.items() if isinstance(value, Tensor) and value.dim() > 0}
        if not sizes:
            raise ValueError("Cannot split a mapping without tensors into chunks; pass a list of chunks instead.")
        if len(set(sizes.values())) != 1:
            raise ValueError(
                f"Cannot split this batch row-wise: its tensors have different first dimensions {sizes}. "
                "Split it with mm_embed_trl.data.collators.split_batch (which cuts pixel values per image) "
                "and pass the list of chunks to GradCache.embed."
            )
        n = next(iter(sizes.values()))
        chunks = []
        for start in range(0, n, chunk_size):
            chunk = {
                key: (value[start : start + chunk_size] if key in sizes else value) for key, value in batch.items()
            }
            # Keep the container type for dict / BatchEncoding-like mappings (constructible from a dict).
            chunks.append(type(batch)(chunk) if isinstance(batch, (dict, UserDict)) else chunk)
        return chunks
    raise TypeError(
        f"Cannot split an object of type {type(batch).__name__} into chunks; pass a list/tuple of chunks "
        "to GradCache.embed (e.g. from mm_embed_trl.data.collators.split_batch)."
    )


@dataclass(eq=False)
class CacheHandle:
    """What :meth:`GradCache.attach` needs to replay one :meth:`GradCache.embed` call.

    ``embeddings`` is what ``embed`` returned: one leaf tensor, or a tuple / dict of them when ``embed_fn`` returns
    several outputs (the gradient w.r.t. the leaves is the cache). ``chunk_sizes`` are the rows of each chunk's first
    output; ``output_sizes[k]`` those of output ``k``.
    """

    embeddings: Tensor | tuple[Tensor, ...] | dict[str, Tensor]
    embed_fn: Callable[[Any], Any]
    chunks: list[Any]
    chunk_sizes: list[int]
    rng_states: list[RandContext]
    autocast_states: list[_AutocastState]
    name: str | None = None
    output_sizes: list[list[int]] = field(default_factory=list)
    # Set once a backward has replayed this handle: a second replay would double-count gradients.
    consumed: bool = field(default=False)
    attached: bool = field(default=False)

    @property
    def label(self) -> str:
        return repr(self.name) if self.name else f"at 0x{id(self):x}"

    @property
    def leaves(self) -> tuple[Tensor, ...]:
        """The cached leaf tensors, in output order."""
        return _flatten_outputs(self.embeddings)[0]


def _flatten_outputs(out: Any) -> tuple[tuple[Tensor, ...], Callable[[Sequence[Tensor]], Any]]:
    """(tensors, rebuild): an embed_fn output (a tensor, a tuple/list or a dict of tensors) as a flat tuple, and the
    function that puts a flat sequence back into the same structure."""
    if isinstance(out, Tensor):
        return (out,), lambda flat: flat[0]
    if isinstance(out, Mapping):
        keys = list(out)
        return tuple(out[k] for k in keys), lambda flat: dict(zip(keys, flat))
    if isinstance(out, (tuple, list)):
        return tuple(out), tuple
    return (out,), lambda flat: flat[0]


def _unwrap_ddp_like(model: Any) -> Any | None:
    """The DDP-like module (has ``no_sync`` and ``require_backward_grad_sync``), or None."""
    if model is None:
        return None
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if hasattr(model, "no_sync") and hasattr(model, "require_backward_grad_sync"):
        return model
    return None


@contextmanager
def _ddp_replay_context(ddp: Any | None, synchronize: bool) -> Iterator[None]:
    """Run one chunk's re-forward + backward with or without DDP gradient synchronisation."""
    if ddp is None:
        yield
        return
    if getattr(ddp, "static_graph", False) and not getattr(ddp, "_static_graph_delay_allreduce_enqueued", True):
        # Static-graph DDP's first iteration must run its reducer once to record the graph: let that chunk
        # synchronise even inside an outer no_sync (sentence-transformers does the same). Later chunks
        # accumulate on top of the already averaged gradients, which stays correct.
        previous = ddp.require_backward_grad_sync
        ddp.require_backward_grad_sync = True
        try:
            yield
        finally:
            ddp.require_backward_grad_sync = previous
        return
    with nullcontext() if synchronize else ddp.no_sync():
        yield


def _leaves_reached(loss: Tensor, leaves: Sequence[Tensor]) -> list[bool]:
    """Which of ``leaves`` the autograd graph of ``loss`` reaches (walks ``grad_fn`` nodes once)."""
    targets = {id(leaf): i for i, leaf in enumerate(leaves)}
    found = [loss is leaf for leaf in leaves]
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    seen: set[int] = set()
    while stack and not all(found):
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if variable is not None and id(variable) in targets:
            found[targets[id(variable)]] = True
        stack.extend(next_node for next_node, _ in node.next_functions)
    return found


class GradCache:
    """Chunked no-grad embedding + cached-gradient replay, driven by the ordinary ``loss.backward()``.

    Args:
        chunk_size: rows per chunk when :meth:`embed` is given a whole batch (a tensor or a mapping of
            tensors with one batch dimension). Ignored when :meth:`embed` gets a list of chunks.
        split_fn: optional ``split_fn(batch, chunk_size) -> list[chunk]`` replacing
            :func:`split_into_chunks` for whole batches (e.g. ``collators.split_batch`` for VLM inputs).

    Example::

        >>> import torch
        >>> from mm_embed_trl.distributed import GradCache
        >>> encoder = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 4)
        >>> cache = GradCache(chunk_size=2)
        >>> q, q_handle = cache.embed(encoder, x)           # (8, 3), no graph kept
        >>> p, p_handle = cache.embed(encoder, y)
        >>> loss = torch.nn.functional.cross_entropy(q @ p.T, torch.arange(8))
        >>> loss = cache.attach(loss, [q_handle, p_handle])  # same tensor
        >>> loss.backward()                                  # re-embeds chunk by chunk with graph
        >>> encoder.weight.grad.shape
        torch.Size([3, 4])
    """

    def __init__(
        self, chunk_size: int | None = None, split_fn: Callable[[Any, int], Sequence[Any]] | None = None
    ) -> None:
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"GradCache chunk_size must be a positive integer or None, got {chunk_size}.")
        self.chunk_size = chunk_size
        self.split_fn = split_fn

    # ------------------------------------------------------------------ step 1
    def _chunks(self, batch: Any) -> list[Any]:
        if isinstance(batch, (list, tuple)):
            return list(batch)
        if self.chunk_size is None:
            return [batch]
        split = self.split_fn or split_into_chunks
        return list(split(batch, self.chunk_size))

    def embed(self, embed_fn: Callable[[Any], Any], chunks: Any, *, name: str | None = None) -> tuple[Any, CacheHandle]:
        """Embed every chunk without a graph; return the concatenated embeddings and a replay handle.

        Args:
            embed_fn: ``embed_fn(chunk) -> Tensor (rows, ...)``; e.g. ``lambda enc: model(**enc).embeddings``. It may
                return a tuple or dict of such tensors (several outputs of one forward; a per-chunk scalar as a
                ``(1,)`` tensor), which are cached and returned in the same structure.
            chunks: a list/tuple of chunks (any objects ``embed_fn`` accepts), or a whole batch that is split
                with ``chunk_size`` (see :func:`split_into_chunks`).
            name: optional label used in error messages (e.g. ``"query"``).

        Returns:
            ``(embeddings, handle)``. With grad mode on, ``embeddings`` is a detached leaf with
            ``requires_grad=True`` (a tuple / dict of them for several outputs): compute the loss from it and pass
            ``handle`` to :meth:`attach`. With grad mode off (evaluation), plain embeddings and an inert handle are
            returned.
        """
        chunk_list = self._chunks(chunks)
        if not chunk_list:
            raise ValueError(f"GradCache.embed got no chunks to embed (handle {name!r}).")
        track = torch.is_grad_enabled()
        outputs: list[tuple[Tensor, ...]] = []
        rng_states, autocast_states = [], []
        rebuild = None
        for index, chunk in enumerate(chunk_list):
            if track:
                rng_states.append(RandContext(chunk))
                autocast_states.append(_AutocastState())
            with torch.no_grad():
                flat, rebuild = _flatten_outputs(embed_fn(chunk))
            bad = [type(t).__name__ if not isinstance(t, Tensor) else "a 0-d tensor" for t in flat
                   if not isinstance(t, Tensor) or t.dim() == 0]
            if bad or (outputs and len(flat) != len(outputs[0])):
                raise TypeError(
                    f"GradCache embed_fn must return a tensor of shape (rows, ...), or a tuple/dict of them (a "
                    f"per-chunk scalar as shape (1,)), the same number for every chunk; chunk {index} of {name!r} "
                    f"gave {bad or len(flat)}. Wrap the model call, e.g. lambda enc: model(**enc).embeddings."
                )
            outputs.append(flat)
        leaves = []
        for per_chunk in zip(*outputs):
            leaf = torch.cat(per_chunk, dim=0).detach()
            if track:
                leaf.requires_grad_(True)
            leaves.append(leaf)
        output_sizes = [[t.shape[0] for t in per_chunk] for per_chunk in zip(*outputs)]
        handle = CacheHandle(
            embeddings=rebuild(leaves),
            embed_fn=embed_fn,
            chunks=chunk_list,
            chunk_sizes=output_sizes[0],
            rng_states=rng_states,
            autocast_states=autocast_states,
            name=name,
            output_sizes=output_sizes,
        )
        return handle.embeddings, handle

    # ------------------------------------------------------------------ step 2
    def attach(self, loss: Tensor, handles: CacheHandle | Sequence[CacheHandle], *, model: Any = None) -> Tensor:
        """Arrange for ``loss.backward()`` to replay ``handles``; returns ``loss`` itself.

        Args:
            loss: the loss computed from the embeddings of ``handles`` (any further scaling may come later).
            handles: the handles returned by :meth:`embed` that ``loss`` depends on.
            model: the DDP-wrapped model (anything with ``no_sync`` and ``require_backward_grad_sync``) to
                synchronise gradients once per step instead of once per chunk; None for a single process.

        Raises:
            ValueError: if a handle's embeddings do not reach ``loss`` (the loss did not use them), or a
                handle was already attached.
        """
        handles = [handles] if isinstance(handles, CacheHandle) else list(handles)
        if not handles:
            raise ValueError("GradCache.attach needs at least one handle.")
        if not loss.requires_grad:
            # Evaluation (no grad) or a loss that ignores the embeddings: nothing to replay.
            if any(leaf.requires_grad for h in handles for leaf in h.leaves) and torch.is_grad_enabled():
                raise ValueError(
                    "GradCache.attach: the loss does not require grad although cached embeddings do; "
                    "was it computed from the embeddings returned by GradCache.embed?"
                )
            return loss
        for h in handles:
            if not all(leaf.requires_grad for leaf in h.leaves):
                raise ValueError(
                    f"GradCache handle {h.label} was created with grad disabled (evaluation); it cannot be replayed."
                )
            if h.attached or h.consumed:
                raise ValueError(
                    f"GradCache handle {h.label} is already attached to a loss: call embed() again for a new step."
                )
        # Every handle must feed the loss; a handle with several outputs needs only one of them to (a chunk's LM loss
        # may be weighted 0, e.g. a discriminative-only run).
        leaves = [leaf for h in handles for leaf in h.leaves]
        reached = iter(_leaves_reached(loss, leaves))
        missing = [h.label for h in handles if not any([next(reached) for _ in h.leaves])]
        if missing:
            raise ValueError(
                f"GradCache.attach: the loss does not depend on the embeddings of handle(s) {', '.join(missing)}. "
                "Use the tensors returned by GradCache.embed (not a detached copy) or drop those handles."
            )
        for h in handles:
            h.attached = True

        def on_embedding_grads(grads: Sequence[Tensor | None]) -> None:
            # Fires once per backward, after autograd computed the gradients of all cached embeddings.
            self._replay(handles, list(grads), model)

        # The hook lives on the embedding leaves (which die with this step), not on the loss: the gradient
        # reaching them already includes every later scaling of the loss, and the loss graph stays intact.
        torch.autograd.graph.register_multi_grad_hook(leaves, on_embedding_grads, mode="all")
        return loss

    def backward(self, loss: Tensor, handles: CacheHandle | Sequence[CacheHandle], *, model: Any = None) -> Tensor:
        """Convenience for use outside a Trainer: :meth:`attach` then ``loss.backward()``; returns the detached loss."""
        self.attach(loss, handles, model=model).backward()
        return loss.detach()

    # ------------------------------------------------------------------ step 3
    @staticmethod
    def _jobs(handles: list[CacheHandle], grads: list[Tensor | None]) -> list[tuple[CacheHandle, int, list]]:
        """(handle, chunk index, that chunk's slices of the cached gradients: one per output, None where the
        backward did not reach that output) for every chunk to replay. ``grads`` is flat over the handles' leaves."""
        jobs: list[tuple[CacheHandle, int, list]] = []
        position = 0
        for h in handles:
            if h.consumed:
                raise RuntimeError(
                    f"GradCache handle {h.label} is being back-propagated a second time (backward with "
                    "retain_graph?); its chunks were already replayed. Call embed() again for a new step."
                )
            h.consumed = True
            own = grads[position : position + len(h.leaves)]
            position += len(h.leaves)
            if all(g is None for g in own):  # not needed by this backward (e.g. backward(inputs=...)): nothing to do
                continue
            pieces = [
                [None] * len(h.chunk_sizes) if g is None else list(g.split(sizes, dim=0))
                for g, sizes in zip(own, h.output_sizes)
            ]
            for index in range(len(h.chunk_sizes)):
                jobs.append((h, index, [p[index] for p in pieces]))
        return jobs

    @staticmethod
    def _trainable(outputs: Sequence[Tensor], grad_pieces: Sequence[Tensor | None]) -> tuple[list, list]:
        """The (output, gradient) pairs of a re-forward that reach trainable parameters."""
        pairs = [(o, g.to(o.dtype)) for o, g in zip(outputs, grad_pieces) if g is not None and o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def surrogate_losses(
        self, loss: Tensor, handles: CacheHandle | Sequence[CacheHandle]
    ) -> Iterator[tuple[Tensor, bool]]:
        """For engines that need one backward call per chunk (DeepSpeed ZeRO, FSDP): yield, chunk by chunk,
        ``(surrogate, is_last)``: a scalar ``sum(re-embedded outputs * their cached gradients)`` whose backward puts
        exactly that chunk's share of ``dloss/dparams`` into the parameters, and whether it is the last one (the
        backward that should reduce). The gradients w.r.t. the cached embeddings are computed first (``loss`` must
        carry every scaling that should reach the parameters); only one chunk's graph is alive at a time, as long as
        the caller back-propagates each surrogate before taking the next. Chunks with no trainable path are skipped;
        when the batch's last chunk is one, a trainable chunk is replayed once more with a zero gradient as the last
        surrogate, so the reduction still happens (the rule :meth:`attach`'s replay follows under DDP).
        """
        handles = [handles] if isinstance(handles, CacheHandle) else list(handles)
        grads = torch.autograd.grad(loss, [leaf for h in handles for leaf in h.leaves], allow_unused=True)
        jobs = self._jobs(handles, list(grads))
        last_trainable: tuple[CacheHandle, int] | None = None
        with torch.enable_grad():
            for position, (h, index, grad_pieces) in enumerate(jobs):
                outputs, grad_list = self._trainable(self._reforward(h, index), grad_pieces)
                if not outputs:
                    continue  # frozen path: no parameter to update
                last_trainable = (h, index)
                yield sum((o * g).sum() for o, g in zip(outputs, grad_list)), position == len(jobs) - 1
            if jobs and last_trainable is not None and last_trainable != jobs[-1][:2]:
                h, index = last_trainable
                outputs = [o for o in self._reforward(h, index) if o.requires_grad]
                yield sum((o * 0.0).sum() for o in outputs), True
        for h in handles:
            h.chunks, h.rng_states, h.autocast_states = [], [], []

    def _replay(self, handles: list[CacheHandle], grads: list[Tensor | None], model: Any) -> None:
        """Re-embed every chunk with a graph and back-propagate its slices of the cached gradients."""
        jobs = self._jobs(handles, grads)
        ddp = _unwrap_ddp_like(model)
        # Read now, not at attach time: gradient accumulation may wrap the backward in an outer no_sync.
        sync_wanted = ddp is not None and bool(ddp.require_backward_grad_sync)
        synchronized = False
        last_trainable: tuple[CacheHandle, int] | None = None
        with torch.enable_grad():
            for position, (h, index, grad_pieces) in enumerate(jobs):
                is_last = position == len(jobs) - 1
                with _ddp_replay_context(ddp, synchronize=is_last and sync_wanted):
                    outputs, grad_list = self._trainable(self._reforward(h, index), grad_pieces)
                    if not outputs:
                        continue  # frozen path: no parameter to update
                    last_trainable = (h, index)
                    torch.autograd.backward(outputs, grad_list)
                    synchronized = is_last and sync_wanted
            if sync_wanted and not synchronized and last_trainable is not None:
                # The last chunk had nothing trainable, so DDP has not all-reduced yet: replay a trainable
                # chunk with a zero gradient under synchronisation to flush the accumulated gradients.
                h, index = last_trainable
                outputs = [o for o in self._reforward(h, index) if o.requires_grad]
                torch.autograd.backward(outputs, [torch.zeros_like(o) for o in outputs])
        # Free the inputs and RNG snapshots early; the handle cannot be replayed again anyway.
        for h in handles:
            h.chunks = []
            h.rng_states = []
            h.autocast_states = []

    @staticmethod
    def _reforward(h: CacheHandle, index: int) -> tuple[Tensor, ...]:
        with h.rng_states[index], h.autocast_states[index].replay():
            outputs, _ = _flatten_outputs(h.embed_fn(h.chunks[index]))
        got = [tuple(o.shape) for o in outputs]
        expected = [(sizes[index], *leaf.shape[1:]) for sizes, leaf in zip(h.output_sizes, h.leaves)]
        if got != expected:
            raise RuntimeError(
                f"GradCache: re-embedding chunk {index} of handle {h.label} gave shapes {got}, "
                f"but the no-grad pass gave {expected}; embed_fn must be deterministic for a given chunk."
            )
        return outputs
