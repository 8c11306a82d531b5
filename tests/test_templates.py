"""Prompt templates: registry, placeholder stripping, messages, and each built-in template's exact text."""

from __future__ import annotations

import pytest
from PIL import Image

from mm_embed_trl.data.schema import EmbeddingInput
from mm_embed_trl.data.templates import (
    DISC_EMB_TOKEN,
    GEN_EMB_TOKEN,
    IMAGE_PLACEHOLDER_PATTERN,
    PromptTemplate,
    available_templates,
    get_template,
    register_template,
    strip_image_placeholders,
)

IMG = Image.new("RGB", (4, 4), (255, 0, 0))

# The public UME-R1 instruction, typed out here independently of the module's constant.
UME_R1_TEXT = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. First output "
    "the thinking process in <think> </think> tags and then summarize the entire input in a word or sentence. "
    "Finally, use the <gen_emb> tag to represent the entire input."
)


def _user_content(messages):
    assert messages[-1]["role"] == "user"
    return messages[-1]["content"]


def test_builtin_names_and_unknown_name_error():
    assert {"unime", "mmeb", "ume_r1", "plain"} <= set(available_templates())
    assert available_templates() == sorted(available_templates())
    with pytest.raises(ValueError) as info:
        get_template("e5v-typo")
    message = str(info.value)
    assert "e5v-typo" in message
    for name in ("unime", "mmeb", "ume_r1", "plain"):
        assert name in message
    assert "register_template" in message


def test_get_template_passes_instances_through():
    template = get_template("mmeb")
    assert get_template(template) is template


def test_register_custom_template_and_overwrite_guard():
    custom = PromptTemplate(
        name="test-instruct",
        text_format="Query: {text}",
        image_text_format="{text}",
        query_instruction="Instruct: find the caption\n",
    )
    register_template(custom)
    try:
        assert get_template("test-instruct") is custom
        assert "test-instruct" in available_templates()
        with pytest.raises(ValueError, match="already registered.*overwrite=True"):
            register_template(PromptTemplate(name="test-instruct"))
        replacement = PromptTemplate(name="test-instruct", text_format="Q: {text}")
        register_template(replacement, overwrite=True)
        assert get_template("test-instruct") is replacement
    finally:
        from mm_embed_trl.data import templates

        templates._REGISTRY.pop("test-instruct", None)


def test_invalid_template_definitions():
    with pytest.raises(ValueError, match="text_format.*{text}"):
        PromptTemplate(name="x", text_format="no slot")
    with pytest.raises(ValueError, match="image_format.*cannot contain"):
        PromptTemplate(name="x", image_format="{text}")
    with pytest.raises(ValueError, match="non-empty name"):
        PromptTemplate(name="")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("<|image_1|>\nRepresent the given image.", "Represent the given image."),
        ("<image>\nWhat is this?", "What is this?"),
        ("<|image|>Describe it", "Describe it"),
        ("Compare <|image_1|> and <|image_2|> please", "Compare and please"),
        ("<|vision_start|><|image_pad|><|vision_end|>Caption:", "Caption:"),
        ("a  text   with spaces", "a  text   with spaces"),  # no placeholder: inner spacing untouched
        ("  padded  ", "padded"),
        ("<image>\n\n\n\nText", "Text"),
        ("Line one <image>\n  line two", "Line one\nline two"),
        ("<image>", ""),
        (None, ""),
    ],
)
def test_strip_image_placeholders(raw, expected):
    assert strip_image_placeholders(raw) == expected


def test_placeholder_pattern_leaves_other_tags():
    assert IMAGE_PLACEHOLDER_PATTERN.search("<disc_emb> <gen_emb> <think>") is None
    assert IMAGE_PLACEHOLDER_PATTERN.findall("<|image_12|><image_3><image>") == ["<|image_12|>", "<image_3>", "<image>"]


@pytest.mark.parametrize("name", ["unime", "mmeb", "ume_r1", "plain"])
def test_image_item_present_iff_image(name):
    template = get_template(name)
    for inp, has_image in (
        (EmbeddingInput(text="a dog", image=IMG), True),
        (EmbeddingInput(image=IMG), True),
        (EmbeddingInput(text="a dog"), False),
    ):
        content = _user_content(template.build_messages(inp, "query"))
        images = [c for c in content if c["type"] == "image"]
        assert len(images) == (1 if has_image else 0)
        for item in content:
            if item["type"] == "text":
                assert IMAGE_PLACEHOLDER_PATTERN.search(item["text"]) is None


def test_unime_texts():
    t = get_template("unime")
    assert t.build_messages(EmbeddingInput(image=IMG)) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nSummary above image in one word:"}]}
    ]
    assert t.build_messages(EmbeddingInput(text="A cat sits."), "document") == [
        {"role": "user", "content": [{"type": "text", "text": "A cat sits.\nSummary above sentence in one word:"}]}
    ]
    inp = EmbeddingInput(text="<|image_1|>\nRepresent the given image with the following question: What?", image=IMG)
    assert _user_content(t.build_messages(inp)) == [
        {"type": "image"},
        {
            "type": "text",
            "text": "\nRepresent the given image with the following question: What?\nSummary above image in one word:",
        },
    ]
    # format_text is the text part only (no separator, no image token)
    assert t.format_text(EmbeddingInput(image=IMG), "query") == "Summary above image in one word:"


def test_mmeb_text_as_is_image_first():
    t = get_template("mmeb")
    inp = EmbeddingInput(text="<|image_1|>\nRepresent the given image.", image=IMG)
    assert _user_content(t.build_messages(inp)) == [
        {"type": "image"},
        {"type": "text", "text": "\nRepresent the given image."},
    ]
    assert _user_content(t.build_messages(EmbeddingInput(text="a red circle"), "positive")) == [
        {"type": "text", "text": "a red circle"}
    ]
    assert _user_content(t.build_messages(EmbeddingInput(image=IMG))) == [{"type": "image"}]


def test_ume_r1_texts():
    assert DISC_EMB_TOKEN == "<disc_emb>" and GEN_EMB_TOKEN == "<gen_emb>"
    t = get_template("ume_r1")
    assert t.format_text(EmbeddingInput(text="A cat."), "query") == "A cat.\n<disc_emb>\n" + UME_R1_TEXT
    content = _user_content(t.build_messages(EmbeddingInput(text="<|image_1|>\nFind the caption.", image=IMG)))
    assert content == [{"type": "image"}, {"type": "text", "text": "\nFind the caption.\n<disc_emb>\n" + UME_R1_TEXT}]
    content = _user_content(t.build_messages(EmbeddingInput(image=IMG), "document"))
    assert content == [{"type": "image"}, {"type": "text", "text": "\n<disc_emb>\n" + UME_R1_TEXT}]
    assert content[-1]["text"].count(DISC_EMB_TOKEN) == 1 and content[-1]["text"].endswith("entire input.")


def test_ume_r1_blank_image_gives_every_text_only_input_ume_r1s_white_square():
    """UME-R1 never embeds text alone: a 28x28 white image comes before every text-only side (SFT's blank.jpg, RL's
    and evaluation's Image.new("RGB", (28, 28), (255, 255, 255))). The "ume_r1" template keeps text alone."""
    t = get_template("ume_r1_blank_image")
    text_only = t.with_text_only_image(EmbeddingInput(text="A cat."))
    assert text_only.image.size == (28, 28) and text_only.image.mode == "RGB"
    assert set(text_only.image.getdata()) == {(255, 255, 255)}
    assert _user_content(t.build_messages(text_only, "query")) == [
        {"type": "image"}, {"type": "text", "text": "\nA cat.\n<disc_emb>\n" + UME_R1_TEXT}]
    with_image = EmbeddingInput(text="A cat.", image=IMG)
    assert t.with_text_only_image(with_image) is with_image
    plain = EmbeddingInput(text="A cat.")
    assert get_template("ume_r1").with_text_only_image(plain) is plain
    assert t.build_messages(with_image) == get_template("ume_r1").build_messages(with_image)
    with pytest.raises(ValueError, match="text_only_image_size"):
        PromptTemplate(name="bad", text_only_image_size=0)


def test_plain_text_as_is():
    t = get_template("plain")
    assert t.format_text(EmbeddingInput(text="  hello {world}  "), "query") == "hello {world}"
    assert _user_content(t.build_messages(EmbeddingInput(text="<image>\nhi", image=IMG))) == [
        {"type": "image"},
        {"type": "text", "text": "hi"},
    ]


def test_per_side_instruction_and_options():
    t = PromptTemplate(
        name="sided",
        query_instruction="Instruct: retrieve\nQuery: ",
        document_instruction="Passage: ",
        image_first=False,
        image_separator="",
        system_prompt="You embed things.",
    )
    inp = EmbeddingInput(text="{braces} stay", image=IMG)
    q = t.build_messages(inp, "query")
    assert q[0] == {"role": "system", "content": [{"type": "text", "text": "You embed things."}]}
    assert q[1]["content"] == [{"type": "text", "text": "Instruct: retrieve\nQuery: {braces} stay"}, {"type": "image"}]
    for side in ("document", "positive", "negative", "target"):
        assert t.format_text(inp, side) == "Passage: {braces} stay"
    with pytest.raises(ValueError, match="Unknown side"):
        t.format_text(inp, "middle")


def test_placeholder_only_text_without_image_is_an_error():
    with pytest.raises(ValueError, match="image placeholder.*no image"):
        get_template("mmeb").build_messages(EmbeddingInput(text="<|image_1|>"))


def test_messages_render_through_a_chat_template():
    """The messages are what a Qwen2-VL style chat template expects (content list with typed items)."""
    jinja2 = pytest.importorskip("jinja2")
    chat = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
        "{% endfor %}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    inp = EmbeddingInput(text="<|image_1|>\nRepresent the given image.", image=IMG)
    messages = get_template("unime").build_messages(inp)
    rendered = jinja2.Template(chat, keep_trailing_newline=True).render(messages=messages)
    assert rendered == (
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>\nRepresent the given image.\n"
        "Summary above image in one word:<|im_end|>\n<|im_start|>assistant\n"
    )


def test_published_models_templates_place_instructions_and_images_as_their_code_does():

    red = Image.new("RGB", (8, 8), "red")
    qwen3 = get_template("qwen3_vl_embedding")
    # the instruction is the system message, "." added unless it ends in punctuation (any Unicode P* character)
    assert qwen3.system_message("query") == "Represent the user's input."
    assert qwen3.system_message("query", "  Find the image ") == "Find the image."
    assert qwen3.system_message("query", "Trouve l'image ?") == "Trouve l'image ?"
    assert qwen3.system_message("query", "找到图片。") == "找到图片。"
    messages = qwen3.build_messages(EmbeddingInput(text="a cat", image=red), "query", "Find the image")
    assert messages[0]["content"][0]["text"] == "Find the image."
    assert messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "a cat"}]  # no instruction in text
    gme = get_template("gme")
    assert gme.system_message("document") == "You are a helpful assistant." and gme.generation_suffix == "<|endoftext|>"
    assert gme.system_message("query", "Find the image.") == "Find the image."
    vlm2vec = get_template("vlm2vec")
    assert vlm2vec.render_plain(EmbeddingInput(text="Represent it: a", image=red), "<|image_pad|>") == (
        "<|image_pad|> Represent it: a"
    )
    # VLM2Vec's process_input_text keeps the space after the image token when the text is empty
    assert vlm2vec.render_plain(EmbeddingInput(image=red), "<|image_pad|>") == "<|image_pad|> "
    assert vlm2vec.render_plain(EmbeddingInput(text="a"), "<|image_pad|>") == "a"
    with pytest.raises(ValueError, match="belong to a chat template"):
        PromptTemplate(name="bad", use_chat_template=False, system_prompt="You are...")
