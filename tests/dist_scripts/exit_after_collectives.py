"""20 gloo collectives, then exit, with nothing but `import mm_embed_trl` to end the process group: the library's exit
handler must keep the exit clean for any script that uses the group directly. Run under
``torch.distributed.run --nproc_per_node 2``; ``--accelerator`` starts the group through accelerate instead,
``--ddp`` runs 20 steps of a small model under DistributedDataParallel, which keeps the model (and through it the group)
alive until the interpreter shuts down, as a training script's module-level trainer does; ``--raise`` ends rank 1 on
an uncaught exception after the collectives (its group is then left alone); ``--time-exit`` runs the exit handler
itself at the end (the model still alive, as at exit) and prints how long it took."""

import sys
import time

import torch
import torch.distributed as dist

import mm_embed_trl  # noqa: F401  (registers the exit handler)

if "--accelerator" in sys.argv:
    from accelerate import PartialState

    PartialState(cpu=True)
else:
    dist.init_process_group("gloo")
t = torch.ones(1000)
if "--ddp" in sys.argv:
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)), bucket_cap_mb=0.05
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        model(torch.randn(8, 64)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
for _ in range(20):
    dist.all_reduce(t)
    gathered = [torch.empty(1000) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
if "--raise" in sys.argv and dist.get_rank() == 1:
    raise RuntimeError("failed after the collectives")
if "--time-exit" in sys.argv:
    from mm_embed_trl.distributed.process_group import destroy_process_group_on_clean_exit

    rank, start = dist.get_rank(), time.monotonic()
    destroy_process_group_on_clean_exit()
    print(f"rank {rank}: the exit handler took {time.monotonic() - start:.2f} s", flush=True)
