"""Pairs as RL rollouts: each (query, target) pair flattened into two prompt rows, and a sampler that keeps a pair's
rollouts together.

:func:`flatten_pairs` turns MMEB-train rows into two rows per pair, ``side`` ``"query"`` (row ``2k``) and
``"target"`` (row ``2k + 1``), each with its ``text`` and ``image`` value, the ``pair_id`` k and the ``content_id`` of
its own input (identical queries share it, and so do identical targets). :class:`PairedRepeatSampler` then yields,
per generation batch of ``generation_batch_size`` rows, ``generation_batch_size // (2 G)`` pairs laid out as::

    [q_a × G, t_a × G, q_b × G, t_b × G, ...]

so every advantage group (G consecutive rows of the global batch) is one side of one pair, and a pair's 2G rollouts
never straddle a generation batch. TRL hands rank p the p-th contiguous slice of each generation batch and its
``gather`` restores this order, so groups may straddle ranks (the retrieval reward maps rows by ``pair_id`` and
``side``, never by position).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from .schema import (
    POS_IMAGE,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_TEXT,
    QUERY_VIDEO,
    ROW_INDEX_COLUMN,
    is_missing,
)

__all__ = ["PairedRepeatSampler", "flatten_pairs"]

SIDES = ("query", "target")


def flatten_pairs(dataset):
    """Two rows per (query, target) pair of an MMEB-train dataset: ``text``, ``image``, ``side``, ``pair_id``,
    ``content_id`` (a hash of the row's own text and image(s): equal for identical queries, and for identical
    targets; the duplicate mask of :func:`~mm_embed_trl.rewards.retrieval_pool` reads it so).

    ``image`` is a path (``""`` for none) or, when some side of the dataset holds several images, a list of paths
    for every row (``[]`` for none); a dataset whose images are a ``datasets.Image`` column keeps them as undecoded
    ``{"bytes", "path"}`` dicts (None for none). A dataset with videos adds ``video`` (a video file or frame folder,
    ``""`` for none) and ``video_frames`` (a list of frame paths, ``[]`` for none). A dataset with
    :data:`~mm_embed_trl.data.schema.ROW_INDEX_COLUMN` (the row check adds it) keeps it on both rows of a pair: the
    pair's row in the user's dataset, which error messages name (``pair_id`` counts the pairs left after the check
    skipped bad rows). Rows that already carry ``side`` and ``pair_id`` (flattened before) come back unchanged.
    """
    import datasets

    from .collators import _content_id

    if {"side", "pair_id", "text", "image"} <= set(dataset.column_names):
        return dataset
    missing = [c for c in (QUERY_TEXT, POS_TEXT) if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"EmbeddingGRPOTrainer needs (query, target) pairs in the MMEB-train schema; the dataset lacks {missing} "
            f"(it has {dataset.column_names}). Rename columns with dataset.rename_column(old, new)."
        )
    if len(dataset) < 2:
        raise ValueError(f"The dataset holds {len(dataset)} pair(s); GRPO with a retrieval reward needs at least 2.")
    image_lists = _has_several_images(dataset)
    # `datasets.Image` columns hold {"bytes", "path"} dicts (undecoded by the row check), not paths: the flat column
    # keeps them as images, a missing one as None
    image_data = _holds_image_features(dataset)
    no_image = None if image_data else ""
    videos = any(column in dataset.column_names for column in (QUERY_VIDEO, POS_VIDEO))
    row_numbers = ROW_INDEX_COLUMN in dataset.column_names

    def flatten(batch, indices):
        n = len(indices)
        sides = [(side, batch[text], batch.get(image, [""] * n), batch.get(video, [""] * n))
                 for side, text, image, video in (("query", QUERY_TEXT, QUERY_IMAGE, QUERY_VIDEO),
                                                  ("target", POS_TEXT, POS_IMAGE, POS_VIDEO))]
        out = {"text": [], "image": [], "side": [], "pair_id": [], "content_id": [], "video": [], "video_frames": [],
               ROW_INDEX_COLUMN: []}
        for k in range(n):
            for side, texts, images, side_videos in sides:
                text, image, video = texts[k], images[k], side_videos[k]
                paths = [p for p in (image if isinstance(image, list) else [image]) if not is_missing(p)]
                frames = list(video) if isinstance(video, (list, tuple)) else []
                video = "" if isinstance(video, (list, tuple)) or is_missing(video) else video
                out["text"].append(text)
                out["image"].append(paths if image_lists else (paths[0] if paths else no_image))
                out["side"].append(side)
                out["pair_id"].append(indices[k])
                out["content_id"].append(_content_id(text, paths, paths or None, frames or video))
                out["video"].append(video)
                out["video_frames"].append(frames)
                if row_numbers:
                    out[ROW_INDEX_COLUMN].append(batch[ROW_INDEX_COLUMN][k])
        if not videos:
            del out["video"], out["video_frames"]
        if not row_numbers:
            del out[ROW_INDEX_COLUMN]
        return out

    image_feature = datasets.Image(decode=False) if image_data else datasets.Value("string")
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "image": datasets.List(image_feature) if image_lists else image_feature,
            "side": datasets.Value("string"),
            "pair_id": datasets.Value("int64"),
            "content_id": datasets.Value("int64"),
            **({"video": datasets.Value("string"), "video_frames": datasets.List(datasets.Value("string"))}
               if videos else {}),
            **({ROW_INDEX_COLUMN: datasets.Value("int64")} if row_numbers else {}),
        }
    )
    return dataset.map(
        flatten, batched=True, with_indices=True, remove_columns=dataset.column_names, features=features,
        desc="Flattening pairs into prompt rows",
    )


def _holds_image_features(dataset) -> bool:
    """Whether an image column of the pairs is a ``datasets.Image`` (or a list of them) rather than paths."""
    import datasets

    def is_image(feature) -> bool:
        if isinstance(feature, (datasets.List, datasets.LargeList)):
            return is_image(feature.feature)
        return isinstance(feature, datasets.Image)

    features = dataset.features or {}
    return any(is_image(features[column]) for column in (QUERY_IMAGE, POS_IMAGE) if column in features)


def _has_several_images(dataset) -> bool:
    """Whether a side of some pair holds more than one image (list image columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from .validation import as_array

    table = dataset.data.table
    for column in (QUERY_IMAGE, POS_IMAGE):
        if column not in table.column_names:
            continue
        values = as_array(table[column])
        if (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)) and len(values):
            if int(pc.max(values.value_lengths().fill_null(0)).as_py() or 0) > 1:
                return True
    return False


class PairedRepeatSampler(Sampler[int]):
    """Indices of a flattened pair dataset, ``G`` rollouts per side and both sides of a pair in one generation batch.

    Args:
        data_source: the flattened dataset (row ``2k`` = query side of pair k, row ``2k + 1`` = its target).
        num_generations: G, rollouts per side.
        generation_batch_size: rows per generation batch (all ranks, all steps of one generation); a multiple of 2G.
        repeat_count: how many times each generation batch is yielded (TRL: ``num_iterations x steps_per_generation``).
        shuffle: shuffle the pairs (with ``seed``) before cutting them into generation batches.
        seed: the shuffle's seed; the same on every rank, so ranks agree on the order.

    An incomplete last group of pairs is dropped.
    """

    def __init__(self, data_source, num_generations: int, generation_batch_size: int, repeat_count: int = 1,
                 shuffle: bool = True, seed: int | None = 0):
        if len(data_source) % 2:
            raise ValueError(f"A flattened pair dataset has an even number of rows, this one {len(data_source)}.")
        if num_generations < 1 or generation_batch_size % (2 * num_generations):
            raise ValueError(
                f"generation_batch_size ({generation_batch_size}) must be a multiple of 2 x num_generations "
                f"({2 * num_generations}): each pair puts num_generations rollouts of each side in one batch."
            )
        self.pairs_per_batch = generation_batch_size // (2 * num_generations)
        num_pairs = len(data_source) // 2
        if self.pairs_per_batch < 2:
            raise ValueError(
                f"A generation batch of {generation_batch_size} rows holds {self.pairs_per_batch} pair(s) of "
                f"2 x {num_generations} rollouts; the retrieval reward needs at least 2 pairs per batch (negatives): "
                "raise per_device_train_batch_size (or steps_per_generation, or processes)."
            )
        if num_pairs < self.pairs_per_batch:
            raise ValueError(
                f"The dataset holds {num_pairs} pairs, fewer than one generation batch ({self.pairs_per_batch})."
            )
        self.num_generations = num_generations
        self.repeat_count = repeat_count
        self.shuffle = shuffle
        self.seed = seed
        self.num_pairs = num_pairs
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(int(self.seed or 0) + self.epoch)
            pairs = torch.randperm(self.num_pairs, generator=generator)
        else:
            pairs = torch.arange(self.num_pairs)
        usable = self.num_pairs - self.num_pairs % self.pairs_per_batch
        g = self.num_generations
        for chunk in pairs[:usable].view(-1, self.pairs_per_batch).tolist():
            rows = [2 * pair + side for pair in chunk for side in (0, 1) for _ in range(g)]
            for _ in range(self.repeat_count):
                yield from rows

    def __len__(self) -> int:
        usable = self.num_pairs - self.num_pairs % self.pairs_per_batch
        return usable * 2 * self.num_generations * self.repeat_count
