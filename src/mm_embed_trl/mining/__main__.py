"""``python -m mm_embed_trl.mining``: mine hard negatives for a dataset in the MMEB-train schema.

    python -m mm_embed_trl.mining --model outputs/hardneg --dataset train.jsonl --image_root /data/MMEB-train \\
        --output train.mined.jsonl --num_negatives 8 --false_negative_margin 0.1

or from a recipe (the command line overrides it): ``python -m mm_embed_trl.mining --config
recipes/mining/mine_mmeb_qwen2vl_2b.yaml``. Several processes share the work (``torchrun --nproc_per_node 8 -m
mm_embed_trl.mining ...`` or ``accelerate launch -m mm_embed_trl.mining ...``); a killed run started again with the
same arguments resumes from its last chunk. The output trains as it is: ``examples/train_hardneg.py --dataset_name
train.mined.jsonl --image_root ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .miner import MiningConfig


@dataclass
class MiningArguments:
    """What to mine, with what, and where the result goes (the mining options are :class:`MiningConfig`'s)."""

    model: str = field(metadata={"help": "A model of this library, its sentence-transformers export, or any "
                                 "sentence-transformers model (folder or hub id)."})
    dataset: str = field(metadata={"help": "Hub id, .jsonl/.parquet/.json file or save_to_disk folder (MMEB-train)."})
    output: str = field(metadata={"help": "Result: .jsonl, .parquet, a folder (save_to_disk), or .json (ume_r1)."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. an MMEB subset)."})
    split: str = field(default="train", metadata={"help": "Dataset split."})
    image_root: str | None = field(default=None, metadata={"help": "Folder relative image paths are relative to."})
    corpus: str | None = field(
        default=None, metadata={"help": "More candidates: a dataset with 'text' and/or 'image' columns."}
    )
    work_dir: str | None = field(default=None, metadata={"help": "Chunks of work (default: <output>.mining-work)."})
    model_type: str = field(
        default="auto",
        metadata={"help": "auto | mm_embed_trl | sentence_transformers", "choices": ["auto", "mm_embed_trl",
                                                                               "sentence_transformers"]},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights' dtype: auto (the checkpoint's), bfloat16, float16 or float32.",
                  "choices": ["auto", "bfloat16", "float16", "float32"]},
    )


def main(argv=None) -> None:
    import logging

    import torch
    from trl import TrlParser

    from ..data.loading import load_rows_dataset
    from ..trainers.arguments import check_option_types
    from .miner import mine_hard_negatives

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parser = TrlParser((MiningArguments, MiningConfig))
    args, config = parser.parse_args_and_config(args=argv)
    for options in (args, config):
        check_option_types(options)
    dataset = load_rows_dataset(args.dataset, config=args.dataset_config, split=args.split)
    corpus = load_rows_dataset(args.corpus) if args.corpus else None
    model_kwargs = {} if args.dtype == "auto" else {"dtype": getattr(torch, args.dtype)}
    _, summary = mine_hard_negatives(
        dataset, args.model, output=args.output, corpus=corpus, image_root=args.image_root, work_dir=args.work_dir,
        model_type=args.model_type, model_kwargs=model_kwargs, config=config,
    )
    print(f"[mm-embed-trl] Mined {summary.rows_mined} rows into {args.output}")


if __name__ == "__main__":
    main()
