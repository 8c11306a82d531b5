"""One EmbeddingGRPOTrainer step on fixed (stubbed) completions; run alone or under torchrun with 2 processes.

    python grpo_step.py OUT.pt        /   torchrun --nproc_per_node 2 grpo_step.py OUT.pt

Saves (rank 0) the global reward table, the global advantages, the logged loss and the parameter updates of one AdamW
step with eps=1 (each weight moves by ~lr x its gradient, so equal updates mean equal gradients).
"""

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

out = sys.argv[1]
world = int(os.environ.get("WORLD_SIZE", "1"))
data = make_shapes_dataset(num_train=16, num_eval=0, seed=2)
torch.manual_seed(0)
model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), encoder_kind="generative")
config = EmbeddingGRPOConfig(
    output_dir=out + ".trainer", num_generations=G, per_device_train_batch_size=16 // world, max_completion_length=16,
    max_steps=1, logging_steps=1, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, beta=0.04,
    epsilon_high=0.28, loss_type="dr_grpo", save_strategy="no", learning_rate=1e-2, adam_epsilon=1.0,
    weight_decay=0.0, max_grad_norm=0.0, seed=0, image_root=str(data.image_root), reasoning_sensitivity_rows=2,
    disable_tqdm=True, retrieval_pool="generation_batch",
)


def length_reward(completions, **kwargs):
    """A reward that differs within every group (its rollouts differ in length), so advantages are well defined."""
    return [len(c[-1]["content"]) / 40.0 for c in completions]


trainer = EmbeddingGRPOTrainer(model=model, reward_funcs=[length_reward], args=config, train_dataset=data["train"])
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
initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
trainer.train()
if trainer.accelerator.is_main_process:
    updates = {n: (p.detach() - initial[n]) for n, p in trainer.model.named_parameters()}
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    torch.save({**captured, "loss": loss, "updates": updates, "world": world}, out)
