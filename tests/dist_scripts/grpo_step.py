"""One EmbeddingGRPOTrainer step on fixed (stubbed) completions; run alone or under torchrun with 2 processes.

    python grpo_step.py OUT.pt [--lora] [--save DIR]
    torchrun --nproc_per_node 2 grpo_step.py OUT.pt [--lora] [--stage 3 | --fsdp] [--save DIR]   (DS_ACCELERATOR=cpu)

Saves (rank 0) the global reward table, the global advantages, the logged loss and, unless the weights are sharded
(ZeRO-3, FSDP), the parameter updates of one AdamW step with eps=1 (each weight moves by ~lr x its gradient, so equal
updates mean equal gradients), plus the backbone's weights before the step. `--lora` trains LoRA adapters (PEFT, as
TRL wraps the policy); `--stage N` runs under DeepSpeed ZeRO-N, `--fsdp` under FSDP2; `--save DIR` ends with the
trainer's final save (`save_for_inference`: gathered, LoRA merged).
"""

import argparse
import os
import sys

import torch
from accelerate.utils import gather

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from test_grpo_trainer import G, _fixed_completions  # noqa: E402

from mm_embed_trl import MultimodalEmbeddingModel  # noqa: E402
from mm_embed_trl.demo.generated import make_shapes_dataset  # noqa: E402
from mm_embed_trl.demo.tiny import get_tiny_backbone  # noqa: E402
from mm_embed_trl.trainers.grpo_config import EmbeddingGRPOConfig  # noqa: E402
from mm_embed_trl.trainers.grpo_trainer import EmbeddingGRPOTrainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--lora", action="store_true", help="train LoRA adapters on q, v and down projections")
parser.add_argument("--stage", type=int, default=0, help="DeepSpeed ZeRO stage (0: no DeepSpeed)")
parser.add_argument("--no_gather_on_save", action="store_true", help="ZeRO-3 without the 16-bit gather on save")
parser.add_argument("--fsdp", action="store_true", help="FSDP2 full sharding (switched on for the CPU)")
parser.add_argument("--save", help="end with the final save into this folder")
cli = parser.parse_args()
if cli.fsdp:
    from sharded_step import _force_fsdp_on_cpu

    _force_fsdp_on_cpu()
out = cli.out
world = int(os.environ.get("WORLD_SIZE", "1"))
data = make_shapes_dataset(num_train=16, num_eval=0, seed=2)
torch.manual_seed(0)
model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), encoder_kind="generative")
deepspeed = None
if cli.stage:
    # accelerate starts DeepSpeed's communication layer only on accelerators; TRL's reference model is built under
    # zero.Init (ZeRO-3), whose batch-size check asks it for the world size
    import deepspeed as ds

    ds.init_distributed(dist_backend="gloo")
    deepspeed = {
        "zero_optimization": {
            "stage": cli.stage, "stage3_gather_16bit_weights_on_model_save": not cli.no_gather_on_save
        },
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,  # the Trainer's torch AdamW: no DeepSpeed C++ extension to compile
    }
FSDP_CONFIG = {
    "version": 2,
    "reshard_after_forward": True,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"],
}
peft_config = None
if cli.lora:
    from peft import LoraConfig

    peft_config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
config = EmbeddingGRPOConfig(
    output_dir=out + ".trainer", num_generations=G, per_device_train_batch_size=16 // world, max_completion_length=16,
    max_steps=1, logging_steps=1, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, beta=0.04,
    epsilon_high=0.28, loss_type="dr_grpo", save_strategy="no", learning_rate=1e-2, adam_epsilon=1.0,
    weight_decay=0.0, max_grad_norm=0.0, seed=0, image_root=str(data.image_root), reasoning_sensitivity_rows=2,
    disable_tqdm=True, retrieval_pool="generation_batch", deepspeed=deepspeed, save_sentence_transformers=False,
    fsdp=cli.fsdp, fsdp_config=FSDP_CONFIG if cli.fsdp else None,
)


def length_reward(completions, **kwargs):
    """A reward that differs within every group (its rollouts differ in length), so advantages are well defined."""
    return [len(c[-1]["content"]) / 40.0 for c in completions]


trainer = EmbeddingGRPOTrainer(
    model=model, reward_funcs=[length_reward], args=config, train_dataset=data["train"], peft_config=peft_config
)
_fixed_completions(trainer)
captured = {}
calculate, score = trainer._calculate_rewards, trainer._generate_and_score_completions


def spy_rewards(*args):
    captured["rewards"] = calculate(*args).detach().cpu().clone()
    return captured["rewards"].to(trainer.accelerator.device)


def spy_score(inputs):
    output = score(inputs)
    captured["advantages"] = gather(output["advantages"]).detach().cpu()
    return output


trainer._calculate_rewards, trainer._generate_and_score_completions = spy_rewards, spy_score
# The backbone after the trainer added its tokens, before the step (ZeRO-3 partitions it only when training starts).
start = {n: p.detach().clone() for n, p in trainer.embedding_model.backbone.state_dict().items()}
initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
trainer.train()
updates = None
if cli.stage != 3 and not cli.fsdp:  # whole weights; before the final save, which merges LoRA in place
    updates = {n: (p.detach() - initial[n]) for n, p in trainer.model.named_parameters()}
if cli.save:
    trainer.save_for_inference(cli.save)
if trainer.accelerator.is_main_process:
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    torch.save({**captured, "loss": loss, "updates": updates, "start": start, "world": world}, out)
