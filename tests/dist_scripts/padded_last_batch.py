"""The last, uneven batch of an epoch, taken from the trainer's own training data loader, in 1 or N processes.

Run as ``python padded_last_batch.py OUT.pt`` (one process) or under ``torch.distributed.run --nproc_per_node 2``.
12 rows, a global batch of 8 (8 / world per device), `dataloader_drop_last=False`: the epoch's second and last
global batch holds 4 rows, which under 2 processes accelerate completes with 4 rows from the start of the epoch
(`even_batches`). The batch goes through `trainer.get_batch_samples` (where the training loop takes it),
`trainer.compute_loss` and `accelerator.backward` on the DDP-wrapped model. Rank 0 writes the loss, every parameter
gradient and the content ids of the global batch's targets to OUT.pt.
"""

from __future__ import annotations

import argparse
import os

import torch

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.demo.generated import make_shapes_dataset
from mm_embed_trl.demo.tiny import get_tiny_backbone
from mm_embed_trl.distributed import gather_no_grad

ROWS, GLOBAL_BATCH = 12, 8


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    args = parser.parse_args()

    data = make_shapes_dataset(num_train=64, num_eval=8, seed=3)
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    config = HardNegContrastiveConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trainer"),
        per_device_train_batch_size=GLOBAL_BATCH // world,
        dataloader_drop_last=False,
        num_hard_negatives=3,
        false_negative_margin=0.0,
        temperature=0.05,
        num_negatives=0,
        image_root=str(data.image_root),
        report_to="none",
        use_cpu=True,
        seed=11,
    )
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=data["train"].select(range(ROWS)))
    accelerator = trainer.accelerator
    loader = trainer.get_train_dataloader()
    batches = iter(loader)
    for _ in range(len(loader)):
        (batch,), _ = trainer.get_batch_samples(batches, 1, trainer.args.device)
    wrapped = accelerator.prepare_model(trainer.model)
    wrapped.train()
    loss = trainer.compute_loss(wrapped, trainer._prepare_inputs(batch))
    accelerator.backward(loss)
    ids = gather_no_grad(batch["positive_ids"].to(trainer.args.device))
    if accelerator.process_index == 0:
        grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach().item(), "grads": grads, "ids": ids.cpu(), "world": world}, args.out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
