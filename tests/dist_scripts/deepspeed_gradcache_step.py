"""Two HardNegContrastiveTrainer optimizer steps under DeepSpeed ZeRO (CPU accelerator, gloo), with or without
GradCache; rank 0 saves the resulting parameters. Run under ``torch.distributed.run --nproc_per_node 2`` with
``DS_ACCELERATOR=cpu``: ``python deepspeed_gradcache_step.py OUT.pt [--chunk N] [--stage 2]``.
"""

from __future__ import annotations

import argparse

import torch

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.data.generated import make_shapes_dataset
from mm_embed_trl.tiny import get_tiny_backbone


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--stage", type=int, default=2)
    args = parser.parse_args()
    data = make_shapes_dataset(num_train=64, num_eval=8, seed=3)
    ds_config = {
        "zero_optimization": {"stage": args.stage},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
        "zero_allow_untested_optimizer": True,
    }
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
    config = HardNegContrastiveConfig(
        output_dir="/tmp/ds-gradcache-test",
        per_device_train_batch_size=8,
        # one step of AdamW with eps=1 and no decay moves each weight by ~lr * its gradient (linear, unlike Adam's
        # sign-like first step), so equal parameters afterwards mean equal gradients
        max_steps=1,
        learning_rate=1e-2,
        adam_epsilon=1.0,
        weight_decay=0.0,
        max_grad_norm=0.0,
        gradient_cache_chunk_size=args.chunk or None,
        image_root=str(data.image_root),
        num_negatives=0,
        num_hard_negatives=3,
        temperature=0.05,
        deepspeed=ds_config,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
    )
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=data["train"])
    trainer.train()
    if trainer.is_world_process_zero():
        params = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        torch.save({"params": params, "loss": trainer.state.log_history[-1]["train_loss"]}, args.out)


if __name__ == "__main__":
    main()
