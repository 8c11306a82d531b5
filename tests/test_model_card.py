"""Model cards from a real (tiny) training run: metadata, Hub-valid YAML front matter, no placeholders."""

from __future__ import annotations

import re

import pytest
import yaml
from huggingface_hub import ModelCard

from mm_embed_trl.export.model_card import (
    collect_card_metadata,
    hyperparameters_from_args,
    normalize_eval_results,
    render_model_card,
)
from mm_embed_trl.modeling import MultimodalEmbeddingModel
from mm_embed_trl.trainers.identity import canonical_method, method_keys, trainer_for_method
from mm_embed_trl.trainers.papers import UME_R1_PAPER, UNIME_PAPER


def _front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, "the card must start with a YAML front matter block"
    return yaml.safe_load(match.group(1))


def _assert_no_placeholders(card: str) -> None:
    for marker in ("{{", "}}", "{%", "%}", "TODO", "None |", "| None"):
        assert marker not in card, marker


@pytest.fixture(scope="module")
def trained_run(tiny_backbone, shapes_data, tmp_path_factory):
    """Two optimiser steps of UniME stage 2 on the generated shapes data, evaluated before and after."""
    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer
    from mm_embed_trl.evaluation import RetrievalEvaluator

    out = tmp_path_factory.mktemp("run")
    args = HardNegContrastiveConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=2,
        learning_rate=3e-3,
        temperature=0.05,
        num_hard_negatives=3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        image_root=str(shapes_data.image_root),
        save_sentence_transformers=False,
        seed=0,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    evaluator = RetrievalEvaluator.from_rows(
        [shapes_data["eval"][i] for i in range(12)], shapes_data.image_root, name="heldout", k_values=(1, 5)
    )
    before = evaluator(model)
    trainer = HardNegContrastiveTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(16)))
    trainer.train()
    after = evaluator(model)
    return model, args, {"before": before, "after": after}, trainer


def test_card_from_a_real_training_run(trained_run):
    model, args, results, trainer = trained_run
    metadata = collect_card_metadata(
        model, training_args=args, eval_results=results, method=trainer, dataset_name="shapes (generated)"
    )
    metadata.update(repo_id="my-org/shapes-embedder", license="apache-2.0")
    assert metadata["method"] == "unime_stage2"  # declared by HardNegContrastiveTrainer
    hp = metadata["hyperparameters"]
    assert hp["learning_rate"] == args.learning_rate and hp["max_steps"] == 2
    assert hp["temperature"] == 0.05 and hp["num_hard_negatives"] == 3  # method-specific fields
    assert hp["total_train_batch_size"] == 8  # 4 per device x 2 accumulation x 1 process
    assert not any(k in hp for k in ("output_dir", "logging_steps", "report_to", "image_root", "push_to_hub"))
    rows = {(r["dataset"], r["metric"]): r for r in metadata["eval_results"]}
    assert rows[("heldout", "recall@1")]["before"] == results["before"]["heldout_recall@1"]
    assert rows[("heldout", "recall@1")]["after"] == results["after"]["heldout_recall@1"]

    card = render_model_card(metadata)
    _assert_no_placeholders(card)
    front = _front_matter(card)
    assert front["library_name"] == "sentence-transformers" and front["pipeline_tag"] == "sentence-similarity"
    assert front["license"] == "apache-2.0" and "unime" in front["tags"] and "mm-embed-trl" in front["tags"]
    assert "base_model" not in front  # a local tiny backbone is no Hub id: not claimed as base_model
    assert "datasets" not in front  # nor a local dataset as a Hub dataset
    assert "`shapes (generated)`" in card
    results_yaml = front["model-index"][0]["results"][0]
    metrics = {m["type"]: m["value"] for m in results_yaml["metrics"]}
    assert metrics["recall@1"] == pytest.approx(results["after"]["heldout_recall@1"])
    assert results_yaml["dataset"]["name"] == "heldout"
    # the values of the run, the method and its citation are in the text
    assert f"| `learning_rate` | {args.learning_rate:.4g} |" in card
    before, after = results["before"]["heldout_recall@1"], results["after"]["heldout_recall@1"]
    assert f"| heldout | recall@1 | {before:.4g} | {after:.4g} | {after - before:+.4g} |" in card
    assert "arXiv:2504.17432" in card and "Breaking the Modality Barrier" in card and "@article{gu2025unime" in card
    assert 'SentenceTransformer("my-org/shapes-embedder")' in card
    assert "Summary above image in one word:" in card  # the prompt actually used
    # huggingface_hub reads the same metadata back
    parsed = ModelCard(card)
    assert parsed.data.library_name == "sentence-transformers"
    for result in parsed.data.eval_results:
        assert result.metric_value == pytest.approx(results["after"][f"heldout_{result.metric_type}"])


def test_hub_ids_go_into_the_front_matter(trained_run):
    model, args, _, _ = trained_run
    metadata = collect_card_metadata(
        model, training_args=args, dataset_name=["TIGER-Lab/MMEB-train"], method=trainer_for_method("ume_r1_rl")
    )
    metadata.update(base_model="Qwen/Qwen2-VL-2B-Instruct", model_reference="/tmp/some/export", language="en")
    card = render_model_card(metadata)
    _assert_no_placeholders(card)
    front = _front_matter(card)
    assert front["base_model"] == "Qwen/Qwen2-VL-2B-Instruct" and front["datasets"] == ["TIGER-Lab/MMEB-train"]
    assert front["language"] == "en" and "model-index" not in front  # no metrics given: no model-index
    assert "arXiv:2511.00405" in card and "Lan, Zhibin" in card and "UME-R1 stage 2" in card
    assert "The training run recorded no evaluation results." in card


def test_method_resolution_and_citations():
    assert canonical_method("hardneg") == canonical_method("HardNegContrastiveConfig") == "unime_stage2"
    assert canonical_method("distill") == canonical_method("unime-stage1") == "unime_stage1"
    assert canonical_method("grpo") == "ume_r1_rl" and canonical_method("sft") == "ume_r1_sft"
    assert canonical_method(None) == "none"
    with pytest.raises(ValueError, match="Unknown training method 'magic'"):
        canonical_method("magic")
    assert UNIME_PAPER["id"] == "2504.17432" and UME_R1_PAPER["id"] == "2511.00405"
    for key in method_keys():
        trainer = trainer_for_method(key)
        assert trainer is None or trainer._paper in (UNIME_PAPER, UME_R1_PAPER), key


def test_normalize_eval_results_forms():
    rows = normalize_eval_results({"before": {"heldout_recall@1": 0.25}, "after": {"heldout_recall@1": 0.5}})
    assert rows == [{"dataset": "heldout", "metric": "recall@1", "before": 0.25, "after": 0.5}]
    trainer_style = {"eval_loss": 1.2, "eval_runtime": 3.0, "eval_samples_per_second": 9.0, "eval_ndcg@10": 0.7}
    assert normalize_eval_results(trainer_style, "flickr") == [
        {"dataset": "flickr", "metric": "ndcg@10", "before": None, "after": 0.7}
    ]
    per_dataset = {"coco": {"before": {"recall@1": 0.1}, "after": {"recall@1": 0.2}}, "mmeb": {"precision@1": 0.6}}
    assert normalize_eval_results(per_dataset) == [
        {"dataset": "coco", "metric": "recall@1", "before": 0.1, "after": 0.2},
        {"dataset": "mmeb", "metric": "precision@1", "before": None, "after": 0.6},
    ]
    assert normalize_eval_results([{"metric": "mrr", "after": 0.3}]) == [
        {"dataset": "evaluation set", "metric": "mrr", "before": None, "after": 0.3}
    ]
    with pytest.raises(ValueError, match="is not a finite number"):
        normalize_eval_results({"after": {"recall@1": float("nan")}})
    with pytest.raises(ValueError, match="must be a dict with 'metric'"):
        normalize_eval_results([{"value": 1.0}])
    with pytest.raises(TypeError, match="eval_results must be a dict"):
        normalize_eval_results(0.5)


def test_hyperparameters_from_a_plain_dict_and_bad_type():
    hp = hyperparameters_from_args(
        {
            "learning_rate": 1e-4,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 8,
            "world_size": 2,
            "output_dir": "/x",
            "temperature": 0.02,
            "logging_dir": "/y",
            "bf16": False,
            "max_steps": -1,
        }
    )
    assert hp == {
        "learning_rate": 1e-4,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 8,
        "temperature": 0.02,
        "world_size": 2,
        "total_train_batch_size": 64,
    }
    with pytest.raises(TypeError, match="training_args must be"):
        hyperparameters_from_args(3)


def test_missing_template_and_missing_values_are_clear_errors(trained_run, tmp_path):
    model, _, _, _ = trained_run
    metadata = collect_card_metadata(model)
    with pytest.raises(ValueError, match="needs `repo_id`"):
        render_model_card(metadata)  # no model reference for the usage snippets
    metadata["model_reference"] = "/tmp/x"
    with pytest.raises(FileNotFoundError, match="Model card template not found"):
        render_model_card(metadata, template_path=tmp_path / "nope.md")
    broken = tmp_path / "broken.md"
    broken.write_text("---\n{{ card_data }}\n---\n\n{{ not_a_field }}\n")
    with pytest.raises(ValueError, match="not_a_field"):
        render_model_card(metadata, template_path=broken)


@pytest.mark.parametrize(
    "template, instruction, system, user_text, user_image_text",
    [
        # the house default: the instruction starts the text of the one user message
        ("unime", "Find it: ", None, "Find it: <text>\nSummary above sentence in one word:",
         "<image>\nFind it: <text>\nSummary above image in one word:"),
        # GME (gme_inference.py): the instruction is the system message, the user message image then text
        ("gme", "Find an image that matches the given caption.", "Find an image that matches the given caption.",
         "<text>", "<image><text>"),
        # Qwen3-VL-Embedding (format_model_input): the system instruction gets a final "."
        ("qwen3_vl_embedding", "Retrieve relevant images", "Retrieve relevant images.", "<text>", "<image><text>"),
        # VLM2Vec / UniME-V2 on Qwen2-VL (process_input_text): no chat template, the image token, a space, the text
        ("vlm2vec", "", None, "<text>", "<image> <text>"),
    ],
)
def test_the_cards_prompts_are_the_prompts_encode_renders(
    tiny_backbone, template, instruction, system, user_text, user_image_text
):
    """The card's prompt table shows where each template puts the instruction (the text, or the system message), and
    every row it shows is what `encode` feeds the model: its system and user messages in the rendered chat prompt."""
    from PIL import Image

    from mm_embed_trl.data.schema import EmbeddingInput

    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template=template)
    metadata = collect_card_metadata(model, export_info={"prompts": {"query": instruction, "document": ""}})
    metadata.update(model_reference="/tmp/export")
    rows = {row["input"]: row for row in metadata["prompt_examples"]}
    assert (rows["text"]["system"], rows["text"]["content"]) == (system, user_text)
    assert (rows["image + text"]["system"], rows["image + text"]["content"]) == (system, user_image_text)
    card = render_model_card(metadata)
    _assert_no_placeholders(card)
    section = card.split("### Prompts", 1)[1].split("## Training", 1)[0]
    placement = "the system message" if system else "prepended to the text"
    assert (f"Instructions ({placement})" in section) == bool(instruction)
    assert ("without a chat template" in section) == (template == "vlm2vec")

    collator = model.make_collator()
    image = Image.new("RGB", (32, 32))
    for kind, inp in (("text", EmbeddingInput(text="a red square")),
                      ("image + text", EmbeddingInput(text="a red square", image=image))):
        rendered = collator._render([inp], "query", instruction)[0][0]
        shown = rows[kind]["content"].replace("<text>", "a red square")
        if template == "vlm2vec":
            assert rendered == shown.replace("<image>", model.processor.image_token)
            continue
        shown = shown.replace("<image>", "<|vision_start|><|image_pad|><|vision_end|>")
        assert f"<|im_start|>user\n{shown}<|im_end|>" in rendered, rendered
        if system is not None:
            assert rendered.startswith(f"<|im_start|>system\n{system}<|im_end|>"), rendered
        assert f"`{rows[kind]['content']}`".replace("\n", "\\n") in section
