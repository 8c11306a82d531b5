"""One HardNegContrastiveTrainer loss + backward on a fixed global batch, in 1 or N processes.

Run as ``python hardneg_trainer_step.py OUT.pt [--chunk N] [--negatives K]`` (single process, whole batch) or under
``torch.distributed.run --nproc_per_node 2`` (each rank takes its contiguous slice of the global batch). The model
goes through the trainer's own accelerator (DDP on gloo when distributed), the loss through
``trainer.compute_loss`` and the backward through ``accelerator.backward`` — exactly the training-step path.
Rank 0 writes the loss and every parameter gradient (after DDP's all-reduce) to OUT.pt.
"""

from __future__ import annotations

import argparse
import os

import torch
from one_step import save_one_step

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.demo.generated import make_shapes_dataset
from mm_embed_trl.demo.tiny import get_tiny_backbone

GLOBAL_BATCH = 8


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--negatives", type=int, default=0)
    parser.add_argument("--dropout", type=float, default=0.0)
    args = parser.parse_args()

    data = make_shapes_dataset(num_train=64, num_eval=8, seed=3, num_negatives=max(args.negatives, 1))
    rows = [data["train"][i] for i in range(GLOBAL_BATCH)]
    # plant an exact duplicate target so content masking is exercised across ranks
    rows[5] = {**rows[5], "pos_text": rows[1]["pos_text"], "pos_image_path": rows[1]["pos_image_path"]}

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
    if args.dropout:
        model.encoder.config.text_config.attention_dropout = args.dropout
        for module in model.modules():
            if hasattr(module, "attention_dropout"):
                module.attention_dropout = args.dropout
    config = HardNegContrastiveConfig(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trainer"),
        per_device_train_batch_size=GLOBAL_BATCH,
        gradient_cache_chunk_size=args.chunk,
        num_hard_negatives=3,
        false_negative_margin=0.0,
        temperature=0.05,
        num_negatives=args.negatives,
        image_root=str(data.image_root),
        report_to="none",
        use_cpu=True,
    )
    trainer = HardNegContrastiveTrainer(model=model, args=config)
    save_one_step(trainer, rows, args.out, seed=1234)


if __name__ == "__main__":
    main()
