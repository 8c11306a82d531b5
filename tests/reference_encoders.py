"""Independent ports of each published embedding model's own encode path, the reference the presets are tested against.

Each function follows its authors' code (cited per step; docs/PRESETS.md has the table), written against the stock
transformers classes installed here instead of the authors' copies of older ones: prompts built as they build them,
processors loaded and called as they call them (per example where they do), padding on their side, the forward they
run and the hidden state they read. Nothing here imports mm_embed_trl's prompt, collator or pooling code.

An input is ``{"text": str | None, "image": PIL.Image | None}``; every function returns (N, D) float32 L2-normalised
embeddings, one per input, in order.
"""

from __future__ import annotations

import io
import math
import unicodedata
import warnings

import torch
import torch.nn.functional as F
from PIL import Image

UME_R1_PROMPT = (  # Kikcer/lume src/eval/VLM2Vec/src/data/collator/eval_collator.py:21
    "Represent the above input text, images, videos, or any combination of the three as embeddings. First output the "
    "thinking process in <think> </think> tags and then summarize the entire input in a word or sentence. Finally, "
    "use the <gen_emb> tag to represent the entire input."
)


# ---------------------------------------------------------------------------------------------------- shared pieces
def _pad_rows(rows: list[list[int]], pad: int, side: str) -> torch.Tensor:
    width = max(len(r) for r in rows)
    out = [([pad] * (width - len(r)) + r) if side == "left" else (r + [pad] * (width - len(r))) for r in rows]
    return torch.tensor(out, dtype=torch.long)


def _qwen_vl_utils_smart_resize(height, width, factor, min_pixels, max_pixels):
    """qwen_vl_utils.vision_process.smart_resize (copy in VLM2Vec src/model/baseline_backbone/gme/gme_inference.py
    :246-277)."""
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _qwen_vl_utils_fetch_image(image, factor=28, min_pixels=4 * 28 * 28, max_pixels=16384 * 28 * 28):
    """qwen_vl_utils fetch_image for a PIL image (gme_inference.py:280-319): RGB, smart_resize, PIL resize."""
    image = image.convert("RGB")
    width, height = image.size
    resized_height, resized_width = _qwen_vl_utils_smart_resize(height, width, factor, min_pixels, max_pixels)
    return image.resize((resized_width, resized_height))


def _vlm2vec_style_batch(processor, texts, images, pad_side):
    """VLM2Vec's Qwen2_VL_process_fn (TIGER-AI-Lab/VLM2Vec src/model/processor.py:302-374; UniME-V2 copies it in
    Embedding/src/model_utils.py:213-262): one processor call per input, then the tokenizer pads the ids. The
    mm_token_type_ids (transformers >= 5 needs them for the image positions) are padded alike."""
    ids, types, pixels, grids = [], [], [], []
    for text, image in zip(texts, images):
        enc = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
        ids.append(enc["input_ids"][0].tolist())
        types.append(enc["mm_token_type_ids"][0].tolist())
        if image is not None:
            pixels.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    input_ids = _pad_rows(ids, processor.tokenizer.pad_token_id, pad_side)
    batch = {
        "input_ids": input_ids,
        "attention_mask": _pad_rows([[1] * len(r) for r in ids], 0, pad_side),
        "mm_token_type_ids": _pad_rows(types, 0, pad_side),
    }
    if pixels:
        batch["pixel_values"], batch["image_grid_thw"] = torch.cat(pixels), torch.cat(grids)
    return batch


def _last_hidden(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, output_hidden_states=True, return_dict=True).hidden_states[-1]


# ---------------------------------------------------------------------------------------------------- VLM2Vec
def vlm2vec_encode(checkpoint, inputs, base_model=None):
    """VLM2Vec V1 / V2.0 (Qwen2-VL): MMEBModel.load + Qwen2_VL_process_fn + _pooling."""
    import json
    import pathlib

    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor

    # load_processor (processor.py:121-134): DataArguments.resize_min/max_pixels (arguments.py:45-46) as the size
    size = {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 1280}
    image_processor = Qwen2VLImageProcessor.from_pretrained(checkpoint, size=size)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    processor = Qwen2VLProcessor.from_pretrained(checkpoint, image_processor=image_processor, tokenizer=tokenizer)
    # MMEBModel.load (model.py:214-290): the base, then the LoRA of the checkpoint, merged (is_trainable=False)
    base_model = base_model or json.loads((pathlib.Path(checkpoint) / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    base = Qwen2VLForConditionalGeneration.from_pretrained(base_model, dtype=torch.float32)
    # VLM2Vec's adapters name Qwen2-VL's modules as transformers < 4.52 did; 4.52's own conversion mapping of
    # Qwen2VLForConditionalGeneration (its _checkpoint_conversion_mapping) renames them for the current layout
    legacy = {"^visual": "model.visual", r"^model(?!\.(language_model|visual))": "model.language_model"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing adapter key would make this port vacuous
        adapted = PeftModel.from_pretrained(base, checkpoint, is_trainable=False, key_mapping=legacy)
    model = adapted.merge_and_unload().eval()

    def process_input_text(instruction, add_image_token):  # processor.py:650-673 (text=None: the row is the prompt)
        prompt = instruction
        if add_image_token:
            prompt = "<|image_pad|>" + " " + prompt
        return prompt

    texts = [process_input_text(x["text"] or "", x["image"] is not None) for x in inputs]
    batch = _vlm2vec_style_batch(processor, texts, [x["image"] for x in inputs], tokenizer.padding_side)
    hidden = _last_hidden(model, batch)
    # MMEBModel._pooling (model.py:105-122), pooling='last', normalize=True
    mask = batch["attention_mask"]
    if mask[:, -1].sum() == mask.shape[0]:
        reps = hidden[torch.arange(hidden.shape[0]), -1, :]
    else:
        reps = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    return F.normalize(reps, p=2, dim=-1)


# ---------------------------------------------------------------------------------------------------- UniME-V2
def unime_v2_qwen2vl_encode(checkpoint, inputs):
    """UniME-V2 (Qwen2-VL): utils/utils.py init_model_and_processor + prepare_stage_data, model_utils.py
    Qwen2_VL_process_fn; the embedding is hidden_states[-1][:, -1] (left padding)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()  # utils.py:30-35
    processor = AutoProcessor.from_pretrained(checkpoint)  # utils.py:47-52
    processor.tokenizer.padding_side = "left"
    # prepare_stage_data (utils.py:64-78): "<|image_1|> {instruction}" with the backbone's image token; texts as is
    texts = [("<|image_pad|> " + (x["text"] or "")) if x["image"] is not None else x["text"] for x in inputs]
    batch = _vlm2vec_style_batch(processor, texts, [x["image"] for x in inputs], "left")
    return F.normalize(_last_hidden(model, batch)[:, -1, :], dim=-1)


def _llava_ov_chat_encode(checkpoint, conversations):
    """LLaVA-OneVision embedding as UniME's card and UniME-V2 run it: apply_chat_template (tokenize=True, left
    padding), hidden_states[-1][:, -1], L2 normalisation."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    batch = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True
    )
    return F.normalize(_last_hidden(model, dict(batch))[:, -1, :], dim=-1)


def unime_v2_llava_ov_encode(checkpoint, inputs):
    """UniME-V2 (LLaVA-OneVision): model_utils.py appply_chat_template + Llava_OV_process (361-390)."""

    def conversation(image, text):
        text = text.replace("<image>\n", "").replace("<image>", "").strip()
        content = ([{"type": "image", "image": image}] if image is not None else []) + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]

    return _llava_ov_chat_encode(checkpoint, [conversation(x["image"], x["text"]) for x in inputs])


def unime_llava_ov_encode(checkpoint, inputs):
    """UniME (LLaVA-OneVision-7B) model card: appply_chat_template with the one-word prompts (image or text)."""

    def conversation(image, text):
        if image is not None:
            return [{"role": "user", "content": [
                {"type": "image", "image": image}, {"type": "text", "text": "Summary above image in one word:\n"}]}]
        prompt = f"{text}\nSummary above sentence in one word:\n"
        return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]

    return _llava_ov_chat_encode(checkpoint, [conversation(x["image"], x["text"]) for x in inputs])


# ---------------------------------------------------------------------------------------------------- GME
def gme_encode(checkpoint, inputs, *, instruction=None, is_query=True):
    """GME: GmeQwen2VL.embed + forward (copy: VLM2Vec src/model/baseline_backbone/gme/gme_inference.py:17-145):
    hand-written ChatML ending in <|endoftext|>, the instruction as system message, images through fetch_image,
    the language model run on the merged embeddings without position ids, the last real token pooled. Padding on
    the right as the model card's processor sets it (VLM2Vec's copy pads left, which moves every position of a
    shorter input)."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    base = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint, min_pixels=256 * 28 * 28, max_pixels=1280 * 28 * 28)
    processor.tokenizer.padding_side = "right"
    input_texts, input_images = [], []
    for x in inputs:
        system = instruction if (is_query and instruction is not None) else "You are a helpful assistant."
        input_str = ""
        if x["image"] is not None:
            input_str += "<|vision_start|><|image_pad|><|vision_end|>"
            input_images.append(_qwen_vl_utils_fetch_image(x["image"]))
        if x["text"] is not None:
            input_str += x["text"]
        input_texts.append(
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{input_str}<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>"
        )
    enc = processor(
        text=input_texts, images=input_images or None, padding=True, truncation=True, max_length=1800,
        return_tensors="pt",
    )
    inner = base.model
    with torch.no_grad():
        embeds = inner.get_input_embeddings()(enc["input_ids"])
        if input_images:
            features = inner.get_image_features(enc["pixel_values"], enc["image_grid_thw"], return_dict=True)
            image_embeds = torch.cat(features.pooler_output).to(embeds.dtype)
            embeds[enc["input_ids"] == base.config.image_token_id] = image_embeds
        out = inner.language_model(inputs_embeds=embeds, attention_mask=enc["attention_mask"])
    mask = enc["attention_mask"]
    hidden = out.last_hidden_state
    if mask[:, -1].sum() == mask.shape[0]:
        embeddings = hidden[:, -1]
    else:
        embeddings = hidden[torch.arange(hidden.shape[0]), mask.sum(dim=1) - 1]
    return F.normalize(embeddings, p=2, dim=1)


# -------------------------------------------------------------------------------------------- Qwen3-VL-Embedding
def qwen3_vl_embedding_encode(checkpoint, inputs, *, instruction=None):
    """Qwen3-VL-Embedding: Qwen3VLEmbedder.process (QwenLM/Qwen3-VL-Embedding src/models/qwen3_vl_embedding.py
    :160-393): the instruction (default "Represent the user's input.", a "." added when unpunctuated) as the system
    message, images then texts, qwen_vl_utils' resize (factor 32, 4096..1843200 px), the processor without its own
    resize, right padding, the last real token of Qwen3VLModel's last hidden state."""
    from transformers import Qwen3VLModel, Qwen3VLProcessor

    model = Qwen3VLModel.from_pretrained(checkpoint, dtype=torch.float32).eval()  # Qwen3VLForEmbedding.model
    processor = Qwen3VLProcessor.from_pretrained(checkpoint, padding_side="right")
    conversations, images = [], []
    for x in inputs:
        text = instruction
        if text:
            text = text.strip()
            if text and not unicodedata.category(text[-1]).startswith("P"):
                text = text + "."
        content = []
        if x["image"] is not None:
            content.append({"type": "image", "image": x["image"]})
            images.append(_qwen_vl_utils_fetch_image(x["image"], factor=32, min_pixels=4096, max_pixels=1843200))
        if x["text"] is not None:
            content.append({"type": "text", "text": x["text"]})
        conversations.append([
            {"role": "system", "content": [{"type": "text", "text": text or "Represent the user's input."}]},
            {"role": "user", "content": content},
        ])
    text = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    enc = processor(
        text=text, images=images or None, truncation=True, max_length=8192, padding=True, do_resize=False,
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"]
    col = mask.shape[1] - mask.flip(dims=[1]).argmax(dim=1) - 1  # _pooling_last
    return F.normalize(hidden[torch.arange(hidden.shape[0]), col], p=2, dim=-1)


# ---------------------------------------------------------------------------------------------------- UME-R1
def _ume_r1_batch(processor, inputs):
    """eval_collator.py:217-356: image first, the text with <disc_emb> and the instruction after it (no newline
    between); a text-only input gets a 28x28 white JPEG; qwen_vl_utils resizes (>= 3136 px), then the processor."""
    texts, images = [], []
    for x in inputs:
        image = x["image"]
        if image is None:
            buffer = io.BytesIO()
            Image.new("RGB", (28, 28), (255, 255, 255)).save(buffer, format="JPEG")
            image = Image.open(io.BytesIO(buffer.getvalue()))
        messages = [{"role": "user", "content": [
            {"type": "image"},
            {"type": "text", "text": (x["text"] or "").strip() + "\n<disc_emb>\n" + UME_R1_PROMPT},
        ]}]
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        images.append(_qwen_vl_utils_fetch_image(image))
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def _ume_r1_model_and_processor(checkpoint):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    model = Qwen2VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    # run_eval: --resize_min_pixels 784 --resize_max_pixels 2359296 (README.md:531-532), left padding
    processor = AutoProcessor.from_pretrained(checkpoint, min_pixels=784, max_pixels=2359296)
    processor.tokenizer.padding_side = "left"
    return model, processor


def ume_r1_disc_encode(checkpoint, inputs):
    """UME-R1 discriminative: the last hidden state at <disc_emb> (demo/image_disc_embed_demo.py:51-81; training's
    get_embedding_reps reads the same position)."""
    model, processor = _ume_r1_model_and_processor(checkpoint)
    batch = _ume_r1_batch(processor, inputs)
    hidden = _last_hidden(model, dict(batch))
    disc_id = processor.tokenizer.get_vocab()["<disc_emb>"]
    rows = []
    for i, ids in enumerate(batch["input_ids"].tolist()):
        j = len(ids) - 1 - ids[::-1].index(disc_id)  # get_embedding_idx: searched from the end
        rows.append(hidden[i, j])
    return F.normalize(torch.stack(rows), p=2, dim=-1)


def ume_r1_gen_encode(checkpoint, inputs, **generate_kwargs):
    """UME-R1 generative (README.md:30-130): generate with hidden states, the state of the last <gen_emb> the
    completion wrote, hidden_states[j + 1][-1]."""
    model, processor = _ume_r1_model_and_processor(checkpoint)
    batch = _ume_r1_batch(processor, inputs)
    with torch.no_grad():
        out = model.generate(**batch, output_hidden_states=True, return_dict_in_generate=True, **generate_kwargs)
    gen_id = processor.tokenizer.get_vocab()["<gen_emb>"]
    prompt_length = batch["input_ids"].shape[1]
    rows = []
    for i, sequence in enumerate(out.sequences.tolist()):
        completion = sequence[prompt_length:]
        j = len(completion) - 1 - completion[::-1].index(gen_id)
        rows.append(out.hidden_states[j + 1][-1][i, -1])
    return F.normalize(torch.stack(rows), p=2, dim=-1)
