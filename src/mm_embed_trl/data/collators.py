"""Rows → processor outputs, one processor call per side, and the row-chunking GradCache needs.

The collator turns a list of MMEB-schema rows into::

    {"query": enc, "positive": enc, "negative": enc (only with explicit negatives), "num_negatives": K,
     "positive_ids": (B,) int64, "negative_ids": (B*K,) int64}

Each ``enc`` is the output of ONE processor call over that side's inputs (left padded, with
``pixel_values`` / ``image_grid_thw`` / ``pixel_values_videos`` / ``video_grid_thw`` / ``mm_token_type_ids`` as the
backbone expects), plus ``image_counts`` and ``video_counts`` (images and videos per row) so :func:`split_batch` can
cut it into row chunks without re-running the processor.
``*_ids`` are content hashes of the targets (text + image identity): equal ids mean identical targets, which
the contrastive loss must never use as negatives of each other.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .images import image_identity, load_image, load_image_values
from .schema import (
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_TEXT,
    QUERY_VIDEO,
    ROW_INDEX_COLUMN,
    EmbeddingInput,
    is_missing,
    row_negatives,
)
from .templates import PromptTemplate, get_template, strip_image_placeholders
from .videos import load_video, video_identity

logger = logging.getLogger(__name__)

# Text tokens kept per input by default: MMEB / NLI texts are far shorter, and a stray 100k-character text (a
# scraped page, a file read into a cell) would otherwise run the forward pass out of memory.
DEFAULT_MAX_TEXT_TOKENS = 1024

# Tensors indexed by row / by image in processor outputs. Anything else is refused by split_batch rather than
# silently mis-sliced.
ROW_KEYS = (
    "input_ids",
    "attention_mask",
    "mm_token_type_ids",
    "token_type_ids",
    "position_ids",
    "image_counts",
    "video_counts",
    "labels",
    "completion_start",
)
IMAGE_KEYS = ("image_grid_thw", "image_sizes", "batch_num_images")  # batch_num_images: LLaVA-OV, 1 per image
# Tensors indexed by video (second_per_grid_ts: Qwen2.5-VL's seconds per temporal patch, one per video).
VIDEO_KEYS = ("video_grid_thw", "second_per_grid_ts")


def describe_batch_row(row: dict, index: int) -> str:
    """How an error names a row: its dataset position (the trainers' row check adds ROW_INDEX_COLUMN; the dataloader
    hands the collator rows only) or else its position in the batch."""
    if row.get(ROW_INDEX_COLUMN) is not None:
        return f"dataset row {int(row[ROW_INDEX_COLUMN])} (batch row {index})"
    return f"batch row {index}"


def _describe_row(row: dict, index: int) -> str:
    row_id = row.get("id", row.get("idx"))
    text = str(row.get(QUERY_TEXT) or "")[:60]
    return (
        describe_batch_row(row, index)
        + (f" (id={row_id})" if row_id is not None else "")
        + (f" [qry={text!r}]" if text else "")
    )


def _content_id(text: str | None, image_value: Any, image: Any, video_value: Any = None) -> int:
    """A stable 63-bit id of a target's content: identical (text, image(s), video) inputs share it."""
    h = hashlib.blake2b(digest_size=8)
    h.update((text or "").strip().encode("utf-8"))
    h.update(b"\x00")
    if image is not None:  # the raw value: a path identifies the image without hashing its pixels
        values = image_value if isinstance(image_value, (list, tuple)) else [image_value]
        h.update("|".join(image_identity(v) for v in values).encode("utf-8"))
    if not is_missing(video_value):
        h.update(b"\x00video:" + video_identity(video_value).encode("utf-8"))
    return int.from_bytes(h.digest(), "little") >> 1


class InputEncodingError(ValueError):
    """One input of a processor call could not be encoded; `index` is its position in the call's inputs."""

    def __init__(self, index: int, reason: str):
        super().__init__(f"input #{index}: {reason}")
        self.index, self.reason = index, reason


class EmbeddingCollator:
    """Collate MMEB-schema rows into per-side processor outputs.

    Args:
        processor: the backbone's processor (`AutoProcessor`) or, for text-only LMs, its tokenizer.
        template: prompt template name or object (see `mm_embed_trl.data.templates`).
        image_root: directory that relative image paths are resolved against.
        max_length: maximum number of text tokens kept from each input's raw text (the prompt template and image
            tokens are never cut, so the pooled end-of-prompt token is always present); default
            `DEFAULT_MAX_TEXT_TOKENS` (1024), `None` keeps whole texts. The first batch that cuts texts logs a
            warning with their count; `num_truncated` counts every cut text.
        num_negatives: use exactly this many explicit negatives per row (rows with fewer are an error); `None`
            uses however many the rows carry (all rows must carry the same number); `0` ignores them.
        extra_columns: per-row columns handed through under their own names, stacked into one tensor each
            (numbers, or vectors of one length: a method's judge scores, teacher vectors): a method that needs one
            names it instead of wrapping the collator. A row without one is an error naming the row.
    """

    def __init__(
        self,
        processor,
        template: str | PromptTemplate = "unime",
        *,
        image_root: str | os.PathLike | None = None,
        max_length: int | None = DEFAULT_MAX_TEXT_TOKENS,
        num_negatives: int | None = None,
        extra_columns: Sequence[str] = (),
    ):
        if max_length is not None and max_length <= 0:
            raise ValueError(f"max_length must be a positive number of text tokens (or None), got {max_length}.")
        self.processor = processor
        self.template = get_template(template) if isinstance(template, str) else template
        self.image_root = image_root
        self.max_length = max_length
        self.num_negatives = num_negatives
        self.extra_columns = tuple(extra_columns)
        self.num_truncated = 0  # texts cut to max_length so far (in this process / dataloader worker)
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.is_multimodal = hasattr(processor, "image_processor")

    # ------------------------------------------------------------------ one side
    def encode_inputs(self, inputs: Sequence[EmbeddingInput], side: str = "query", instruction: str | None = None):
        """One processor call over `inputs`: template → chat template → tokenize (+ image processing).

        ``instruction`` replaces the side's instruction of the template for every input (a task instruction, e.g.
        Qwen3-VL-Embedding's or GME's query instruction)."""
        if not inputs:
            raise ValueError("encode_inputs got an empty list of inputs.")
        if self.template.text_only_image_size is not None:
            if not self.is_multimodal:
                raise ValueError(
                    f"The prompt template {self.template.name!r} gives text-only inputs an image, which this "
                    f"processor ({type(self.processor).__name__}) cannot take: use a vision-language backbone, or a "
                    "template without text_only_image_size (e.g. 'ume_r1')."
                )
            inputs = [self.template.with_text_only_image(x) for x in inputs]
        images = [image for x in inputs for image in x.images]
        videos = [x.video.frames for x in inputs if x.video is not None]
        if (images or videos) and not self.is_multimodal:
            raise ValueError(
                f"{len(images) + len(videos)} input(s) carry an image or a video but the processor "
                f"({type(self.processor).__name__}) is text-only. Use a vision-language backbone's AutoProcessor, or "
                "drop the image and video columns."
            )
        if videos and getattr(self.processor, "video_processor", None) is None:
            raise ValueError(
                f"{len(videos)} input(s) carry a video but the processor ({type(self.processor).__name__}) takes no "
                "video. Use a video-language backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision)."
            )
        if self.max_length is not None:
            inputs = self._truncate_texts(inputs)
        texts, templated = self._render(inputs, side, instruction)
        kwargs: dict[str, Any] = {"padding": True, "return_tensors": "pt", "padding_side": "left"}
        # A chat template already writes BOS & co. (Llama-3 style); tokenizing it with special tokens doubles them.
        kwargs["add_special_tokens"] = not templated
        if images:
            kwargs["images"] = images
        if videos:
            # frames are sampled when loaded (data/videos.py, from the processor's saved options): never again here
            kwargs["videos"] = videos
            kwargs["do_sample_frames"] = False
        if not self.is_multimodal:
            kwargs["return_token_type_ids"] = False
        try:
            enc = self.processor(text=texts, **kwargs)
        except Exception as err:
            self._raise_for_failing_image(inputs, err)
            raise
        enc = dict(enc)
        enc.pop("token_type_ids", None)  # BERT-style tokenizers; decoder backbones do not take them
        enc["image_counts"] = torch.tensor([len(x.images) for x in inputs], dtype=torch.long)
        if videos:
            enc["video_counts"] = torch.tensor([int(x.video is not None) for x in inputs], dtype=torch.long)
        return enc

    def _raise_for_failing_image(self, inputs: Sequence[EmbeddingInput], err: Exception) -> None:
        """Error path of a failed processor call: find the input whose image the image processor refuses on its own
        (an aspect ratio beyond Qwen-VL's limit of 200, ...) and raise an InputEncodingError naming it."""
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            return
        for index, x in enumerate(inputs):
            for image in x.images:
                try:
                    image_processor(images=[image], return_tensors="pt")
                except Exception as single:
                    raise InputEncodingError(
                        index,
                        f"its image ({image.width}x{image.height} pixels) cannot be processed by "
                        f"{type(image_processor).__name__}: {single}. Crop or pad the image, or drop the row.",
                    ) from err

    def _render(self, inputs, side, instruction) -> tuple[list[str], bool]:
        """(prompt strings, whether a chat template rendered them)."""
        template = self.template
        if self.is_multimodal and not template.use_chat_template:
            image_token = getattr(self.processor, "image_token", None)
            if image_token is None:
                raise ValueError(
                    f"The prompt template {template.name!r} writes the processor's image token, but "
                    f"{type(self.processor).__name__} names none (processor.image_token)."
                )
            return [template.render_plain(x, image_token, side, instruction) for x in inputs], False
        conversations = [template.build_messages(x, side, instruction) for x in inputs]
        if self.is_multimodal:
            texts = self.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
            return [text + template.generation_suffix for text in texts], True
        if getattr(self.tokenizer, "chat_template", None):
            flat = [
                [{"role": m["role"], "content": "".join(c.get("text", "") for c in m["content"])} for m in conv]
                for conv in conversations
            ]
            texts = self.tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=False)
            return [text + template.generation_suffix for text in texts], True
        return [template.format_text(x, side, instruction) for x in inputs], False

    def prompt_lengths(self, inputs: Sequence[EmbeddingInput], side: str = "query") -> np.ndarray:
        """Tokens of each input's prompt as :meth:`encode_inputs` makes it, without touching an image: the same text
        truncation, template and chat template, tokenized in one call, each image counted as the one placeholder
        token the processor expands (add its image tokens - 1). ``x.image`` only needs to be set or None."""
        if self.max_length is not None:
            inputs, _ = self._truncated(inputs)
        texts, templated = self._render(inputs, side, None)
        ids = self.tokenizer(texts, add_special_tokens=not templated)["input_ids"]
        return np.array([len(i) for i in ids], dtype=np.int64)

    def _truncated(self, inputs: Sequence[EmbeddingInput]) -> tuple[list[EmbeddingInput], list[int]]:
        """(inputs with texts cut to max_length tokens, positions of the cut ones)."""
        # A token spans at least one UTF-8 byte (a character at most 4), give or take a prefix token: shorter texts
        # cannot exceed max_length and skip the extra tokenizer call.
        maybe_long = [i for i, x in enumerate(inputs) if x.text and 4 * len(x.text) + 8 >= self.max_length]
        if not maybe_long:
            return list(inputs), []
        texts = [inputs[i].text for i in maybe_long]
        ids = self.tokenizer(texts, add_special_tokens=False, truncation=True, max_length=self.max_length)["input_ids"]
        too_long = [i for i, t in zip(maybe_long, ids) if len(t) >= self.max_length]
        if not too_long:
            return list(inputs), []
        out = list(inputs)
        by_position = dict(zip(maybe_long, ids))
        decoded = self.tokenizer.batch_decode([by_position[i] for i in too_long], skip_special_tokens=False)
        for i, text in zip(too_long, decoded):
            out[i] = EmbeddingInput(text=text, image=inputs[i].image, video=inputs[i].video)
        return out, too_long

    def _truncate_texts(self, inputs: Sequence[EmbeddingInput]) -> list[EmbeddingInput]:
        out, too_long = self._truncated(inputs)
        if not too_long:
            return out
        if self.num_truncated == 0:
            logger.warning(
                "%d of %d texts in a batch are longer than max_length=%d text tokens and were truncated (the prompt is "
                "kept); later truncations are counted (collator.num_truncated), not logged. Raise max_length "
                "(--max_length) to keep more of each text.",
                len(too_long), len(inputs), self.max_length,
            )
        self.num_truncated += len(too_long)
        return out

    # ------------------------------------------------------------------ rows
    def _side_input(
        self, row: dict, index: int, text_col: str, image_col: str, video_col: str | None = None
    ) -> EmbeddingInput:
        text, image_value = row.get(text_col), row.get(image_col)
        if text is not None and not isinstance(text, str):
            raise ValueError(
                f"{_describe_row(row, index)}: {text_col!r} holds a {type(text).__name__} ({str(text)[:40]!r}), not a "
                "text; store texts as strings."
            )
        where = _describe_row(row, index)
        image = load_image_values(image_value, self.image_root, where=f"{where}, column {image_col!r}")
        video = None
        if video_col is not None and not is_missing(row.get(video_col)):
            video = load_video(
                row[video_col], self.image_root, where=f"{where}, column {video_col!r}", processor=self.processor
            )
        if image is None and video is None and not strip_image_placeholders(text):
            only_placeholder = " (but for an image placeholder)" if not is_missing(text) else ""
            raise ValueError(
                f"{where}: {text_col!r} is empty{only_placeholder} and {image_col!r} has no image, so there is nothing "
                "to embed. Fill in the text or the image, or filter such rows out of the dataset."
            )
        return EmbeddingInput(text=text, image=image, video=video)

    def _encode_rows(self, inputs: list[EmbeddingInput], side: str, describe) -> dict[str, Any]:
        """:meth:`encode_inputs`, with an input that cannot be encoded reported as the row (`describe(i)`) it is."""
        try:
            return self.encode_inputs(inputs, side=side)
        except InputEncodingError as err:
            raise ValueError(f"{describe(err.index)}: {err.reason}") from err

    def __call__(self, rows: Sequence[dict]) -> dict[str, Any]:
        if len(rows) == 0:
            raise ValueError("The collator got an empty batch.")
        queries, positives, positive_ids = [], [], []
        for i, row in enumerate(rows):
            for col in (QUERY_TEXT, POS_TEXT):
                if col not in row:
                    raise KeyError(
                        f"{_describe_row(row, i)} has no column {col!r}; rows need the MMEB training schema "
                        f"({QUERY_TEXT}, {QUERY_IMAGE}, {POS_TEXT}, {POS_IMAGE}[, {NEG_TEXT}, {NEG_IMAGE}])."
                    )
            q = self._side_input(row, i, QUERY_TEXT, QUERY_IMAGE, QUERY_VIDEO)
            p = self._side_input(row, i, POS_TEXT, POS_IMAGE, POS_VIDEO)
            queries.append(q)
            positives.append(p)
            positive_ids.append(_content_id(p.text, row.get(POS_IMAGE), p.image, row.get(POS_VIDEO)))
        batch = {
            "query": self._encode_rows(
                queries, "query", lambda i: f"{_describe_row(rows[i], i)}, column {QUERY_IMAGE!r}"
            ),
            "positive": self._encode_rows(
                positives, "document", lambda i: f"{_describe_row(rows[i], i)}, column {POS_IMAGE!r}"
            ),
            "positive_ids": torch.tensor(positive_ids, dtype=torch.long),
            "num_negatives": 0,
            **self.collate_extra_columns(rows),
        }
        if self.num_negatives == 0:
            return batch
        # (index, text, image) triples: the index is the pair's position in the row's neg_* lists, which the
        # dropped empty pairs ("" text and "" image) would otherwise shift in error messages.
        per_row = [row_negatives(row, where=_describe_row(row, i), with_index=True) for i, row in enumerate(rows)]
        counts = [len(n) for n in per_row]
        # Without num_negatives, the count most rows carry (the smallest of tied counts), as the dataset check
        # (validation._negative_count_problems) reads it: the odd rows are blamed, not the rest of the batch.
        k = self.num_negatives if self.num_negatives is not None else max(sorted(set(counts)), key=counts.count)
        bad = [i for i, c in enumerate(counts) if (c < k if self.num_negatives is not None else c != k)]
        if bad:
            detail = ", ".join(f"{_describe_row(rows[i], i)} has {counts[i]}" for i in bad[:5])
            raise ValueError(
                f"Rows in a batch must carry the same number of explicit negatives ({k} expected): {detail}. "
                "Pad or trim neg_text/neg_image_path in preprocessing, or set num_negatives to a count every "
                "row has (0 ignores explicit negatives)."
            )
        if k == 0:
            return batch
        negatives, negative_ids, negative_names = [], [], []
        for i, (row, negs) in enumerate(zip(rows, per_row)):
            for j, text, image_value in negs[:k]:
                name = f"{_describe_row(row, i)}, column {NEG_IMAGE!r}[{j}]"
                image = load_image(image_value, self.image_root, where=name)
                negatives.append(EmbeddingInput(text=text, image=image))
                negative_ids.append(_content_id(text, image_value, image))
                negative_names.append(name)
        batch["negative"] = self._encode_rows(negatives, "document", negative_names.__getitem__)
        batch["negative_ids"] = torch.tensor(negative_ids, dtype=torch.long)
        batch["num_negatives"] = k
        return batch


    def collate_extra_columns(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``{column: (B, ...) tensor}`` of the ``extra_columns`` of ``rows``."""
        extras = {}
        for column in self.extra_columns:
            missing = [i for i, row in enumerate(rows) if row.get(column) is None]
            if missing:
                raise KeyError(
                    f"{_describe_row(rows[missing[0]], missing[0])} has no value in column {column!r}, which this "
                    f"method reads for every row ({len(missing)} of the batch's {len(rows)} rows lack it)."
                )
            extras[column] = torch.stack([torch.as_tensor(row[column]) for row in rows])
        return extras


def split_batch(enc: dict[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Cut one side's processor output into chunks of at most `chunk_size` rows, without re-processing.

    Row tensors are sliced by row; per-image tensors (`image_grid_thw`, `image_sizes`) by the images those rows
    own (`image_counts`); `pixel_values` by image, or, for Qwen-style flattened patches, by each image's patch
    count (the product of its `image_grid_thw`); videos alike (`video_counts`, `video_grid_thw`,
    `pixel_values_videos`). Model outputs on the chunks equal those on the whole batch.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    batch_size = int(enc["input_ids"].shape[0])
    if batch_size <= chunk_size:
        return [enc]
    # Non-tensor values (forward options such as pool_tokens) go to every chunk as they are.
    known = ROW_KEYS + IMAGE_KEYS + VIDEO_KEYS + ("pixel_values", "pixel_values_videos")
    unknown = [k for k, v in enc.items() if torch.is_tensor(v) and k not in known]
    if unknown:
        raise ValueError(f"split_batch does not know how to cut {unknown}; extend ROW_KEYS/IMAGE_KEYS/VIDEO_KEYS.")
    media = [
        _MediaSlicer(enc, batch_size, "image_counts", "pixel_values", "image_grid_thw", IMAGE_KEYS),
        _MediaSlicer(enc, batch_size, "video_counts", "pixel_values_videos", "video_grid_thw", VIDEO_KEYS),
    ]
    chunks = []
    for start in range(0, batch_size, chunk_size):
        stop = min(start + chunk_size, batch_size)
        chunk = {key: value[start:stop] for key, value in enc.items() if key in ROW_KEYS}
        chunk.update({key: value for key, value in enc.items() if not torch.is_tensor(value)})
        for slicer in media:
            chunk.update(slicer.cut(start, stop))
        chunks.append(chunk)
    return chunks


class _MediaSlicer:
    """Cuts one kind of visual input (images or videos) of a processed batch by the rows that own them."""

    def __init__(self, enc, batch_size: int, counts_key: str, pixels_key: str, grid_key: str, keys: tuple):
        self.enc, self.pixels_key, self.keys = enc, pixels_key, keys
        counts = enc.get(counts_key)
        if counts is None:
            if pixels_key in enc:
                raise ValueError(f"split_batch needs `{counts_key}` (added by EmbeddingCollator) to cut {pixels_key}.")
            counts = torch.zeros(batch_size, dtype=torch.long)
        self.bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        self.patch_bounds = None
        if pixels_key in enc and grid_key in enc:  # Qwen-style flattened patches: each item owns prod(grid) rows
            patches = enc[grid_key].prod(dim=-1)
            self.patch_bounds = torch.cat([patches.new_zeros(1), patches.cumsum(0)]).tolist()

    def cut(self, start: int, stop: int) -> dict:
        lo, hi = self.bounds[start], self.bounds[stop]
        if hi == lo:  # no such input in the chunk: the backbone must not see empty tensors
            return {}
        out = {key: self.enc[key][lo:hi] for key in self.keys if key in self.enc}
        if self.pixels_key in self.enc:
            pixels = self.enc[self.pixels_key]
            if self.patch_bounds is not None:
                out[self.pixels_key] = pixels[self.patch_bounds[lo] : self.patch_bounds[hi]]
            else:  # one entry per image
                out[self.pixels_key] = pixels[lo:hi]
        return out
