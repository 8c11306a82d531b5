"""One HardNegContrastiveTrainer optimizer step under DeepSpeed ZeRO (its CPU accelerator) or FSDP2 (gloo), with
or without GradCache; rank 0 saves the resulting parameters. Run under ``torch.distributed.run --nproc_per_node 2``
with ``DS_ACCELERATOR=cpu``: ``python sharded_step.py OUT.pt [--chunk N] [--stage 2 | --fsdp] [--videos]``. The
generated data mixes image and text-only queries, so chunks (and ranks) differ in modality; ``--videos`` turns every
third image query into a video query (a folder of frames), so some chunks hold a video, others images or text only.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.demo.generated import make_shapes_dataset
from mm_embed_trl.demo.tiny import get_tiny_backbone


def _force_fsdp_on_cpu():
    """accelerate only enables FSDP on accelerators; FSDP2 itself runs on CPU with gloo, so switch it on here."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original_init = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        # later bare AcceleratorState() calls (TRL's set_seed) derive the type again: keep the plugin once given
        plugin = fsdp_plugin if fsdp_plugin is not None else getattr(self, "fsdp_plugin", None)
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init


def _with_videos(rows, image_root):
    """Every third image query becomes a video of 3 frames (its image, flipped, its image again), written on disk by
    whichever rank gets there first (each writes its own staging folder and renames it into place)."""
    import shutil

    from PIL import Image, ImageOps

    image_queries = [i for i, path in enumerate(rows["qry_image_path"]) if path][::3]
    root = os.path.join(str(image_root), "videos")
    staging = os.path.join(root, f".staging-{os.getpid()}")
    for i in image_queries:
        folder = os.path.join(root, f"clip{i:03d}")
        if os.path.isdir(folder):
            continue
        os.makedirs(staging, exist_ok=True)
        image = Image.open(os.path.join(str(image_root), rows[i]["qry_image_path"])).convert("RGB")
        for k, frame in enumerate((image, ImageOps.mirror(image), image)):
            frame.save(os.path.join(staging, f"{k:04d}.png"))
        try:
            os.rename(staging, folder)
        except OSError:  # another rank put it in place first
            shutil.rmtree(staging, ignore_errors=True)
    chosen = set(image_queries)

    def convert(row, index):
        if index not in chosen:
            return {**row, "qry_video_path": ""}
        return {**row, "qry": "<video>\nRepresent the given video.", "qry_image_path": "",
                "qry_video_path": os.path.join(root, f"clip{index:03d}")}

    return rows.map(convert, with_indices=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--zero_options", default="{}", help="extra zero_optimization entries, as JSON")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 full sharding instead of DeepSpeed")
    parser.add_argument("--without_coalesce", action="store_true", help="act as a DeepSpeed without coalescing")
    parser.add_argument("--videos", action="store_true", help="every third image query becomes a video query")
    args = parser.parse_args()
    if args.fsdp:
        _force_fsdp_on_cpu()
    if args.without_coalesce:
        from deepspeed import DeepSpeedEngine

        delattr(DeepSpeedEngine, "coalesce_grad_reduction")
    data = make_shapes_dataset(num_train=64, num_eval=8, seed=3)
    train = _with_videos(data["train"], data.image_root) if args.videos else data["train"]
    ds_config = {
        # the trainers refuse ZeRO-3 without it: their final save gathers the whole model
        "zero_optimization": {
            "stage": args.stage, "stage3_gather_16bit_weights_on_model_save": True, **json.loads(args.zero_options)
        },
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        # no "optimizer" block: the Trainer's torch AdamW is handed to DeepSpeed, whose own would first compile a
        # C++ extension (about 90 s on a fresh 2-core machine)
        "zero_allow_untested_optimizer": True,
    }
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
    config = HardNegContrastiveConfig(
        # this run's own folder: a fixed one is locked by whichever test session trains into it first
        output_dir=os.path.join(os.path.dirname(os.path.abspath(args.out)), "trainer"),
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
        deepspeed=None if args.fsdp else ds_config,
        fsdp=args.fsdp,
        fsdp_config={
            "version": 2,
            "reshard_after_forward": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"],
        }
        if args.fsdp
        else None,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=0,
        data_seed=0,
        video_max_frames=3,
    )
    # the model is loaded whole (before the config enables zero.Init): the starting point of every run
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=train)
    trainer.train()
    # FSDP2 parameters are DTensor shards: gather them (a collective, so on every rank)
    params = {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        for n, p in trainer.model.named_parameters()
    }
    if trainer.is_world_process_zero():
        torch.save(
            {
                "params": params,
                "initial": initial,
                "loss": trainer.state.log_history[-1]["train_loss"],
                "engine": "fsdp" if trainer.is_fsdp_enabled else "deepspeed" if trainer.is_deepspeed_enabled else "ddp",
            },
            args.out,
        )


if __name__ == "__main__":
    main()
