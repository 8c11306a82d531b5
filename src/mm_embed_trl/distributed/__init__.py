"""Cross-rank gathering with local gradients, the matching loss scale, GradCache, and the process group's exit."""

from .gather import (
    distributed_loss_scale,
    gather_no_grad,
    gather_sizes,
    gather_with_grad,
    is_distributed,
    rank,
    world_size,
)
from .grad_cache import CacheHandle, GradCache, RandContext, split_into_chunks
from .process_group import destroy_process_group_at_exit, destroy_process_group_on_clean_exit

__all__ = [
    "CacheHandle",
    "GradCache",
    "RandContext",
    "destroy_process_group_at_exit",
    "destroy_process_group_on_clean_exit",
    "distributed_loss_scale",
    "gather_no_grad",
    "gather_sizes",
    "gather_with_grad",
    "is_distributed",
    "rank",
    "split_into_chunks",
    "world_size",
]
