"""20 gloo collectives, then exit, with the process group left to mm_embed_trl's exit handling: the unit of work is
wrapped as the trainers wrap `train()` and the final save. Run under ``torch.distributed.run --nproc_per_node 2``."""

import torch
import torch.distributed as dist

from mm_embed_trl.distributed.process_group import destroy_process_group_at_exit

dist.init_process_group("gloo")
with destroy_process_group_at_exit():
    t = torch.ones(1000)
    for _ in range(20):
        dist.all_reduce(t)
        gathered = [torch.empty(1000) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t)
