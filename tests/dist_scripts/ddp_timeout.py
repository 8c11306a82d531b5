"""Rank 1 stops (sleeps) before a collective; rank 0 must give up after `ddp_timeout` seconds, not 30 minutes.

Run with 2 processes: `torchrun --nproc_per_node 2 ddp_timeout.py <ddp_timeout> <output_dir>`.
"""

import os
import sys
import time

import torch.distributed as dist

from mm_embed_trl import HardNegContrastiveConfig

# CPU training (use_cpu; set by the config itself on a machine without accelerator): the gloo process group.
args = HardNegContrastiveConfig(output_dir=sys.argv[2], ddp_timeout=int(sys.argv[1]), use_cpu=True, report_to="none")
assert dist.is_initialized() and dist.get_backend() == "gloo", dist.is_initialized()
if dist.get_rank() == 1:
    time.sleep(600)  # a stopped rank
    sys.exit(0)
start = time.monotonic()
try:
    dist.barrier()
except Exception as err:  # gloo: RuntimeError "Timed out waiting ...ms"
    print(f"rank 0 gave up after {time.monotonic() - start:.1f}s ({type(err).__name__})", flush=True)
    os._exit(3)
print("rank 0 passed the barrier without its peer", flush=True)
os._exit(1)
