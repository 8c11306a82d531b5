"""Export a :class:`~mm_embed_trl.modeling.MultimodalEmbeddingModel` as a plain sentence-transformers model.

The exported directory loads with ``SentenceTransformer(path)`` — **no** ``trust_remote_code`` — and is built from
sentence-transformers' own modules only::

    0  sentence_transformers.base.modules.Transformer        the bare backbone (AutoModel) + its processor
    1  sentence_transformers.sentence_transformer.modules.Pooling("lasttoken" | "mean")
    2  sentence_transformers.base.modules.Dense               only with ``embedding_dim``: an identity slice
                                                             (exact truncation to the first D features)
    3  sentence_transformers.base.modules.Normalize           only with ``normalize=True``

How the prompts are reproduced
------------------------------
``MultimodalEmbeddingModel.encode`` wraps every input in the model's prompt template
(:mod:`mm_embed_trl.data.templates`, e.g. UniME's ``"{text}\\nSummary above sentence in one word:"``) and then in
the processor's chat template with ``add_generation_prompt=True``. sentence-transformers 6.2 sends every input of a
chat-template backbone — plain strings, PIL images, ``{"image": ..., "text": ...}`` dicts and chat messages alike —
through ``processor.apply_chat_template`` as one ``user`` message (an ST *prompt* becomes a ``system`` message in
front of it). A prefix string can therefore not reproduce our prompts. Instead the export saves an **embedding chat
template** (``chat_template.jinja``): a generated preamble that rebuilds exactly the messages our prompt template
builds, followed by the backbone's original chat template, with the generation prompt always on. Rendering is then
identical in both libraries, and so are the token ids and the vectors (checked to ~1e-6 on every tiny backbone
family by the tests). In the preamble:

* the instruction of the input is, in this order: the ST prompt (the ``system`` message ST adds for ``prompt=`` /
  ``prompt_name=``), else the side's prompt chosen by ST's ``task`` (``"document"`` — set by ``encode_document`` —
  selects ``prompts["document"]``; anything else, or no task, selects ``prompts["query"]``);
* image placeholders in the text (``<|image_1|>``, ``<image>``, an expanded Qwen-VL block, ...) are removed with the
  same whitespace rules as :func:`~mm_embed_trl.data.templates.strip_image_placeholders`;
* the image item and the text item are ordered and separated as the prompt template says, and its ``system_prompt``
  (if any) becomes the system message.

So, for an export of a model whose ``MultimodalEmbeddingModel.encode(x, side=...)`` you want to reproduce::

    st = SentenceTransformer(path)                    # no trust_remote_code
    st.encode_query(x)      == model.encode(x, side="query")       # also st.encode(x) and st.encode(x, task="query")
    st.encode_document(x)   == model.encode(x, side="document")    # also st.encode(x, task="document")
    st.encode(x, prompt_name="query") / st.encode(x, prompt_name="document") select the same instructions
    st.encode(x, prompt="Instruct: ...\\n")         == the template with that instruction as the side's instruction

where ``x`` is a string, a PIL image, a ``{"image": img, "text": str}`` dict or a list of them (mixed batches are
fine). With the built-in templates (``unime``, ``mmeb``, ``ume_r1``, ``plain``) both sides' instructions are empty,
so query and document embeddings coincide unless prompts are given at export time
(``prompts={"query": "Represent the given query: "}``); those prompts become the side instructions of the export.

The exported processor also works without sentence-transformers: ``processor.apply_chat_template(messages,
tokenize=True, return_dict=True, padding=True, return_tensors="pt", task="query")`` followed by the last (or mean)
hidden state of ``AutoModel`` reproduces the embedding (see the generated model card).

Known, explicit differences
---------------------------
* ``special_token`` pooling (UME-R1's discriminative ``<disc_emb>``): sentence-transformers has no token-position
  pooling, but the backbone is causal, so the hidden state at the *last* ``<disc_emb>`` of the prompt depends only on
  the tokens up to it. The embedding chat template therefore ends the rendered prompt right after the last
  occurrence of the pooling token and the export pools the last token — exact, and remote-code-free. (Without the
  token in the prompt our model pools the last token; so does the export.)
* UME-R1's *generative* embedding (hidden state at ``<gen_emb>`` after generating a reasoning) needs ``generate``
  inside the module, which no stock module does. It is not exported. Design for a later custom module: an
  ``InputModule`` subclass (``MMEmbedGenerativeModule`` in ``mm_embed_generative.py`` saved at the model root,
  listed in ``modules.json`` by file name so ``SentenceTransformer(path, trust_remote_code=True)`` imports it) whose
  ``preprocess`` renders the same chat template, whose ``forward`` runs ``generate(max_new_tokens=...)`` on the
  ``AutoModelForImageTextToText`` backbone, re-runs the forward on prompt + completion and writes the hidden state
  at the last ``<gen_emb>`` (last token if absent) to ``features["sentence_embedding"]``, followed by the stock
  ``Normalize``.
* A text containing the private-use character U+E000 is refused (the template uses it internally); messages with
  more than one text item, more than one image, videos, audio or assistant turns are refused with a clear error
  (``MultimodalEmbeddingModel.encode`` takes one text and at most one image per input too).
* sentence-transformers treats a string that is the path of an existing image file (or an image URL) as an
  image; ``MultimodalEmbeddingModel.encode`` treats every string as text. Pass PIL images to either.
* Float32 models agree to ~1e-6; bf16 models to bf16 precision (~1e-3: our model normalises in float32,
  sentence-transformers' ``Normalize`` in the model dtype).
* sentence-transformers truncates inputs longer than the tokenizer's ``model_max_length`` (capped at the
  backbone's ``max_position_embeddings``); ``MultimodalEmbeddingModel.encode`` does not (and its ``max_length``
  truncation of the raw text is not reproduced).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import logging
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._files import make_staging_dir, publish_dir, staged_dir

if TYPE_CHECKING:  # heavy imports stay lazy: `import mm_embed_trl.export` must be cheap
    from ..data.templates import PromptTemplate
    from ..modeling import MultimodalEmbeddingModel

logger = logging.getLogger(__name__)

__all__ = [
    "EXPORT_INFO_FILE",
    "ST_SUBDIR",
    "build_embedding_chat_template",
    "export_sentence_transformers",
    "load_model_for_export",
    "save_for_inference",
]

# The sentence-transformers export written by `save_for_inference` next to the MultimodalEmbeddingModel files.
ST_SUBDIR = "sentence_transformers"
ST_GENERATIVE_SUBDIR = "sentence_transformers_generative"  # UME-R1 models: the generative embedding (remote code)
# Small JSON written into every export: what was exported and how to reproduce the embeddings.
EXPORT_INFO_FILE = "mm_embed_trl_export.json"

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
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Keyword arguments of collect_card_metadata that model_card_data may carry.
_CARD_ARGS = ("training_args", "eval_results", "method", "dataset_name")


# ---------------------------------------------------------------------------------------------------- template
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

    Returns:
        The template source. It declares the ``task`` variable, so sentence-transformers forwards ``task``.
    """
    if multimodal and not base_chat_template:
        raise ValueError(
            "The processor of this vision-language model has no chat template, so MultimodalEmbeddingModel.encode "
            "cannot render prompts either. Set `processor.chat_template` (e.g. from the base model's "
            "chat_template.jinja) before exporting."
        )
    q = template.query_instruction if query_instruction is None else query_instruction
    d = template.document_instruction if document_instruction is None else document_instruction
    doc_tasks = "[" + ", ".join(_jinja_str(t) for t in _DOCUMENT_TASKS) + "]"
    text_item = "{'type': 'text', 'text': %s}"
    # Vision-language processors get structured contents (a list of typed items, as build_messages makes them);
    # text LMs get plain string contents (the collator flattens them before the tokenizer's chat template).
    if template.system_prompt is None:
        system_prefix = "[]"
    elif multimodal:
        system_prefix = "[{'role': 'system', 'content': [" + text_item % _jinja_str(template.system_prompt) + "]}]"
    else:
        system_prefix = "[{'role': 'system', 'content': " + _jinja_str(template.system_prompt) + "}]"
    if multimodal:
        sep = _jinja_str(template.image_separator)
        if template.image_first:
            image_first_branch = (
                "{%- if mmembed_has_image -%}\n"
                "{%- if mmembed_text -%}\n"
                "{%- set mmembed_content = [{'type': 'image'}, " + text_item % f"{sep} + mmembed_text" + "] -%}\n"
                "{%- else -%}{%- set mmembed_content = [{'type': 'image'}] -%}{%- endif -%}\n"
                "{%- else -%}\n"
                "{%- set mmembed_content = [" + text_item % "mmembed_text" + "] -%}\n"
                "{%- endif -%}"
            )
        else:
            image_first_branch = (
                "{%- set mmembed_content = ([" + text_item % "mmembed_text" + "] if mmembed_text else []) "
                "+ ([{'type': 'image'}] if mmembed_has_image else []) -%}"
            )
        build = (
            image_first_branch
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
    fail_content = _fail("only text and image content is supported, got a {} item.", "mmembed_c['type']")
    fail_system_image = _fail("a system message (the instruction / prompt) cannot hold an image.")
    fail_role = _fail(
        "each input is one user message (plus an optional system instruction); got a message with role {}. Embed "
        "queries and documents separately (encode_query / encode_document), not as pairs.",
        "mmembed_m['role']",
    )
    fail_messages = _fail("expected exactly one user message and at most one system message per input.")
    fail_counts = _fail(
        "an input holds at most one text and one image (as in MultimodalEmbeddingModel.encode); "
        "got {} texts and {} images.",
        "mmembed_ns.n_text",
        "mmembed_ns.n_image",
    )
    fail_text_only = _fail("this backbone is text-only and cannot embed images.")
    fail_empty = _fail(
        "the input has no image and its text is empty (once image placeholders are removed); "
        "give a non-empty text or an image."
    )
    preamble = f"""{header}
{{%- set mmembed_ns = namespace(instruction='', text='', n_text=0, n_image=0, n_user=0, n_system=0) -%}}
{{%- for mmembed_m in messages -%}}
{{%- if mmembed_m['content'] is string -%}}
{{%- set mmembed_items = [{{'type': 'text', 'text': mmembed_m['content']}}] -%}}
{{%- else -%}}
{{%- set mmembed_items = mmembed_m['content'] -%}}
{{%- endif -%}}
{{%- set mmembed_acc = namespace(text='', n_text=0, n_image=0) -%}}
{{%- for mmembed_c in mmembed_items -%}}
{{%- if mmembed_c['type'] == 'text' -%}}
{{%- set mmembed_acc.text = mmembed_acc.text + mmembed_c['text'] -%}}
{{%- set mmembed_acc.n_text = mmembed_acc.n_text + 1 -%}}
{{%- elif mmembed_c['type'] == 'image' or 'image' in mmembed_c or 'image_url' in mmembed_c -%}}
{{%- set mmembed_acc.n_image = mmembed_acc.n_image + 1 -%}}
{{%- else -%}}
{fail_content}
{{%- endif -%}}
{{%- endfor -%}}
{{%- if mmembed_m['role'] == 'system' -%}}
{{%- if mmembed_acc.n_image > 0 -%}}
{fail_system_image}
{{%- endif -%}}
{{%- set mmembed_ns.n_system = mmembed_ns.n_system + 1 -%}}
{{%- set mmembed_ns.instruction = mmembed_acc.text -%}}
{{%- elif mmembed_m['role'] == 'user' -%}}
{{%- set mmembed_ns.n_user = mmembed_ns.n_user + 1 -%}}
{{%- set mmembed_ns.text = mmembed_acc.text -%}}
{{%- set mmembed_ns.n_text = mmembed_acc.n_text -%}}
{{%- set mmembed_ns.n_image = mmembed_acc.n_image -%}}
{{%- else -%}}
{fail_role}
{{%- endif -%}}
{{%- endfor -%}}
{{%- if mmembed_ns.n_user != 1 or mmembed_ns.n_system > 1 -%}}
{fail_messages}
{{%- endif -%}}
{{%- if mmembed_ns.n_text > 1 or mmembed_ns.n_image > 1 -%}}
{fail_counts}
{{%- endif -%}}
{{%- if mmembed_ns.n_image > 0 and not {str(multimodal).lower()} -%}}
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
{{%- set mmembed_has_image = mmembed_ns.n_image > 0 -%}}
{{%- if not mmembed_has_image and not mmembed_text -%}}
{fail_empty}
{{%- endif -%}}
{{%- if mmembed_has_image and mmembed_text -%}}
{{%- set mmembed_text = {_jinja_str(template.image_text_format)}.replace('{{text}}', mmembed_text) -%}}
{{%- elif mmembed_has_image -%}}
{{%- set mmembed_text = {_jinja_str(template.image_format)} -%}}
{{%- else -%}}
{{%- set mmembed_text = {_jinja_str(template.text_format)}.replace('{{text}}', mmembed_text) -%}}
{{%- endif -%}}
{{%- set mmembed_text = mmembed_instruction + mmembed_text -%}}
{build}
{{%- set add_generation_prompt = true %}}
"""
    # The newline right after the last preamble tag is eaten by trim_blocks, so the base template starts at the
    # beginning of a line exactly as it does on its own (lstrip_blocks behaves the same).
    if base_chat_template:
        body = base_chat_template
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


# ---------------------------------------------------------------------------------------------------- loading
def _looks_like_weights(path: pathlib.Path) -> bool:
    return path.is_file() and path.name.endswith(_WEIGHT_SUFFIXES)


def load_model_for_export(
    model_or_path: MultimodalEmbeddingModel | str | os.PathLike, **kwargs
) -> MultimodalEmbeddingModel:
    """Return the model to export: the instance itself, or a saved ``MultimodalEmbeddingModel`` loaded from a directory.

    Raises clear errors for a path that does not exist, is not a directory, holds no ``config.json`` or weights, is
    not a ``MultimodalEmbeddingModel`` (a plain backbone, a sentence-transformers export, ...) or has no processor.
    """
    from ..modeling import MultimodalEmbeddingModel

    if isinstance(model_or_path, MultimodalEmbeddingModel):
        model = model_or_path
    elif isinstance(model_or_path, (str, os.PathLike)):
        path = pathlib.Path(model_or_path).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"Checkpoint {str(path)!r} does not exist. Pass the output_dir of a training run (or a directory "
                "written by MultimodalEmbeddingModel.save_pretrained)."
            )
        if not path.is_dir():
            raise NotADirectoryError(f"Checkpoint {str(path)!r} is a file; pass the directory that holds config.json.")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{str(path)!r} is not a trained model: it has no config.json. Pass the output_dir of a training "
                "run (or of MultimodalEmbeddingModel.save_pretrained)."
            )
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except json.JSONDecodeError as err:
            raise ValueError(f"{str(config_file)!r} is not valid JSON ({err}); the checkpoint is damaged.") from err
        if model_type != "mm_embedding":
            hint = (
                " It looks like a sentence-transformers export already (modules.json is present)."
                if (path / "modules.json").is_file()
                else " To export an untrained backbone as a baseline, wrap it first: "
                "`MultimodalEmbeddingModel.from_pretrained(path)` and pass that model instance."
            )
            raise ValueError(
                f"{str(path)!r} is not a trained MultimodalEmbeddingModel (config.json has model_type="
                f"{model_type!r}, expected 'mm_embedding').{hint}"
            )
        if not any(_looks_like_weights(p) for p in path.iterdir()):
            raise ValueError(
                f"{str(path)!r} has a config.json but no weights (*.safetensors); the save did not complete. "
                "Re-run save_pretrained / the end of training."
            )
        model = MultimodalEmbeddingModel.from_pretrained(path, **kwargs)
    else:
        raise TypeError(
            f"model_or_path must be a MultimodalEmbeddingModel or a directory path, got {type(model_or_path).__name__}."
        )
    if model.processor is None:
        where = f" at {str(model_or_path)!r}" if not isinstance(model_or_path, MultimodalEmbeddingModel) else ""
        raise ValueError(
            f"The model{where} has no processor (tokenizer / image processor files are missing), so its prompts "
            "cannot be exported. Save the base model's processor next to the weights "
            "(`AutoProcessor.from_pretrained(base).save_pretrained(dir)`) or call model.set_processor(...) first."
        )
    return model


def _bare_backbone(model: MultimodalEmbeddingModel):
    """The backbone without LM head (what `AutoModel` loads and sentence-transformers' Transformer runs)."""
    base = model.backbone
    # Same rule as MultimodalEmbeddingModel's forward: generative backbones embed with their inner base model.
    return base.model if hasattr(base, "lm_head") and hasattr(base, "model") else base


def _resolve_prompts(template: PromptTemplate, prompts: Mapping[str, str] | None) -> dict[str, str]:
    resolved = {"query": template.query_instruction, "document": template.document_instruction}
    for name, value in (prompts or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise TypeError(f"prompts must map names to strings; got {name!r}: {type(value).__name__}.")
        resolved[name] = value
    return resolved


def _refuse_overlap_with_source(source: str | os.PathLike, output_dir: pathlib.Path) -> None:
    """An export that is, contains or lies inside the checkpoint it reads would replace (delete) that checkpoint."""
    source_dir = pathlib.Path(source).expanduser().resolve()
    target = output_dir.resolve()
    if target == source_dir or target in source_dir.parents or source_dir in target.parents:
        raise ValueError(
            f"output_dir {str(output_dir)!r} overlaps the checkpoint being exported ({str(source_dir)!r}): writing "
            "the export there would replace the run it is made from. Choose an output_dir outside the checkpoint "
            "(e.g. a sibling such as <run>-st)."
        )


def _prepare_output_dir(output_dir: pathlib.Path, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"output_dir {str(output_dir)!r} exists and is a file.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"output_dir {str(output_dir)!r} is not empty; pass overwrite=True (CLI: --overwrite) or another directory."
        )


# ---------------------------------------------------------------------------------------------------- export
def export_sentence_transformers(
    model_or_path: MultimodalEmbeddingModel | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a sentence-transformers model directory that embeds exactly like ``model.encode``.

    Args:
        model_or_path: a ``MultimodalEmbeddingModel`` or the directory of a saved one (a training run's
            ``output_dir``). LoRA adapters are merged into a copy; the caller's model is never modified.
        output_dir: directory to write (must be empty or absent unless ``overwrite``). Written to a temporary
            sibling first and renamed into place, so a failed export leaves nothing half-written. It may not be,
            contain or lie inside the checkpoint directory being exported.
        prompts: ST prompts; ``"query"`` / ``"document"`` are the side instructions (default: the prompt template's
            own, ``""`` for the built-in templates). Other names are extra instructions usable with
            ``prompt_name=``. Saved in ``config_sentence_transformers.json``.
        default_prompt_name: ST's default prompt for ``encode`` (``None``: ``encode`` without a prompt uses the query
            side anyway, see the module docstring).
        model_card_data: extra model card metadata, merged over
            :func:`~mm_embed_trl.export.model_card.collect_card_metadata`
            (keys ``training_args``, ``eval_results``, ``method``, ``dataset_name`` are passed to it; anything else,
            e.g. ``license``, ``model_name``, ``repo_id``, ``language``, ``tags``, overrides the collected values).
        overwrite: replace a non-empty ``output_dir``.

    Returns:
        The path of the export.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from ..data.templates import get_template
    from .model_card import collect_card_metadata, render_model_card

    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    if isinstance(model_or_path, (str, os.PathLike)):
        _refuse_overlap_with_source(model_or_path, output_dir)
    _prepare_output_dir(output_dir, overwrite)
    model = load_model_for_export(model_or_path)
    owned = model is not model_or_path
    config = model.config
    template = get_template(config.prompt_template)
    resolved_prompts = _resolve_prompts(template, prompts)
    if default_prompt_name is not None and default_prompt_name not in resolved_prompts:
        raise ValueError(
            f"default_prompt_name={default_prompt_name!r} is not one of the prompts {sorted(resolved_prompts)}; "
            "add it to `prompts` or leave it None."
        )
    if config.embedding_dim is not None and not 0 < int(config.embedding_dim) <= config.hidden_size:
        raise ValueError(
            f"config.embedding_dim={config.embedding_dim} must be in [1, {config.hidden_size}] (the hidden size)."
        )

    processor = copy.deepcopy(model.processor)
    tokenizer = getattr(processor, "tokenizer", processor)
    multimodal = hasattr(processor, "image_processor")
    base_template = processor.chat_template if multimodal else getattr(tokenizer, "chat_template", None)
    if isinstance(base_template, dict):  # named templates: the collator renders the default one
        base_template = base_template.get("default")
    pooling_token = None
    if config.pooling == "special_token":
        pooling_token = config.pooling_token or tokenizer.convert_ids_to_tokens(int(config.pooling_token_id))
    prefix, suffix = ("", "") if base_template else _special_token_affixes(tokenizer)
    chat_template = build_embedding_chat_template(
        template,
        base_template,
        multimodal=multimodal,
        query_instruction=resolved_prompts["query"],
        document_instruction=resolved_prompts["document"],
        pooling_token=pooling_token,
        special_prefix=prefix,
        special_suffix=suffix,
    )
    processor.chat_template = chat_template
    if tokenizer is not processor:
        tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"  # as the collator pads; Pooling("lasttoken") handles either side anyway

    info = {
        "format": "mm_embed_trl.sentence_transformers",
        "prompt_template": template.name,
        "pooling": config.pooling,
        "pooling_token": pooling_token,
        "normalize": bool(config.normalize),
        "embedding_dim": config.embedding_dim,
        "encoder_kind": config.encoder_kind,
        "prompts": resolved_prompts,
        "default_prompt_name": default_prompt_name,
    }
    card_kwargs = dict(model_card_data or {})
    metadata = collect_card_metadata(
        model,
        **{k: card_kwargs.pop(k) for k in _CARD_ARGS if k in card_kwargs},
        export_info=info,
    )
    metadata["model_reference"] = str(output_dir)
    metadata.update(card_kwargs)
    card = render_model_card(metadata)
    # push_to_hub rewrites this reference in the card's snippets to the repo id (even if the folder was moved).
    info["card_model_reference"] = metadata.get("repo_id") or metadata["model_reference"]

    with staged_dir(output_dir, what="the sentence-transformers export") as staging:
        backbone_dir, final_dir = staging / "backbone", staging / "export"
        with _merged(model, owned) as merged:
            _bare_backbone(merged).save_pretrained(backbone_dir, safe_serialization=True)
        processor.save_pretrained(backbone_dir)
        del model  # a checkpoint loaded here is ours: free it before sentence-transformers loads its own copy
        # Loading through sentence-transformers (rather than writing its JSON by hand) lets ST infer the modality
        # config and write every file in its own current format. unpad_inputs=False: Qwen-VL rope needs padding.
        transformer = Transformer(str(backbone_dir), unpad_inputs=False)
        hidden = transformer.get_embedding_dimension()
        modules: list[torch.nn.Module] = [
            transformer,
            Pooling(hidden, pooling_mode="mean" if config.pooling == "mean" else "lasttoken"),
        ]
        if config.embedding_dim is not None:
            # An identity slice keeps exactly the first `dim` features, in a stock module. (ST's truncate_dim would
            # act after Normalize; our model truncates first and normalises the truncated vector.)
            dim = int(config.embedding_dim)
            eye = torch.eye(dim, hidden, dtype=transformer.model.dtype)
            modules.append(Dense(hidden, dim, bias=False, activation_function=torch.nn.Identity(), init_weight=eye))
        if config.normalize:
            modules.append(Normalize())
        st_model = SentenceTransformer(
            modules=modules,
            prompts=resolved_prompts,
            default_prompt_name=default_prompt_name,
            similarity_fn_name="cosine",
            device="cpu",
        )
        st_model.save(str(final_dir), create_model_card=False)
        del st_model, transformer, modules
        (final_dir / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        (final_dir / "README.md").write_text(card, encoding="utf-8")
        publish_dir(final_dir, output_dir)
    logger.info("Exported a sentence-transformers model to %s", output_dir)
    return output_dir


@contextlib.contextmanager
def _merged(model: MultimodalEmbeddingModel, owned: bool):
    """``model`` with LoRA adapters merged: itself when it has none or is ours to modify, else a merged copy."""
    if not model.has_lora:
        yield model
        return
    target = model if owned else copy.deepcopy(model)
    target.merge_lora()
    try:
        yield target
    finally:
        del target


def save_model_files(model: MultimodalEmbeddingModel, output_dir: pathlib.Path) -> None:
    """``model.save_pretrained(output_dir)``, written to a staging folder and renamed in file by file.

    Why: the model may have been loaded from ``output_dir`` itself (a trainer reloading its final save), and its
    tensors may still be memory-mapped from those files; truncating them in place would corrupt the model. A rename
    replaces the directory entry while the old, mapped file lives on until it is released. Other files already in
    ``output_dir`` (trainer state, reports) are kept.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = make_staging_dir(output_dir / "model", tag="save")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        written = {p.name for p in staging.iterdir()}
        if any(name.endswith(".safetensors") for name in written):
            # A previous save may have used other shard names: stale shards would confuse the index.
            for old in output_dir.glob("model*.safetensors"):
                if old.name not in written:
                    old.unlink()
        for path in staging.iterdir():
            target = output_dir / path.name
            if target.is_dir() and path.is_dir():
                shutil.rmtree(target)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# What a final save writes (or an earlier one may have written): a new save replaces all of it, so an old model's
# weights, card or export never sit beside the new config. Everything else in the folder (checkpoint-*, trainer
# state, reports, logs) is the run's and is kept. Hidden entries are staging leftovers of this package.
_MODEL_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*",
    "adapter_*",
    "README.md",
    EXPORT_INFO_FILE,
    ST_SUBDIR,
    ST_GENERATIVE_SUBDIR,
    "tokenizer*",
    "vocab*",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "*processor_config.json",
    "preprocessor_config.json",
    "chat_template.*",
    "*.model",
    ".*",
)


def is_run_state(name: str) -> bool:
    """Whether the entry ``name`` of a run folder survives a new final save (see ``_MODEL_FILE_PATTERNS``)."""
    return not any(fnmatch.fnmatch(name, pattern) for pattern in _MODEL_FILE_PATTERNS)


def write_inference_extras(
    model: MultimodalEmbeddingModel,
    directory: pathlib.Path,
    *,
    published_as: pathlib.Path,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
) -> None:
    """Next to the model saved in ``directory`` (a staging folder that will be published as ``published_as``, the
    path the cards' snippets name): its sentence-transformers export in ``ST_SUBDIR``, the model card and the
    export info. A UME-R1 model (a generative pooling token and an LM head) also gets its generative export in
    ``ST_GENERATIVE_SUBDIR`` (a custom module: ``trust_remote_code=True``), with ``generation`` as its settings."""
    from .model_card import collect_card_metadata, render_model_card

    st_dir = export_sentence_transformers(
        model,
        directory / ST_SUBDIR,
        prompts=prompts,
        default_prompt_name=default_prompt_name,
        model_card_data={"model_reference": str(published_as / ST_SUBDIR), **(model_card_data or {})},
        overwrite=True,
    )
    card_kwargs = dict(model_card_data or {})
    info = json.loads((st_dir / EXPORT_INFO_FILE).read_text())
    metadata = collect_card_metadata(
        model,
        **{k: card_kwargs.pop(k) for k in _CARD_ARGS if k in card_kwargs},
        export_info=info,
        sentence_transformers_subdir=ST_SUBDIR,
    )
    metadata["model_reference"] = str(published_as)
    metadata.update(card_kwargs)
    (directory / "README.md").write_text(render_model_card(metadata), encoding="utf-8")
    root_info = {
        "format": "mm_embed_trl.mm_embedding",
        "sentence_transformers_subdir": ST_SUBDIR,
        **_write_generative_export(model, directory, generation),
        "card_model_reference": metadata.get("repo_id") or metadata["model_reference"],
    }
    (directory / EXPORT_INFO_FILE).write_text(json.dumps(root_info, indent=2, sort_keys=True) + "\n")


def _write_generative_export(model, directory: pathlib.Path, generation) -> dict[str, str]:
    if model.config.generative_pooling_token is None or model.lm_head is None:
        return {}
    from .generative import export_generative_sentence_transformers

    target = directory / ST_GENERATIVE_SUBDIR
    export_generative_sentence_transformers(model, target, generation=generation, overwrite=True)
    return {"sentence_transformers_generative_subdir": ST_GENERATIVE_SUBDIR}


def save_for_inference(
    model: MultimodalEmbeddingModel,
    output_dir: str | os.PathLike,
    *,
    prompts: Mapping[str, str] | None = None,
    default_prompt_name: str | None = None,
    model_card_data: Mapping[str, Any] | None = None,
    merge_lora: bool = False,
) -> pathlib.Path:
    """Write the final artefacts of a training run: the model itself and a sentence-transformers export.

    ``output_dir`` receives ``model.save_pretrained`` (loadable with ``MultimodalEmbeddingModel.from_pretrained``) and
    ``output_dir/sentence_transformers/`` the export of :func:`export_sentence_transformers` (loadable with
    ``SentenceTransformer`` and plain transformers). The model card (README.md) is written to both.

    Everything is written to a staging folder beside ``output_dir`` and published in one rename: a kill at any point
    leaves the previous model or the new one, never a mix. The rest of ``output_dir`` (checkpoints, trainer state,
    reports) is kept.

    Args:
        merge_lora: merge LoRA adapters into ``model`` in place first (no extra copy of the weights in memory; the
            model is modified). Otherwise the adapters are saved as they are and the export merges a copy.
    """
    from ..modeling import MultimodalEmbeddingModel

    if not isinstance(model, MultimodalEmbeddingModel):
        raise TypeError(f"save_for_inference expects a MultimodalEmbeddingModel, got {type(model).__name__}.")
    if model.processor is None:
        raise ValueError(
            "The model has no processor attached; call model.set_processor(AutoProcessor.from_pretrained(base)) "
            "before saving, or the saved model cannot encode."
        )
    output_dir = pathlib.Path(output_dir).expanduser().absolute()
    if merge_lora and model.has_lora:
        model.merge_lora()
    with staged_dir(output_dir, what="the final model") as staging:
        model.save_pretrained(staging, safe_serialization=True)
        write_inference_extras(
            model,
            staging,
            published_as=output_dir,
            prompts=prompts,
            default_prompt_name=default_prompt_name,
            model_card_data=model_card_data,
        )
        publish_dir(staging, output_dir, keep_existing=is_run_state)
    return output_dir
