"""One answer for every rank: the main process computes it and hands it to the others through the process group's
key-value store, so ranks that must agree (which rows of a dataset to leave out) do, and a shared resource (a file
system asked about a million paths) answers once rather than once per rank."""

from __future__ import annotations

import collections
import datetime
import logging
import pickle
from collections.abc import Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

Answer = TypeVar("Answer")

# key -> how many times this process asked it: every rank asks the same questions in the same order, so the n-th ask
# of a key is one question on every rank (the same rows checked again later, after files changed, is a new one)
_ASKED: collections.Counter = collections.Counter()
_ANSWER, _ERROR = b"A", b"E"


def main_process_answer(
    key: str,
    compute: Callable[[], Answer],
    *,
    encode: Callable[[Answer], bytes],
    decode: Callable[[bytes], Answer],
    timeout: datetime.timedelta | None = None,
) -> Answer:
    """``compute()`` on the main process (rank 0), whose answer every other rank reads from the process group's
    store; one process, or no process group: ``compute()``.

    The main process always writes: its answer, or the exception ``compute`` raised (the other ranks raise it too).
    The others wait for it, whether they asked before it answered (``main_process_first(local=True)`` lets the first
    process of each machine run beside it) or after; a rank that waits longer than ``timeout`` (default: the store's,
    the process group's timeout), or whose ``decode`` returns None (the answer is not to its question), computes its
    own answer and says so.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    try:
        store = dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):  # a torch without it, or a group without a store
        return compute()
    _ASKED[key] += 1
    name = f"mm_embed_trl/{key}/{_ASKED[key]}"
    if dist.get_rank() == 0:
        try:
            answer = compute()
        except Exception as error:
            try:
                told = pickle.dumps(error)
            except Exception:  # noqa: BLE001 (an exception that does not pickle: its text)
                told = pickle.dumps(RuntimeError(f"{type(error).__name__}: {error}"))
            store.set(name, _ERROR + told)
            raise
        store.set(name, _ANSWER + encode(answer))
        return answer
    try:
        store.wait([name], timeout) if timeout is not None else store.wait([name])
    except Exception:  # noqa: BLE001 (torch raises RuntimeError or DistStoreError on a timeout)
        logger.warning("Rank %d waited in vain for the main process's answer %s; it computes its own.",
                       dist.get_rank(), name)
        return compute()
    data = store.get(name)
    if data.startswith(_ERROR):
        raise pickle.loads(data[len(_ERROR):])  # the main process's own error, from this job's store
    answer = decode(data[len(_ANSWER):])
    if answer is None:
        logger.warning("The main process's answer %s is not to rank %d's question; it computes its own.", name,
                       dist.get_rank())
        return compute()
    return answer
