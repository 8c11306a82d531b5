# Copyright the mm-embed-trl authors. Apache-2.0.
"""UniME stage 2: hard-negative enhanced contrastive instruction tuning.

With no arguments it trains the built-in tiny Qwen2-VL backbone on the built-in generated shapes data on the CPU
in a few minutes, and reports held-out retrieval before and after:

    accelerate launch examples/train_hardneg.py

Real runs name a backbone, a dataset in the MMEB-train schema and usually a recipe (command line overrides it):

    accelerate launch --config_file recipes/accelerate/ddp.yaml examples/train_hardneg.py \
        --config recipes/hardneg_qwen2vl_2b.yaml --image_root /data/MMEB-train
"""

from trl import ModelConfig, TrlParser, get_peft_config

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.evaluation import RetrievalEvaluator
from mm_embed_trl.scripts import (
    EmbeddingScriptArguments,
    model_init_kwargs,
    parse_args,
    resolve_datasets,
    resolve_model_path,
    train_evaluate_save,
)

# The built-in CPU demo (tiny random backbone trained from scratch): recipes/hardneg_tiny_cpu.yaml holds the same.
TINY_DEFAULTS = dict(  # on top of scripts.TINY_CPU_DEFAULTS; used only when no model is named
    output_dir="outputs/hardneg-tiny",
    num_train_epochs=12,
    learning_rate=5e-4,
    temperature=0.05,
    num_hard_negatives=32,  # of 63 in-batch candidates: a random tiny model needs a wider net than k=8
    logging_steps=5,
)


def main():
    parser = TrlParser((EmbeddingScriptArguments, HardNegContrastiveConfig, ModelConfig))
    script_args, training_args, model_args = parse_args(parser, TINY_DEFAULTS)

    # The data first: its rows are checked before the model loads.
    train_dataset, eval_dataset, image_root = resolve_datasets(script_args, training_args)
    training_args.image_root = image_root
    model_path, is_tiny = resolve_model_path(model_args, script_args)
    # A published model keeps its own prompt format (its preset) unless --prompt_template says otherwise; a plain
    # backbone gets UniME's (the trainer applies --prompt_template to either).
    model = MultimodalEmbeddingModel.from_pretrained(model_path, **model_init_kwargs(model_args, script_args))

    evaluator = None
    if eval_dataset is not None:
        evaluator = RetrievalEvaluator.from_rows(eval_dataset, image_root, name="heldout", batch_size=64)

    trainer = HardNegContrastiveTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
        dataset_mixture=script_args.dataset_mixture,
    )
    title = "Held-out retrieval (generated data never seen in training):" if is_tiny else "Held-out retrieval:"
    dataset = script_args.training_data_name("generated shapes (mm_embed_trl.demo.generated)")
    train_evaluate_save(
        trainer, evaluator, title=title, dataset_name=dataset, evaluate_before=script_args.evaluate_before_training
    )


if __name__ == "__main__":
    main()
