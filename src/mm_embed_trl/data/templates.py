"""Prompt templates: the one place that decides what text wraps an input before the chat template.

A :class:`PromptTemplate` turns an :class:`~mm_embed_trl.data.schema.EmbeddingInput` into chat messages
``[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}]``. The collator
then applies the processor's chat template (with ``add_generation_prompt=True``), so the last prompt
token - the one pooled for UniME-style embeddings - follows the template's instruction.

Built-in templates (``available_templates()``):

* ``"unime"``  - UniME / E5-V "in one word" prompts: ``<image>\\nSummary above image in one word:`` and
  ``<sent>\\nSummary above sentence in one word:``; an MMEB instruction + image becomes
  ``<image>\\n{instruction}\\nSummary above image in one word:``.
* ``"mmeb"``   - VLM2Vec / MMEB style: the row text as is (the task instruction is part of the data), the
  image item first.
* ``"ume_r1_blank_image"`` - UME-R1 as published: ``{input}\\n<disc_emb>\\nRepresent the above input ... <gen_emb>
  tag ...`` (wording as in the public UME-R1 code, ``qwen_module.py``), and a text-only input gets UME-R1's 28x28
  white image first, as in all its stages (SFT ``blank.jpg``, RL and evaluation ``Image.new``): the inputs its
  released checkpoints were trained and evaluated on.
* ``"ume_r1"`` - the same prompt, text-only inputs without an image (the tiny demo's).
* ``"plain"``  - the text as is, no instruction (text LMs, baselines).

The published models' own formats (their presets, :mod:`mm_embed_trl.presets`, pick them; docs/PRESETS.md cites the
code each one follows): ``"vlm2vec"`` (no chat template, ``<|image_pad|> {text}``), ``"unime_llava_ov"``,
``"unime_v2_llava_ov"``, ``"gme"``, ``"qwen3_vl_embedding"`` and ``"ume_r1_eval"``.

Register your own with :func:`register_template`; all behaviour lives in dataclass fields.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

from .schema import EmbeddingInput

__all__ = [
    "DISC_EMB_TOKEN",
    "GEN_EMB_TOKEN",
    "IMAGE_PLACEHOLDER_PATTERN",
    "UME_R1_BLANK_IMAGE_SIZE",
    "UME_R1_FORMAT",
    "UME_R1_INSTRUCTION",
    "UNIME_IMAGE_SUMMARY",
    "UNIME_TEXT_SUMMARY",
    "VIDEO_PLACEHOLDER_PATTERN",
    "VISION_TOKEN_PATTERN",
    "PromptTemplate",
    "available_templates",
    "blank_image",
    "get_template",
    "normalize_side",
    "register_template",
    "strip_image_placeholders",
]

DISC_EMB_TOKEN = "<disc_emb>"
GEN_EMB_TOKEN = "<gen_emb>"
# UME-R1's format check (r1-train vlm_modules/qwen_module.py, verbatim): a reasoning, a summary, then <gen_emb>.
# The SFT collator, follows_format, the format evaluator and the GRPO format reward all use this one pattern.
UME_R1_FORMAT = re.compile(r"<think>.*?</think>.*?\s*<answer>.*?\s*" + re.escape(GEN_EMB_TOKEN), re.DOTALL)

UNIME_IMAGE_SUMMARY = "Summary above image in one word:"
UNIME_TEXT_SUMMARY = "Summary above sentence in one word:"
# Verbatim from the public UME-R1 code (src/r1-train/.../vlm_modules/qwen_module.py), one line.
UME_R1_INSTRUCTION = (
    "Represent the above input text, images, videos, or any combination of the three as embeddings. "
    "First output the thinking process in <think> </think> tags and then summarize the entire input in a word "
    "or sentence. Finally, use the <gen_emb> tag to represent the entire input."
)

# Image placeholders that datasets / model families put in the text: MMEB's "<|image_1|>", LLaVA's
# "<image>", Phi/Llama's "<|image|>", and an already-expanded Qwen-VL block. The image position is
# carried by the {"type": "image"} content item instead, so the chat template inserts the right tokens.
IMAGE_PLACEHOLDER_PATTERN: re.Pattern[str] = re.compile(
    r"<\|vision_start\|>(?:<\|image_pad\|>)*<\|vision_end\|>"  # expanded Qwen-VL image block
    r"|<\|image(?:_\d+)?\|>"  # <|image|>, <|image_1|>
    r"|<image(?:_\d+)?>"  # <image>, <image_1>
    r"|<\|image_pad\|>"
)
# Video placeholders (MMEB-V2 / LLaVA "<video>", "<|video_1|>", Qwen-VL's pad and its expanded block): the video's
# place is its {"type": "video"} content item, as for images.
VIDEO_PLACEHOLDER_PATTERN: re.Pattern[str] = re.compile(
    r"<\|vision_start\|>(?:<\|video_pad\|>)*<\|vision_end\|>|<\|video(?:_\d+)?\|>|<video(?:_\d+)?>|<\|video_pad\|>"
)
# The tokens processors expand into image / video features (Qwen-VL's pads, LLaVA-OneVision's <image> / <video>).
# One left in a text asks for features no image gave: the processor refuses the batch, or the model does ("Image
# features and image tokens do not match"). Prompt texts lose the image ones with the placeholders above; reasoning
# targets are tokenized as they are.
VISION_TOKEN_PATTERN: re.Pattern[str] = re.compile(r"<\|image_pad\|>|<\|video_pad\|>|<image>|<video>")
_VISUAL_PLACEHOLDER = re.compile(IMAGE_PLACEHOLDER_PATTERN.pattern + "|" + VIDEO_PLACEHOLDER_PATTERN.pattern)
_PLACEHOLDER_WITH_SPACE = re.compile(r"[ \t]*(?:" + _VISUAL_PLACEHOLDER.pattern + r")[ \t]*")
_SPACE_AROUND_NEWLINE = re.compile(r"[ \t]*\n[ \t]*")
_MANY_NEWLINES = re.compile(r"\n{3,}")

_TEXT_FIELD = "{text}"
_DOCUMENT_ALIASES = {"document", "positive", "negative", "target", "candidate", "doc", "pos", "neg", "tgt"}


def strip_image_placeholders(text: str | None) -> str:
    """Remove image and video placeholders from ``text`` and tidy the whitespace they leave behind.

    Text without placeholders is only stripped at both ends (its inner whitespace is the user's).
    """
    if text is None:
        return ""
    if _VISUAL_PLACEHOLDER.search(text) is None:
        return text.strip()
    text = _PLACEHOLDER_WITH_SPACE.sub(" ", text)
    text = _SPACE_AROUND_NEWLINE.sub("\n", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def normalize_side(side: str) -> str:
    """Map a side name to ``"query"`` or ``"document"`` (``positive``/``negative``/``target`` are documents)."""
    key = side.lower()
    if key in ("query", "qry", "q"):
        return "query"
    if key in _DOCUMENT_ALIASES:
        return "document"
    raise ValueError(f"Unknown side {side!r}; use 'query' or 'document' (or 'positive'/'negative'/'target').")


@dataclass(frozen=True)
class PromptTemplate:
    """How an input's text is wrapped, per modality and per side. Formats use the literal field ``{text}``.

    Attributes:
        name: Registry name.
        description: One line for docs and error messages.
        text_format: Text-only input; must contain ``{text}``.
        image_format: Image-only input (text that follows/precedes the image); must not contain ``{text}``.
            ``""`` means the content is just the image.
        image_text_format: Image + text input; must contain ``{text}``.
        query_instruction: Prepended to the query side's text part (e.g. ``"Instruct: ...\\nQuery: "``).
        document_instruction: Prepended to the document side's text part.
        image_first: Put the image item before the text item (every published recipe here does).
        image_separator: Starts the text item when it directly follows the image item; ``"\\n"``
            reproduces the published ``<image>\\n...`` prompts.
        system_prompt: Optional system message; ``None`` leaves the processor's chat-template default.
        text_only_image_size: Side in pixels of a white square image given to every input without an image
            (:meth:`with_text_only_image`; UME-R1: 28); ``None`` leaves text-only inputs without one.
        instruction_in_system: The instruction (the side's, or one given per call) is the system message, and
            ``system_prompt`` the system message of inputs without one (GME, Qwen3-VL-Embedding); ``False``
            prepends it to the text.
        punctuate_instruction: A system instruction that does not end in punctuation gets a ``"."``
            (Qwen3-VL-Embedding's ``format_model_input``).
        use_chat_template: ``False`` renders no chat template: the prompt is the processor's bare image token
            (``<|image_pad|>``, ``<image>``), ``image_separator`` and the text, as VLM2Vec and UniME-V2 (Qwen2-VL)
            feed their models; the tokenizer adds its own special tokens, if any.
        generation_suffix: Text after the chat template's generation prompt (GME ends every input with
            ``<|endoftext|>`` and pools it).

    ``{text}`` is substituted with ``str.replace``, so braces in data or instructions need no escaping.
    """

    name: str
    description: str = ""
    text_format: str = _TEXT_FIELD
    image_format: str = ""
    image_text_format: str = _TEXT_FIELD
    query_instruction: str = ""
    document_instruction: str = ""
    image_first: bool = True
    image_separator: str = "\n"
    system_prompt: str | None = None
    text_only_image_size: int | None = None
    instruction_in_system: bool = False
    punctuate_instruction: bool = False
    use_chat_template: bool = True
    generation_suffix: str = ""

    def __post_init__(self):
        if not self.name:
            raise ValueError("PromptTemplate needs a non-empty name.")
        if self.text_only_image_size is not None and self.text_only_image_size < 1:
            raise ValueError(
                f"PromptTemplate {self.name!r}: text_only_image_size must be a positive number of pixels or None, "
                f"got {self.text_only_image_size}."
            )
        for field_name in ("text_format", "image_text_format"):
            if _TEXT_FIELD not in getattr(self, field_name):
                raise ValueError(
                    f"PromptTemplate {self.name!r}: {field_name}={getattr(self, field_name)!r} must contain "
                    f"'{_TEXT_FIELD}' where the input text goes."
                )
        if _TEXT_FIELD in self.image_format:
            raise ValueError(
                f"PromptTemplate {self.name!r}: image_format is used for image-only inputs (no text), so it "
                f"cannot contain '{_TEXT_FIELD}'; got {self.image_format!r}."
            )
        if not self.use_chat_template and (self.instruction_in_system or self.system_prompt or self.generation_suffix):
            raise ValueError(
                f"PromptTemplate {self.name!r}: system messages and a generation suffix belong to a chat template; "
                "use_chat_template=False renders the text alone."
            )

    def instruction(self, side: str, override: str | None = None) -> str:
        """The side's instruction (``""`` when none); ``override`` (an instruction given per call) replaces it."""
        if override is not None:
            return override
        return self.query_instruction if normalize_side(side) == "query" else self.document_instruction

    def system_message(self, side: str, instruction: str | None = None) -> str | None:
        """The system message of an input on ``side`` (``None``: the chat template's default)."""
        if not self.instruction_in_system:
            return self.system_prompt
        text = self.instruction(side, instruction).strip()
        if text and self.punctuate_instruction and not unicodedata.category(text[-1]).startswith("P"):
            text += "."
        return text or self.system_prompt

    def format_text(self, inp: EmbeddingInput, side: str = "query", instruction: str | None = None) -> str:
        """The text item for ``inp`` (image placeholders removed; no image tokens). May be ``""``.

        Raises:
            ValueError: the input has no image and its text is empty once placeholders are removed
                (a row whose text says ``<|image_1|>`` but whose image column is empty).
        """
        text = strip_image_placeholders(inp.text)
        has_image = inp.has_visual  # an image-only format serves videos and several images too
        if not has_image and not text:
            raise ValueError(
                f"Input text {inp.text!r} holds only an image placeholder but the input has no image; check "
                "that the row's image column is filled (and image_root points at the images)."
            )
        if has_image and text:
            body = self.image_text_format.replace(_TEXT_FIELD, text)
        elif has_image:
            body = self.image_format
        else:
            body = self.text_format.replace(_TEXT_FIELD, text)
        return body if self.instruction_in_system else self.instruction(side, instruction) + body

    def with_text_only_image(self, inp: EmbeddingInput) -> EmbeddingInput:
        """``inp`` as this template embeds it: with the white square of ``text_only_image_size`` when it has no
        image (every caller that turns inputs into model inputs calls this before :meth:`build_messages`)."""
        if self.text_only_image_size is None or inp.has_visual:
            return inp
        return EmbeddingInput(text=inp.text, image=blank_image(self.text_only_image_size))

    def build_messages(self, inp: EmbeddingInput, side: str = "query", instruction: str | None = None) -> list[dict]:
        """Chat messages for ``inp``: one ``{"type": "image"}`` item per image, then ``{"type": "video"}`` for its
        video, then the text (the visual items after the text when ``image_first`` is False)."""
        text = self.format_text(inp, side, instruction)
        visual = [{"type": "image"} for _ in inp.images] + ([{"type": "video"}] if inp.video is not None else [])
        content: list[dict] = []
        if visual and self.image_first:
            content.extend(visual)
            if text:
                content.append({"type": "text", "text": self.image_separator + text})
        else:
            if text:
                content.append({"type": "text", "text": text})
            content.extend(visual)
        messages: list[dict] = []
        system = self.system_message(side, instruction)
        if system is not None:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append({"role": "user", "content": content})
        return messages

    def render_plain(self, inp: EmbeddingInput, image_token: str, side: str = "query", instruction: str | None = None):
        """The prompt of a ``use_chat_template=False`` template: ``image_token``, the separator and the text. The
        separator stays when the text is empty, as VLM2Vec's ``process_input_text`` writes ``"<|image_pad|> "``."""
        text = self.format_text(inp, side, instruction)
        if inp.video is not None or len(inp.images) > 1:
            raise ValueError(
                f"PromptTemplate {self.name!r} renders without a chat template, which places one image token: it "
                "takes no video or several images. Use a template with use_chat_template=True for them."
            )
        if inp.image is None:
            return text
        return image_token + self.image_separator + text if self.image_first else text + image_token


_REGISTRY: dict[str, PromptTemplate] = {}


def register_template(template: PromptTemplate, *, overwrite: bool = False) -> None:
    """Make ``template`` available to :func:`get_template` (and to ``--template`` on the CLI) by its name."""
    if not isinstance(template, PromptTemplate):
        raise TypeError(f"register_template expects a PromptTemplate, got {type(template).__name__}.")
    if template.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"A prompt template named {template.name!r} is already registered; pick another name or pass "
            "overwrite=True to replace it."
        )
    _REGISTRY[template.name] = template


def available_templates() -> list[str]:
    """Names of the registered templates, sorted."""
    return sorted(_REGISTRY)


def get_template(name: str | PromptTemplate) -> PromptTemplate:
    """The registered template called ``name`` (a ``PromptTemplate`` passes through unchanged)."""
    if isinstance(name, PromptTemplate):
        return name
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown prompt template {name!r}. Known templates: {', '.join(available_templates())}. "
            "To add one, call mm_embed_trl.data.templates.register_template(PromptTemplate(name=..., "
            "text_format='{text}', image_format=..., image_text_format='{text}', ...))."
        ) from None


@functools.lru_cache(maxsize=4)
def blank_image(size: int):
    """A white ``size`` x ``size`` RGB image (UME-R1's placeholder for text-only inputs at 28). One shared object
    per size: callers never modify it."""
    from PIL import Image

    return Image.new("RGB", (size, size), (255, 255, 255))


_UME_R1_SUFFIX = f"\n{DISC_EMB_TOKEN}\n{UME_R1_INSTRUCTION}"
# Side of the white image UME-R1 puts before every text-only input (its SFT blank.jpg; RL and evaluation build it).
UME_R1_BLANK_IMAGE_SIZE = 28

for _template in (
    PromptTemplate(
        name="unime",
        description="UniME / E5-V 'in one word' summary prompts (image, sentence, instruction + image).",
        text_format=f"{{text}}\n{UNIME_TEXT_SUMMARY}",
        image_format=UNIME_IMAGE_SUMMARY,
        image_text_format=f"{{text}}\n{UNIME_IMAGE_SUMMARY}",
    ),
    PromptTemplate(
        name="mmeb",
        description="VLM2Vec / MMEB: the row text as is (instruction included in the data), image first.",
    ),
    PromptTemplate(
        name="ume_r1",
        description="UME-R1's prompt: input, then <disc_emb> and the reasoning instruction ending with <gen_emb>; "
        "text-only inputs stay text-only.",
        text_format="{text}" + _UME_R1_SUFFIX,
        image_format=_UME_R1_SUFFIX.lstrip("\n"),  # the image item + separator already supply the newline
        image_text_format="{text}" + _UME_R1_SUFFIX,
    ),
    PromptTemplate(
        name="ume_r1_blank_image",
        description="UME-R1 as published: its prompt, and a 28x28 white image before every text-only input.",
        text_format="{text}" + _UME_R1_SUFFIX,
        image_format=_UME_R1_SUFFIX.lstrip("\n"),
        image_text_format="{text}" + _UME_R1_SUFFIX,
        text_only_image_size=UME_R1_BLANK_IMAGE_SIZE,
    ),
    PromptTemplate(
        name="plain",
        description="The text as is, no instruction and no separator (text LMs, baselines).",
        image_separator="",
    ),
    # The published models' formats (docs/PRESETS.md cites the code each follows).
    PromptTemplate(
        name="vlm2vec",
        description="VLM2Vec / UniME-V2 on Qwen2-VL: no chat template, the bare image token, a space, the text "
        "(the task instruction is part of the text).",
        use_chat_template=False,
        image_separator=" ",
    ),
    PromptTemplate(
        name="unime_llava_ov",
        description="UniME (LLaVA-OneVision) card: 'in one word' prompts ending in a newline; the chat template "
        "puts the newline after the image.",
        text_format=f"{{text}}\n{UNIME_TEXT_SUMMARY}\n",
        image_format=f"{UNIME_IMAGE_SUMMARY}\n",
        image_text_format=f"{{text}}\n{UNIME_IMAGE_SUMMARY}\n",
        image_separator="",
    ),
    PromptTemplate(
        name="unime_v2_llava_ov",
        description="UniME-V2 (LLaVA-OneVision): the text as is after the image; the chat template puts the "
        "newline after the image.",
        image_separator="",
    ),
    PromptTemplate(
        name="gme",
        description="GME: the instruction as the system message ('You are a helpful assistant.' for documents and "
        "inputs without one), image then text, <|endoftext|> after the generation prompt (pooled).",
        system_prompt="You are a helpful assistant.",
        instruction_in_system=True,
        image_separator="",
        generation_suffix="<|endoftext|>",
    ),
    PromptTemplate(
        name="qwen3_vl_embedding",
        description="Qwen3-VL-Embedding: the instruction as the system message (a '.' added when it ends without "
        "punctuation; 'Represent the user's input.' by default), image then text.",
        system_prompt="Represent the user's input.",
        instruction_in_system=True,
        punctuate_instruction=True,
        image_separator="",
    ),
    PromptTemplate(
        name="ume_r1_eval",
        description="UME-R1 as its evaluation feeds the released checkpoints: image, then the text with no newline, "
        "<disc_emb> and the instruction; a 28x28 white image before every text-only input.",
        text_format="{text}" + _UME_R1_SUFFIX,
        image_format=_UME_R1_SUFFIX,
        image_text_format="{text}" + _UME_R1_SUFFIX,
        image_separator="",
        text_only_image_size=UME_R1_BLANK_IMAGE_SIZE,
    ),
):
    register_template(_template)
del _template
