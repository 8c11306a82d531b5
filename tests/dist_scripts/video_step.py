"""One training step of a trainer on rows where rank 0's batch holds videos and rank 1's none, in 1 or 2 processes.

Run as ``python video_step.py OUT.pt ROWS.json {hardneg,sft} [--chunk N]`` (one process, the whole batch) or under
``torch.distributed.run --nproc_per_node 2`` (each rank its half). The trainer's own accelerator wraps the model (DDP
on gloo), the loss goes through ``trainer.compute_loss`` and the backward through ``accelerator.backward``. Rank 0
writes the loss and every parameter gradient (after DDP's all-reduce) to OUT.pt.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from one_step import save_one_step

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.demo.tiny import get_tiny_backbone


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("rows")
    parser.add_argument("trainer", choices=("hardneg", "sft"))
    parser.add_argument("--chunk", type=int, default=None)
    args = parser.parse_args()
    with open(args.rows, encoding="utf-8") as handle:
        rows = json.load(handle)

    common = dict(
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trainer"), temperature=0.05,
        gradient_cache_chunk_size=args.chunk, report_to="none", use_cpu=True, per_device_train_batch_size=len(rows),
        video_max_frames=4,
    )
    torch.manual_seed(0)
    if args.trainer == "hardneg":
        from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer

        model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
        config = HardNegContrastiveConfig(num_hard_negatives=1, false_negative_margin=0.0, **common)
        trainer = HardNegContrastiveTrainer(model=model, args=config)
    else:
        from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer

        model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), encoder_kind="generative")
        trainer = EmbeddingSFTTrainer(model=model, args=EmbeddingSFTConfig(**common))
    save_one_step(trainer, rows, args.out)


if __name__ == "__main__":
    main()
