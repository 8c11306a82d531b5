"""Training on several datasets at once: a mixture of sources, interleaved by weight under a seed, optionally one
source per global batch (VLM2Vec's homogeneous batches), resumable at the exact row after a kill.

A :class:`DatasetMixture` lists :class:`MixtureSource` s (a hub id or local path, its config and split, the folder
its relative image paths are relative to, its weight or row count per epoch, its instructions).
:meth:`DatasetMixture.load` loads every source with :func:`~mm_embed_trl.data.loading.load_rows_dataset`, makes its
relative image and video paths absolute under the source's own ``image_root`` (so one collator serves every source),
puts the source's instructions in front of its texts (MMEB-train keeps a task's instruction in the row text: the
same place), tags each row with its source (column ``mixture_source``) and concatenates the sources.

A trainer given the mixture (``HardNegContrastiveTrainer(..., dataset_mixture=mixture)``) samples it with a
:class:`MixtureSampler`: each epoch an index plan, a numpy function of ``(seed, epoch)`` alone, so every rank builds
the same plan (accelerate deals each rank its batches of it) and a resumed run rebuilds the plan it was killed in
(the Trainer then skips the batches already trained).

In YAML (the examples' ``dataset_mixture`` option)::

    dataset_mixture:
      same_source_batches: true
      sources:
        - {name_or_path: TIGER-Lab/MMEB-train, config: ImageNet_1K, split: original, image_root: /data/MMEB-train,
           num_samples: 100000}
        - {name_or_path: /data/extra.jsonl, image_root: /data/extra-images, weight: 2.0,
           query_instruction: "Represent the given image: "}
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .schema import (
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_TEXT,
    QUERY_VIDEO,
    is_missing,
)

__all__ = ["MIXTURE_SOURCE_COLUMN", "DatasetMixture", "MixtureSampler", "MixtureSource"]

# Added by DatasetMixture.load: each row's source (its position in `DatasetMixture.sources`). The sampler reads it from
# the dataset the trainer trains on, so rows the pre-training check left out are simply not drawn.
MIXTURE_SOURCE_COLUMN = "mixture_source"
_PATH_COLUMNS = (QUERY_IMAGE, POS_IMAGE, NEG_IMAGE, QUERY_VIDEO, POS_VIDEO)


@dataclass
class MixtureSource:
    """One dataset of a :class:`DatasetMixture`, in the MMEB-train schema.

    Parameters:
        name_or_path (`str`): hub id, local parquet/jsonl/csv file or `save_to_disk` folder (as `--dataset_name`).
        config (`str`, *optional*): hub dataset config (an MMEB-train subset such as `"ImageNet_1K"`).
        split (`str`, defaults to `"train"`): the split trained on (MMEB-train's is `"original"`).
        image_root (`str`, *optional*): folder this source's relative image and video paths are relative to; they
            are made absolute when the mixture loads. Default: the run's `image_root`.
        weight (`float`, *optional*): the source's share of an epoch. An epoch draws as many rows as the weighted
            sources hold together, shared out in proportion to the weights: a source given more rows than it holds
            repeats them, one given fewer draws a fresh subset each epoch. Default 1.0 (when `num_samples` is unset).
        num_samples (`int`, *optional*): exactly this many rows of the source per epoch instead (VLM2Vec's
            `num_sample_per_subset`, drawn anew each epoch); exclusive with `weight`.
        query_instruction (`str`, defaults to `""`): put in front of every query text (`qry`), e.g.
            `"Represent the given image with the following question: "`.
        target_instruction (`str`, defaults to `""`): put in front of every target text (`pos_text`, and each
            negative's text).
        name (`str`, *optional*): how logs and errors name the source; default `name_or_path` (`/config`).
    """

    name_or_path: str
    config: str | None = None
    split: str = "train"
    image_root: str | None = None
    weight: float | None = None
    num_samples: int | None = None
    query_instruction: str = ""
    target_instruction: str = ""
    name: str | None = None

    def __post_init__(self):
        if self.name is None:
            self.name = str(self.name_or_path) + (f"/{self.config}" if self.config else "")
        where = f"Mixture source {self.name!r}"
        if self.weight is not None and self.num_samples is not None:
            raise ValueError(
                f"{where} sets both weight ({self.weight}) and num_samples ({self.num_samples}): give one (weight: a "
                "share of the epoch; num_samples: a fixed number of rows per epoch)."
            )
        whole = isinstance(self.num_samples, int) and not isinstance(self.num_samples, bool)
        if self.num_samples is not None and (not whole or self.num_samples <= 0):
            raise ValueError(f"{where} has num_samples={self.num_samples!r}: give a positive whole number of rows.")
        if self.num_samples is None:
            if self.weight is None:
                self.weight = 1.0
            if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
                raise ValueError(
                    f"{where} has weight={self.weight!r}: weights are positive numbers (a share of the epoch); remove "
                    "the source to leave it out."
                )
            if not math.isfinite(self.weight):
                raise ValueError(f"{where} has weight={self.weight!r}: give a finite positive number.")
        for key in ("query_instruction", "target_instruction"):
            if not isinstance(getattr(self, key), str):
                raise ValueError(f"{where}: {key} must be a text, got {getattr(self, key)!r}.")


@dataclass
class DatasetMixture:
    """Several training datasets in one run; see the module documentation.

    Parameters:
        sources (`list[MixtureSource]`): the datasets (mappings with `MixtureSource`'s keys are converted).
        same_source_batches (`bool`, defaults to `False`): every global batch (all ranks' rows of one step: the rows
            one contrastive loss sees when embeddings are gathered across devices) comes from a single source, as
            VLM2Vec's `homogeneous_batch_size_per_device=1` (its interleave block is per-device batch x world size):
            in-batch negatives then share the query's task, as at evaluation. Each source's rows per epoch are then
            rounded down to whole global batches.
    """

    sources: list[MixtureSource] = field(default_factory=list)
    same_source_batches: bool = False

    def __post_init__(self):
        if isinstance(self.sources, Mapping) or not isinstance(self.sources, Sequence) or not self.sources:
            raise ValueError(
                f"A dataset mixture needs a non-empty list of sources, got {self.sources!r}; e.g. sources: "
                "[{name_or_path: data/a.jsonl, weight: 1.0}, {name_or_path: data/b.jsonl, weight: 2.0}]."
            )
        self.sources = [_as_source(s, i) for i, s in enumerate(self.sources)]
        names = [s.name for s in self.sources]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(
                f"Mixture sources {repeated} appear more than once: give each a distinct `name` (e.g. the same file "
                "under two instructions), or merge them into one source with a larger weight."
            )

    @classmethod
    def from_config(cls, value: Any) -> DatasetMixture:
        """A mixture from a recipe's value: a list of sources, or a mapping of `DatasetMixture`'s keys."""
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            _refuse_unknown_keys(value, cls, "The dataset mixture")
            return cls(**value)
        return cls(sources=value)

    def load(self, *, split: str | None = None, loader: Callable[[MixtureSource, str], Any] | None = None):
        """All sources as one `datasets.Dataset` with a ``mixture_source`` column: relative paths made absolute under
        each source's `image_root`, instructions in front of the texts.

        ``split`` loads that split of every source instead of its own (a held-out split); ``loader(source, split)``
        replaces :func:`~mm_embed_trl.data.loading.load_rows_dataset` (the examples' built-in generated data).
        """
        import datasets

        from .loading import check_training_columns, load_rows_dataset

        loader = loader or (lambda s, sp: load_rows_dataset(s.name_or_path, config=s.config, split=sp))
        parts = []
        for index, source in enumerate(self.sources):
            try:
                ds = loader(source, split or source.split)
            except Exception as err:
                raise ValueError(
                    f"Mixture source {source.name!r} (name_or_path={source.name_or_path!r}, config={source.config!r}, "
                    f"split={split or source.split!r}) could not be loaded: {err}. Fix its entry in dataset_mixture."
                ) from err
            if len(ds) == 0:
                raise ValueError(f"Mixture source {source.name!r} holds no rows (split {split or source.split!r}).")
            check_training_columns(ds, name=f"mixture source {source.name!r}")
            parts.append(_prepared(ds, source, index))
        return datasets.concatenate_datasets(_aligned(parts, self.sources))

    def sampler(self, dataset, *, seed: int, block_size: int = 1) -> MixtureSampler:
        """The training sampler over `dataset` (this mixture's rows, as loaded and checked); ``block_size`` rows in a
        row come from one source (a global batch under `same_source_batches`, else 1)."""
        if MIXTURE_SOURCE_COLUMN not in getattr(dataset, "column_names", ()):
            raise ValueError(
                f"The training dataset has no {MIXTURE_SOURCE_COLUMN!r} column, so the dataset_mixture cannot tell its "
                "rows' sources: pass the dataset that DatasetMixture.load() returned (filtered or mapped as you like)."
            )
        rows = dataset.select_columns([MIXTURE_SOURCE_COLUMN]).with_format("arrow")[:]
        row_sources = rows.column(MIXTURE_SOURCE_COLUMN).to_numpy()
        if len(row_sources) and row_sources.max() >= len(self.sources):
            raise ValueError(
                f"The training dataset has rows of source #{int(row_sources.max())} but this mixture lists "
                f"{len(self.sources)} sources: pass the mixture the dataset was loaded from."
            )
        return MixtureSampler(row_sources, self.sources, seed=seed, block_size=block_size)


class MixtureSampler(Sampler[int]):
    """Dataset indices of one epoch of a mixture: each source's rows per epoch fixed by its weight or `num_samples`,
    in blocks of `block_size` rows from one source, the blocks in a seeded random order.

    Args:
        row_sources: the source index of every dataset row (the ``mixture_source`` column).
        sources: the mixture's sources (their `weight` / `num_samples`, their names for errors).
        seed: the plan's seed; the same on every rank.
        block_size: rows in a row from one source (1: sources interleaved row by row).

    The plan of epoch e is a function of ``(seed, e)`` only (numpy's PCG64), rebuilt when the Trainer calls
    `set_epoch`: a resumed run gets the plan it was killed in, and skips the batches it already trained.
    """

    def __init__(self, row_sources: np.ndarray, sources: Sequence[MixtureSource], *, seed: int, block_size: int = 1):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}.")
        row_sources = np.asarray(row_sources)
        self.rows_of = [np.flatnonzero(row_sources == i) for i in range(len(sources))]
        self.seed, self.block_size, self.epoch = int(seed), block_size, 0
        self.counts = rows_per_epoch([len(r) for r in self.rows_of], sources, block_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def plan(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's dataset indices, in order (one numpy pass per source, none per row)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else int(epoch)])
        blocks = rng.permutation(np.repeat(np.arange(len(self.counts)), self.counts // self.block_size))
        plan = np.empty((len(blocks), self.block_size), dtype=np.int64)
        for i, rows in enumerate(self.rows_of):
            count = int(self.counts[i])
            passes = -(-count // len(rows))  # whole shuffled passes over the source, cut to its count
            drawn = rng.permuted(np.tile(np.arange(len(rows)), (passes, 1)), axis=1).ravel()[:count]
            plan[blocks == i] = rows[drawn].reshape(-1, self.block_size)
        return plan.ravel()

    def __iter__(self) -> Iterator[int]:
        yield from self.plan().tolist()

    def __len__(self) -> int:
        return int(self.counts.sum())


def rows_per_epoch(sizes: Sequence[int], sources: Sequence[MixtureSource], block_size: int = 1) -> np.ndarray:
    """Rows each source gives an epoch, whole blocks of `block_size`: `num_samples` (rounded down to blocks), and for
    the weighted sources their rows together shared out by weight (largest remainders, so the shares add up)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    for source, size in zip(sources, sizes):
        if size == 0:
            raise ValueError(
                f"Mixture source {source.name!r} has no rows left to train on (the row check left all out?)."
            )
    blocks = np.zeros(len(sources), dtype=np.int64)
    weighted = np.array([s.num_samples is None for s in sources])
    for i, source in enumerate(sources):
        if not weighted[i]:
            blocks[i] = source.num_samples // block_size
    if weighted.any():
        weights = np.array([s.weight if s.weight is not None else 0.0 for s in sources], dtype=np.float64)[weighted]
        total = int(sizes[weighted].sum()) // block_size
        share = total * weights / weights.sum()
        whole = np.floor(share).astype(np.int64)
        extra = np.argsort(-(share - whole), kind="stable")[: total - int(whole.sum())]
        whole[extra] += 1
        blocks[weighted] = whole
    empty = [s for s, b in zip(sources, blocks) if b == 0]
    if empty:
        unit = f" in same-source batches of {block_size} rows" if block_size > 1 else ""
        raise ValueError(
            f"Mixture source(s) {[s.name for s in empty]} get no rows per epoch{unit} "
            f"(weight or num_samples too small for the mixture's {int(sizes.sum())} rows): raise their weight, give "
            "them num_samples of at least one batch, or remove them."
        )
    return blocks * block_size


# ------------------------------------------------------------------------------------------------ loading helpers
def _refuse_unknown_keys(mapping: Mapping, cls, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in mapping if k not in known]
    if unknown:
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(k), known, n=1))
                 else repr(k) for k in unknown]
        raise ValueError(f"{where} has unknown key(s) {', '.join(hints)}; its keys are {known}.")


def _as_source(value: Any, index: int) -> MixtureSource:
    if isinstance(value, MixtureSource):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(
            f"Mixture source #{index} is {value!r}; each source is a mapping such as "
            "{name_or_path: data/a.jsonl, weight: 1.0}."
        )
    label = value.get("name") or value.get("name_or_path") or f"#{index}"
    _refuse_unknown_keys(value, MixtureSource, f"Mixture source {label!r}")
    if not value.get("name_or_path"):
        raise ValueError(f"Mixture source #{index} ({dict(value)!r}) has no name_or_path: name its hub id or file.")
    return MixtureSource(**value)


def _absolute(value: Any, root: str) -> Any:
    """A relative path string (or each of a list of them) joined to `root`; anything else as it is."""
    if isinstance(value, list):
        return [_absolute(v, root) for v in value]
    if isinstance(value, str) and not is_missing(value) and not os.path.isabs(os.path.expanduser(value)):
        return os.path.join(root, value)
    return value


def _prefixed(texts: list, instruction: str, images: list, videos: list) -> list:
    """Each text with `instruction` in front when its side has an input (a text, an image or a video): an empty side
    stays empty, so the row check still names it (a bare instruction would train as if it were the input)."""
    from .images import has_image

    def holds(value: Any) -> bool:
        return any(holds(v) for v in value) if isinstance(value, (list, tuple)) else has_image(value)

    return [
        instruction + text if isinstance(text, str) and (not is_missing(text) or holds(image) or holds(video)) else text
        for text, image, video in zip(texts, images, videos)
    ]


def _prepared(ds, source: MixtureSource, index: int):
    """The source's rows with absolute paths, instructions and the source column (one cached batched map)."""
    root = os.path.abspath(os.path.expanduser(source.image_root)) if source.image_root else None
    path_columns = [c for c in _PATH_COLUMNS if c in ds.column_names] if root else []
    query, target = source.query_instruction, source.target_instruction

    def prepare(batch):
        n = len(next(iter(batch.values())))
        for column in path_columns:
            batch[column] = [_absolute(v, root) for v in batch[column]]
        none = [None] * n
        if query:
            batch[QUERY_TEXT] = _prefixed(batch[QUERY_TEXT], query, batch.get(QUERY_IMAGE, none),
                                          batch.get(QUERY_VIDEO, none))
        if target:
            batch[POS_TEXT] = _prefixed(batch[POS_TEXT], target, batch.get(POS_IMAGE, none), batch.get(POS_VIDEO, none))
            if NEG_TEXT in batch:
                # a negative's text gets the instruction when the negative exists (text or image), as a positive's
                texts, images = batch[NEG_TEXT], batch.get(NEG_IMAGE, [None] * n)
                batch[NEG_TEXT] = [_negative_texts(t, im, target) for t, im in zip(texts, images)]
        batch[MIXTURE_SOURCE_COLUMN] = [index] * n
        return batch

    import datasets

    features = ds.features.copy()
    features[MIXTURE_SOURCE_COLUMN] = datasets.Value("int32")
    return ds.map(prepare, batched=True, features=features, desc=f"Preparing mixture source {source.name!r}")


def _negative_texts(texts: Any, images: Any, instruction: str) -> Any:
    """`neg_text` of one row with `instruction` in front of the text of each negative that exists (a text or an
    image, paired as `schema.row_negatives` pairs them: a single value applies to every negative)."""
    image_list = [] if is_missing(images) else (list(images) if isinstance(images, list) else [images])
    if not isinstance(texts, list):
        exists = not is_missing(texts) or any(not is_missing(image) for image in image_list)
        return instruction + texts if isinstance(texts, str) and exists else texts
    if len(image_list) == 1:
        image_list = image_list * len(texts)
    if len(image_list) != len(texts):  # no images, or a count row_negatives refuses: texts alone decide
        image_list = [None] * len(texts)
    return [
        instruction + t if isinstance(t, str) and not (is_missing(t) and is_missing(image)) else t
        for t, image in zip(texts, image_list)
    ]


def _aligned(parts: list, sources: Sequence[MixtureSource]) -> list:
    """The sources with one set of columns and types (a column a source lacks is added as nulls), or an error naming
    the column whose types disagree."""
    import datasets

    features: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for ds, source in zip(parts, sources):
        for column, feature in ds.features.items():
            if column not in features:
                features[column], owner[column] = feature, source.name
            elif feature != features[column]:
                raise ValueError(
                    f"Column {column!r} holds {feature} in mixture source {source.name!r} but {features[column]} in "
                    f"{owner[column]!r}: convert one source (e.g. single image paths into lists of one) before mixing."
                )
    common = datasets.Features(features)
    aligned = []
    for ds in parts:
        for column in common:
            if column not in ds.column_names:
                ds = ds.add_column(column, [None] * len(ds), feature=common[column])
        aligned.append(ds.select_columns(list(common)).cast(common) if ds.features != common else ds)
    return aligned
