"""Tiny, randomly initialised, fully offline backbones for tests, examples and CI.

Each *family* is written as an ordinary Hugging Face model directory (``config.json``,
``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json``, ``chat_template.jinja`` and, for
vision-language families, ``processor_config.json``) that loads with the stock ``from_pretrained`` of
the Auto classes, exactly like a real checkpoint from the Hub:

- ``qwen2_vl``: ``Qwen2VLModel`` / ``Qwen2VLForConditionalGeneration``, ``Qwen2VLProcessor``;
- ``qwen2_5_vl``: ``Qwen2_5_VLModel`` / ``Qwen2_5_VLForConditionalGeneration`` (windowed vision
  attention), ``Qwen2_5_VLProcessor``;
- ``qwen3_vl``: ``Qwen3VLModel`` / ``Qwen3VLForConditionalGeneration`` (patch 16, deepstack),
  ``Qwen3VLProcessor``;
- ``llava_onevision``: ``LlavaOnevisionModel`` / ``LlavaOnevisionForConditionalGeneration`` (SigLIP
  tower, Qwen2 LM, anyres crops), ``LlavaOnevisionProcessor``;
- ``text``: ``Qwen3Model`` / ``Qwen3ForCausalLM``, tokenizer only (``AutoTokenizer``).

Sizes follow docs/STACK.md (text hidden 64, 2 layers, 4 heads, 2 kv heads; vision depth 2). Image
processors resize any image to a budget of 4..16 image tokens; a 64x64 image gives 4 (10 for LLaVA).

Everything is built offline: the tokenizer is a byte-level BPE (the Qwen2 pre-tokenisation pipeline)
trained by the ``tokenizers`` library on a small built-in corpus, so any string tokenises; the special
tokens, chat templates and config token ids mirror the real checkpoints. Builds are deterministic: the
same family and seed give bit-identical files.

Usage::

    from mm_embed_trl.demo.tiny import get_tiny_backbone
    path = get_tiny_backbone("qwen2_vl")          # cached under ~/.cache/mm_embed_trl/tiny/
    model = AutoModel.from_pretrained(path)

    python -m mm_embed_trl.demo.tiny --family all --output_dir /tmp/tiny   # or: mm-embed-tiny ...
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .._cache import cache_root
from .._files import follow_umask, publish_dir, staged_dir

__all__ = ["TINY_FAMILIES", "build_tiny_backbone", "get_tiny_backbone", "main"]

TINY_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "text")

# Bump when the produced files change in a way that matters (sizes, tokenizer, templates): cached
# directories are keyed by it, so stale caches are never reused.
_FORMAT_VERSION = 2  # 2: UME-R1's reasoning tags are single tokens
# Written last into every built directory; its presence marks a complete build.
_MARKER_FILE = "tiny_backbone.json"

# --- sizes (see docs/STACK.md) ------------------------------------------------------------------
_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)
_HEAD_DIM = _TEXT["hidden_size"] // _TEXT["num_attention_heads"]  # 16 -> 8 rotary frequencies
_MODEL_MAX_LENGTH = _TEXT["max_position_embeddings"]
_BPE_VOCAB_SIZE = 1536  # upper bound handed to the BPE trainer (the corpus decides the exact size)

# --- tokens ---------------------------------------------------------------------------------------
# Same relative order as in the real Qwen2 / Qwen2-VL vocab (ids 151643..), appended after the BPE vocab.
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_LLAVA_SPECIAL_TOKENS = ("<image>", "<video>")
# UME-R1's reasoning tags as ordinary added tokens (decoding keeps them), one id each, as Qwen3's vocabulary holds
# <think> and </think>. Why: the byte-level pieces of "</think><answer>" ("</", "think", "><", ...) make the tag
# boundaries a multi-token guess that a 2-layer, 64-wide model does not learn from the demo's few hundred traces.
_REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2 pre-tokenisation regex (a copy of transformers' Qwen2Tokenizer one, which _train_bpe prefers)
# so the BPE we train sees exactly the pieces the loaded Qwen2Tokenizer will produce.
_QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# --- chat templates ---------------------------------------------------------------------------------
_VISION_ITEMS = (
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
)
_TEXT_ONLY_ITEMS = (
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content"
    " or content['type'] == 'video' or 'video' in content %}"
    "{{ raise_exception('This tiny text-only backbone cannot take images or videos; use a vision-language "
    "family such as qwen2_vl.') }}"
)


def _qwen_chat_template(*, default_system: bool, vision: bool) -> str:
    """Qwen-style ChatML template; content may be a string or a list of ``{"type": ...}`` items.

    ``default_system`` reproduces Qwen2-VL's implicit "You are a helpful assistant." system turn
    (Qwen3-VL and Qwen3 have none). Image items render as ``<|vision_start|><|image_pad|><|vision_end|>``,
    which the processor expands to one pad token per merged image patch.
    """
    system = (
        "{% if loop.first and message['role'] != 'system' %}"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}"
        if default_system
        else ""
    )
    items = _VISION_ITEMS if vision else _TEXT_ONLY_ITEMS
    return (
        "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
        "{% for message in messages %}" + system + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}" + items + "{% elif 'text' in content %}"
        "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# LLaVA-OneVision (llava-hf) template: images first, then text, each turn "<|im_start|>role ...".
# A newline right after a block tag is written as a Jinja string expression, because transformers
# renders chat templates with trim_blocks=True (which drops a literal newline there).
_LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<image>"
    "{% elif content['type'] == 'video' or 'video' in content %}<video>{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ '\\n' + content['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# --- tokenizer training corpus ------------------------------------------------------------------------
# Words the shapes dataset, the prompt templates (UniME, VLM2Vec/MMEB, UME-R1) and tests use, so that
# they tokenise into few pieces; anything else still tokenises byte by byte (byte-level alphabet).
_CORPUS_WORDS = """
red green blue yellow orange purple pink brown black white gray grey cyan magenta violet gold silver
colour color colours colors coloured colored dark light bright pale
circle circles square squares triangle triangles rectangle rectangles star stars ellipse oval hexagon
pentagon diamond cross heart line lines dot dots shape shapes polygon
left right top bottom middle center centre upper lower corner corners above below beside next between
inside outside near far front back side sides edge position positions
zero one two three four five six seven eight nine ten eleven twelve twenty hundred thousand
first second third fourth fifth last many few several no none some all each every count counts number
numbers how much what which where who when why is are was were be been has have had do does did
the a an of in on at to for with from by and or not this that these those it its there here
big small large tiny huge little medium size sizes tall short wide narrow long round flat
image images picture pictures photo photos video videos text texts sentence sentences word words query
document documents caption captions question questions answer answers title description passage
represent represents given following summary summarize above one word find retrieve select choose
identify describe classify match matches matching relevant everyday news article wikipedia entity
visual task instruction instructions prompt user assistant system helpful you your me my we our
embedding embeddings vector retrieval search result results label labels class category object objects
scene background foreground person people man woman child dog cat car tree house sky water grass
""".split()
_CORPUS_SENTENCES = (
    "Represent the given image.",
    "Represent the given image with the following question:",
    "Represent the given text.",
    "Represent the given sentence.",
    "Represent the given Wikipedia image with related text information:",
    "Summary above image in one word:",
    "Summary above sentence in one word:",
    "Summary above image and sentence in one word:",
    "Find a caption for the news in the given photo.",
    "Find me an everyday image that matches the given caption:",
    "Find an image that matches the given question.",
    "Find the document image that can answer the given query:",
    "Retrieve an image of this entity.",
    "Identify the scene shown in the image.",
    "Select the portion of the image that isolates the object.",
    "Given an image, retrieve a caption that describes it.",
    "Given a question, retrieve the answer.",
    "Answer the question based on the image.",
    "What is shown in this image? Answer in one word.",
    "How many shapes are there in the picture?",
    "Which colour is the circle on the left?",
    "A red circle at the top left and a blue square at the bottom right.",
    "Two green triangles next to one yellow star in the middle.",
    "There are three shapes: a purple hexagon, an orange oval and a white diamond.",
    "You are a helpful assistant.",
    "<think> </think> <answer> </answer>",
    "Let me think step by step. The final answer is:",
    "The image shows two shapes. The caption describes three identical shapes in a row.",
)


def _corpus() -> list[str]:
    """The fixed training corpus (deterministic order). Repeats make frequent words merge first."""
    alphabet = "abcdefghijklmnopqrstuvwxyz"
    lines = list(_CORPUS_SENTENCES) * 4
    lines += [" ".join(_CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)] * 3
    # Capitalised variants and the alphabet, so sentence-initial words and single letters merge too.
    lines += [" ".join(w.capitalize() for w in _CORPUS_WORDS[i : i + 12]) for i in range(0, len(_CORPUS_WORDS), 12)]
    lines += [alphabet, alphabet.upper(), " ".join(alphabet), "0123456789 .,:;!?'\"()[]{}<>-_/\\|@#$%^&*+=~`"]
    return lines


@functools.lru_cache(maxsize=1)
def _train_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train the byte-level BPE once per process and return ``(vocab, merges)``.

    The ``tokenizers`` BPE trainer is deterministic for a fixed corpus (ties are broken by pair
    order, not hash order), which the determinism test checks across processes via file bytes.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    try:  # the installed Qwen2Tokenizer's own regex, so training and loading can never disagree
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as regex
    except ImportError:
        regex = _QWEN2_PRETOKENIZE_REGEX

    tokenizer = Tokenizer(models.BPE())
    # The exact pipeline Qwen2Tokenizer rebuilds on load: NFC, Qwen regex split, byte-level bytes.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: anything tokenises
        special_tokens=[],
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _build_tokenizer(extra_special_tokens: Sequence[str], chat_template: str) -> Any:
    """A ``Qwen2Tokenizer`` over the trained BPE, Qwen special tokens appended after the BPE vocab.

    Left padding: embedding models pool the last token, which must be the last *real* token.
    """
    from transformers import Qwen2Tokenizer

    vocab, merges = _train_bpe()
    vocab = dict(vocab)
    specials = list(_QWEN_SPECIAL_TOKENS) + list(extra_special_tokens)
    for token in [*specials, *_REASONING_TAGS]:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",  # instruct checkpoints stop on <|im_end|>
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=_MODEL_MAX_LENGTH,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": specials})  # v5 name of additional_special_tokens
    tokenizer.add_tokens(list(_REASONING_TAGS))
    tokenizer.chat_template = chat_template
    # Why: a special token that is not one id (or got a new id) would silently break the config's
    # image/video token ids; fail loudly if a transformers change ever does that.
    added = [*specials, *_REASONING_TAGS]
    ids = tokenizer.convert_tokens_to_ids(added)
    expected = [vocab[token] for token in added]
    if ids != expected or len(tokenizer) != len(vocab):
        raise RuntimeError(
            f"Tiny tokenizer special tokens got ids {ids} (expected {expected}) and length {len(tokenizer)} "
            f"(expected {len(vocab)}); the installed transformers changed how Qwen2Tokenizer adds tokens."
        )
    return tokenizer


def _token_ids(tokenizer: Any) -> dict[str, int]:
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens}


def _text_config(tokenizer: Any, **overrides: Any) -> dict[str, Any]:
    ids = _token_ids(tokenizer)
    config = dict(
        _TEXT,
        vocab_size=len(tokenizer),
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    config.update(overrides)
    return config


# --- image budgets ----------------------------------------------------------------------------------
def _qwen_pixel_budget(patch_size: int) -> dict[str, int]:
    """Resize budget for Qwen image processors, in pixels of one ``patch*merge`` cell (``factor``).

    Any image is resized to between 2x2 and 4x4 merged cells, i.e. 4..16 image tokens; a 64x64 image
    (the generated dataset's size) lands on exactly 2x2 cells = 4 image tokens.
    """
    factor = patch_size * 2  # merge_size 2
    return {"shortest_edge": 4 * factor * factor, "longest_edge": 16 * factor * factor}


def _qwen_processor_parts(patch_size: int, video_processor_cls: Any, *, total_video_budget: bool) -> tuple[Any, Any]:
    """Image and video processors on the tiny pixel budget.

    ``total_video_budget``: Qwen3-VL's video ``size`` bounds all frames together (Qwen2-VL's bounds each
    frame), so it gets room for about 4 frames of the image budget.
    """
    from transformers import Qwen2VLImageProcessor

    size = _qwen_pixel_budget(patch_size)
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=patch_size, temporal_patch_size=2, merge_size=2)
    video_size = (
        {"shortest_edge": 2 * size["shortest_edge"], "longest_edge": 4 * size["longest_edge"]}
        if total_video_budget
        else dict(size)
    )
    video_processor = video_processor_cls(
        size=video_size,
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        cap_pixels_per_frame=True,  # the reference (qwen-vl-utils) behaviour; also silences a warning
    )
    return image_processor, video_processor


def _qwen_vl_token_ids(tokenizer: Any) -> dict[str, int]:
    ids = _token_ids(tokenizer)
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


# --- per-family builders: (tokenizer) -> (config, model class, processor or tokenizer) -------------
def _qwen2_vl(tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLVideoProcessor

    config = Qwen2VLConfig(
        # mrope sections (t, h, w) sum to head_dim / 2; the real model uses 16:24:24 of 64.
        text_config=_text_config(
            tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=_TEXT["hidden_size"], num_heads=2, mlp_ratio=2, patch_size=14
        ),
        tie_word_embeddings=True,  # like Qwen2-VL-2B: AutoModel then loads with no unexpected lm_head
        **_qwen_vl_token_ids(tokenizer),
    )
    image_processor, video_processor = _qwen_processor_parts(14, Qwen2VLVideoProcessor, total_video_budget=False)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return config, Qwen2VLForConditionalGeneration, processor


def _qwen2_5_vl(tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLVideoProcessor,
    )

    config = Qwen2_5_VLConfig(
        text_config=_text_config(
            tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            out_hidden_size=_TEXT["hidden_size"],
            # window of 2x2 merged cells (real: 112 px = 4x4), last block full attention, as in the real
            # model, so both attention paths run
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=True,
        **_qwen_vl_token_ids(tokenizer),
    )
    image_processor, video_processor = _qwen_processor_parts(14, Qwen2VLVideoProcessor, total_video_budget=False)
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return config, Qwen2_5_VLForConditionalGeneration, processor


def _qwen3_vl(tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor

    config = Qwen3VLConfig(
        text_config=_text_config(
            tokenizer,
            head_dim=_HEAD_DIM,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5e5,
                "mrope_section": [4, 2, 2],  # real: 24:20:20 of 64
                "mrope_interleaved": True,
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=16,
            out_hidden_size=_TEXT["hidden_size"],
            num_position_embeddings=64,  # 8x8 learned grid, interpolated to the image's patch grid
            deepstack_visual_indexes=[0, 1],  # both vision blocks feed the two text layers
        ),
        tie_word_embeddings=True,
        **_qwen_vl_token_ids(tokenizer),
    )
    image_processor, video_processor = _qwen_processor_parts(16, Qwen3VLVideoProcessor, total_video_budget=True)
    processor = Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return config, Qwen3VLForConditionalGeneration, processor


# LLaVA-OneVision: SigLIP tower on 16x16 crops of 8x8 patches -> 2x2 = 4 features per crop.
_LLAVA_CROP = 16
_LLAVA_PATCH = 8
_LLAVA_TOKENS_PER_CROP = (_LLAVA_CROP // _LLAVA_PATCH) ** 2
# Square images use the single-crop pinpoint (base 4 + crop 4 + 2 newlines = 10 image tokens for any
# square input); elongated ones pick a 1x2 / 2x1 grid, so the anyres path is still exercised.
_LLAVA_PINPOINTS = [[_LLAVA_CROP, _LLAVA_CROP], [_LLAVA_CROP, 2 * _LLAVA_CROP], [2 * _LLAVA_CROP, _LLAVA_CROP]]


def _llava_onevision(tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    ids = _token_ids(tokenizer)
    config = LlavaOnevisionConfig(
        text_config=dict(_text_config(tokenizer), model_type="qwen2", tie_word_embeddings=True),
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_LLAVA_CROP,
            patch_size=_LLAVA_PATCH,
            vision_use_head=False,
        ),
        image_token_index=ids["<image>"],
        video_token_index=ids["<video>"],
        image_grid_pinpoints=_LLAVA_PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=True,
    )
    crop = {"height": _LLAVA_CROP, "width": _LLAVA_CROP}
    image_processor = LlavaOnevisionImageProcessor(size=crop, image_grid_pinpoints=_LLAVA_PINPOINTS)
    video_processor = LlavaOnevisionVideoProcessor(size=crop)
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=_LLAVA_TOKENS_PER_CROP,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=tokenizer.chat_template,
    )
    return config, LlavaOnevisionForConditionalGeneration, processor


def _text(tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        **_text_config(tokenizer, head_dim=_HEAD_DIM, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        tie_word_embeddings=True,
    )
    return config, Qwen3ForCausalLM, tokenizer


# family -> (builder, extra special tokens, chat template)
_FAMILIES: dict[str, tuple[Callable[[Any], tuple[Any, Any, Any]], tuple[str, ...], str]] = {
    "qwen2_vl": (_qwen2_vl, (), _qwen_chat_template(default_system=True, vision=True)),
    "qwen2_5_vl": (_qwen2_5_vl, (), _qwen_chat_template(default_system=True, vision=True)),
    "qwen3_vl": (_qwen3_vl, (), _qwen_chat_template(default_system=False, vision=True)),
    "llava_onevision": (_llava_onevision, _LLAVA_SPECIAL_TOKENS, _LLAVA_ONEVISION_CHAT_TEMPLATE),
    "text": (_text, (), _qwen_chat_template(default_system=False, vision=False)),
}
assert tuple(_FAMILIES) == TINY_FAMILIES


def _check_family(family: str) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"Unknown tiny backbone family {family!r}; known families: {', '.join(TINY_FAMILIES)}.")


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' "Writing model shards" bar for a one-shard, sub-second save."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _write_backbone(family: str, directory: pathlib.Path, seed: int) -> None:
    """Build ``family`` and save every file into the existing, empty ``directory``."""
    import torch
    import transformers

    builder, extra_tokens, chat_template = _FAMILIES[family]
    tokenizer = _build_tokenizer(extra_tokens, chat_template)
    config, model_cls, processor = builder(tokenizer)
    # Seed only a forked RNG: building a backbone must not perturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).eval()
    # transformers writes weights only on rank 0 once torch.distributed is up; this private, per-process build
    # directory must be complete on every rank (any rank may win the rename race in get_tiny_backbone).
    model.should_save_on_this_rank = lambda is_main_process: True
    with _quiet_progress_bars():
        model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    missing = [name for name in ("config.json", "model.safetensors") if not (directory / name).exists()]
    if missing:
        raise RuntimeError(f"Building the tiny {family} backbone wrote no {missing} into {directory}.")
    marker = {
        "family": family,
        "seed": seed,
        "format_version": _FORMAT_VERSION,
        "model_class": model_cls.__name__,
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "transformers_version": transformers.__version__,
    }
    (directory / _MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _is_complete(directory: pathlib.Path) -> bool:
    return (directory / _MARKER_FILE).is_file()


def build_tiny_backbone(
    family: str, output_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False
) -> pathlib.Path:
    """Build a tiny random ``family`` backbone into ``output_dir`` and return its path.

    The files are written into a temporary sibling directory and renamed into place, so
    ``output_dir`` either does not exist or holds a complete backbone, even if the build is killed.

    Args:
        family: one of :data:`TINY_FAMILIES`.
        output_dir: directory to create. It must not exist (or be empty) unless ``overwrite``.
        seed: seeds the weight initialisation; the same family and seed give bit-identical files.
        overwrite: replace an existing non-empty ``output_dir``.

    Raises:
        ValueError: unknown ``family``.
        FileExistsError: ``output_dir`` is non-empty and ``overwrite`` is False.
    """
    _check_family(family)
    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {str(output_dir)!r} exists and is not a directory.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} is not empty; pass overwrite=True (CLI: --overwrite) or choose "
            "another directory."
        )
    with staged_dir(output_dir, what=f"the tiny {family} backbone") as tmp:
        _write_backbone(family, tmp, seed)
        publish_dir(tmp, output_dir)
    return output_dir


def get_tiny_backbone(family: str = "qwen2_vl", *, seed: int = 0, cache_dir: str | None = None) -> pathlib.Path:
    """Return the path of a cached tiny ``family`` backbone, building it on first use.

    The directory is ``<cache_dir>/<family>-s<seed>-v<format>``; ``cache_dir`` defaults to
    ``$MM_EMBED_TRL_CACHE/tiny`` or ``~/.cache/mm_embed_trl/tiny``. Safe under concurrency: each
    process builds into its own temporary directory and renames it into place; a process that loses
    the race discards its copy and returns the winner's (identical) directory.
    """
    _check_family(family)
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else cache_root("tiny")
    target = (root / f"{family}-s{seed}-v{_FORMAT_VERSION}").absolute()
    if _is_complete(target):
        return target
    if target.exists() and any(target.iterdir()):
        raise RuntimeError(
            f"Cached tiny backbone {str(target)!r} exists but is incomplete (no {_MARKER_FILE}); it was not "
            "written by mm_embed_trl.demo.tiny. Delete it and call get_tiny_backbone again."
        )
    with staged_dir(target, what=f"the tiny {family} backbone") as tmp:
        _write_backbone(family, tmp, seed)
        follow_umask(tmp)
        try:
            os.rename(tmp, target)
        except OSError as err:
            # Another process renamed its complete copy into place first: use it (ours is removed on exit).
            if not (err.errno in (errno.EEXIST, errno.ENOTEMPTY) and _is_complete(target)):
                raise
    return target


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m mm_embed_trl.demo.tiny --family qwen2_vl --output_dir DIR [--seed 0]``.

    ``--family all`` writes every family into ``DIR/<family>``.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mm_embed_trl.demo.tiny", description="Build tiny random offline backbones for tests."
    )
    parser.add_argument("--family", required=True, choices=[*TINY_FAMILIES, "all"])
    parser.add_argument("--output_dir", required=True, help="target directory (with --family all: its parent)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing non-empty directories")
    args = parser.parse_args(argv)

    out = pathlib.Path(args.output_dir)
    jobs = [(f, out / f) for f in TINY_FAMILIES] if args.family == "all" else [(args.family, out)]
    for family, directory in jobs:
        path = build_tiny_backbone(family, directory, seed=args.seed, overwrite=args.overwrite)
        info = json.loads((path / _MARKER_FILE).read_text())
        files = ", ".join(sorted(p.name for p in path.iterdir()))
        print(
            f"{family}: wrote {path} ({info['model_class']}, {info['num_parameters']:,} parameters, "
            f"vocab {info['vocab_size']}, seed {args.seed}): {files}"
        )


if __name__ == "__main__":
    main()
