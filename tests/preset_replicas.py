"""Tiny random replicas of the published embedding models' Hub layouts, one per preset, built offline from the tiny
backbones of :mod:`mm_embed_trl.demo.tiny` (their configs, tokenizers, chat templates and processors mirror the real
Qwen2-VL / Qwen3-VL / LLaVA-OneVision checkpoints), with what each release adds:

* VLM2Vec (V1, V2): a PEFT adapter repository (``adapter_config.json`` naming the base, adapter weights, the base's
  config and processor files, no base weights), as TIGER-Lab/VLM2Vec-Qwen2VL-2B is published;
* UME-R1: ``<gen_emb>`` then ``<disc_emb>`` added with ``add_tokens`` (train_qwen.py's order) and the embedding rows
  resized for them;
* GME: the full model and its ``gme_inference.py``;
* UniME, UniME-V2, Qwen3-VL-Embedding: the full model of their backbone family.

Each replica's folder is named as its Hub repository, so presets find it by repository name as they find a local
copy made with ``hf download --local-dir``.
"""

from __future__ import annotations

import pathlib
import shutil

import torch

from mm_embed_trl.demo.tiny import get_tiny_backbone

# preset -> (tiny family, Hub repository name of the replica)
REPLICAS: dict[str, tuple[str, str]] = {
    "vlm2vec-qwen2vl": ("qwen2_vl", "VLM2Vec-Qwen2VL-2B"),
    "vlm2vec-v2": ("qwen2_vl", "VLM2Vec-V2.0"),
    "unime-qwen2vl": ("qwen2_vl", "UniME-Qwen2-VL-2B"),
    "unime-llava-ov": ("llava_onevision", "UniME-LLaVA-OneVision-7B"),
    "unime-v2-qwen2vl": ("qwen2_vl", "UniME-V2-Qwen2VL-2B"),
    "unime-v2-llava-ov": ("llava_onevision", "UniME-V2-LLaVA-OneVision-8B"),
    "gme-qwen2vl": ("qwen2_vl", "gme-Qwen2-VL-2B-Instruct"),
    "qwen3-vl-embedding": ("qwen3_vl", "Qwen3-VL-Embedding-2B"),
    "ume-r1": ("qwen2_vl", "UME-R1-2B"),
}
ADAPTER_PRESETS = ("vlm2vec-qwen2vl", "vlm2vec-v2")


def build_replica(preset: str, root: pathlib.Path, *, folder: str | None = None) -> pathlib.Path:
    """Write the replica of ``preset`` into ``root / (folder or its Hub repository name)`` and return the path."""
    family, repo_name = REPLICAS[preset]
    target = root / (folder or repo_name)
    base = get_tiny_backbone(family)
    if preset in ADAPTER_PRESETS:
        _write_adapter_repository(base, target)
    elif preset == "ume-r1":
        _write_with_embedding_tokens(base, target)
    else:
        shutil.copytree(base, target)
        if preset == "gme-qwen2vl":
            # the release ships its encoder code next to the weights (mm-embed-trl never runs it)
            (target / "gme_inference.py").write_text("# GmeQwen2VL: the release's encode code (replica placeholder)\n")
    return target


def _write_adapter_repository(base: pathlib.Path, target: pathlib.Path) -> None:
    """VLM2Vec's adapter: DoRA on the language model's projections (MMEBModel.build, model.py:186-196, with
    arguments.py:17-20's target names), its keys in the layout of the transformers VLM2Vec trained with (the
    language model under ``model.``, before transformers 4.52 moved it to ``model.language_model.``)."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2VLForConditionalGeneration

    shutil.copytree(base, target, ignore=shutil.ignore_patterns("*.safetensors"))
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    config = LoraConfig(
        r=4, lora_alpha=16, lora_dropout=0.1, init_lora_weights="gaussian", use_dora=True,
        target_modules="qkv_proj,o_proj,gate_up_proj,down_proj,k_proj,q_proj,out_proj,v_proj,gate_proj,up_proj".split(","),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        peft_model = get_peft_model(model, config)
        with torch.no_grad():  # a trained adapter: B and the DoRA magnitudes away from their identity start
            for param_name, param in peft_model.named_parameters():
                if "lora_B" in param_name or "lora_magnitude_vector" in param_name:
                    param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(target)  # adapter_config.json names `base` as base_model_name_or_path
    weights = target / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k.replace(".model.language_model.", ".model."): v for k, v in state.items()}, weights)


def _write_with_embedding_tokens(base: pathlib.Path, target: pathlib.Path) -> None:
    from transformers import AutoProcessor, GenerationConfig, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(base)
    tokenizer = processor.tokenizer
    tokenizer.add_tokens(["<gen_emb>"])  # UME-R1 train_qwen.py:191-209: gen first, then disc, ordinary tokens
    tokenizer.add_tokens(["<disc_emb>"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(target)
    processor.save_pretrained(target)
