"""The published embedding models: one preset per release, each read from its authors' encode code.

docs/PRESETS.md holds the per-model, per-side table (chat template, system prompt, instruction, image placeholder and
pixel budget, pooling, normalisation, dtype, special tokens) with the file:line each setting comes from, and the
tolerance each preset's replica test reached. Video goes through `encode`; no preset's video path is checked against
its authors' code.
"""

from __future__ import annotations

from ..data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN
from .registry import Preset, register_preset

# Qwen2-VL pixels per merged image token: 14 px patches, 2x2 merged.
_QWEN2_TOKEN_PIXELS = 28 * 28

CATALOG: tuple[Preset, ...] = (
    Preset(
        name="vlm2vec-qwen2vl",
        title="VLM2Vec (Qwen2-VL)",
        hub_ids=("TIGER-Lab/VLM2Vec-Qwen2VL-2B", "TIGER-Lab/VLM2Vec-Qwen2VL-7B"),
        model_type="qwen2_vl",
        prompt_template="vlm2vec",
        # DataArguments.resize_min_pixels / resize_max_pixels defaults, handed to Qwen2VLImageProcessor as its size
        image_min_pixels=4 * _QWEN2_TOKEN_PIXELS,
        image_max_pixels=1280 * _QWEN2_TOKEN_PIXELS,
        adapter=True,
        source="TIGER-AI-Lab/VLM2Vec src/model/model.py:105-122,214-290; src/model/processor.py:121-134,302-374,"
        "650-673; src/arguments.py:45-46; experiments/examples/qwen2vl/demo_v1_image.py",
    ),
    Preset(
        name="vlm2vec-v2",
        title="VLM2Vec-V2.0 (Qwen2-VL-2B)",
        hub_ids=("VLM2Vec/VLM2Vec-V2.0",),
        model_type="qwen2_vl",
        prompt_template="vlm2vec",
        image_min_pixels=4 * _QWEN2_TOKEN_PIXELS,
        image_max_pixels=1280 * _QWEN2_TOKEN_PIXELS,
        adapter=True,
        source="TIGER-AI-Lab/VLM2Vec experiments/examples/qwen2vl/demo_v2_image.py; src/model/model.py:214-290; "
        "src/model/processor.py:302-374,650-673",
    ),
    Preset(
        name="unime-qwen2vl",
        title="UniME (Qwen2-VL)",
        hub_ids=("DeepGlint-AI/UniME-Qwen2-VL-2B", "DeepGlint-AI/UniME-Qwen2-VL-7B"),
        model_type="qwen2_vl",
        prompt_template="unime",
        verified=False,
        source="assumed: deepglint/UniME publishes encode code for Phi-3.5-V, LLaVA-1.6 and (card) LLaVA-OneVision "
        "only; README.md Quick Start prompts on the Qwen2-VL chat template",
    ),
    Preset(
        name="unime-llava-ov",
        title="UniME (LLaVA-OneVision-7B)",
        hub_ids=("DeepGlint-AI/UniME-LLaVA-OneVision-7B",),
        model_type="llava_onevision",
        prompt_template="unime_llava_ov",
        dtype="float16",
        source="DeepGlint-AI/UniME-LLaVA-OneVision-7B model card (appply_chat_template, hidden_states[-1][:, -1]); "
        "deepglint/UniME self_evaluate/utils/utils.py:104-105,139-140",
    ),
    Preset(
        name="unime-v2-qwen2vl",
        title="UniME-V2 (Qwen2-VL)",
        hub_ids=("TianchengGu/UniME-V2-Qwen2VL-2B", "TianchengGu/UniME-V2-Qwen2VL-7B"),
        model_type="qwen2_vl",
        prompt_template="vlm2vec",
        source="GaryGuTC/UniME-v2 utils/utils.py:20-80; Embedding/src/model_utils.py:34-40,70-80,213-262",
    ),
    Preset(
        name="unime-v2-llava-ov",
        title="UniME-V2 (LLaVA-OneVision-8B)",
        hub_ids=("TianchengGu/UniME-V2-LLaVA-OneVision-8B",),
        model_type="llava_onevision",
        prompt_template="unime_v2_llava_ov",
        source="GaryGuTC/UniME-v2 Embedding/src/model_utils.py:92-99,361-390; utils/utils.py:20-80",
    ),
    Preset(
        name="gme-qwen2vl",
        title="GME (Qwen2-VL)",
        hub_ids=("Alibaba-NLP/gme-Qwen2-VL-2B-Instruct", "Alibaba-NLP/gme-Qwen2-VL-7B-Instruct"),
        model_type="qwen2_vl",
        prompt_template="gme",
        sequential_positions=True,  # GmeQwen2VL.forward calls self.base.model(...) without position ids
        image_min_pixels=256 * _QWEN2_TOKEN_PIXELS,
        image_max_pixels=1280 * _QWEN2_TOKEN_PIXELS,
        marker_files=("gme_inference.py",),
        source="gme_inference.py of the model card (copy: TIGER-AI-Lab/VLM2Vec "
        "src/model/baseline_backbone/gme/gme_inference.py:23-55,57-145,246-319)",
    ),
    Preset(
        name="qwen3-vl-embedding",
        title="Qwen3-VL-Embedding",
        hub_ids=("Qwen/Qwen3-VL-Embedding-2B", "Qwen/Qwen3-VL-Embedding-8B"),
        model_type="qwen3_vl",
        prompt_template="qwen3_vl_embedding",
        matryoshka_min_dim=64,  # MRL-trained (README "MRL Support"); the model card's range starts at 64
        image_min_pixels=4 * 32 * 32,
        image_max_pixels=1800 * 32 * 32,
        source="QwenLM/Qwen3-VL-Embedding src/models/qwen3_vl_embedding.py:23-33,160-393; README.md:44-58,200-214",
    ),
    Preset(
        name="ume-r1",
        title="UME-R1 (Qwen2-VL)",
        hub_ids=("zhibinlan/UME-R1-2B", "zhibinlan/UME-R1-7B"),
        model_type="qwen2_vl",
        prompt_template="ume_r1_eval",
        pooling="special_token",
        pooling_token=DISC_EMB_TOKEN,
        generative_pooling_token=GEN_EMB_TOKEN,
        encoder_kind="generative",
        # eval: qwen_vl_utils raises every image to >= 3136 px, then --resize_min_pixels 784 --resize_max_pixels 2359296
        image_min_pixels=4 * _QWEN2_TOKEN_PIXELS,
        image_max_pixels=2359296,
        added_tokens=(GEN_EMB_TOKEN, DISC_EMB_TOKEN),
        source="Kikcer/lume README.md:30-130,520-535; src/eval/VLM2Vec/src/data/collator/eval_collator.py:21,217-356; "
        "demo/image_disc_embed_demo.py:51-81; src/sft-train/qwenvl/train/train_qwen.py:191-209",
    ),
)

for _preset in CATALOG:
    register_preset(_preset)
del _preset
