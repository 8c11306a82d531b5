"""Hard-negative mining for (query, positive) rows in the MMEB-train schema, whatever their modalities.

For every row: embed its query (query side) and every candidate (document side: each row's positive, plus a corpus
when given), retrieve the candidates most similar to the query, drop those that are no negatives, and write the
``num_negatives`` most similar survivors into ``neg_text`` / ``neg_image_path``. What is dropped, in this order:

1. **a positive or the query, or a duplicate of one**: a candidate whose content (text up to case and spacing,
   decoded pixels) is that of a positive of the same query (its own or another row's; "the same query" is the same
   content too) or of the query itself (symmetric data holds the queries among the positives): never mined,
   whatever the other options;
2. **a repeat of a better candidate**: the same content as a candidate ranked above it (one image under two paths):
   a row never gets one negative twice by way of two copies;
3. **outside the rank window** ``[range_min, range_max)``: ranks count the candidates left after 1. and 2., from 0;
4. **above the margin** (UniME's false-negative rule): ``cos(q, c) > cos(q, p) + false_negative_margin``.

Queries may hold a video (``qry_video_path``: a file or a frame folder); candidates are texts, images or both, as
the negative columns are. Candidates of another modality than the row's positive (``match_modality``), or of another
value of
``group_column``, are never candidates. A row left with fewer survivors than ``num_negatives`` gets its survivors
repeated (``short_rows="repeat"``, as UniME repeats its hard negatives) or is dropped (``"drop"``); a row with none
is dropped. The summary counts each. A chunk of queries retrieves as deep as its deepest row needs; each row keeps
its own depth (``depth`` plus the pool items that carry its excluded contents), so no result depends on the
chunking.

The work is done in chunks under ``work_dir``, each written once by rename: a killed run resumes where it stopped,
and a run with other filters reuses the embeddings. Under ``torchrun`` / ``accelerate launch`` the chunks are shared
out over the ranks, and the main process writes the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._files import publish_dir, staged_dir, staged_file, write_text_atomic
from ..data.schema import (
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_TEXT,
    QUERY_VIDEO,
    ROW_INDEX_COLUMN,
)
from .search import SEARCH_BACKENDS, search_top_k

logger = logging.getLogger(__name__)

__all__ = ["MiningConfig", "MiningSummary", "mine_hard_negatives"]

OUTPUT_FORMATS = ("mmeb", "ume_r1")
SHORT_ROWS = ("repeat", "drop")
# drop reasons, in the order they are applied (the summary's keys)
REASONS = ("positive_or_duplicate", "repeated_candidate", "outside_rank_window", "above_margin")
_MODALITIES = ("text", "image", "image+text")


@dataclass
class MiningConfig:
    """Options of :func:`mine_hard_negatives` (and of ``python -m mm_embed_trl.mining``)."""

    num_negatives: int = field(default=8, metadata={"help": "Negatives written per row (UniME: k = 8)."})
    false_negative_margin: float | None = field(
        default=0.1,
        metadata={
            "help": "UniME's false-negative rule: drop a candidate c when cos(q, c) > cos(q, p) + margin (UniME: "
            "0.1; negative values keep only candidates below the positive). null: no margin rule."
        },
    )
    range_min: int = field(
        default=0, metadata={"help": "Skip the range_min most similar candidates (ranks from 0, duplicates left out)."}
    )
    range_max: int | None = field(
        default=None, metadata={"help": "Consider candidates of rank < range_max only (default: depth)."}
    )
    depth: int | None = field(
        default=None,
        metadata={
            "help": "Candidates retrieved per query, beside duplicates of its positives (default: range_max, else "
            "range_min + 4 x num_negatives)."
        },
    )
    match_modality: bool = field(
        default=True,
        metadata={"help": "Candidates must have the modality (text, image, image+text) of the row's positive."},
    )
    group_column: str | None = field(
        default=None, metadata={"help": "Mine only among rows (and corpus items) with the same value in this column."}
    )
    short_rows: str = field(
        default="repeat",
        metadata={"help": "A row with fewer survivors than num_negatives: 'repeat' them, or 'drop' the row.",
                  "choices": list(SHORT_ROWS)},
    )
    batch_size: int = field(default=32, metadata={"help": "Inputs per model forward."})
    num_workers: int = field(default=2, metadata={"help": "Dataloader workers decoding and processing inputs."})
    chunk_size: int = field(
        default=4096,
        metadata={"help": "Inputs embedded, and queries searched, per chunk (the unit of resumption and of ranks)."},
    )
    corpus_chunk_size: int = field(
        default=8192,
        metadata={"help": "Corpus rows scored at once against a chunk of queries: the search holds a few buffers of "
                  "8 x chunk_size x corpus_chunk_size bytes (about 270 MB each at the defaults)."},
    )
    search_backend: str = field(
        default="torch", metadata={"help": "'torch' (exact, chunked) or 'faiss' (faiss installed).",
                                   "choices": list(SEARCH_BACKENDS)}
    )
    output_format: str = field(
        default="mmeb",
        metadata={"help": "'mmeb' (neg_text/neg_image_path columns) or 'ume_r1' (UME-R1's JSON with a 'neg' list).",
                  "choices": list(OUTPUT_FORMATS)},
    )
    on_bad_row: str = field(
        default="raise",
        metadata={"help": "Rows the row check finds unusable: 'raise' or 'skip' (left out of the output, counted).",
                  "choices": ["raise", "skip"]},
    )
    keep_work_dir: bool = field(
        default=False, metadata={"help": "Keep the embeddings in work_dir after success (to mine again cheaply)."}
    )
    rank_timeout: float = field(
        default=1800.0,
        metadata={"help": "Seconds a rank waits for the other ranks' chunks while none of them appears, before it "
                  "stops with an error naming the missing ones (a rank that died, a work_dir not shared)."},
    )

    def __post_init__(self):
        if self.num_negatives < 1:
            raise ValueError(f"num_negatives must be at least 1, got {self.num_negatives}.")
        if self.range_min < 0 or (self.range_max is not None and self.range_max <= self.range_min):
            raise ValueError(
                f"The rank window [range_min={self.range_min}, range_max={self.range_max}) is empty or negative: "
                "pass 0 <= range_min < range_max."
            )
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"depth must be at least 1, got {self.depth}.")
        for name, choices in (("short_rows", SHORT_ROWS), ("search_backend", SEARCH_BACKENDS),
                              ("output_format", OUTPUT_FORMATS), ("on_bad_row", ("raise", "skip"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}.")
        if self.rank_timeout <= 0:
            raise ValueError(f"rank_timeout must be positive, got {self.rank_timeout}.")
        for name in ("batch_size", "chunk_size", "corpus_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")

    @property
    def window_stop(self) -> int:
        """The rank the window ends before: range_max, else the retrieval depth."""
        return self.range_max if self.range_max is not None else self.retrieval_depth

    @property
    def retrieval_depth(self) -> int:
        if self.depth is not None:
            return self.depth
        return self.range_max if self.range_max is not None else self.range_min + 4 * self.num_negatives

    def search_options(self) -> dict[str, Any]:
        """The options the search and filter results depend on (not the embeddings)."""
        keys = ("num_negatives", "false_negative_margin", "range_min", "range_max", "depth", "match_modality",
                "group_column", "search_backend")
        return {k: getattr(self, k) for k in keys}


@dataclass
class MiningSummary:
    """What mining found and dropped. ``dropped`` counts candidates by reason (see the module docstring) among those
    retrieved; rows are counted once each."""

    rows: int = 0
    rows_mined: int = 0
    rows_short: int = 0
    rows_dropped: int = 0
    bad_rows_skipped: int = 0
    candidates: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    positive_score_mean: float = float("nan")
    negative_score_mean: float = float("nan")
    short_rows: str = "repeat"

    def format(self) -> str:
        fate = "repeated their survivors" if self.short_rows == "repeat" else "were dropped"
        lines = [
            f"Rows: {self.rows} in, {self.rows_mined} written with negatives"
            + (f" ({self.bad_rows_skipped} bad rows skipped before mining)" if self.bad_rows_skipped else ""),
            f"  {self.rows_short} row(s) had fewer survivors than num_negatives and {fate}",
            f"  {self.rows_dropped - (self.rows_short if self.short_rows == 'drop' else 0)} row(s) dropped (no "
            "negative left)",
            f"Candidates retrieved: {self.candidates}; dropped:",
            f"  a positive or the query, or a duplicate of one: {self.dropped['positive_or_duplicate']}",
            f"  the same content as a better candidate:         {self.dropped['repeated_candidate']}",
            f"  outside the rank window:                        {self.dropped['outside_rank_window']}",
            f"  above the false-negative margin:                {self.dropped['above_margin']}",
            f"Mean cosine: query-positive {self.positive_score_mean:.4f}, "
            f"query-negative {self.negative_score_mean:.4f}",
        ]
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------- inputs
def _column(table, name: str):
    import pyarrow as pa

    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _texts(table, name: str) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    column = _column(table, name)  # e.g. an integer group column: compared as its text
    return np.asarray(pc.fill_null(column.cast(pa.string()), "").to_pylist(), dtype=object)


def _image_values(table, name: str, what: str) -> np.ndarray:
    """Image (or video) values as path strings ("" for none): mining writes negatives as MMEB's image paths."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if name not in table.column_names:
        return np.full(table.num_rows, "", dtype=object)
    column = _column(table, name)
    if pa.types.is_struct(column.type):  # a datasets.Image column (decode=False after the row check)
        data = column.field("bytes") if column.type.get_field_index("bytes") >= 0 else None
        if data is not None and pc.any(pc.is_valid(data)).as_py():
            row = int(np.flatnonzero(pc.is_valid(data).to_numpy(zero_copy_only=False))[0])
            raise ValueError(
                f"Row {row} of the {what} holds its {name!r} as encoded bytes; mining writes negatives as image paths "
                f"(MMEB's {NEG_IMAGE!r}). Save the images to files and store their paths, then mine."
            )
        column = column.field("path")
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise TypeError(
            f"Column {name!r} of the {what} holds {column.type}; mining needs one path (a string) per row there: "
            "one image per side (a video as a file or a frame folder)."
        )
    return np.asarray(pc.fill_null(column, "").to_pylist(), dtype=object)


def _unique(*columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position of each distinct tuple of values, inverse: each position's distinct tuple), in order of first
    appearance (Arrow's dictionary encoding, no Python loop over rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = [pa.array(np.asarray(c).tolist()).cast(pa.string()) for c in columns]
    joined = parts[0] if len(parts) == 1 else pc.binary_join_element_wise(*parts, "\x00")
    inverse = pc.dictionary_encode(joined).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    first = np.unique(inverse, return_index=True)[1]
    return first, inverse


def _modality(texts: np.ndarray, images: np.ndarray) -> np.ndarray:
    """0 text, 1 image, 2 image+text, per input (a text of image placeholders alone is no text)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from ..data.templates import IMAGE_PLACEHOLDER_PATTERN

    bare = pc.replace_substring_regex(pa.array(texts.tolist(), pa.string()), IMAGE_PLACEHOLDER_PATTERN.pattern, "")
    has_text = pc.not_equal(pc.utf8_trim_whitespace(bare), "").to_numpy(zero_copy_only=False)
    has_image = pc.not_equal(pc.utf8_trim_whitespace(pa.array(images.tolist(), pa.string())), "")
    has_image = has_image.to_numpy(zero_copy_only=False)
    return np.where(has_image & has_text, 2, np.where(has_image, 1, 0))


# ---------------------------------------------------------------------------------------------------- work folder
class _ChunkStore:
    """Embeddings (and content keys) of a list of inputs, one ``.npz`` per chunk, each published by rename; then
    gathered into one float32 ``.npy`` read by memory map."""

    def __init__(self, folder: Path, num_items: int, chunk_size: int):
        self.folder, self.num_items, self.chunk_size = folder, num_items, chunk_size
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def num_chunks(self) -> int:
        return -(-self.num_items // self.chunk_size)

    def chunk_path(self, chunk: int) -> Path:
        return self.folder / f"chunk-{chunk:06d}.npz"

    def done(self, chunk: int) -> bool:
        return self.chunk_path(chunk).is_file()

    def write(self, chunk: int, embeddings: np.ndarray, keys: np.ndarray) -> None:
        _save_npz(self.chunk_path(chunk), embeddings=embeddings, keys=keys)

    def gather(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings memory-mapped, keys) of every item, once every chunk is done."""
        path = self.folder / "embeddings.npy"
        keys_path = self.folder / "keys.npy"
        if not path.is_file():
            first = np.load(self.chunk_path(0))
            keys = np.empty(self.num_items, dtype=np.int64)
            with staged_file(path, suffix=".npy") as staging:  # published last: present means complete
                out = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32,
                                                shape=(self.num_items, first["embeddings"].shape[1]))
                for chunk in range(self.num_chunks):
                    data = np.load(self.chunk_path(chunk))
                    start = chunk * self.chunk_size
                    out[start : start + len(data["keys"])] = data["embeddings"]
                    keys[start : start + len(data["keys"])] = data["keys"]
                out.flush()
                del out
                with staged_file(keys_path, suffix=".npy") as keys_staging:  # two ranks may both gather: same bytes
                    np.save(keys_staging, keys)
        return np.load(path, mmap_mode="r"), np.load(keys_path)


def _save_npz(path: Path, **arrays) -> None:
    with staged_file(path, suffix=".npz") as staging:  # the suffix: savez would add one
        np.savez(staging, **arrays)


def _stage_key(options: dict) -> str:
    return hashlib.blake2b(json.dumps(options, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def _claim(folder: Path, identity: dict, what: str) -> None:
    """Record what ``folder``'s contents are made of; refuse a folder made of something else."""
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / "identity.json"
    if record.is_file():
        found = json.loads(record.read_text())
        if found != json.loads(json.dumps(identity, default=str)):
            changed = sorted(k for k in set(found) | set(identity) if found.get(k) != identity.get(k))
            raise FileExistsError(
                f"{folder} holds the {what} of another run (differing: {changed}). Delete it, or pass another "
                "work_dir, to start afresh."
            )
    else:
        write_text_atomic(record, json.dumps(identity, indent=2, sort_keys=True, default=str))


# ---------------------------------------------------------------------------------------------------- distributed
class _Ranks:
    """This process's share of the chunks. Ranks meet through the files of the work folder (a shared filesystem
    across machines), not through collectives: a rank that is slow to embed its share cannot time out a process
    group, and a rank that waits ``timeout`` seconds without any awaited chunk appearing stops, naming them."""

    def __init__(self, timeout: float = 1800.0):
        self.timeout = timeout
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.rank, self.world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:  # torchrun / accelerate launch set these
            self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device | None:
        """This rank's GPU where there is one (the model and the search run there), else None (the CPU)."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return None

    def mine(self, num_chunks: int) -> range:
        return range(self.rank, num_chunks, self.world)

    def done_path(self, work: Path, rank: int) -> Path:
        """The file rank ``rank`` leaves when it has read all it needs; named by the launch (torchrun's run id), so a
        file left by a killed earlier launch is not taken for this one's."""
        launch = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("MASTER_PORT", "")
        return work / f"done-{launch}-rank-{rank}"

    def wait_for(self, paths: Sequence[Path], what: str, poll_seconds: float = 0.5) -> None:
        """Block until every path exists (the other ranks' chunks); the clock restarts whenever one appears."""
        import time

        waiting, last_progress = list(paths), time.monotonic()
        while waiting:
            left = [p for p in waiting if not p.exists()]
            if not left:
                return
            if len(left) < len(waiting):
                last_progress = time.monotonic()
            waiting = left
            if time.monotonic() - last_progress > self.timeout:
                raise TimeoutError(
                    f"Rank {self.rank} of {self.world} waited {self.timeout:.0f} s for {len(waiting)} {what} chunk(s) "
                    f"of other ranks without any appearing (e.g. {waiting[0]}). Is every rank running, and is the "
                    "work folder on a filesystem they all share? Start the run again to resume from the chunks done."
                )
            time.sleep(poll_seconds)


def _progress(iterable, total: int, desc: str, ranks: _Ranks):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not ranks.main)


def _embed_all(store: _ChunkStore, items: list, labels: list[str], embedder, side: str, ranks: _Ranks, what: str):
    mine = [c for c in ranks.mine(store.num_chunks) if not store.done(c)]
    for chunk in _progress(mine, len(mine), f"Embedding {what} (rank {ranks.rank})", ranks):
        lo, hi = chunk * store.chunk_size, min((chunk + 1) * store.chunk_size, store.num_items)
        embeddings, keys = embedder.embed(items[lo:hi], side, labels=labels[lo:hi])
        store.write(chunk, embeddings, keys)
    ranks.wait_for([store.chunk_path(c) for c in range(store.num_chunks)], what)
    return store.gather()


# ----------------------------------------------------------------------------------------------------------- mine
def mine_hard_negatives(
    dataset,
    model,
    *,
    output: str | os.PathLike | None = None,
    corpus=None,
    image_root: str | os.PathLike | None = None,
    work_dir: str | os.PathLike | None = None,
    model_type: str = "auto",
    model_kwargs: dict[str, Any] | None = None,
    config: MiningConfig | None = None,
    **options,
):
    """Mine hard negatives for every row of ``dataset``; returns ``(mined dataset, MiningSummary)``.

    Args:
        dataset: rows in the MMEB-train schema (a ``datasets.Dataset``, or a hub id / file / folder for
            :func:`~mm_embed_trl.data.loading.load_rows_dataset`). Rows are checked first (``on_bad_row``).
        model: a ``MultimodalEmbeddingModel``, a ``SentenceTransformer``, or the path / hub id of either (see
            :func:`~mm_embed_trl.mining.embedders.load_embedder`; ``model_type`` forces one, ``model_kwargs`` go to
            the loader, e.g. ``{"dtype": torch.bfloat16}``).
        output: where to write the result (``.jsonl``, ``.parquet``, a folder for ``save_to_disk``, or ``.json`` for
            ``output_format="ume_r1"``); None writes nothing. The summary goes beside it (``*.mining.json``).
        corpus: more candidates beside the rows' positives: a ``datasets.Dataset`` with ``text`` and/or ``image``
            columns (paths), or a path to one.
        image_root: the folder relative image paths are relative to.
        work_dir: chunks of embeddings and results (default: beside ``output``, else a temporary folder).
        config / options: a :class:`MiningConfig`, or its fields as keywords.
    """
    import datasets

    from ..data.loading import load_rows_dataset
    from ..data.validation import check_training_rows, rows_left_out

    if config is None:
        config = MiningConfig(**options)
    elif options:
        config = MiningConfig(**{**asdict(config), **options})
    if output is not None:
        _check_output(output, config.output_format)
    ranks = _Ranks(config.rank_timeout)
    if ranks.world > 1 and work_dir is None and output is None:
        raise ValueError(
            f"{ranks.world} ranks share the work through files: pass output= or work_dir= (a folder every rank sees)."
        )
    if isinstance(dataset, (str, os.PathLike)):
        dataset = load_rows_dataset(str(dataset))
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"mine_hard_negatives takes a datasets.Dataset (or a path to one), got {type(dataset).__name__}."
        )
    if isinstance(corpus, (str, os.PathLike)):
        corpus = load_rows_dataset(str(corpus))
    checked = check_training_rows(
        dataset, what="dataset to mine", num_negatives=0, on_bad_row=config.on_bad_row, image_root=image_root
    )
    if config.group_column is not None and config.group_column not in checked.column_names:
        raise KeyError(f"group_column {config.group_column!r} is not a column of the dataset ({checked.column_names}).")

    from .embedders import load_embedder

    device = ranks.device()
    embedder = load_embedder(model, model_type=model_type, batch_size=config.batch_size, num_workers=config.num_workers,
                             image_root=image_root, device=device, **(model_kwargs or {}))
    work = _work_dir(work_dir, output)
    table = checked.with_format("arrow")[:]
    rows = _RowTable(table, config, corpus)

    embed_identity = {"data": checked._fingerprint, "corpus": getattr(corpus, "_fingerprint", None),
                      "image_root": str(image_root), "chunk_size": config.chunk_size, **embedder.identity(),
                      "group_column": config.group_column, "match_modality": config.match_modality}
    embed_dir = work / f"embeddings-{_stage_key(embed_identity)}"
    _claim(embed_dir, embed_identity, "embeddings")
    query_store = _ChunkStore(embed_dir / "queries", len(rows.query_items), config.chunk_size)
    pool_store = _ChunkStore(embed_dir / "candidates", len(rows.pool_items), config.chunk_size)
    pool_emb, pool_keys = _embed_all(pool_store, rows.pool_items, rows.pool_labels, embedder, "document", ranks,
                                     "candidates")
    query_emb, query_keys = _embed_all(query_store, rows.query_items, rows.query_labels, embedder, "query", ranks,
                                       "queries")
    rows.set_search_units(query_keys)

    # the search's own version: results of an older search (other exclusions or units) are never resumed from
    result_dir = embed_dir / f"results-{_stage_key({'search_version': 2, **config.search_options()})}"
    result_dir.mkdir(exist_ok=True)
    searcher = _Searcher(rows, config, query_emb, pool_emb, pool_keys, device=device)
    mine = [c for c in ranks.mine(searcher.num_chunks) if not (result_dir / f"chunk-{c:06d}.npz").is_file()]
    for chunk in _progress(mine, len(mine), f"Searching (rank {ranks.rank})", ranks):
        _save_npz(result_dir / f"chunk-{chunk:06d}.npz", **searcher.chunk(chunk))
    ranks.wait_for([result_dir / f"chunk-{c:06d}.npz" for c in range(searcher.num_chunks)], "result")

    result, summary = _assemble(checked, rows, result_dir, searcher.num_chunks, config)
    summary.bad_rows_skipped = rows_left_out(checked)
    summary.rows += summary.bad_rows_skipped
    if ranks.main:
        logger.warning("Hard-negative mining:\n%s", summary.format())
        if output is not None:
            write_mined(result, output, config.output_format)
            write_text_atomic(_summary_path(output), json.dumps(asdict(summary), indent=2))
    ranks.done_path(work, ranks.rank).touch()
    if ranks.main and not config.keep_work_dir and work_dir is None:
        ranks.wait_for([ranks.done_path(work, r) for r in range(ranks.world)], "finished-rank")
        shutil.rmtree(work, ignore_errors=True)  # every rank has read what it needed
    return result, summary


def _work_dir(work_dir, output) -> Path:
    if work_dir is not None:
        return Path(work_dir)
    if output is not None:
        return Path(f"{os.fspath(output)}.mining-work")
    import tempfile

    return Path(tempfile.mkdtemp(prefix="mm-embed-mining-"))


def _summary_path(output) -> Path:
    output = Path(output)
    stem = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(f"{stem}.mining.json")


class _RowTable:
    """The rows as mining sees them: each row's query and positive as indices into the distinct queries and the
    distinct candidates ("pool"), the search units (a query and the group its candidates must share) and the
    pool's groups."""

    def __init__(self, table, config: MiningConfig, corpus):
        n = table.num_rows
        # the user's row numbers (rows a check with on_bad_row="skip" left out shift the positions)
        row_number = (np.asarray(_column(table, ROW_INDEX_COLUMN).to_numpy(zero_copy_only=False), dtype=np.int64)
                      if ROW_INDEX_COLUMN in table.column_names else np.arange(n))
        query_text, query_image = _texts(table, QUERY_TEXT), _image_values(table, QUERY_IMAGE, "dataset")
        pos_text, pos_image = _texts(table, POS_TEXT), _image_values(table, POS_IMAGE, "dataset")
        with_video = np.flatnonzero(_image_values(table, POS_VIDEO, "dataset") != "")
        if len(with_video):
            raise ValueError(
                f"Row {row_number[with_video[0]]} (and {len(with_video) - 1} more) has a video positive "
                f"({POS_VIDEO!r}); mined negatives are written as texts and images ({NEG_TEXT!r}, {NEG_IMAGE!r}), "
                "which hold no video. Mine rows whose positives are texts or images (video queries are fine), or "
                "leave these rows out."
            )
        group = _texts(table, config.group_column) if config.group_column else np.full(n, "", dtype=object)
        texts, images, groups, origins = [pos_text], [pos_image], [group], [np.arange(n)]
        if corpus is not None:
            ctable = corpus.with_format("arrow")[:]
            if not {"text", "image"} & set(ctable.column_names):
                raise KeyError(f"The corpus needs a 'text' and/or an 'image' column; it has {ctable.column_names}.")
            if config.group_column and config.group_column not in ctable.column_names:
                raise KeyError(f"group_column {config.group_column!r} is not a column of the corpus.")
            if "video" in ctable.column_names and (_image_values(ctable, "video", "corpus") != "").any():
                raise ValueError("The corpus holds videos; mined negatives are texts and images: drop its 'video' "
                                 "column, or its rows with a video.")
            ctexts, cimages = _texts(ctable, "text"), _image_values(ctable, "image", "corpus")
            texts.append(ctexts)
            images.append(cimages)
            groups.append(_texts(ctable, config.group_column) if config.group_column
                          else np.full(ctable.num_rows, "", dtype=object))
            origins.append(-1 - np.arange(ctable.num_rows))  # negative: corpus row -1 - origin
        all_text, all_image, all_group = np.concatenate(texts), np.concatenate(images), np.concatenate(groups)
        modality = _modality(all_text, all_image) if config.match_modality else np.zeros(len(all_text), dtype=int)
        group_ids = _unique(all_group, modality)[1]
        first, inverse = _unique(all_text, all_image, group_ids)
        self.pool_text, self.pool_image, self.pool_group = all_text[first], all_image[first], group_ids[first]
        origin = np.concatenate(origins)[first]
        self.pool_items = [(text, image, "") for text, image in zip(self.pool_text.tolist(), self.pool_image.tolist())]
        self.pool_labels = [(f"row {row_number[o]}, column {POS_IMAGE!r}", "") if o >= 0
                            else (f"corpus row {-1 - o}", "") for o in origin]
        self.row_positive = inverse[:n]
        query_video = _image_values(table, QUERY_VIDEO, "dataset")
        q_first, self.row_query = _unique(query_text, query_image, query_video)
        self.query_items = list(zip(query_text[q_first].tolist(), query_image[q_first].tolist(),
                                    query_video[q_first].tolist()))
        self.query_labels = [(f"row {r}, column {QUERY_IMAGE!r}", f"row {r}, column {QUERY_VIDEO!r}")
                             for r in row_number[q_first]]

    def set_search_units(self, query_keys: np.ndarray) -> None:
        """Once the queries' content keys are known: the search units, one per (query, positive group), each searched
        with its own query's embedding; and the rows' query *contents* (content key, positive group): rows whose
        queries show the same content (one image under two paths, texts that differ only in case or spacing) share
        their positives and queries as exclusions, so neither's positive is mined as the other's negative."""
        row_group = self.pool_group[self.row_positive]
        self.row_query_key = query_keys[self.row_query]
        unit_first, self.row_unit = _unique(self.row_query, row_group)
        self.unit_query = self.row_query[unit_first]
        self.unit_group = row_group[unit_first]
        self.row_content = _unique(self.row_query_key, row_group)[1]
        self.unit_content = self.row_content[unit_first]  # a unit's rows share one query, hence one content


def _pair_hash(units: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """One 64-bit value per (search unit, content key) pair."""
    with np.errstate(over="ignore"):
        return keys.astype(np.uint64) ^ (units.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15))


class _Searcher:
    """Search one chunk of units and apply the filters to their rows."""

    def __init__(self, rows: _RowTable, config: MiningConfig, query_emb, pool_emb, pool_keys, device=None):
        self.rows, self.config, self.device = rows, config, device
        self.query_emb, self.pool_emb, self.pool_keys = query_emb, pool_emb, pool_keys
        self.num_chunks = -(-len(rows.unit_query) // config.chunk_size)
        # (query content, content key of one of its positives or of the query): a candidate with such a pair is never
        # its negative (symmetric data holds each query among the positives: it would be its own hardest negative)
        contents = np.concatenate([rows.row_content, rows.row_content])
        keys = np.concatenate([pool_keys[rows.row_positive], rows.row_query_key])
        self.excluded = np.unique(_pair_hash(contents, keys))
        key_values, key_counts = np.unique(pool_keys, return_counts=True)
        # pool items that carry each unit's excluded keys: retrieved beside `depth` so that depth survive them
        content_keys = np.unique(np.stack([contents, keys]), axis=1)
        at = np.minimum(np.searchsorted(key_values, content_keys[1]), len(key_values) - 1)
        counts = np.where(key_values[at] == content_keys[1], key_counts[at], 0)  # a query's content may be no candidate
        excluded_per_content = np.bincount(content_keys[0], weights=counts, minlength=int(rows.row_content.max()) + 1)
        self.unit_excluded = excluded_per_content[rows.unit_content].astype(int)
        self.rows_by_unit = np.argsort(rows.row_unit, kind="stable")
        self.unit_row_bounds = np.searchsorted(rows.row_unit[self.rows_by_unit], np.arange(len(rows.unit_query) + 1))

    def chunk(self, chunk: int) -> dict[str, np.ndarray]:
        rows, config = self.rows, self.config
        lo, hi = chunk * config.chunk_size, min((chunk + 1) * config.chunk_size, len(rows.unit_query))
        k = min(config.retrieval_depth + int(self.unit_excluded[lo:hi].max()), len(self.pool_emb))
        queries = torch.from_numpy(np.asarray(self.query_emb[rows.unit_query[lo:hi]]))
        found = search_top_k(
            queries, self.pool_emb, k, query_groups=rows.unit_group[lo:hi], corpus_groups=rows.pool_group,
            corpus_chunk_size=config.corpus_chunk_size, backend=config.search_backend, device=self.device,
        )
        row_ids = self.rows_by_unit[self.unit_row_bounds[lo] : self.unit_row_bounds[hi]]
        local = rows.row_unit[row_ids] - lo
        indices, scores = found.indices.cpu()[local].numpy(), found.scores.cpu()[local].numpy()
        # each row sees its own unit's depth (k is the chunk's largest): the result does not depend on the chunking
        own_k = config.retrieval_depth + self.unit_excluded[rows.row_unit[row_ids]]
        indices = np.where(np.arange(indices.shape[1])[None, :] < own_k[:, None], indices, -1)
        query_vectors = np.asarray(self.query_emb[rows.row_query[row_ids]])
        positive_vectors = np.asarray(self.pool_emb[rows.row_positive[row_ids]])
        positive_scores = np.einsum("nd,nd->n", query_vectors, positive_vectors)
        return {"rows": row_ids, "positive_scores": positive_scores.astype(np.float32),
                **filter_candidates(indices, scores, positive_scores, rows.row_content[row_ids], self.pool_keys,
                                    self.excluded, config)}


def filter_candidates(indices: np.ndarray, scores: np.ndarray, positive_scores: np.ndarray, units: np.ndarray,
                      pool_keys: np.ndarray, excluded: np.ndarray, config: MiningConfig) -> dict[str, np.ndarray]:
    """Apply the drop rules to retrieved candidates (rows x k, best first, ``-1`` = none) of each row.

    Returns ``negatives`` (rows x num_negatives pool indices, ``-1`` past a row's survivors), ``negative_scores``,
    ``survivors`` (count per row) and ``dropped`` (count per reason, in :data:`REASONS` order).
    """
    valid = indices >= 0
    keys = pool_keys[np.maximum(indices, 0)]
    duplicate = valid & np.isin(_pair_hash(np.broadcast_to(units[:, None], indices.shape), keys), excluded)
    repeated = _repeats_earlier(keys, valid & ~duplicate)
    candidate = valid & ~duplicate & ~repeated
    rank = np.cumsum(candidate, axis=1) - 1
    examined = candidate & (rank < config.retrieval_depth)
    in_window = examined & (rank >= config.range_min) & (rank < config.window_stop)
    below_margin = np.ones_like(in_window)
    if config.false_negative_margin is not None:
        below_margin = scores <= positive_scores[:, None] + config.false_negative_margin
    keep = in_window & below_margin
    order = np.argsort(~keep, axis=1, kind="stable")[:, : config.num_negatives]  # survivors first, best first
    kept = np.take_along_axis(keep, order, axis=1)
    dropped = np.array([
        int(duplicate.sum()),
        int(repeated.sum()),
        int((examined & ~in_window).sum()),
        int((in_window & ~below_margin).sum()),
    ], dtype=np.int64)
    return {
        "negatives": np.where(kept, np.take_along_axis(indices, order, axis=1), -1),
        "negative_scores": np.where(kept, np.take_along_axis(scores, order, axis=1), np.nan).astype(np.float32),
        "survivors": keep.sum(axis=1),
        "candidates": np.array([int((valid & (duplicate | repeated | examined)).sum())], dtype=np.int64),
        "dropped": dropped,
    }


def _repeats_earlier(keys: np.ndarray, among: np.ndarray) -> np.ndarray:
    """Where a row's key (content keys are >= 0) already stands at an earlier position of ``among`` in that row."""
    columns = np.arange(keys.shape[1])
    keys = np.where(among, keys, -1 - columns)  # positions outside `among`: keys that match nothing
    order = np.argsort(keys, axis=1, kind="stable")  # equal keys stay in rank order: the first of each is kept
    ordered = np.take_along_axis(keys, order, axis=1)
    repeat = np.zeros_like(among)
    np.put_along_axis(repeat, order, np.pad(ordered[:, 1:] == ordered[:, :-1], ((0, 0), (1, 0))), axis=1)
    return repeat


def _assemble(checked, rows: _RowTable, result_dir: Path, num_chunks: int, config: MiningConfig):
    """The dataset with the mined negatives (rows left without any dropped), and the summary."""
    n, k = len(rows.row_positive), config.num_negatives
    negatives = np.full((n, k), -1, dtype=np.int64)
    negative_scores = np.full((n, k), np.nan, dtype=np.float32)
    survivors = np.zeros(n, dtype=np.int64)
    positive_scores = np.zeros(n, dtype=np.float32)
    summary = MiningSummary(rows=n, short_rows=config.short_rows)
    for chunk in range(num_chunks):
        data = np.load(result_dir / f"chunk-{chunk:06d}.npz")
        at = data["rows"]
        negatives[at], negative_scores[at] = data["negatives"], data["negative_scores"]
        survivors[at], positive_scores[at] = data["survivors"], data["positive_scores"]
        summary.candidates += int(data["candidates"][0])
        for reason, count in zip(REASONS, data["dropped"].tolist()):
            summary.dropped[reason] += count
    found = np.minimum(survivors, k)
    short = (found > 0) & (found < k)
    keep_rows = found == k if config.short_rows == "drop" else found > 0
    summary.rows_short = int(short.sum())
    summary.rows_dropped = int((~keep_rows).sum())
    summary.rows_mined = int(keep_rows.sum())
    # a short row repeats its survivors in order: negative j is survivor j mod (number of survivors)
    cycle = np.arange(k)[None, :] % np.maximum(found, 1)[:, None]
    negatives = np.take_along_axis(negatives, cycle, axis=1)[keep_rows]
    summary.positive_score_mean = float(positive_scores[keep_rows].mean()) if keep_rows.any() else float("nan")
    kept_scores = negative_scores[keep_rows]
    summary.negative_score_mean = float(np.nanmean(kept_scores)) if np.isfinite(kept_scores).any() else float("nan")
    result = checked.select(np.flatnonzero(keep_rows))
    drop = [c for c in (NEG_TEXT, NEG_IMAGE, ROW_INDEX_COLUMN) if c in result.column_names]
    if {NEG_TEXT, NEG_IMAGE} & set(drop):
        logger.warning("The dataset's own %s/%s columns are replaced by the mined negatives.", NEG_TEXT, NEG_IMAGE)
    result = result.remove_columns(drop)
    result = result.add_column(NEG_TEXT, rows.pool_text[negatives].tolist())
    result = result.add_column(NEG_IMAGE, rows.pool_image[negatives].tolist())
    return result, summary


# ---------------------------------------------------------------------------------------------------------- output
def write_mined(dataset, output: str | os.PathLike, output_format: str = "mmeb") -> Path:
    """Write a mined dataset: ``.jsonl`` / ``.parquet`` / a ``save_to_disk`` folder in the MMEB schema, or UME-R1's
    JSON (``output_format="ume_r1"``). Written beside the destination, then renamed: never half-written."""
    output = _check_output(output, output_format)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output_format == "ume_r1":
        text = json.dumps(to_ume_r1_records(dataset), ensure_ascii=False, indent=1)
        write_text_atomic(output, text)
        return output
    suffix = output.suffix.lower()
    if suffix in (".jsonl", ".parquet"):
        with staged_file(output) as staging:
            if suffix == ".jsonl":
                dataset.to_json(str(staging), lines=True, force_ascii=False)
            else:
                dataset.to_parquet(str(staging))
        return output
    with staged_dir(output, what="the mined dataset") as staging:
        dataset.save_to_disk(str(staging))
        publish_dir(staging, output)
    return output


def _check_output(output: str | os.PathLike, output_format: str) -> Path:
    """The output path, if its name fits the format (checked before mining: a long run never fails at its end)."""
    output = Path(output)
    suffix = output.suffix.lower()
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}.")
    if output_format == "ume_r1" and suffix != ".json":
        raise ValueError(f"output {output}: UME-R1's format is one JSON list; name the output '*.json'.")
    if output_format == "mmeb" and suffix not in ("", ".jsonl", ".parquet"):
        raise ValueError(
            f"output {output}: the MMEB schema is written as .jsonl, .parquet or a folder (save_to_disk); "
            "for UME-R1's JSON pass output_format='ume_r1' and a '.json' name."
        )
    return output


def to_ume_r1_records(dataset) -> list[dict[str, Any]]:
    """Rows as UME-R1's SFT records, ``{"qry": side, "pos": side, "neg": [side, ...]}``, each side
    ``{"conversations": [human turn, gpt turn], "image": path}`` (the human turn is UME-R1's prompt: ``<image>``,
    the text, ``<disc_emb>`` and its instruction; the gpt turn the side's reasoning target, when the rows have one;
    negatives have none). :func:`~mm_embed_trl.data.reasoning.load_ume_r1_sft_json` reads them back."""
    from ..data.schema import POS_REASONING, QUERY_REASONING
    from ..data.templates import DISC_EMB_TOKEN, UME_R1_INSTRUCTION, strip_image_placeholders

    def side(text, image, reasoning=None, video=None):
        prompt = ("<video>\n" if video else "") + ("<image>\n" if image else "") + strip_image_placeholders(text or "")
        turns = [{"from": "human", "value": f"{prompt}\n{DISC_EMB_TOKEN}\n{UME_R1_INSTRUCTION}"}]
        if reasoning:
            turns.append({"from": "gpt", "value": reasoning})
        out = {"conversations": turns}
        if image:
            out["image"] = image
        if video:
            out["video"] = video
        return out

    columns = dataset.column_names
    records = []
    for row in dataset:
        records.append({
            "qry": side(row[QUERY_TEXT], row.get(QUERY_IMAGE), row.get(QUERY_REASONING) if QUERY_REASONING in columns
                        else None, row.get(QUERY_VIDEO)),
            "pos": side(row[POS_TEXT], row.get(POS_IMAGE), row.get(POS_REASONING) if POS_REASONING in columns
                        else None),
            "neg": [side(t, i) for t, i in zip(row[NEG_TEXT], row[NEG_IMAGE])],
        })
    return records
