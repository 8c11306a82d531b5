# Copyright the mm-embed-trl authors. Apache-2.0.
"""UME-R1 stage 1: reasoning SFT that teaches a discriminative and a generative embedding.

With no arguments it trains the built-in tiny Qwen2-VL backbone on the built-in generated shapes data (whose rows
carry reasoning targets derived from each scene) on the CPU in a few minutes, and reports held-out retrieval before
and after for the discriminative embedding (<disc_emb>), the generative one (written after the model's own
reasoning) and their per-query oracle, plus how often the model's generations follow UME-R1's format:

    accelerate launch examples/train_sft_reasoning.py

Real runs name a backbone, a dataset with qry_reasoning / pos_reasoning columns (UME-R1's released SFT JSON converts
with mm_embed_trl.data.reasoning.load_ume_r1_sft_json; pass the JSON as --dataset_name) and a recipe:

    accelerate launch --config_file recipes/accelerate/zero3.yaml examples/train_sft_reasoning.py \
        --config recipes/sft_reasoning_qwen2vl_2b.yaml --dataset_name /data/UME-sft-train.json --image_root /data
"""

from trl import ModelConfig, TrlParser, get_peft_config

from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel
from mm_embed_trl.scripts import (
    EmbeddingScriptArguments,
    model_init_kwargs,
    parse_args,
    resolve_datasets,
    resolve_model_path,
    train_evaluate_save,
    ume_r1_evaluator,
)

# The built-in CPU demo (tiny random backbone trained from scratch): recipes/sft_reasoning_tiny_cpu.yaml holds the same.
TINY_DEFAULTS = dict(  # on top of scripts.TINY_CPU_DEFAULTS; used only when no model is named
    output_dir="outputs/sft-reasoning-tiny",
    num_train_epochs=24,
    generated_train_size=1024,
    generated_eval_size=96,
    per_device_train_batch_size=32,
    learning_rate=2e-3,
    temperature=0.05,
    max_new_tokens=96,
    logging_steps=5,
    # demo-specific, unlike UME-R1 (docs/UME-R1.md): shuffled batches (the generated rows have no task order), and
    # text-only sides without UME-R1's blank image (half the demo's sides; its figures were measured so)
    train_sampling_strategy="random",
    prompt_template="ume_r1",
)


def main():
    parser = TrlParser((EmbeddingScriptArguments, EmbeddingSFTConfig, ModelConfig))
    script_args, training_args, model_args = parse_args(parser, TINY_DEFAULTS)

    model_path, is_tiny = resolve_model_path(model_args, script_args)
    kind = "base" if training_args.discriminative_only else "generative"
    model = MultimodalEmbeddingModel.from_pretrained(
        model_path, encoder_kind=kind, **model_init_kwargs(model_args, script_args)
    )
    train_dataset, eval_dataset, image_root = resolve_datasets(script_args, training_args)
    training_args.image_root = image_root

    trainer = EmbeddingSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        dataset_mixture=script_args.dataset_mixture,
    )
    evaluator = ume_r1_evaluator(
        eval_dataset, image_root, max_new_tokens=training_args.max_new_tokens,
        discriminative_only=training_args.discriminative_only,
    )
    title = "Held-out retrieval (generated data never seen in training):" if is_tiny else "Held-out retrieval:"
    dataset = script_args.training_data_name("generated shapes with reasoning (mm_embed_trl.demo.generated)")
    train_evaluate_save(
        trainer, evaluator, title=title, dataset_name=dataset, evaluate_before=script_args.evaluate_before_training
    )


if __name__ == "__main__":
    main()
