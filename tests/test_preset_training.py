"""Training, evaluating and exporting from published embedding models: every example script takes each backbone
family's replica (tests/preset_replicas.py) through --model_name_or_path, with LoRA, and ends with a reloadable model
that kept its preset and a sentence-transformers export; GRPO from a UME-R1 release keeps its tokens and their ids."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from numerics import TINY_FORWARD, TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.data.templates import get_template

ROOT = Path(__file__).resolve().parents[1]
# One release per backbone family: its preset's template is kept through training (no --prompt_template given).
FAMILY_RELEASES = {"qwen2_vl": "vlm2vec-v2", "llava_onevision": "unime-v2-llava-ov", "qwen3_vl": "qwen3-vl-embedding"}
COMMON = [
    "--report_to", "none", "--save_strategy", "no", "--bf16", "false", "--dataloader_num_workers", "0",
    "--use_peft", "true", "--lora_r", "4", "--lora_alpha", "8", "--evaluate_before_training", "false",
    "--max_steps", "1", "--disable_tqdm", "true",
]
EXAMPLE_ARGS = {
    "train_hardneg.py": [
        "--generated_train_size", "16", "--generated_eval_size", "8", "--per_device_train_batch_size", "4",
        "--num_hard_negatives", "2",
    ],
    "train_distill.py": [
        "--generated_train_size", "16", "--generated_eval_size", "8", "--per_device_train_batch_size", "4",
    ],
    "train_sft_reasoning.py": [
        "--generated_train_size", "8", "--generated_eval_size", "4", "--per_device_train_batch_size", "4",
        "--max_new_tokens", "6", "--gradient_checkpointing", "false",
    ],
    "train_grpo.py": [
        "--generated_train_size", "8", "--generated_eval_size", "4", "--per_device_train_batch_size", "8",
        "--num_generations", "2", "--max_completion_length", "6", "--beta", "0", "--gradient_checkpointing", "false",
        "--steps_per_generation", "1",
    ],
}


def _run_example(script: str, args: list[str], monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [script, *map(str, args)])
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILY_RELEASES))
@pytest.mark.parametrize("script", sorted(EXAMPLE_ARGS))
def test_every_example_trains_from_each_familys_published_model(script, family, preset_replica, tmp_path, monkeypatch):
    reasoning = script in ("train_sft_reasoning.py", "train_grpo.py")
    preset = "ume-r1" if reasoning and family == "qwen2_vl" else FAMILY_RELEASES[family]
    source = preset_replica(preset)
    out = tmp_path / "run"
    _run_example(script, ["--model_name_or_path", source, "--output_dir", out, *COMMON, *EXAMPLE_ARGS[script]],
                 monkeypatch)
    model = MultimodalEmbeddingModel.from_pretrained(out)
    assert model.config.preset == preset and model.config.lora_config is None  # adapters merged at the end
    if not reasoning:  # the release's prompt format kept (reasoning SFT switches to UME-R1's, as it trains it)
        assert model.config.prompt_template == MultimodalEmbeddingModel.from_pretrained(source).config.prompt_template
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out / "sentence_transformers"), device="cpu")
    texts = ["a red circle on the left", "two blue squares"]
    blank = get_template(model.config.prompt_template).text_only_image_size  # UME-R1's: given to the export
    st_texts = [{"text": t, "image": Image.new("RGB", (blank, blank), "white")} for t in texts] if blank else texts
    rtol = rounding_rtol(**(TINY_IMAGE_FORWARD if blank else TINY_FORWARD))
    assert_close(torch.as_tensor(st.encode_query(st_texts)), model.encode(texts), rtol=rtol)


def test_grpo_from_a_ume_r1_release_keeps_its_tokens_ids_and_prompt(preset_replica, shapes_data, tmp_path):
    from mm_embed_trl.trainers.grpo_config import EmbeddingGRPOConfig
    from mm_embed_trl.trainers.grpo_trainer import EmbeddingGRPOTrainer

    source = preset_replica("ume-r1")
    model = MultimodalEmbeddingModel.from_pretrained(source)
    tokenizer = model.processor.tokenizer
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<gen_emb>", "<disc_emb>")}
    assert ids["<gen_emb>"] < ids["<disc_emb>"]  # UME-R1's order: gen first
    vocab = len(tokenizer)
    args = EmbeddingGRPOConfig(
        output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=8, max_completion_length=6,
        max_steps=1, report_to="none", bf16=False, use_cpu=True, gradient_checkpointing=False, beta=0.0,
        save_strategy="no", seed=0, disable_tqdm=True, image_root=str(shapes_data.image_root),
        save_sentence_transformers=False,
    )
    trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=shapes_data["train"].select(range(4)))
    assert model.config.prompt_template == "ume_r1_eval"  # the release's inputs, not the SFT default's
    trainer.train()
    trainer.save_for_inference(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["preset"] == "ume-r1" and saved["prompt_template"] == "ume_r1_eval"
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "saved")
    tok = reloaded.processor.tokenizer
    assert len(tok) == vocab and {t: tok.convert_tokens_to_ids(t) for t in ids} == ids
    assert reloaded.config.pooling_token_id == ids["<disc_emb>"]
