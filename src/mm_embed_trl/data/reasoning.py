"""UME-R1 reasoning rows: prompt + completion batches with labels on the completion only, and the SFT JSON converter.

Each side of a row becomes one sequence laid out exactly as generation lays it out::

    [pad ... pad | system + user turn (image, text, <disc_emb>, instruction) + assistant header | completion | pad ...]
     left-padded prompt (one processor call, as for plain embedding)              right-padded completion

The completion is the side's reasoning target ``<think>...</think><answer>...</answer><gen_emb>`` followed by the
chat template's end of the assistant turn (``<|im_end|>\\n`` for Qwen). ``labels`` hold the completion's token ids
(``-100`` on the prompt and on padding), ``completion_start`` the first completion position: the discriminative
embedding is read at the last ``<disc_emb>`` before it, the generative one at the last ``<gen_emb>`` after it (the
instruction in the prompt holds a ``<gen_emb>`` of its own, which must never count). Because
:meth:`MultimodalEmbeddingModel.encode` builds its generative batches the same way after ``generate``
(:func:`append_completions`), the teacher-forced state of training and the state read at inference are the same
function of the same tokens.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .collators import EmbeddingCollator, _content_id, _describe_row
from .images import has_image, image_size, max_image_tokens
from .schema import (
    POS_IMAGE,
    POS_REASONING,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_REASONING,
    QUERY_TEXT,
    ROW_INDEX_COLUMN,
    VIDEO_COLUMNS,
    EmbeddingInput,
    is_missing,
)
from .templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN, UME_R1_FORMAT, PromptTemplate
from .ume_r1_json import load_ume_r1_sft_json  # noqa: F401  (imported from here since the first release)
from .videos import video_sampling

__all__ = [
    "UME_R1_FORMAT",
    "ReasoningCollator",
    "append_completions",
    "embedding_token_ids",
    "follows_format",
    "format_reasoning",
    "load_ume_r1_sft_json",
]


# Stand-in assistant text used once per collator to learn what the chat template writes around an assistant turn.
_PROBE = "<think>x</think><answer>y</answer>"
# Tokens a tokenizer may add beyond one per UTF-8 byte of a text: BOS/EOS, SentencePiece's dummy prefix.
_SPECIAL_TOKEN_SLACK = 8
# side -> (text, image, reasoning target) columns, and the prompt side the template gives it
_SIDES = {
    "query": (QUERY_TEXT, QUERY_IMAGE, QUERY_REASONING, "query"),
    "positive": (POS_TEXT, POS_IMAGE, POS_REASONING, "document"),
}


def format_reasoning(think: str, answer: str) -> str:
    """A reasoning target in UME-R1's format: ``<think>{think}</think><answer>{answer}</answer><gen_emb>``."""
    return f"<think>{think}</think><answer>{answer}</answer>{GEN_EMB_TOKEN}"


def follows_format(text: str) -> bool:
    """Whether a completion follows UME-R1's format (``UME_R1_FORMAT`` found in it, as UME-R1's reward checks)."""
    return UME_R1_FORMAT.search(text) is not None


def embedding_token_ids(tokenizer, tokens: Sequence[str] = (DISC_EMB_TOKEN, GEN_EMB_TOKEN)) -> list[int]:
    """The ids of UME-R1's embedding tokens, each one token of the vocabulary; a clear error otherwise."""
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        if token_id is None or token_id == tokenizer.unk_token_id or pieces != [token_id]:
            raise ValueError(
                f"The tokenizer has no single token {token!r} (it encodes as {pieces}). Add UME-R1's tokens first: "
                "mm_embed_trl.modeling.add_embedding_tokens(model, processor) (EmbeddingSFTTrainer does it)."
            )
        ids.append(int(token_id))
    return ids


def append_completions(
    prompt: Mapping[str, Any], completions: Sequence[Sequence[int]], pad_token_id: int, *, with_labels: bool = False
) -> dict[str, Any]:
    """Left-padded prompt batch + right-padded completion ids -> one batch, as after ``generate``.

    Adds ``completion_start`` (the prompt width: every completion starts there) and, with ``with_labels``, ``labels``
    (the completion ids; ``-100`` on the prompt and padding). ``mm_token_type_ids`` is extended with zeros; image
    tensors are kept as they are (the images sit in the prompt).
    """
    ids = prompt["input_ids"]
    rows, width = ids.shape
    if len(completions) != rows:
        raise ValueError(f"{len(completions)} completions for {rows} prompts.")
    longest = max((len(c) for c in completions), default=0)
    tail = torch.full((rows, longest), pad_token_id, dtype=ids.dtype)
    tail_mask = torch.zeros((rows, longest), dtype=prompt["attention_mask"].dtype)
    lengths = torch.tensor([len(c) for c in completions])
    filled = torch.arange(longest) < lengths[:, None]
    if longest:
        tail[filled] = torch.tensor([t for c in completions for t in c], dtype=ids.dtype)
        tail_mask[filled] = 1
    out = dict(prompt)
    out["input_ids"] = torch.cat([ids, tail], dim=1)
    out["attention_mask"] = torch.cat([prompt["attention_mask"], tail_mask], dim=1)
    if "mm_token_type_ids" in prompt:
        types = prompt["mm_token_type_ids"]
        out["mm_token_type_ids"] = torch.cat([types, types.new_zeros((rows, longest))], dim=1)
    out["completion_start"] = torch.full((rows,), width, dtype=torch.long)
    if with_labels:
        labels = torch.full_like(out["input_ids"], -100)
        labels[:, width:] = torch.where(filled, tail, torch.full_like(tail, -100))
        out["labels"] = labels
    return out


class ReasoningCollator(EmbeddingCollator):
    """UME-R1 reasoning SFT batches: per side, the embedding prompt and its reasoning target, labels on the target.

    Returns ``{"query": enc, "positive": enc, "positive_ids": (B,)}`` where each ``enc`` is the prompt batch of
    :meth:`EmbeddingCollator.encode_inputs` (one processor call, left padding; the ``ume_r1`` template puts
    ``<disc_emb>`` and the instruction after the input) followed by the right-padded completion, with ``labels`` and
    ``completion_start`` (see the module docstring). Rows need ``qry_reasoning`` and ``pos_reasoning``.

    Args:
        processor, template, image_root: as for :class:`EmbeddingCollator` (``template`` defaults to ``"ume_r1"``).
        max_length: the longest sequence (prompt + completion, in tokens) a row may have (the trainer's
            ``max_sequence_length``). A row beyond it is an error naming the row: cutting it would cut ``<gen_emb>``
            off the target (UME-R1 truncates silently). The trainer finds such rows before training
            (:func:`~mm_embed_trl.data.validation.check_reasoning_lengths`, from :meth:`sequence_lengths`).
        max_text_length: text tokens kept from each input's raw text (the prompt's instruction is never cut).
        check_format: require each target to contain ``<gen_emb>``, and each prompt ``<disc_emb>``.
    """

    def __init__(
        self,
        processor,
        template: str | PromptTemplate = "ume_r1",
        *,
        image_root: str | os.PathLike | None = None,
        max_length: int | None = None,
        max_text_length: int | None = None,
        check_format: bool = True,
    ):
        super().__init__(processor, template, image_root=image_root, max_length=max_text_length, num_negatives=0)
        self.max_sequence_length = max_length
        self.check_format = check_format
        self.disc_token_id, self.gen_token_id = embedding_token_ids(self.tokenizer)
        self._turn_end = self._assistant_turn_end()
        self._fixed_prompt_bytes: dict[str, int] = {}

    def _assistant_turn_end(self) -> str:
        """What the chat template writes after an assistant message (``<|im_end|>\\n``). Training sequences are
        prompt-with-generation-prompt + completion + this, the tokens generation produces, even where the template
        renders a whole assistant turn otherwise (LLaVA-OneVision writes ``assistant \\n`` there, ``assistant\\n`` as
        its generation prompt)."""
        user = [{"role": "user", "content": [{"type": "text", "text": "q"}]}]
        full = user + [{"role": "assistant", "content": [{"type": "text", "text": _PROBE}]}]
        if self.is_multimodal:
            render = self.processor.apply_chat_template
        else:
            render = self.tokenizer.apply_chat_template
            user = [{"role": "user", "content": "q"}]
            full = user + [{"role": "assistant", "content": _PROBE}]
        prompt = render(user, add_generation_prompt=True, tokenize=False)
        whole = render(full, tokenize=False)
        if _PROBE not in whole:
            raise ValueError(
                "The processor's chat template does not render an assistant message after the user turn (got "
                f"{whole!r} for prompt {prompt!r}); reasoning SFT needs a chat template with assistant turns."
            )
        return whole[whole.rindex(_PROBE) + len(_PROBE) :]

    def completion_ids(self, targets: Sequence[str]) -> list[list[int]]:
        """The token ids of each target as the model is trained to write it: the target, then the end of the turn."""
        return self.tokenizer([t + self._turn_end for t in targets], add_special_tokens=False)["input_ids"]

    def encode_side(self, inputs, targets: Sequence[str], side: str, labels_for: Sequence[str]) -> dict[str, Any]:
        """One side: the prompt batch (one processor call) + the tokenized targets, with labels."""
        prompt = self.encode_inputs(inputs, side=side)
        completions = self.completion_ids(targets)
        ids = prompt["input_ids"]
        if self.check_format:
            missing = [i for i, c in enumerate(completions) if self.gen_token_id not in c]
            if missing:
                raise ValueError(
                    f"{labels_for[missing[0]]}: the reasoning target has no {GEN_EMB_TOKEN} "
                    f"({targets[missing[0]][:80]!r}); UME-R1 targets read <think>...</think><answer>...</answer>"
                    f"{GEN_EMB_TOKEN}. Fix the data, or build targets with "
                    "mm_embed_trl.data.reasoning.format_reasoning."
                )
            no_disc = (~(ids == self.disc_token_id).any(dim=1)).nonzero().flatten().tolist()
            if no_disc:
                raise ValueError(
                    f"{labels_for[no_disc[0]]}: the prompt has no {DISC_EMB_TOKEN}, so there is no discriminative "
                    "embedding to read; use the 'ume_r1' prompt template "
                    f"(or one whose formats contain {DISC_EMB_TOKEN})."
                )
        if self.max_sequence_length is not None:
            prompt_lengths = prompt["attention_mask"].sum(dim=1).tolist()
            over = [i for i, c in enumerate(completions) if prompt_lengths[i] + len(c) > self.max_sequence_length]
            if over:
                i = over[0]
                raise ValueError(
                    f"{labels_for[i]} needs {prompt_lengths[i] + len(completions[i])} tokens ({prompt_lengths[i]} of "
                    f"prompt, {len(completions[i])} of reasoning target) but max_sequence_length is "
                    f"{self.max_sequence_length}; cutting it would drop {GEN_EMB_TOKEN}. Raise max_sequence_length "
                    "(--max_sequence_length), shorten the reasoning, lower image_max_pixels, or filter the row out "
                    "(--on_bad_row skip leaves such rows out before training)."
                )
        return append_completions(prompt, completions, self.tokenizer.pad_token_id, with_labels=True)

    # ------------------------------------------------------------------ lengths without batches
    def sequence_lengths(self, rows) -> dict[str, np.ndarray]:
        """Per side (``"query"``, ``"positive"``), the tokens of each row's sequence (prompt + reasoning target) in
        this collator's batches, without building them. Exact wherever the row could exceed ``max_sequence_length``;
        elsewhere a bound within it. Three steps, each only for the rows the one before cannot settle:

        1. a bound from byte counts, no tokenizer (a token spans at least one UTF-8 byte): the prompt's fixed
           part, the text and the target, an image at the processor's pixel budget
           (:func:`~mm_embed_trl.data.images.max_image_tokens`);
        2. texts and targets tokenized in batches as the collator does (:meth:`prompt_lengths`,
           :meth:`completion_ids`), an image still at its budget;
        3. the image's own token count, from its size read from its header (:meth:`image_token_counts`).

        A processor without a pixel budget (LLaVA-OneVision's tiles) leaves steps 1 and 2 no bound for an image:
        each image is then read (its header only). A side with a video or several images is measured by building
        its prompt (:meth:`exact_prompt_lengths`): its frames are loaded once, before training.

        ``rows``: a ``pyarrow.Table`` of rows that passed the reasoning row contract.
        """
        import pyarrow as pa

        table = rows if isinstance(rows, pa.Table) else pa.table(rows)
        out = {}
        for side in _SIDES:
            visual = self._video_or_image_list(table, side)
            if not visual.any():
                out[side] = self._bounded_lengths(table, side)
                continue
            # a video or several images: measured whole; the bounds read one image per row
            rest = table.filter(pa.array(~visual))
            image_col = _SIDES[side][1]
            if image_col in rest.column_names and pa.types.is_list(rest.schema.field(image_col).type):
                rest = rest.drop_columns([image_col])  # the rows left have no image (lists of images are measured)
            lengths = np.zeros(table.num_rows, dtype=np.int64)
            lengths[~visual] = self._bounded_lengths(rest, side)
            lengths[visual] = self.exact_prompt_lengths(table.filter(pa.array(visual)), side)
            out[side] = lengths
        return out

    def _bounded_lengths(self, table, side: str) -> np.ndarray:
        """:meth:`sequence_lengths` of one side for rows with at most one image each (the three steps)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from .validation import as_array, present_mask

        n = table.num_rows
        limit = self.max_sequence_length
        budget = max_image_tokens(self.processor)
        text_col, image_col, target_col, prompt_side = _SIDES[side]

        def column(name):
            return as_array(table[name]) if name in table.column_names else pa.nulls(n, pa.string())

        def byte_lengths(array):
            return pc.binary_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)

        # A template that gives text-only inputs a white square (ume_r1_blank_image) adds its tokens to those rows:
        # its size is known, so its count is exact.
        blank_size = self.template.text_only_image_size if self.is_multimodal else None
        blank_tokens = self.image_token_counts([(blank_size, blank_size)])[0] if blank_size is not None else 0

        with_image = present_mask(column(image_col))
        with_blank = ~with_image if blank_size is not None else np.zeros(n, dtype=bool)
        fixed = self._prompt_bytes(prompt_side) + len(self._turn_end.encode("utf-8")) + _SPECIAL_TOKEN_SLACK
        lengths = fixed + byte_lengths(column(text_col)) + byte_lengths(column(target_col))
        lengths[with_blank] += blank_tokens
        if budget is not None:
            lengths[with_image] += budget
        settled = np.zeros(n, dtype=bool) if limit is None else lengths <= limit
        if budget is None:
            settled &= ~with_image
        todo = np.flatnonzero(~settled)
        if len(todo):
            picked = table.take(pa.array(todo)).to_pydict()
            inputs = [
                EmbeddingInput(text=t, image=True if has_image(v) or blank_size is not None else None)
                for t, v in zip(picked[text_col], picked.get(image_col) or [None] * len(todo))
            ]
            # each image (the blank one too) counted as its one placeholder token for now
            exact = self.prompt_lengths(inputs, prompt_side)
            exact += [len(c) for c in self.completion_ids(picked[target_col])]
            exact[with_blank[todo]] += blank_tokens - 1
            lengths[todo] = exact + self._image_tokens(todo, picked, side, with_image[todo], exact, budget)
        return lengths

    @staticmethod
    def _video_or_image_list(table, side: str) -> np.ndarray:
        """Rows whose ``side`` has a video or a list of images (more than one image's tokens to count)."""
        import pyarrow as pa

        from .validation import as_array, present_mask

        found = np.zeros(table.num_rows, dtype=bool)
        video_col, image_col = VIDEO_COLUMNS[side], _SIDES[side][1]
        if video_col in table.column_names:
            found |= present_mask(as_array(table[video_col]))
        if image_col in table.column_names:
            images = as_array(table[image_col])
            if pa.types.is_list(images.type) or pa.types.is_large_list(images.type):
                found |= present_mask(images)
        return found

    def exact_prompt_lengths(self, table, side: str, chunk_size: int = 16) -> np.ndarray:
        """Tokens of each row's sequence on ``side`` (prompt + target), counted on its prompt as the collator builds
        it (frames and images loaded), ``chunk_size`` rows per processor call."""
        text_col, image_col, target_col, prompt_side = _SIDES[side]
        lengths = np.zeros(table.num_rows, dtype=np.int64)
        for start in range(0, table.num_rows, chunk_size):
            rows = table.slice(start, chunk_size).to_pylist()
            inputs = [
                self._side_input(row, start + i, text_col, image_col, VIDEO_COLUMNS[side]) for i, row in enumerate(rows)
            ]
            prompts = self.encode_inputs(inputs, side=prompt_side)["attention_mask"].sum(dim=1).numpy()
            targets = [len(ids) for ids in self.completion_ids([row[target_col] for row in rows])]
            lengths[start:start + len(rows)] = prompts + np.array(targets, dtype=np.int64)
        return lengths

    def _image_tokens(self, rows, picked, side, with_image, lengths, budget) -> np.ndarray:
        """Image tokens - 1 (the placeholder is counted) of ``rows``: their budget where it keeps the row within the
        limit, else their own count from their size."""
        image_col = _SIDES[side][1]
        extra = np.zeros(len(rows), dtype=np.int64)
        limit = self.max_sequence_length
        read = with_image if budget is None or limit is None else with_image & (lengths - 1 + budget > limit)
        extra[with_image & ~read] = budget - 1 if budget is not None else 0
        to_read = np.flatnonzero(read)
        if len(to_read):
            index = picked.get(ROW_INDEX_COLUMN) or rows.tolist()
            sizes = [
                image_size(picked[image_col][i], self.image_root, where=f"dataset row {index[i]}, column {image_col!r}")
                for i in to_read
            ]
            extra[to_read] = np.array(self.image_token_counts(sizes), dtype=np.int64) - 1
        return extra

    def _prompt_bytes(self, side: str) -> int:
        """UTF-8 bytes of a rendered prompt besides its text, at most (every layout: text only, image + text,
        image only)."""
        if side not in self._fixed_prompt_bytes:
            probes = [EmbeddingInput(text="x"), EmbeddingInput(text="x", image=True), EmbeddingInput(image=True)]
            texts, _ = self._render(probes, side, None)
            self._fixed_prompt_bytes[side] = max(len(t.encode("utf-8")) for t in texts)
        return self._fixed_prompt_bytes[side]

    def check_rows(self, dataset, *, what: str, on_bad_row: str):
        """The trainer's pre-training check of what only this collator can judge: sequence lengths
        (:func:`~mm_embed_trl.data.validation.check_reasoning_lengths`)."""
        from .validation import check_reasoning_lengths

        return check_reasoning_lengths(dataset, self, what=what, on_bad_row=on_bad_row)

    def image_token_counts(self, sizes: Sequence[tuple[int, int]]) -> list[int]:
        """The placeholder tokens the processor expands each image of ``(height, width)`` into."""
        counter = getattr(self.processor, "_get_num_multimodal_tokens", None)
        if counter is not None:  # what vLLM uses to count image tokens without an image
            return list(counter(image_sizes=[list(size) for size in sizes]).num_image_tokens)
        from PIL import Image

        counts = []
        for height, width in sizes:  # any other processor: expand a blank image of that size
            probe = EmbeddingInput(text="x", image=Image.new("RGB", (width, height)))
            expanded = int(self.encode_inputs([probe])["attention_mask"].sum())
            counts.append(expanded - int(self.prompt_lengths([probe])[0]) + 1)
        return counts

    def length_options(self) -> dict[str, Any]:
        """What :meth:`sequence_lengths` depends on besides the rows, for the row check's cache key."""
        import dataclasses
        import hashlib

        image_processor = getattr(self.processor, "image_processor", None)
        video_processor = getattr(self.processor, "video_processor", None)
        described = {
            "tokenizer": [getattr(self.tokenizer, "name_or_path", ""), len(self.tokenizer)],
            "chat_template": str(getattr(self.processor, "chat_template", None) or self.tokenizer.chat_template),
            "template": dataclasses.asdict(self.template),
            "image_processor": repr(getattr(image_processor, "size", None)),
            # a video's tokens follow its sampling and its frames' pixel budget
            "video": repr((video_sampling(self.processor), getattr(video_processor, "size", None))),
            "image_root": str(self.image_root),
            "max_text_length": self.max_length,
            "max_sequence_length": self.max_sequence_length,
        }
        return {"collator": hashlib.blake2b(repr(described).encode(), digest_size=16).hexdigest()}

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        if len(rows) == 0:
            raise ValueError("The collator got an empty batch.")
        batch: dict[str, Any] = {}
        positive_ids = []
        for side, (text_col, image_col, target_col, prompt_side) in _SIDES.items():
            inputs, targets, labels = [], [], []
            for i, row in enumerate(rows):
                target = row.get(target_col)
                where = f"{_describe_row(row, i)}, column {target_col!r}"
                if not isinstance(target, str) or is_missing(target):
                    raise ValueError(
                        f"{where}: the reasoning target is {'missing' if target is None else repr(target)}; reasoning "
                        f"SFT needs one per side ({QUERY_REASONING}, {POS_REASONING}: '<think>...</think><answer>..."
                        f"</answer>{GEN_EMB_TOKEN}'). Fill it in or filter such rows out."
                    )
                inp = self._side_input(row, i, text_col, image_col, VIDEO_COLUMNS[side])
                inputs.append(inp)
                targets.append(target)
                labels.append(where)
                if side == "positive":
                    positive_ids.append(_content_id(inp.text, row.get(POS_IMAGE), inp.image, row.get(POS_VIDEO)))
            batch[side] = self.encode_side(inputs, targets, prompt_side, labels)
        batch["positive_ids"] = torch.tensor(positive_ids, dtype=torch.long)
        return batch
