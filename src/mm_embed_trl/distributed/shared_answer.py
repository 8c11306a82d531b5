"""One answer for every rank: the main process computes it and hands it to the others through the process group's
key-value store, so ranks that must agree (which rows of a dataset to leave out) do, and a shared resource (a file
system asked about a million paths) answers once rather than once per rank."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

Answer = TypeVar("Answer")


def main_process_answer(
    key: str, compute: Callable[[], Answer], *, encode: Callable[[Answer], bytes], decode: Callable[[bytes], Answer]
) -> Answer:
    """``compute()`` on the main process (rank 0), which also writes ``encode(answer)`` to the process group's store
    under ``key``; another rank reads that answer when it is there, and computes its own when it is not.

    Under ``main_process_first`` (the examples and the trainers check their data so) the main process has answered
    before the others ask. Without it, or without a process group (one process), each rank computes. A main process
    that raises writes nothing: the others compute, and raise the same.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # a torch without it, or a group without a store
        return compute()
    name = f"mm_embed_trl/{key}"
    if dist.get_rank() == 0:
        answer = compute()
        store.set(name, encode(answer))
        return answer
    if store.check([name]):
        logger.debug("Rank %d reads the main process's answer %s.", dist.get_rank(), name)
        return decode(store.get(name))
    return compute()
