"""The prompt → Jinja chat-template compiler of the sentence-transformers export: a generated preamble that rebuilds
the messages a model's prompt template builds, then the backbone's own chat template (see docs/EXPORT.md), and its
inverse (the backbone's template recovered from an export's). In ``data/`` beside the prompt templates it compiles:
the export writes it (``export/``) and ``MultimodalEmbeddingModel.from_pretrained`` reads it back (``modeling/``)."""

from __future__ import annotations

import functools
import logging
import sys
import unicodedata
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # heavy imports stay lazy: `import mm_embed_trl.export` must be cheap
    from .templates import PromptTemplate

logger = logging.getLogger(__name__)

__all__ = ["build_embedding_chat_template", "recover_base_chat_template"]

# Sides of the prompt template that ST's `task` maps to the document instruction (ST's encode_document sets
# task="document"; the aliases mirror mm_embed_trl.data.templates.normalize_side plus ST's prompt names).
_DOCUMENT_TASKS = (
    "document",
    "documents",
    "passage",
    "corpus",
    "positive",
    "negative",
    "target",
    "candidate",
    "doc",
    "pos",
    "neg",
    "tgt",
)
# Used inside the generated template to mark removed image placeholders; refused in user text.
_SENTINEL = "\ue000"


# ---------------------------------------------------------------------------------------------------- template
# The preamble's last line: the base chat template follows it (in every version of the builder).
_END_OF_PREAMBLE = "{%- set add_generation_prompt = true %}\n"

def _jinja_str(value: str) -> str:
    """A Jinja string literal for ``value`` that survives any content (quotes, braces, ``%}``, newlines, emoji).

    Jinja decodes string literals with ``unicode-escape``, so every character outside a plain readable set is
    written as ``\\xNN`` / ``\\UNNNNNNNN``; braces and ``%`` are escaped too so no literal can close a tag.
    """
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?-_()/@=+*^~$&|<>[]")
    out = []
    for ch in value:
        if ch in safe:
            out.append(ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x100:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    return "'" + "".join(out) + "'"


def _fail(message: str, *expressions: str) -> str:
    """Jinja raising ``message`` (``{}`` slots filled with the Jinja ``expressions``) via ``raise_exception``."""
    pieces = message.split("{}")
    if len(pieces) != len(expressions) + 1:
        raise ValueError(f"_fail: {len(pieces) - 1} slots but {len(expressions)} expressions in {message!r}.")
    parts = [_jinja_str("mm-embed-trl embedding template: " + pieces[0])]
    for expression, piece in zip(expressions, pieces[1:], strict=True):
        parts += [f"({expression}) | string", _jinja_str(piece)]
    return "{{- raise_exception(" + " ~ ".join(parts) + ") -}}"


def _placeholder_stripping_jinja() -> str:
    """Jinja that sets ``mmembed_text`` to ``strip_image_placeholders(mmembed_raw)``, exactly.

    The Python function uses one regex; Jinja has none, so each placeholder form is replaced by a sentinel in its
    own pass (expanded Qwen-VL blocks first, as the regex alternation does), then the regex's whitespace rules are
    applied: ``[ \\t]*<placeholder>[ \\t]*`` -> one space, ``[ \\t]*\\n[ \\t]*`` -> newline, 3+ newlines -> 2, strip.
    Equivalence is property-tested against the Python function.
    """
    s = _jinja_str(_SENTINEL)
    start, end, pad = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
    blanks, nl, nl2, nl3 = _jinja_str(" \t"), _jinja_str("\n"), _jinja_str("\n" * 2), _jinja_str("\n" * 3)
    return f"""
{{%- if {s} in mmembed_raw -%}}
{_fail("the input text contains the private-use character U+E000, which this template reserves. Remove it.")}
{{%- endif -%}}
{{%- set mmembed_parts = mmembed_raw.split({_jinja_str(start)}) -%}}
{{%- set mmembed_s = namespace(value=mmembed_parts[0]) -%}}
{{%- for mmembed_p in mmembed_parts[1:] -%}}
{{%- set mmembed_r = namespace(value=mmembed_p) -%}}
{{%- for mmembed_i in range(mmembed_p.count({_jinja_str(pad)})) -%}}
{{%- if mmembed_r.value.startswith({_jinja_str(pad)}) -%}}
{{%- set mmembed_r.value = mmembed_r.value[{len(pad)}:] -%}}
{{%- else -%}}{{%- break -%}}{{%- endif -%}}
{{%- endfor -%}}
{{%- if mmembed_r.value.startswith({_jinja_str(end)}) -%}}
{{%- set mmembed_s.value = mmembed_s.value + {s} + mmembed_r.value[{len(end)}:] -%}}
{{%- else -%}}
{{%- set mmembed_s.value = mmembed_s.value + {_jinja_str(start)} + mmembed_p -%}}
{{%- endif -%}}
{{%- endfor -%}}
{_numbered_placeholder_pass("<|image", "|>")}
{_numbered_placeholder_pass("<image", ">")}
{{%- set mmembed_s.value = mmembed_s.value.replace({_jinja_str(pad)}, {s}) -%}}
{{%- if {s} in mmembed_s.value -%}}
{{%- set mmembed_s.value = mmembed_s.value.split({s}) | map('trim', {blanks}) | join(' ') -%}}
{{%- set mmembed_s.value = mmembed_s.value.split({nl}) | map('trim', {blanks}) | join({nl}) -%}}
{{%- for mmembed_i in range(mmembed_s.value | length) -%}}
{{%- if {nl3} in mmembed_s.value -%}}
{{%- set mmembed_s.value = mmembed_s.value.replace({nl3}, {nl2}) -%}}
{{%- else -%}}{{%- break -%}}{{%- endif -%}}
{{%- endfor -%}}
{{%- set mmembed_text = mmembed_s.value | trim -%}}
{{%- else -%}}
{{%- set mmembed_text = mmembed_raw | trim -%}}
{{%- endif -%}}"""


def _numbered_placeholder_pass(prefix: str, close: str) -> str:
    """Replace ``prefix + close`` and ``prefix + "_" + digits + close`` (regex ``prefix(?:_\\d+)?close``)."""
    s = _jinja_str(_SENTINEL)
    c = _jinja_str(close)
    n = len(close)
    return f"""
{{%- set mmembed_parts = mmembed_s.value.split({_jinja_str(prefix)}) -%}}
{{%- set mmembed_s.value = mmembed_parts[0] -%}}
{{%- for mmembed_p in mmembed_parts[1:] -%}}
{{%- if mmembed_p.startswith({c}) -%}}
{{%- set mmembed_s.value = mmembed_s.value + {s} + mmembed_p[{n}:] -%}}
{{%- else -%}}
{{%- set mmembed_d = namespace(n=0) -%}}
{{%- if mmembed_p.startswith('_') -%}}
{{%- for mmembed_ch in mmembed_p[1:] -%}}
{{%- if mmembed_ch.isdecimal() -%}}{{%- set mmembed_d.n = mmembed_d.n + 1 -%}}
{{%- else -%}}{{%- break -%}}{{%- endif -%}}
{{%- endfor -%}}
{{%- endif -%}}
{{%- if mmembed_d.n > 0 and mmembed_p[mmembed_d.n + 1:mmembed_d.n + 1 + {n}] == {c} -%}}
{{%- set mmembed_s.value = mmembed_s.value + {s} + mmembed_p[mmembed_d.n + 1 + {n}:] -%}}
{{%- else -%}}
{{%- set mmembed_s.value = mmembed_s.value + {_jinja_str(prefix)} + mmembed_p -%}}
{{%- endif -%}}
{{%- endif -%}}
{{%- endfor -%}}"""


def build_embedding_chat_template(
    template: PromptTemplate,
    base_chat_template: str | None,
    *,
    multimodal: bool,
    query_instruction: str | None = None,
    document_instruction: str | None = None,
    pooling_token: str | None = None,
    special_prefix: str = "",
    special_suffix: str = "",
    image_token: str | None = None,
) -> str:
    """The Jinja chat template that makes ``apply_chat_template`` render exactly what our collator renders.

    Args:
        template: the model's prompt template.
        base_chat_template: the backbone's own chat template (the processor's for vision-language models, the
            tokenizer's for text LMs); ``None`` for a text LM without one (the collator then feeds
            ``template.format_text`` as is, and so does this template).
        multimodal: whether the processor takes images (structured content with ``{"type": "image"}`` items).
        query_instruction / document_instruction: the side instructions used when no ST prompt (system message)
            is given; default to the template's own.
        pooling_token: for ``special_token`` pooling, the rendered prompt ends right after the last occurrence of
            this token (causal backbone: the hidden state there does not depend on what follows), so last-token
            pooling reads the same vector.
        special_prefix / special_suffix: what the tokenizer adds around a text, for prompts rendered without the
            backbone's chat template (a text LM without one, ``use_chat_template=False`` templates).
        image_token: the processor's image token, for ``use_chat_template=False`` templates.

    Returns:
        The template source. It declares the ``task`` variable, so sentence-transformers forwards ``task``.
    """
    if multimodal and not base_chat_template and template.use_chat_template:
        raise ValueError(
            "The processor of this vision-language model has no chat template, so MultimodalEmbeddingModel.encode "
            "cannot render prompts either. Set `processor.chat_template` (e.g. from the base model's "
            "chat_template.jinja) before exporting."
        )
    q = template.query_instruction if query_instruction is None else query_instruction
    d = template.document_instruction if document_instruction is None else document_instruction
    doc_tasks = "[" + ", ".join(_jinja_str(t) for t in _DOCUMENT_TASKS) + "]"
    text_item = "{'type': 'text', 'text': %s}"
    # The system message: the template's fixed one, or (instruction_in_system) the input's instruction with the
    # template's as fallback, set in the preamble as `mmembed_system`.
    if template.instruction_in_system:
        system = "mmembed_system"
    elif template.system_prompt is not None:
        system = _jinja_str(template.system_prompt)
    else:
        system = None
    # Vision-language processors get structured contents (a list of typed items, as build_messages makes them);
    # text LMs get plain string contents (the collator flattens them before the tokenizer's chat template).
    if system is None:
        system_prefix = "[]"
    elif multimodal:
        system_prefix = "[{'role': 'system', 'content': [" + text_item % system + "]}]"
    else:
        system_prefix = "[{'role': 'system', 'content': " + system + "}]"
    if multimodal and not template.use_chat_template:
        build = ""  # rendered below without messages: image token, separator, text
    elif multimodal:
        sep = _jinja_str(template.image_separator)
        if template.image_first:
            visual_first_branch = (
                "{%- if mmembed_has_visual -%}\n"
                "{%- if mmembed_text -%}\n"
                "{%- set mmembed_content = mmembed_visual + [" + text_item % f"{sep} + mmembed_text" + "] -%}\n"
                "{%- else -%}{%- set mmembed_content = mmembed_visual -%}{%- endif -%}\n"
                "{%- else -%}\n"
                "{%- set mmembed_content = [" + text_item % "mmembed_text" + "] -%}\n"
                "{%- endif -%}"
            )
        else:
            visual_first_branch = (
                "{%- set mmembed_content = ([" + text_item % "mmembed_text" + "] if mmembed_text else []) "
                "+ mmembed_visual -%}"
            )
        # One image item per image, then the video (as build_messages orders them).
        build = (
            "{%- set mmembed_vis = namespace(items=[]) -%}\n"
            "{%- for mmembed_i in range(mmembed_ns.n_image) -%}"
            "{%- set mmembed_vis.items = mmembed_vis.items + [{'type': 'image'}] -%}{%- endfor -%}\n"
            "{%- set mmembed_visual = mmembed_vis.items + ([{'type': 'video'}] if mmembed_ns.n_video else []) -%}\n"
            + visual_first_branch
            + "\n{%- set messages = "
            + system_prefix
            + " + [{'role': 'user', 'content': mmembed_content}] -%}"
        )
    else:
        build = "{%- set messages = " + system_prefix + " + [{'role': 'user', 'content': mmembed_text}] -%}"

    header = (
        "{#- Embedding prompt of mm-embed-trl (prompt template "
        + template.name.replace("#", "")
        + "), generated by mm_embed_trl.export. It rebuilds the messages MultimodalEmbeddingModel.encode renders "
        "(instruction + text/image formats), then runs the backbone's chat template below with "
        "add_generation_prompt=True. Instruction: the system message (sentence-transformers prompt) if any, else "
        "the side chosen by `task`. -#}"
    )
    # Error branches of the template (raise_exception with the offending value).
    fail_content = _fail("only text, image and video content is supported, got a {} item.", "mmembed_c['type']")
    fail_system_image = _fail("a system message (the instruction / prompt) cannot hold an image or a video.")
    fail_role = _fail(
        "each input is one user message (plus an optional system instruction); got a message with role {}. Embed "
        "queries and documents separately (encode_query / encode_document), not as pairs.",
        "mmembed_m['role']",
    )
    fail_messages = _fail("expected exactly one user message and at most one system message per input.")
    fail_counts = _fail(
        "an input holds at most one text and one video, besides its images (as in MultimodalEmbeddingModel.encode); "
        "got {} texts and {} videos.",
        "mmembed_ns.n_text",
        "mmembed_ns.n_video",
    )
    # A template rendered without the chat template places one image token, as render_plain does.
    fail_plain = _fail(
        f"the prompt template {template.name.replace('{', '')} renders without a chat template, which places one "
        "image token: it takes no video and at most one image (got {} images and {} videos).",
        "mmembed_ns.n_image",
        "mmembed_ns.n_video",
    )
    fail_text_only = _fail("this backbone is text-only and cannot embed images.")
    fail_empty = _fail(
        "the input has no image and its text is empty (once image placeholders are removed); "
        "give a non-empty text or an image."
    )
    plain_check = ""
    if multimodal and not template.use_chat_template:
        plain_check = (
            "\n{%- if mmembed_ns.n_image > 1 or mmembed_ns.n_video > 0 -%}\n" + fail_plain + "\n{%- endif -%}"
        )
    preamble = f"""{header}
{{%- set mmembed_ns = namespace(instruction='', text='', n_text=0, n_image=0, n_video=0, n_user=0, n_system=0) -%}}
{{%- for mmembed_m in messages -%}}
{{%- if mmembed_m['content'] is string -%}}
{{%- set mmembed_items = [{{'type': 'text', 'text': mmembed_m['content']}}] -%}}
{{%- else -%}}
{{%- set mmembed_items = mmembed_m['content'] -%}}
{{%- endif -%}}
{{%- set mmembed_acc = namespace(text='', n_text=0, n_image=0, n_video=0) -%}}
{{%- for mmembed_c in mmembed_items -%}}
{{%- if mmembed_c['type'] == 'text' -%}}
{{%- set mmembed_acc.text = mmembed_acc.text + mmembed_c['text'] -%}}
{{%- set mmembed_acc.n_text = mmembed_acc.n_text + 1 -%}}
{{%- elif mmembed_c['type'] == 'image' or 'image' in mmembed_c or 'image_url' in mmembed_c -%}}
{{%- set mmembed_acc.n_image = mmembed_acc.n_image + 1 -%}}
{{%- elif mmembed_c['type'] == 'video' or 'video' in mmembed_c -%}}
{{%- set mmembed_acc.n_video = mmembed_acc.n_video + 1 -%}}
{{%- else -%}}
{fail_content}
{{%- endif -%}}
{{%- endfor -%}}
{{%- if mmembed_m['role'] == 'system' -%}}
{{%- if mmembed_acc.n_image + mmembed_acc.n_video > 0 -%}}
{fail_system_image}
{{%- endif -%}}
{{%- set mmembed_ns.n_system = mmembed_ns.n_system + 1 -%}}
{{%- set mmembed_ns.instruction = mmembed_acc.text -%}}
{{%- elif mmembed_m['role'] == 'user' -%}}
{{%- set mmembed_ns.n_user = mmembed_ns.n_user + 1 -%}}
{{%- set mmembed_ns.text = mmembed_acc.text -%}}
{{%- set mmembed_ns.n_text = mmembed_acc.n_text -%}}
{{%- set mmembed_ns.n_image = mmembed_acc.n_image -%}}
{{%- set mmembed_ns.n_video = mmembed_acc.n_video -%}}
{{%- else -%}}
{fail_role}
{{%- endif -%}}
{{%- endfor -%}}
{{%- if mmembed_ns.n_user != 1 or mmembed_ns.n_system > 1 -%}}
{fail_messages}
{{%- endif -%}}
{{%- if mmembed_ns.n_text > 1 or mmembed_ns.n_video > 1 -%}}
{fail_counts}
{{%- endif -%}}
{{%- if mmembed_ns.n_image + mmembed_ns.n_video > 0 and not {str(multimodal).lower()} -%}}
{fail_text_only}
{{%- endif -%}}
{{%- if mmembed_ns.instruction -%}}
{{%- set mmembed_instruction = mmembed_ns.instruction -%}}
{{%- elif task is defined and task in {doc_tasks} -%}}
{{%- set mmembed_instruction = {_jinja_str(d)} -%}}
{{%- else -%}}
{{%- set mmembed_instruction = {_jinja_str(q)} -%}}
{{%- endif -%}}
{{%- set mmembed_raw = mmembed_ns.text -%}}{_placeholder_stripping_jinja()}
{{%- set mmembed_has_visual = mmembed_ns.n_image + mmembed_ns.n_video > 0 -%}}{plain_check}
{{%- if not mmembed_has_visual and not mmembed_text -%}}
{fail_empty}
{{%- endif -%}}
{{%- if mmembed_has_visual and mmembed_text -%}}
{{%- set mmembed_text = {_jinja_str(template.image_text_format)}.replace('{{text}}', mmembed_text) -%}}
{{%- elif mmembed_has_visual -%}}
{{%- set mmembed_text = {_jinja_str(template.image_format)} -%}}
{{%- else -%}}
{{%- set mmembed_text = {_jinja_str(template.text_format)}.replace('{{text}}', mmembed_text) -%}}
{{%- endif -%}}
{_instruction_placement(template)}
{build}
{_END_OF_PREAMBLE}"""
    # The newline right after the last preamble tag is eaten by trim_blocks, so the base template starts at the
    # beginning of a line exactly as it does on its own (lstrip_blocks behaves the same).
    if multimodal and not template.use_chat_template:
        # The collator's render_plain, with the tokenizer's own special tokens (it tokenises with them).
        token = _jinja_str(image_token or "")
        sep = _jinja_str(template.image_separator)
        image_text = (token + " ~ " + sep + " ~ mmembed_text") if template.image_first else ("mmembed_text ~ " + token)
        body = (
            "{{- " + _jinja_str(special_prefix) + " -}}"
            + "{%- if mmembed_has_visual -%}{{- " + image_text + " -}}{%- else -%}{{- mmembed_text -}}{%- endif -%}"
            + "{{- " + _jinja_str(special_suffix) + " -}}"
        )
    elif base_chat_template:
        body = base_chat_template
        if template.generation_suffix:  # after the generation prompt, as the collator appends it
            body += "{{ " + _jinja_str(template.generation_suffix) + " }}"
    else:
        # A text LM without chat template: the collator tokenises format_text as is, with the tokenizer's own
        # special tokens (BOS/EOS); apply_chat_template adds none, so they are written out here.
        body = _jinja_str(special_prefix) + " ~ mmembed_text ~ " + _jinja_str(special_suffix)
        body = "{{- " + body + " -}}"
    if pooling_token is None:
        return preamble + body
    # Special-token pooling: capture the render and cut it after the last pooling token. `{{ '' }}` before endset
    # keeps lstrip_blocks from eating trailing whitespace of the base template.
    tok = _jinja_str(pooling_token)
    return (
        preamble
        + "{%- set mmembed_rendered %}\n"
        + body
        + "{{ '' }}{% endset -%}\n"
        + f"{{%- set mmembed_at = mmembed_rendered.rfind({tok}) -%}}\n"
        + f"{{%- if mmembed_at >= 0 -%}}{{{{- mmembed_rendered[:mmembed_at + {len(pooling_token)}] -}}}}"
        + "{%- else -%}{{- mmembed_rendered -}}{%- endif -%}"
    )


def recover_base_chat_template(
    chat_template: str,
    template: PromptTemplate,
    *,
    tokenizer,
    multimodal: bool,
    query_instruction: str,
    document_instruction: str,
    pooling_token: str | None = None,
) -> str | None:
    """The backbone's own chat template inside an embedding chat template :func:`build_embedding_chat_template`
    wrote with these arguments (None when the backbone had none): what it wrapped around the base template is
    rebuilt and cut off, so the result is exact.

    Raises:
        ValueError: ``chat_template`` is not such a template (edited, or written with other arguments).
    """
    options = dict(
        multimodal=multimodal, query_instruction=query_instruction, document_instruction=document_instruction,
        pooling_token=pooling_token,
    )
    if not multimodal:  # a text LM without a chat template: the template writes the tokenizer's special tokens
        special_prefix, special_suffix = _special_token_affixes(tokenizer)
        without = build_embedding_chat_template(
            template, None, special_prefix=special_prefix, special_suffix=special_suffix, **options
        )
        if chat_template == without:
            return None
    marker = "\ue001mm-embed-trl base chat template\ue001"
    prefix, suffix = build_embedding_chat_template(template, marker, **options).split(marker)
    if chat_template.startswith(prefix) and chat_template.endswith(suffix) and (
        len(chat_template) > len(prefix) + len(suffix)
    ):
        return chat_template[len(prefix) : len(chat_template) - len(suffix)]
    # Written by an earlier version of this builder (its preamble rebuilt the messages another way, e.g. before
    # videos): the same header, the same end of preamble and the same wrapping around the base template.
    title = prefix[: prefix.index("), generated by")]  # "{#- Embedding prompt of mm-embed-trl (prompt template X"
    after = prefix.partition(_END_OF_PREAMBLE)[2]
    found = chat_template.find(_END_OF_PREAMBLE)
    if chat_template.startswith(title) and found >= 0:
        rest = chat_template[found + len(_END_OF_PREAMBLE) :]
        if rest.startswith(after) and rest.endswith(suffix) and len(rest) > len(after) + len(suffix):
            return rest[len(after) : len(rest) - len(suffix)]
    raise ValueError(
        "this chat template is not the embedding chat template mm-embed-trl writes for the export's settings "
        "(edited, or written by another version)"
    )


def _instruction_placement(template: PromptTemplate) -> str:
    """Jinja placing ``mmembed_instruction``: before the text, or (``instruction_in_system``) as ``mmembed_system``,
    trimmed, with a final ``"."`` when the template punctuates and the last character is no Unicode punctuation."""
    if not template.instruction_in_system:
        return "{%- set mmembed_text = mmembed_instruction + mmembed_text -%}"
    fallback = _jinja_str(template.system_prompt or "")
    lines = ["{%- set mmembed_system = mmembed_instruction | trim -%}"]
    if template.punctuate_instruction:
        lines.append(
            "{%- if mmembed_system and mmembed_system[-1] not in " + _jinja_str(_punctuation()) + " -%}"
            "{%- set mmembed_system = mmembed_system + '.' -%}{%- endif -%}"
        )
    lines.append("{%- if not mmembed_system -%}{%- set mmembed_system = " + fallback + " -%}{%- endif -%}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=1)
def _punctuation() -> str:
    """Every Unicode punctuation character (category P*), as PromptTemplate.system_message tests it."""
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P"))


def _special_token_affixes(tokenizer) -> tuple[str, str]:
    """The special tokens ``tokenizer(text)`` adds before / after the text (e.g. BOS), as strings."""
    probe = "mm embed probe"
    with_special = tokenizer(probe)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    if with_special == plain:
        return "", ""
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix = tokenizer.convert_ids_to_tokens(with_special[:start])
            suffix = tokenizer.convert_ids_to_tokens(with_special[start + len(plain) :])
            return "".join(prefix), "".join(suffix)
    raise ValueError(
        f"Cannot tell which special tokens {type(tokenizer).__name__} adds around a text; give the tokenizer a "
        "chat template before exporting."
    )
