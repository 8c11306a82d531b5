"""The training-step path the step scripts share (imported from their own folder, which Python puts on the path)."""

from __future__ import annotations

import torch


def save_one_step(trainer, rows, out, *, seed: int | None = None) -> None:
    """Each rank takes its contiguous slice of ``rows``; one ``trainer.compute_loss`` + ``accelerator.backward`` on
    the model the trainer's accelerator wraps (DDP on gloo when distributed); rank 0 saves the loss and every parameter
    gradient (after DDP's all-reduce) to ``out``. ``seed``: the dropout stream, the same in every configuration."""
    accelerator = trainer.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    per_rank = len(rows) // world
    batch = trainer.data_collator(rows[rank * per_rank : (rank + 1) * per_rank])
    wrapped = accelerator.prepare_model(trainer.model)
    wrapped.train()
    if seed is not None:
        torch.manual_seed(seed)
    loss = trainer.compute_loss(wrapped, trainer._prepare_inputs(batch))
    accelerator.backward(loss)
    if rank == 0:
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach().item(), "grads": grads, "world": world}, out)
    accelerator.wait_for_everyone()
