# Copyright the mm-embed-trl authors. Apache-2.0.
"""Export a trained embedding model as a sentence-transformers model (with a model card), and optionally push it.

    python examples/export.py --checkpoint outputs/hardneg-tiny --output_dir outputs/hardneg-tiny-st

    python examples/export.py --checkpoint outputs/hardneg-qwen2vl --output_dir exports/qwen2vl-unime \
        --push_to_hub --hub_model_id my-org/qwen2vl-unime --license apache-2.0 \
        --dataset_name TIGER-Lab/MMEB-train --prompt_query "Represent the given query: "

`--checkpoint` is a training run's output_dir (or any directory written by `MultimodalEmbeddingModel.save_pretrained`),
or a published embedding model (hub id or local copy, e.g. `zhibinlan/UME-R1-2B`), exported with its preset.
The export loads with `SentenceTransformer(output_dir)` (no trust_remote_code; with `--video_inputs`, which reads
video paths as `encode` does, `trust_remote_code=True`) and embeds exactly like
`MultimodalEmbeddingModel.encode`: `encode_query(x)` ~ `encode(x, side="query")`, `encode_document(x)` ~
`encode(x, side="document")`. The model card (README.md) reads the run's `retrieval_report.json` (before/after
metrics written by the training examples) when present, and hyper-parameters from `--training_args_json`.
Pushing needs a write token (`--hub_token`, `HF_TOKEN` or `hf auth login`); the folder and the token are checked
before anything is uploaded, and the upload is a single commit.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser


@dataclass
class ExportArguments:
    checkpoint: str = field(
        metadata={"help": "Training output_dir / saved MultimodalEmbeddingModel directory / published model (preset)."}
    )
    output_dir: str = field(metadata={"help": "Where to write the sentence-transformers export."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})
    prompt_query: str | None = field(
        default=None, metadata={"help": "Instruction for queries (ST prompt 'query'); default: the template's."}
    )
    prompt_document: str | None = field(
        default=None, metadata={"help": "Instruction for documents (ST prompt 'document'); default: the template's."}
    )
    default_prompt_name: str | None = field(default=None, metadata={"help": "ST default prompt name."})
    video_inputs: bool = field(
        default=False,
        metadata={
            "help": "Read {'video': frame folder | frame list | video file} as MultimodalEmbeddingModel.encode does "
            "(mm-embed-trl's input module: loading needs trust_remote_code=True and mm-embed-trl installed)."
        },
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "Training method for the card: unime_stage1, unime_stage2, ume_r1_sft, ume_r1_rl, none (aliases "
            "distill, hardneg, sft, grpo, baseline)."
        },
    )
    dataset_name: list[str] | None = field(default=None, metadata={"help": "Training dataset id(s) for the card."})
    eval_results: str | None = field(
        default=None,
        metadata={"help": "JSON file of evaluation results; default: <checkpoint>/retrieval_report.json if present."},
    )
    training_args_json: str | None = field(
        default=None, metadata={"help": "JSON file of TrainingArguments.to_dict() for the card's hyper-parameters."}
    )
    license: str | None = field(default=None, metadata={"help": "License id for the card (e.g. apache-2.0)."})
    model_name: str | None = field(default=None, metadata={"help": "Title of the model card."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the export to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo id, e.g. my-org/my-model."})
    hub_token: str | None = field(default=None, metadata={"help": "Write token (default: HF_TOKEN / saved login)."})
    hub_private_repo: bool | None = field(default=None, metadata={"help": "Create the repo private."})
    hub_revision: str | None = field(default=None, metadata={"help": "Branch to push to."})
    hub_create_pr: bool = field(default=False, metadata={"help": "Open a pull request instead of committing."})


def _read_json(path: str | pathlib.Path, what: str):
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} file {str(path)!r} is not valid JSON: {err}") from err


def main(argv: list[str] | None = None) -> pathlib.Path:
    from mm_embed_trl.export import export_sentence_transformers, push_to_hub
    from mm_embed_trl.export.hub import check_repo_id

    parser = HfArgumentParser(ExportArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id (e.g. my-org/my-embedding-model).")
    if args.push_to_hub:
        check_repo_id(args.hub_model_id)  # before the export is written (and its card names the repo)

    card: dict = {}
    report = args.eval_results or pathlib.Path(args.checkpoint) / "retrieval_report.json"
    if args.eval_results or pathlib.Path(report).is_file():
        card["eval_results"] = _read_json(report, "--eval_results")
    if args.training_args_json:
        card["training_args"] = _read_json(args.training_args_json, "--training_args_json")
    if args.method is not None:
        from mm_embed_trl.trainers.identity import trainer_for_method

        card["method"] = trainer_for_method(args.method)  # the card renders what that trainer declares
    for key in ("license", "model_name"):
        if getattr(args, key) is not None:
            card[key] = getattr(args, key)
    if args.dataset_name:
        card["dataset_name"] = args.dataset_name
    if args.push_to_hub:
        card["repo_id"] = args.hub_model_id  # the card's usage snippets name the Hub repo
    prompts = {}
    if args.prompt_query is not None:
        prompts["query"] = args.prompt_query
    if args.prompt_document is not None:
        prompts["document"] = args.prompt_document

    out = export_sentence_transformers(
        args.checkpoint,
        args.output_dir,
        prompts=prompts or None,
        default_prompt_name=args.default_prompt_name,
        model_card_data=card,
        overwrite=args.overwrite,
        video_inputs=args.video_inputs,
    )
    if args.video_inputs:
        print(f"Exported to {out}: SentenceTransformer({str(out)!r}, trust_remote_code=True) loads it.")
    else:
        print(f"Exported to {out}: SentenceTransformer({str(out)!r}) loads it (no trust_remote_code).")
    if args.push_to_hub:
        url = push_to_hub(
            out,
            args.hub_model_id,
            token=args.hub_token,
            private=args.hub_private_repo,
            revision=args.hub_revision,
            create_pr=args.hub_create_pr,
        )
        print(f"Pushed to {url}")
    return out


if __name__ == "__main__":
    from mm_embed_trl._files import DiskFullError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (FileNotFoundError, NotADirectoryError, FileExistsError, ValueError, PermissionError, DiskFullError) as err:
        # Input problems (and a full disk) are reported as one clear line, not a traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
