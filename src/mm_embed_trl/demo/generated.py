"""A generated "shapes" dataset for demos and tests: coloured shapes with captions that test composition.

Each scene holds one to three shapes (circle, square, triangle, star, cross) in eight colours at five
positions (left, right, top, bottom, center). Captions are canonical, so each caption names exactly one
scene:

* one shape:       ``"a red circle on the left"``
* two shapes:      ``"a red circle on the left and a blue square on the right"`` (left/right or top/bottom)
* a count:         ``"two green triangles"`` / ``"three blue stars"`` (laid out in a row)

Many scenes share single attributes (colour, shape, position), so telling them apart needs the binding
of colour to shape to position - the compositional skill benchmarks such as SugarCrepe probe.

The dataset is written to disk in the native MMEB-train schema (``docs/DESIGN.md``): PNG images under
``<output_dir>/images/`` and one parquet file per split, image paths relative to ``output_dir`` - so
**image_root = output_dir** (also stored as ``image_root`` on the returned ``DatasetDict`` and described
in ``<output_dir>/shapes_dataset.json``). Rows come in two directions (column ``task``):

* ``"i2t"``: ``qry = "<|image_1|>\\nRepresent the given image."`` + the scene image -> ``pos_text`` = caption;
* ``"t2i"``: ``qry = "Find an image that matches the given caption: <caption>"`` -> the scene image.

Everything is a deterministic function of the parameters (seed included): the same parameters give the
same captions and the same pixels. :func:`to_mmeb_eval` turns a split into the MMEB-eval schema.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from .._cache import cache_root
from .._files import follow_umask, publish_dir, staged_dir
from ..data.schema import (
    EVAL_QUERY_IMAGE,
    EVAL_QUERY_TEXT,
    EVAL_TARGET_IMAGES,
    EVAL_TARGET_TEXTS,
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_REASONING,
    POS_TEXT,
    QUERY_IMAGE,
    QUERY_REASONING,
    QUERY_TEXT,
)

__all__ = [
    "BACKGROUND",
    "COLORS",
    "GENERATOR_VERSION",
    "I2T_QUERY",
    "IMAGE_DOC_TEXT",
    "INFO_FILE",
    "POSITIONS",
    "SHAPES",
    "T2I_QUERY",
    "SceneObject",
    "SceneSpec",
    "all_scenes",
    "hard_negatives",
    "load_shapes_dataset",
    "make_shapes_dataset",
    "reasoning_target",
    "render_scene",
    "sample_scenes",
    "shapes_cache_dir",
    "to_mmeb_eval",
]

# Bump when rendering, captions or row layout change: it is part of the cache key.
GENERATOR_VERSION = 3  # 2: reasoning targets (qry_reasoning, pos_reasoning); 3: shorter traces
INFO_FILE = "shapes_dataset.json"
IMAGES_DIR = "images"

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 210, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "pink": (245, 110, 180),
    "brown": (120, 75, 30),
}
BACKGROUND: tuple[int, int, int] = (245, 245, 245)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# position -> (x, y) centre as a fraction of the image side
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.2, 0.5),
    "right": (0.8, 0.5),
    "top": (0.5, 0.2),
    "bottom": (0.5, 0.8),
    "center": (0.5, 0.5),
}
_POSITION_PHRASE = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_POSITION_ORDER = {p: i for i, p in enumerate(("left", "top", "center", "bottom", "right"))}
_PAIR_AXES = (("left", "right"), ("top", "bottom"))
# a count of n identical shapes is laid out in a row (its caption names no positions)
_COUNT_LAYOUT = {2: ("left", "right"), 3: ("left", "center", "right")}
_NUMBER_WORDS = {2: "two", 3: "three"}
_PLURALS = {"cross": "crosses"}
_SHAPE_RADIUS = 0.13  # of the image side; 3 shapes in a row stay apart down to tiny images

I2T_QUERY = "<|image_1|>\nRepresent the given image."
IMAGE_DOC_TEXT = "<|image_1|>\nRepresent the given image."
T2I_QUERY = "Find an image that matches the given caption: {caption}"

# Fractions of generated scenes per kind (before capping by how many distinct scenes each kind has).
_KIND_WEIGHTS = {"single": 0.25, "pair": 0.55, "count": 0.20}


@dataclass(frozen=True, order=True)
class SceneObject:
    """One shape: its kind, colour name (a key of :data:`COLORS`) and position (a key of :data:`POSITIONS`)."""

    shape: str
    color: str
    position: str

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"Unknown shape {self.shape!r}; use one of {SHAPES}.")
        if self.color not in COLORS:
            raise ValueError(f"Unknown colour {self.color!r}; use one of {tuple(COLORS)}.")
        if self.position not in POSITIONS:
            raise ValueError(f"Unknown position {self.position!r}; use one of {tuple(POSITIONS)}.")

    def phrase(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        return f"{article} {self.color} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """A scene: 1-3 objects at distinct positions (stored in canonical order, left/top first)."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self):
        objects = tuple(sorted(self.objects, key=lambda o: (_POSITION_ORDER[o.position], o)))
        if not 1 <= len(objects) <= 3:
            raise ValueError(f"A scene holds 1 to 3 objects; got {len(objects)}.")
        positions = [o.position for o in objects]
        if len(set(positions)) != len(positions):
            raise ValueError(f"Two objects share a position in {positions}; give each object its own position.")
        object.__setattr__(self, "objects", objects)

    @property
    def kind(self) -> str:
        """``"single"``; ``"count"`` (2-3 identical shapes in the standard row layout, captioned by number);
        otherwise ``"pair"`` / ``"triple"`` (captioned object by object, with positions)."""
        n = len(self.objects)
        if n == 1:
            return "single"
        identical = len({(o.shape, o.color) for o in self.objects}) == 1
        # Only the standard layout is captioned "two red circles": identical shapes placed elsewhere keep
        # their positions in the caption, so a caption always names exactly one image.
        if identical and tuple(o.position for o in self.objects) == _COUNT_LAYOUT.get(n):
            return "count"
        return "pair" if n == 2 else "triple"

    @property
    def caption(self) -> str:
        """The canonical caption (see the module docstring)."""
        if self.kind == "count":
            first = self.objects[0]
            plural = _PLURALS.get(first.shape, first.shape + "s")
            return f"{_NUMBER_WORDS[len(self.objects)]} {first.color} {plural}"
        parts = [f"{o.phrase()} {_POSITION_PHRASE[o.position]}" for o in self.objects]
        return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]

    @property
    def filename(self) -> str:
        """Image path relative to the dataset folder (readable, unique per caption)."""
        return f"{IMAGES_DIR}/{re.sub(r'[^a-z0-9]+', '_', self.caption.lower()).strip('_')}.png"

    def to_rows(self) -> list[dict[str, str]]:
        return [{"shape": o.shape, "color": o.color, "position": o.position} for o in self.objects]


def _count_scene(n: int, color: str, shape: str) -> SceneSpec:
    return SceneSpec(tuple(SceneObject(shape, color, p) for p in _COUNT_LAYOUT[n]))


def all_scenes() -> dict[str, list[SceneSpec]]:
    """Every scene the generator can produce, by kind, in a fixed canonical order."""
    items = list(product(COLORS, SHAPES))
    singles = [SceneSpec((SceneObject(s, c, p),)) for c, s in items for p in POSITIONS]
    pairs = [
        SceneSpec((SceneObject(s1, c1, p1), SceneObject(s2, c2, p2)))
        for p1, p2 in _PAIR_AXES
        for (c1, s1), (c2, s2) in product(items, items)
        if (c1, s1) != (c2, s2)  # two identical objects are a count scene
    ]
    counts = [_count_scene(n, c, s) for n in _COUNT_LAYOUT for c, s in items]
    return {"single": singles, "pair": pairs, "count": counts}


def sample_scenes(num: int, seed: int = 0) -> list[SceneSpec]:
    """``num`` distinct scenes, deterministic in ``seed``, mixing kinds roughly as ``_KIND_WEIGHTS``."""
    pools = all_scenes()
    available = sum(len(v) for v in pools.values())
    if not 0 <= num <= available:
        raise ValueError(f"Asked for {num} scenes; the shapes generator has {available} distinct scenes.")
    rng = random.Random(seed)
    for kind in pools:  # canonical order + seeded shuffle = deterministic
        rng.shuffle(pools[kind])
    take = {k: min(len(pools[k]), round(num * _KIND_WEIGHTS[k])) for k in ("single", "count")}
    take["pair"] = num - take["single"] - take["count"]
    # if pairs run short (tiny universes never happen with the defaults) top up from the other kinds
    overflow = max(0, take["pair"] - len(pools["pair"]))
    take["pair"] -= overflow
    for kind in ("single", "count"):
        extra = min(overflow, len(pools[kind]) - take[kind])
        take[kind] += extra
        overflow -= extra
    chosen = [s for kind in ("single", "pair", "count") for s in pools[kind][: take[kind]]]
    rng.shuffle(chosen)
    return chosen


def _variants(spec: SceneSpec) -> tuple[list[SceneSpec], list[SceneSpec]]:
    """Compositionally close scenes: (binding swaps, single-attribute changes)."""
    swaps: list[SceneSpec] = []
    edits: list[SceneSpec] = []

    def add(target: list[SceneSpec], objects: Iterable[SceneObject]) -> None:
        try:
            target.append(SceneSpec(tuple(objects)))
        except ValueError:  # e.g. two objects landing on one position
            pass

    kind = spec.kind
    if kind == "count":
        first = spec.objects[0]
        n = len(spec.objects)
        for other_n in _COUNT_LAYOUT:
            if other_n != n:
                edits.append(_count_scene(other_n, first.color, first.shape))
        edits.append(SceneSpec((SceneObject(first.shape, first.color, "center"),)))
        edits += [_count_scene(n, c, first.shape) for c in COLORS if c != first.color]
        edits += [_count_scene(n, first.color, s) for s in SHAPES if s != first.shape]
        return swaps, edits
    objs = spec.objects
    if kind == "pair":
        a, b = objs
        add(swaps, (SceneObject(b.shape, b.color, a.position), SceneObject(a.shape, a.color, b.position)))
        if a.color != b.color:
            add(swaps, (SceneObject(a.shape, b.color, a.position), SceneObject(b.shape, a.color, b.position)))
        if a.shape != b.shape:
            add(swaps, (SceneObject(b.shape, a.color, a.position), SceneObject(a.shape, b.color, b.position)))
        other_axis = next(axis for axis in _PAIR_AXES if a.position not in axis)
        add(edits, (SceneObject(a.shape, a.color, other_axis[0]), SceneObject(b.shape, b.color, other_axis[1])))
    for i, o in enumerate(objs):
        rest = objs[:i] + objs[i + 1 :]
        for c in COLORS:
            if c != o.color:
                add(edits, rest + (SceneObject(o.shape, c, o.position),))
        for s in SHAPES:
            if s != o.shape:
                add(edits, rest + (SceneObject(s, o.color, o.position),))
        if kind == "single":
            for p in POSITIONS:
                if p != o.position:
                    add(edits, (SceneObject(o.shape, o.color, p),))
    return swaps, edits


def hard_negatives(
    spec: SceneSpec,
    k: int,
    rng: random.Random,
    *,
    exclude: frozenset[str] | set[str] = frozenset(),
    fallback: Sequence[SceneSpec] = (),
) -> list[SceneSpec]:
    """``k`` distinct scenes close to ``spec``: binding swaps first, then one-attribute edits, in seeded order.

    Scenes whose caption is ``spec``'s or in ``exclude`` are skipped; if the close variants run out,
    scenes from ``fallback`` (in seeded order) fill the rest.
    """
    swaps, edits = _variants(spec)
    rng.shuffle(swaps)
    rng.shuffle(edits)
    candidates: Iterable[SceneSpec] = [*swaps, *edits]
    if len(swaps) + len(edits) < k:
        extra = list(fallback)
        rng.shuffle(extra)
        candidates = [*candidates, *extra]
    seen = {spec.caption, *exclude}
    out: list[SceneSpec] = []
    for cand in candidates:
        if cand.caption not in seen:
            seen.add(cand.caption)
            out.append(cand)
            if len(out) == k:
                return out
    raise ValueError(f"Could not find {k} distinct negatives for {spec.caption!r}; ask for fewer negatives.")


def reasoning_target(spec: SceneSpec, seen_as: str) -> str:
    """A correct UME-R1 reasoning target for one side showing ``spec``: what the image shows (``seen_as="image"``)
    or what the caption describes (``"text"``), then the caption as the answer, then ``<gen_emb>``.

    ``"<think>The image shows two shapes.</think>"``
    ``"<answer>a red circle on the left and a blue square on the right</answer><gen_emb>"``

    The trace states what kind of scene it is (how many shapes, in a row or not) and leaves the full description to
    the answer, so a target stays short enough for the tiny demo model to learn to write it.
    """
    from ..data.reasoning import format_reasoning

    n = len(spec.objects)
    if spec.kind == "count":
        what = f"{_NUMBER_WORDS[n]} identical shapes in a row"
    else:
        what = "one shape" if n == 1 else f"{_NUMBER_WORDS[n]} shapes"
    verb = "The image shows" if seen_as == "image" else "The caption describes"
    return format_reasoning(f"{verb} {what}.", spec.caption)


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.8 * r), (cx - 0.95 * r, cy + 0.8 * r)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else 0.45 * r
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(shape)


def render_scene(spec: SceneSpec, image_size: int = 64) -> Image.Image:
    """Draw ``spec`` on a light background as an RGB image (no anti-aliasing: colours stay exact)."""
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small to draw shapes; use 16 or more.")
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    r = _SHAPE_RADIUS * image_size
    for obj in spec.objects:
        fx, fy = POSITIONS[obj.position]
        cx, cy = fx * image_size, fy * image_size
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif obj.shape == "square":
            h = 0.85 * r  # similar area to the circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif obj.shape == "cross":
            t = 0.33 * r
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    return image


# ----------------------------------------------------------------------------------------- writing


def _params(
    *, num_train: int, num_eval: int, seed: int, image_size: int, num_negatives: int, t2i_fraction: float
) -> dict[str, Any]:
    checks = (("num_train", num_train, 1), ("num_eval", num_eval, 0), ("num_negatives", num_negatives, 0))
    for name, value, low in checks:
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}; got {value!r}.")
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an integer >= 16; got {image_size!r}.")
    if not 0.0 <= float(t2i_fraction) <= 1.0:
        raise ValueError(f"t2i_fraction must lie in [0, 1]; got {t2i_fraction!r}.")
    return {
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_eval": num_eval,
        "seed": int(seed),
        "image_size": image_size,
        "num_negatives": num_negatives,
        "t2i_fraction": float(t2i_fraction),
    }


def shapes_cache_dir(params: dict[str, Any]) -> Path:
    """``$MM_EMBED_TRL_CACHE`` (default ``~/.cache/mm_embed_trl``) ``/ shapes-<hash of params>``."""
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root(f"shapes-{digest}")


def _features(num_negatives: int):
    from datasets import Features, List, Value

    string = Value("string")
    columns: dict[str, Any] = {
        QUERY_TEXT: string,
        QUERY_IMAGE: string,
        POS_TEXT: string,
        POS_IMAGE: string,
    }
    if num_negatives > 0:
        columns[NEG_TEXT] = List(string)
        columns[NEG_IMAGE] = List(string)
    columns[QUERY_REASONING] = string
    columns[POS_REASONING] = string
    columns.update(
        task=string,
        caption=string,
        image_path=string,
        objects=List({"shape": string, "color": string, "position": string}),
    )
    return Features(columns)


def _build_rows(
    scenes: list[SceneSpec],
    *,
    rng: random.Random,
    t2i_fraction: float,
    num_negatives: int,
    exclude: frozenset[str],
    fallback: Sequence[SceneSpec],
    to_render: dict[str, SceneSpec],
) -> dict[str, list]:
    """Column dict for one split; records every scene whose image the rows reference in ``to_render``."""
    columns: dict[str, list] = {name: [] for name in _features(num_negatives)}
    for spec in scenes:
        task = "t2i" if rng.random() < t2i_fraction else "i2t"
        image = spec.filename
        to_render[image] = spec
        if task == "i2t":
            row = {QUERY_TEXT: I2T_QUERY, QUERY_IMAGE: image, POS_TEXT: spec.caption, POS_IMAGE: ""}
        else:
            row = {QUERY_TEXT: T2I_QUERY.format(caption=spec.caption), QUERY_IMAGE: "", POS_TEXT: IMAGE_DOC_TEXT}
            row[POS_IMAGE] = image
        if num_negatives > 0:
            negatives = hard_negatives(spec, num_negatives, rng, exclude=exclude, fallback=fallback)
            if task == "i2t":
                row[NEG_TEXT] = [n.caption for n in negatives]
                row[NEG_IMAGE] = [""] * num_negatives
            else:
                row[NEG_TEXT] = [IMAGE_DOC_TEXT] * num_negatives
                row[NEG_IMAGE] = [n.filename for n in negatives]
                to_render.update((n.filename, n) for n in negatives)
        image_side, text_side = reasoning_target(spec, "image"), reasoning_target(spec, "text")
        row[QUERY_REASONING], row[POS_REASONING] = (image_side, text_side) if task == "i2t" else (text_side, image_side)
        row.update(task=task, caption=spec.caption, image_path=image, objects=spec.to_rows())
        for name, value in row.items():
            columns[name].append(value)
    return columns


def _write_dataset(folder: Path, params: dict[str, Any]) -> None:
    import pyarrow.parquet as pq
    from datasets import Dataset

    scenes = sample_scenes(params["num_train"] + params["num_eval"], params["seed"])
    eval_scenes, train_scenes = scenes[: params["num_eval"]], scenes[params["num_eval"] :]
    eval_captions = frozenset(s.caption for s in eval_scenes)
    fallback = [s for kind in all_scenes().values() for s in kind]
    # A separate stream for tasks/negatives keeps the scene choice independent of these options.
    rng = random.Random(f"shapes-rows-{params['seed']}")
    to_render: dict[str, SceneSpec] = {}
    features = _features(params["num_negatives"])
    counts = {}
    for split, split_scenes, exclude in (
        ("train", train_scenes, eval_captions),  # no eval scene may leak into training, even as a negative
        ("eval", eval_scenes, frozenset()),
    ):
        columns = _build_rows(
            split_scenes,
            rng=rng,
            t2i_fraction=params["t2i_fraction"],
            num_negatives=params["num_negatives"],
            exclude=exclude,
            fallback=fallback,
            to_render=to_render,
        )
        dataset = Dataset.from_dict(columns, features=features)
        pq.write_table(dataset.data.table, folder / f"{split}.parquet")  # keeps the features in the metadata
        counts[split] = len(dataset)
    (folder / IMAGES_DIR).mkdir()
    for relative, spec in sorted(to_render.items()):
        render_scene(spec, params["image_size"]).save(folder / relative, format="PNG")
    info = {
        "generator": "mm_embed_trl.demo.generated (shapes)",
        "params": params,
        "splits": counts,
        "image_root": ".",
        "note": "Image paths are relative to this folder: pass it as image_root (--image_root).",
    }
    (folder / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def _read_info(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / INFO_FILE).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def load_shapes_dataset(output_dir: str | os.PathLike):
    """Load a shapes dataset written by :func:`make_shapes_dataset`; ``image_root`` is set to the folder.

    Returns:
        A ``datasets.DatasetDict`` with splits ``train`` and ``eval`` and an extra attribute
        ``image_root`` (str): the folder the rows' image paths are relative to.
    """
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict
    from datasets.table import InMemoryTable

    folder = Path(output_dir).expanduser().resolve()
    info = _read_info(folder)
    if info is None:
        raise FileNotFoundError(
            f"'{folder}' holds no shapes dataset (no readable {INFO_FILE}); create one with "
            "make_shapes_dataset(output_dir=...)."
        )
    splits = {
        # read straight from parquet: no copy into the datasets cache folder
        split: Dataset(InMemoryTable(pq.read_table(folder / f"{split}.parquet")))
        for split in info["splits"]
    }
    result = DatasetDict(splits)
    result.image_root = str(folder)
    return result


def _publish(tmp: Path, out: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out`` atomically; tolerate a concurrent writer of the same data."""
    follow_umask(tmp)
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty ``out`` folder
        return
    except OSError:
        if not out.exists():
            raise
    info = _read_info(out)
    if info is not None and info.get("params") == params and not overwrite:
        return  # another process published the same dataset first; ours is identical, drop it
    if not overwrite:
        raise FileExistsError(f"'{out}' appeared while the shapes dataset was being written; retry.")
    publish_dir(tmp, out)


def make_shapes_dataset(
    output_dir: str | os.PathLike | None = None,
    *,
    num_train: int = 512,
    num_eval: int = 128,
    seed: int = 0,
    image_size: int = 64,
    num_negatives: int = 0,
    t2i_fraction: float = 0.25,
    overwrite: bool = False,
):
    """Generate (or reuse) the shapes dataset and return it as a ``datasets.DatasetDict``.

    Args:
        output_dir: Folder to write to; it becomes the ``image_root``. ``None`` uses a cache folder keyed
            by the parameters: ``$MM_EMBED_TRL_CACHE`` (default ``~/.cache/mm_embed_trl``)
            ``/shapes-<hash>``. A folder that already holds a dataset made with the same parameters is
            reused as is.
        num_train, num_eval: Rows per split; the two splits never share a caption (nor a scene, and no
            eval scene appears among the training negatives).
        seed: Seeds scene choice, directions and negatives; same parameters -> same captions and pixels.
        image_size: Side of the square PNG images in pixels.
        num_negatives: If > 0, each row gets ``neg_text`` / ``neg_image_path`` lists of this length,
            holding compositionally close scenes (swapped colours/positions, one attribute changed):
            captions for ``i2t`` rows, images for ``t2i`` rows.
        t2i_fraction: Fraction of rows in the text-to-image direction (the rest are image-to-text).
        overwrite: Replace whatever ``output_dir`` holds.

    Returns:
        ``DatasetDict(train=..., eval=...)`` in the MMEB-train schema plus ``task``, ``caption``,
        ``image_path`` and ``objects`` columns, with an ``image_root`` attribute (the folder).

    Raises:
        FileExistsError: ``output_dir`` is not empty and holds something else (another dataset or other
            files), unless ``overwrite=True``.
    """
    params = _params(
        num_train=num_train,
        num_eval=num_eval,
        seed=seed,
        image_size=image_size,
        num_negatives=num_negatives,
        t2i_fraction=t2i_fraction,
    )
    out = Path(output_dir).expanduser() if output_dir is not None else shapes_cache_dir(params)
    out = out.resolve()
    info = _read_info(out)
    if not overwrite and info is not None and info.get("params") == params:
        return load_shapes_dataset(out)
    if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
        if info is None:
            raise FileExistsError(
                f"output_dir '{out}' exists and is not an empty folder; pass a new or empty folder, or "
                "overwrite=True to replace its contents."
            )
        different = {k: (info.get("params", {}).get(k), v) for k, v in params.items()}
        different = {k: f"{old!r} -> {new!r}" for k, (old, new) in different.items() if old != new}
        raise FileExistsError(
            f"output_dir '{out}' holds a shapes dataset made with other parameters ({different}); use another "
            "folder, output_dir=None (a cache folder per parameter set), or overwrite=True."
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp folder, then rename: readers never see a half-written dataset, and two
    # processes generating the same dataset at once cannot corrupt it.
    with staged_dir(out, what="the generated shapes dataset") as tmp:
        _write_dataset(tmp, params)
        _publish(tmp, out, params, overwrite)
    return load_shapes_dataset(out)


def to_mmeb_eval(dataset, num_candidates: int = 16, *, seed: int = 0, task: str | None = None):
    """Convert a shapes split into the MMEB-eval schema (one query per row, first candidate correct).

    Args:
        dataset: A split from :func:`make_shapes_dataset` (needs ``caption``, ``image_path``, ``task``).
        num_candidates: Candidates per query: the correct one plus ``num_candidates - 1`` other scenes of
            the same split, drawn at random (seeded), so every distractor has an image on disk.
        seed: Seeds the distractor choice.
        task: ``"i2t"`` or ``"t2i"`` turns every row into that direction; ``None`` keeps each row's own.

    Returns:
        A ``datasets.Dataset`` with ``qry_text``, ``qry_img_path``, ``tgt_text`` (list), ``tgt_img_path``
        (list), ``task`` and ``caption``; image paths stay relative to the same ``image_root``.
    """
    import numpy as np
    from datasets import Dataset, Features, List, Value

    if task not in (None, "i2t", "t2i"):
        raise ValueError(f"task must be None, 'i2t' or 't2i'; got {task!r}.")
    missing = {"caption", "image_path", "task"} - set(dataset.column_names)
    if missing:
        raise ValueError(
            f"to_mmeb_eval needs a shapes split; columns {sorted(missing)} are missing from {dataset.column_names}."
        )
    n = len(dataset)
    if not 2 <= num_candidates <= n:
        raise ValueError(
            f"num_candidates={num_candidates} must lie in [2, {n}] (the distractors are the split's other scenes)."
        )
    captions = list(dataset["caption"])
    images = list(dataset["image_path"])
    tasks = [task] * n if task is not None else list(dataset["task"])
    rng = np.random.default_rng(seed)
    eval_columns = (EVAL_QUERY_TEXT, EVAL_QUERY_IMAGE, EVAL_TARGET_TEXTS, EVAL_TARGET_IMAGES)
    columns: dict[str, list] = {k: [] for k in eval_columns}
    for i in range(n):
        others = rng.choice(n - 1, size=num_candidates - 1, replace=False)
        others = others + (others >= i)  # skip row i itself
        order = [i, *others.tolist()]
        if tasks[i] == "i2t":
            columns[EVAL_QUERY_TEXT].append(I2T_QUERY)
            columns[EVAL_QUERY_IMAGE].append(images[i])
            columns[EVAL_TARGET_TEXTS].append([captions[j] for j in order])
            columns[EVAL_TARGET_IMAGES].append([""] * num_candidates)
        else:
            columns[EVAL_QUERY_TEXT].append(T2I_QUERY.format(caption=captions[i]))
            columns[EVAL_QUERY_IMAGE].append("")
            columns[EVAL_TARGET_TEXTS].append([IMAGE_DOC_TEXT] * num_candidates)
            columns[EVAL_TARGET_IMAGES].append([images[j] for j in order])
    columns["task"] = tasks
    columns["caption"] = captions
    string = Value("string")
    features = Features(
        {
            EVAL_QUERY_TEXT: string,
            EVAL_QUERY_IMAGE: string,
            EVAL_TARGET_TEXTS: List(string),
            EVAL_TARGET_IMAGES: List(string),
            "task": string,
            "caption": string,
        }
    )
    return Dataset.from_dict(columns, features=features)
