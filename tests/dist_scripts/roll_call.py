"""Every rank answers where it runs, after one collective over all machines. Run under `accelerate launch` (or
torchrun) with any number of machines and processes; each rank prints
``rank R of W on machine M, local rank L: sum S`` (S = 0 + 1 + ... + W-1 when every rank took part)."""

import os

import torch
import torch.distributed as dist
from accelerate import PartialState

import mm_embed_trl  # noqa: F401  (registers the exit handler)

state = PartialState(cpu=True)
total = torch.tensor([state.process_index])
dist.all_reduce(total)
print(
    f"rank {state.process_index} of {state.num_processes} on machine {os.environ['GROUP_RANK']}, "
    f"local rank {state.local_process_index}: sum {int(total)}",
    flush=True,
)
