"""The generated shapes dataset: determinism, schema, captions that match the pixels, negatives, caching."""

from __future__ import annotations

import os
import re
from collections import Counter, deque

import numpy as np
import pytest

from mm_embed_trl.data.images import load_image
from mm_embed_trl.data.schema import NEG_IMAGE, NEG_TEXT, POS_IMAGE, POS_TEXT, QUERY_IMAGE, QUERY_TEXT
from mm_embed_trl.demo import generated
from mm_embed_trl.demo.generated import (
    BACKGROUND,
    COLORS,
    SceneObject,
    SceneSpec,
    all_scenes,
    load_shapes_dataset,
    make_shapes_dataset,
    render_scene,
    sample_scenes,
    to_mmeb_eval,
)

SMALL = dict(num_train=48, num_eval=16, seed=3, image_size=64, num_negatives=3, t2i_fraction=0.5)

# --- an independent reading of captions and pixels -----------------------------------------------------

_NUMBERS = {"two": 2, "three": 3}
_OBJECT = r"an? (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the center)"


def parse_caption(caption: str):
    """-> ("count", n, colour, shape) or ("objects", [(colour, shape, where), ...])."""
    m = re.fullmatch(r"(two|three) (\w+) (\w+?)(?:es|s)", caption)
    if m:
        return ("count", _NUMBERS[m.group(1)], m.group(2), m.group(3))
    parts = re.split(r", | and ", caption)
    objects = []
    for part in parts:
        m = re.fullmatch(_OBJECT, part)
        assert m, f"unparseable caption part {part!r} in {caption!r}"
        objects.append((m.group(1), m.group(2), m.group(3).split()[-1]))
    return ("objects", objects)


def region(where: str, size: int) -> tuple[slice, slice]:
    """(rows, cols) of the image area a position word refers to: the outer 40% band, middle band across."""
    lo, hi, mid_lo, mid_hi = 0, int(0.4 * size), int(0.3 * size), int(0.7 * size)
    far = int(0.6 * size)
    return {
        "left": (slice(mid_lo, mid_hi), slice(lo, hi)),
        "right": (slice(mid_lo, mid_hi), slice(far, size)),
        "top": (slice(lo, hi), slice(mid_lo, mid_hi)),
        "bottom": (slice(far, size), slice(mid_lo, mid_hi)),
        "center": (slice(mid_lo, mid_hi), slice(mid_lo, mid_hi)),
    }[where]


def colour_mask(pixels: np.ndarray, colour: str) -> np.ndarray:
    return np.all(pixels == np.array(COLORS[colour], dtype=np.uint8), axis=-1)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask (a plain BFS, as a reference)."""
    seen = np.zeros_like(mask, dtype=bool)
    out = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        queue = deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            comp[y, x] = True
            for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(comp)
    return out


def non_background_colours(pixels: np.ndarray) -> set[tuple[int, int, int]]:
    flat = {tuple(int(v) for v in p) for p in pixels.reshape(-1, 3)}
    return flat - {BACKGROUND}


def assert_caption_matches_pixels(caption: str, pixels: np.ndarray) -> None:
    size = pixels.shape[0]
    parsed = parse_caption(caption)
    if parsed[0] == "count":
        _, n, colour, _shape = parsed
        assert non_background_colours(pixels) == {COLORS[colour]}, caption
        assert len(components(colour_mask(pixels, colour))) == n, caption
        return
    claimed = parsed[1]
    assert non_background_colours(pixels) == {COLORS[c] for c, _, _ in claimed}, caption
    for colour, _shape, where in claimed:
        rows, cols = region(where, size)
        mask = colour_mask(pixels, colour)
        assert mask[rows, cols].sum() >= 20, f"{caption}: no {colour} blob {where}"
        # every pixel of a colour claimed only once lies in its claimed area
        if sum(c == colour for c, _, _ in claimed) == 1:
            outside = mask.copy()
            outside[rows, cols] = False
            assert not outside.any(), f"{caption}: {colour} pixels outside the {where} area"


# --- fixtures -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root / "a", **SMALL)


# --- tests ----------------------------------------------------------------------------------------------


def test_single_red_square_pixels():
    size = 64
    pixels = np.asarray(render_scene(SceneSpec((SceneObject("square", "red", "left"),)), size))
    red = colour_mask(pixels, "red")
    rows, cols = region("left", size)
    assert red[rows, cols].sum() > 100
    assert red[:, size // 2 :].sum() == 0  # nothing red in the right half
    ys, xs = np.nonzero(red)
    # a square fills its bounding box
    assert red[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all()
    assert non_background_colours(pixels) == {COLORS["red"]}


def test_shapes_render_differently():
    """Each shape has its own silhouette; fill of the bounding box orders square > circle > star."""
    masks = {}
    for shape in generated.SHAPES:
        pixels = np.asarray(render_scene(SceneSpec((SceneObject(shape, "blue", "center"),)), 64))
        mask = colour_mask(pixels, "blue")
        ys, xs = np.nonzero(mask)
        masks[shape] = (mask, mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1)))
        assert len(components(mask)) == 1
    fill = {s: f for s, (_, f) in masks.items()}
    assert fill["square"] == 1.0
    assert 0.7 < fill["circle"] < 0.9
    assert fill["star"] < min(fill["triangle"], fill["cross"], fill["circle"])
    shapes = list(masks)
    for i, a in enumerate(shapes):
        for b in shapes[i + 1 :]:
            assert not np.array_equal(masks[a][0], masks[b][0]), (a, b)


def test_scene_universe_captions_unique_and_canonical():
    scenes = [s for kind in all_scenes().values() for s in kind]
    captions = [s.caption for s in scenes]
    assert len(set(captions)) == len(captions)
    assert len({s.filename for s in scenes}) == len(scenes)
    # canonical order: the same objects given in another order give the same scene and caption
    a, b = SceneObject("circle", "red", "right"), SceneObject("star", "orange", "left")
    assert SceneSpec((a, b)) == SceneSpec((b, a))
    assert SceneSpec((a, b)).caption == "an orange star on the left and a red circle on the right"
    assert SceneSpec(tuple(SceneObject("cross", "pink", p) for p in ("left", "center", "right"))).caption == (
        "three pink crosses"
    )
    # identical shapes outside the row layout keep their positions (no caption collision with "two ...")
    off_layout = SceneSpec((SceneObject("cross", "pink", "top"), SceneObject("cross", "pink", "bottom")))
    assert off_layout.caption == "a pink cross at the top and a pink cross at the bottom"
    with pytest.raises(ValueError, match="share a position"):
        SceneSpec((a, SceneObject("square", "red", "right")))
    with pytest.raises(ValueError, match="Unknown colour"):
        SceneObject("circle", "teal", "left")


def test_sample_scenes_mixes_kinds_and_is_deterministic():
    scenes = sample_scenes(200, seed=1)
    assert scenes == sample_scenes(200, seed=1)
    assert scenes != sample_scenes(200, seed=2)
    assert len({s.caption for s in scenes}) == 200
    kinds = Counter(s.kind for s in scenes)
    assert kinds["single"] >= 30 and kinds["pair"] >= 80 and kinds["count"] >= 20
    # attributes are shared across many scenes, so composition (not a single attribute) identifies a scene
    colours = Counter(o.color for s in scenes for o in s.objects)
    assert min(colours.values()) >= 10
    with pytest.raises(ValueError, match="distinct scenes"):
        sample_scenes(10**6)


def test_schema_and_directions(small):
    assert set(small) == {"train", "eval"}
    assert len(small["train"]) == SMALL["num_train"] and len(small["eval"]) == SMALL["num_eval"]
    expected = {QUERY_TEXT, QUERY_IMAGE, POS_TEXT, POS_IMAGE, NEG_TEXT, NEG_IMAGE}
    expected |= {"task", "caption", "image_path", "objects", "qry_reasoning", "pos_reasoning"}
    for split in small.values():
        assert set(split.column_names) == expected
        for row in split:
            if row["task"] == "i2t":
                assert row[QUERY_TEXT] == "<|image_1|>\nRepresent the given image."
                assert row[QUERY_IMAGE] == row["image_path"] and row[POS_IMAGE] == ""
                assert row[POS_TEXT] == row["caption"]
            else:
                assert row["task"] == "t2i"
                assert row[QUERY_TEXT] == f"Find an image that matches the given caption: {row['caption']}"
                assert row[QUERY_IMAGE] == "" and row[POS_IMAGE] == row["image_path"]
            assert not os.path.isabs(row["image_path"]) and row["image_path"].startswith("images/")
    assert set(small["train"]["task"]) == {"i2t", "t2i"}
    assert os.path.isabs(small.image_root)
    assert os.path.isfile(os.path.join(small.image_root, generated.INFO_FILE))


def test_images_load_with_image_root_and_match_captions(small):
    for split in small.values():
        for row in split:
            image = load_image(row["image_path"], small.image_root, where=f"caption {row['caption']!r}")
            assert image.size == (SMALL["image_size"], SMALL["image_size"])
            assert_caption_matches_pixels(row["caption"], np.asarray(image))
            # the objects column agrees with the caption too
            parsed = parse_caption(row["caption"])
            if parsed[0] == "objects":
                claimed = sorted((c, s, w) for c, s, w in parsed[1])
                assert claimed == sorted((o["color"], o["shape"], o["position"]) for o in row["objects"])


def test_train_eval_disjoint(small):
    train, evl = set(small["train"]["caption"]), set(small["eval"]["caption"])
    assert len(train) == SMALL["num_train"] and len(evl) == SMALL["num_eval"]
    assert not train & evl
    train_images = set(small["train"]["image_path"]) | {p for ps in small["train"][NEG_IMAGE] for p in ps}
    assert not train_images & set(small["eval"]["image_path"])
    train_neg_captions = {c for cs in small["train"][NEG_TEXT] for c in cs}
    assert not train_neg_captions & evl  # no eval scene leaks into training as a negative


def test_negatives(small):
    k = SMALL["num_negatives"]
    swaps_seen = 0
    for split in small.values():
        for row in split:
            assert len(row[NEG_TEXT]) == k and len(row[NEG_IMAGE]) == k
            if row["task"] == "i2t":
                negs = row[NEG_TEXT]
                assert row[NEG_IMAGE] == [""] * k
            else:
                assert row[NEG_TEXT] == [row[POS_TEXT]] * k
                negs = row[NEG_IMAGE]
                assert row["image_path"] not in negs
                assert len(set(negs)) == k  # the images themselves are checked in the next test
                continue
            assert row["caption"] not in negs and len(set(negs)) == k
            # hard negatives are close: a pair's first negative rebinds the same colours and shapes
            parsed = parse_caption(row["caption"])
            if parsed[0] == "objects" and len(parsed[1]) == 2:
                first = parse_caption(negs[0])
                assert first[0] == "objects"
                assert sorted(c for c, _, _ in first[1]) == sorted(c for c, _, _ in parsed[1])
                assert sorted(s for _, s, _ in first[1]) == sorted(s for _, s, _ in parsed[1])
                swaps_seen += 1
            for neg in negs:  # the objects differ from the positive's in at most 2 attribute slots
                p = parse_caption(neg)
                if parsed[0] == "objects" and p[0] == "objects" and len(p[1]) == len(parsed[1]):
                    pos_attrs = [a for obj in parsed[1] for a in obj]
                    neg_attrs = [a for obj in p[1] for a in obj]
                    assert 0 < sum(x != y for x, y in zip(pos_attrs, neg_attrs)) <= 4
    assert swaps_seen > 0


def test_t2i_negative_images_show_their_scene(small):
    """Every t2i negative image is a rendering of some scene whose caption file name it carries."""
    by_file = {s.filename: s for kind in all_scenes().values() for s in kind}
    checked = 0
    for row in small["train"]:
        if row["task"] != "t2i":
            continue
        for path in row[NEG_IMAGE]:
            pixels = np.asarray(load_image(path, small.image_root))
            assert_caption_matches_pixels(by_file[path].caption, pixels)
            checked += 1
    assert checked > 0


def test_deterministic_and_seed_dependent(tmp_path, small):
    again = make_shapes_dataset(tmp_path / "b", **SMALL)
    for split in ("train", "eval"):
        assert again[split].to_list() == small[split].to_list()
    for path in sorted(set(small["eval"]["image_path"]))[:10]:
        a = np.asarray(load_image(path, small.image_root))
        b = np.asarray(load_image(path, again.image_root))
        np.testing.assert_array_equal(a, b)
    other = make_shapes_dataset(tmp_path / "c", **{**SMALL, "seed": SMALL["seed"] + 1})
    assert other["train"]["caption"] != small["train"]["caption"]


def test_cache_reuse_and_param_keyed_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("MM_EMBED_TRL_CACHE", str(tmp_path / "cache"))
    params = dict(num_train=8, num_eval=4, seed=0, image_size=32)
    first = make_shapes_dataset(**params)
    assert first.image_root.startswith(str(tmp_path / "cache"))
    assert os.path.basename(first.image_root).startswith("shapes-")

    def boom(*args, **kwargs):
        raise AssertionError("regenerated instead of reusing the cache")

    monkeypatch.setattr(generated, "_write_dataset", boom)
    second = make_shapes_dataset(**params)
    assert second.image_root == first.image_root
    assert second["train"].to_list() == first["train"].to_list()
    with pytest.raises(AssertionError, match="regenerated"):
        make_shapes_dataset(**{**params, "seed": 1})  # other params -> other folder -> must generate
    assert load_shapes_dataset(first.image_root)["eval"].to_list() == first["eval"].to_list()
    assert sorted(os.listdir(tmp_path / "cache")) == [os.path.basename(first.image_root)]  # no temp left over


def test_explicit_dir_conflicts_and_overwrite(tmp_path):
    out = tmp_path / "d"
    make_shapes_dataset(out, num_train=8, num_eval=4, image_size=32)
    with pytest.raises(FileExistsError, match=r"other parameters.*num_train"):
        make_shapes_dataset(out, num_train=10, num_eval=4, image_size=32)
    replaced = make_shapes_dataset(out, num_train=10, num_eval=4, image_size=32, overwrite=True)
    assert len(replaced["train"]) == 10
    assert sorted(os.listdir(tmp_path)) == ["d"]
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        make_shapes_dataset(junk, num_train=8, num_eval=4)
    assert (junk / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(make_shapes_dataset(empty, num_train=8, num_eval=0, image_size=32)["eval"]) == 0
    with pytest.raises(FileNotFoundError, match="no shapes dataset"):
        load_shapes_dataset(junk)


def test_concurrent_writer_of_same_dataset(tmp_path, monkeypatch):
    """A second process that publishes the same dataset first makes ours a no-op, not an error or a mix."""
    out = tmp_path / "race"
    params = dict(num_train=8, num_eval=4, seed=5, image_size=32)
    real_write = generated._write_dataset
    calls = []

    def write_while_another_process_wins(folder, p):
        calls.append(folder)
        if len(calls) == 1:  # the "other process" finishes its whole run while we are still writing
            make_shapes_dataset(out, **params)
        real_write(folder, p)

    monkeypatch.setattr(generated, "_write_dataset", write_while_another_process_wins)
    result = make_shapes_dataset(out, **params)
    assert len(calls) == 2
    assert len(result["train"]) == 8
    assert sorted(os.listdir(tmp_path)) == ["race"]  # our temp folder was removed
    assert (out / "images").is_dir() and not any(n.startswith(".") for n in os.listdir(out))


def test_to_mmeb_eval(small):
    evl = small["eval"]
    converted = to_mmeb_eval(evl, num_candidates=5, seed=0)
    assert converted.column_names == ["qry_text", "qry_img_path", "tgt_text", "tgt_img_path", "task", "caption"]
    assert len(converted) == len(evl)
    for row, src in zip(converted, evl):
        assert len(row["tgt_text"]) == 5 and len(row["tgt_img_path"]) == 5
        if src["task"] == "i2t":
            assert row["qry_img_path"] == src["image_path"]
            assert row["tgt_text"][0] == src["caption"] and len(set(row["tgt_text"])) == 5
            assert row["tgt_img_path"] == [""] * 5
        else:
            assert row["qry_img_path"] == "" and src["caption"] in row["qry_text"]
            assert row["tgt_img_path"][0] == src["image_path"] and len(set(row["tgt_img_path"])) == 5
    all_i2t = to_mmeb_eval(evl, num_candidates=3, task="i2t")
    assert set(all_i2t["task"]) == {"i2t"} and all(r["qry_img_path"] for r in all_i2t)
    assert to_mmeb_eval(evl, 5, seed=0).to_list() == converted.to_list()
    with pytest.raises(ValueError, match="num_candidates"):
        to_mmeb_eval(evl, num_candidates=len(evl) + 1)
    with pytest.raises(ValueError, match="task"):
        to_mmeb_eval(evl, task="vqa")


def test_invalid_params(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        make_shapes_dataset(tmp_path / "x", num_train=0)
    with pytest.raises(ValueError, match="t2i_fraction"):
        make_shapes_dataset(tmp_path / "x", t2i_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        make_shapes_dataset(tmp_path / "x", image_size=8)


def test_default_size(tmp_path):
    # its speed is a benchmark figure (benchmarks/data_pipeline.py prints the generation time), not a timed test
    ds = make_shapes_dataset(tmp_path / "full", num_negatives=2)
    assert len(ds["train"]) == 512 and len(ds["eval"]) == 128
