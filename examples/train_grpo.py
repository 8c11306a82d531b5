# Copyright the mm-embed-trl authors. Apache-2.0.
"""UME-R1 stage 2: GRPO on TRL's GRPOTrainer with a retrieval reward, from the reasoning SFT stage's output.

With no arguments it starts from the SFT example's tiny CPU output (`outputs/sft-reasoning-tiny`; when it is absent
the SFT example is run first, on one process, with its own defaults) and runs a short RL stage on the built-in
generated shapes data on the CPU, reporting held-out retrieval of the discriminative and generative embeddings
(and their oracle) plus format compliance before and after:

    accelerate launch examples/train_grpo.py

Real runs name the SFT checkpoint, a pair dataset in the MMEB-train schema and UME-R1's recipe:

    accelerate launch --config_file recipes/accelerate/zero3.yaml examples/train_grpo.py \
        --config recipes/grpo_qwen2vl_2b.yaml --model_name_or_path outputs/ume-r1-sft-qwen2vl-2b \
        --dataset_name /data/mmeb-train.jsonl --image_root /data

Generation can run on vLLM through TRL's own options (`--use_vllm true --vllm_mode colocate`, vLLM installed).
"""

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import PartialState
from trl import ModelConfig, TrlParser, get_peft_config

from mm_embed_trl import EmbeddingGRPOConfig, EmbeddingGRPOTrainer, MultimodalEmbeddingModel
from mm_embed_trl.scripts import (
    EmbeddingScriptArguments,
    model_init_kwargs,
    parse_args,
    refuse_stream_and_mixture,
    resolve_datasets,
    train_evaluate_save,
    ume_r1_evaluator,
)

# The built-in CPU demo: recipes/grpo_tiny_cpu.yaml holds the same.
TINY_DEFAULTS = dict(  # on top of scripts.TINY_CPU_DEFAULTS; used only when no model is named
    output_dir="outputs/grpo-tiny",
    generated_train_size=1024,
    generated_eval_size=96,
    max_steps=200,
    num_generations=4,
    per_device_train_batch_size=32,  # 4 pairs x 2 sides x G=4 per micro-step
    steps_per_generation=4,  # one generation of 16 pairs serves 4 micro-steps...
    retrieval_pool="generation_batch",  # ...and its 16 pairs compete in the retrieval reward
    max_completion_length=48,  # the generated reasoning targets are ~35 tokens
    learning_rate=5e-5,
    freeze_vision_tower=True,  # as in the SFT stage: the LM learned on the random vision tower's exact features
    beta=0.0,
    loss_type="dr_grpo",
    temperature=0.7,  # at 1.0 rollouts stray far from the greedy policy that is evaluated; RL did not learn
    gradient_checkpointing=False,
    bf16=False,
    logging_steps=5,
    warmup_steps=0.0,
)
SFT_TINY_OUTPUT = "outputs/sft-reasoning-tiny"


@dataclass
class GRPOScriptArguments(EmbeddingScriptArguments):
    sft_output_dir: str = field(
        default=SFT_TINY_OUTPUT,
        metadata={"help": "Tiny demo only: the SFT example's output to start from (built when absent)."},
    )


def build_tiny_sft_start(path: str) -> None:
    """Run the SFT example (its tiny CPU defaults) into `path`, once, as a plain single-process job."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    print(f"[mm-embed-trl] No SFT output at {path}: running examples/train_sft_reasoning.py first (a few minutes).")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))
    }
    script = Path(__file__).with_name("train_sft_reasoning.py")
    subprocess.run([sys.executable, str(script), "--output_dir", path], check=True, env=env)


def main():
    parser = TrlParser((GRPOScriptArguments, EmbeddingGRPOConfig, ModelConfig))
    script_args, training_args, model_args = parse_args(parser, TINY_DEFAULTS)
    refuse_stream_and_mixture(
        script_args, "EmbeddingGRPOTrainer", "its sampler repeats each pair for its generations by index"
    )

    is_tiny = not model_args.model_name_or_path
    model_path = model_args.model_name_or_path
    if is_tiny:
        model_path = script_args.sft_output_dir
        with PartialState().main_process_first():
            if PartialState().is_main_process:
                build_tiny_sft_start(model_path)
        print(f"[mm-embed-trl] No --model_name_or_path given: RL from the tiny SFT model at {model_path} (a CPU demo).")
    model = MultimodalEmbeddingModel.from_pretrained(
        model_path, encoder_kind="generative", **model_init_kwargs(model_args, script_args)
    )
    train_dataset, eval_dataset, image_root = resolve_datasets(script_args, training_args)
    training_args.image_root = image_root

    trainer = EmbeddingGRPOTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
    )
    evaluator = ume_r1_evaluator(eval_dataset, image_root, max_new_tokens=training_args.max_completion_length)
    title = "Held-out retrieval (generated data never seen in training):" if is_tiny else "Held-out retrieval:"
    dataset = script_args.dataset_name or "generated shapes (mm_embed_trl.demo.generated)"
    train_evaluate_save(
        trainer, evaluator, title=title, dataset_name=dataset, evaluate_before=script_args.evaluate_before_training
    )


if __name__ == "__main__":
    main()
