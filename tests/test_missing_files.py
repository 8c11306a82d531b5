"""Image and video files the rows name are looked for before training, as the loaders look for them: a missing one
is a bad row (named with its file and the image_root fix, or left out under on_bad_row="skip"), not an error that
stops the run when its batch comes hours in."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.data import validation
from mm_embed_trl.data.images import ImageLoadError, load_image_values
from mm_embed_trl.data.loading import load_rows_dataset
from mm_embed_trl.data.validation import BadRowsError, check_training_rows
from mm_embed_trl.data.videos import VideoLoadError, VideoSampling, find_video, load_video


def _png(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return str(path)


def _row(qry="find it", qry_image="", pos="a red circle", pos_image="", **extra):
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos, "pos_image_path": pos_image, **extra}


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_files_and_urls_are_bad_rows_named_with_the_file_and_the_fix(tmp_path, caplog):
    root = tmp_path / "images"
    _png(root / "a.png")
    (root / "clip").mkdir()
    _png(root / "clip" / "0001.png")
    rows = [
        _row(qry_image="a.png", neg_text=["n"], neg_image_path=[""], pos_video_path=""),
        _row(qry_image="gone.png", neg_text=["n"], neg_image_path=[""], pos_video_path=""),  # missing query image
        _row(qry_image="", neg_text=["n"], neg_image_path=["a.png"], pos_video_path="clip"),  # a frame folder: there
        _row(qry_image="a.png", neg_text=["n"], neg_image_path=["nope.png"], pos_video_path="no_clip"),
        _row(qry_image="https://example.com/a.png", neg_text=["n"], neg_image_path=[""], pos_video_path=""),
    ]
    data = load_rows_dataset(_jsonl(tmp_path / "train.jsonl", rows))
    with pytest.raises(BadRowsError) as info:
        check_training_rows(data, image_root=str(root))
    message = str(info.value)
    assert "an image file in 'qry_image_path' that is not there (rows 1; lines 2 of train.jsonl)" in message
    assert f"'gone.png' (looked for as '{root / 'gone.png'}', '{Path.cwd() / 'gone.png'}')" in message
    assert f"image_root ('{root}', --image_root)" in message
    assert "an image file in 'neg_image_path' that is not there (rows 3; lines 4 of train.jsonl)" in message
    assert "a video in 'pos_video_path' that is not there (rows 3; lines 4 of train.jsonl)" in message
    assert "a URL in 'qry_image_path' (rows 4; lines 5 of train.jsonl)" in message
    assert "found before training, nothing was trained" in message

    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_training_rows(data, image_root=str(root), on_bad_row="skip")
    assert kept["_row_index"][:] == [0, 2]
    assert "Skipping row 1 (line 2 of train.jsonl) of the training dataset: an image file in 'qry_image_path'" in (
        caplog.text
    )

    # without image_root the fix says so; and nothing is remembered between checks: the file that appears is found
    with pytest.raises(BadRowsError, match=r"No image_root was given.*--image_root"):
        check_training_rows(data)
    _png(root / "gone.png")
    _png(root / "nope.png")
    (root / "no_clip").mkdir()
    _png(root / "no_clip" / "0001.png")
    with pytest.raises(BadRowsError) as info:
        check_training_rows(data, image_root=str(root))
    assert "rows 4" in str(info.value) and "not there" not in str(info.value)  # only the URL is left


def _reference_misses(kind: str, value, root) -> bool:
    """Does the library's loader stop on ``value`` because its file is not there (or is a URL, or a frame folder
    with no frame in it)?"""
    try:
        if kind == "image":
            load_image_values(value, root, where="value")
        else:
            load_video(value, root, where="value", sampling=VideoSampling(max_frames=64))
    except (ImageLoadError, VideoLoadError) as error:
        return any(sign in str(error) for sign in ("not found", "URL", "holds no frame image", "cannot be read"))
    return False


def test_the_check_looks_for_files_as_the_loaders_do(tmp_path, monkeypatch):
    """Per value: flagged by the check exactly when the loader (the reference) stops on a file that is not there.
    Relative paths: image_root first, then the working directory; absolute paths; datasets.Image structs (bytes win
    over their path); a video's file, frame folder (one with no frame in it too) or list of frames."""
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    monkeypatch.chdir(_png(cwd / "in_cwd.png").rsplit("/", 1)[0])
    _png(root / "in_root.png")
    absolute = _png(tmp_path / "elsewhere" / "abs.png")
    (root / "frames").mkdir()
    _png(root / "frames" / "1.png")
    (root / "empty_frames").mkdir()  # there, but the loader stops on it: it holds no frame
    (root / "empty_frames" / "notes.txt").write_text("not a frame")
    (root / "no_frame_files" / "0001.png").mkdir(parents=True)  # named like frames, but not files
    (root / "no_frame_files" / "0002.png").symlink_to(root / "lost.png")
    (root / "linked_frames").mkdir()
    (root / "linked_frames" / "0001.png").symlink_to(root / "in_root.png")
    _png(root / "looped_frames" / "0001.png")
    (root / "looped_frames" / "0002.png").symlink_to("0002.png")  # a link that never ends: not a frame
    (root / "loop_only").mkdir()
    (root / "loop_only" / "0001.png").symlink_to("0001.png")
    png = (root / "in_root.png").read_bytes()
    images = ["in_root.png", "in_cwd.png", absolute, "missing.png", str(tmp_path / "missing_abs.png"), "",
              "sub/in_root.png", "http://host/x.png", "in_root.png/", "~/no_such_file.png"]
    structs = [{"bytes": None, "path": "in_root.png"}, {"bytes": None, "path": "missing.png"},
               {"bytes": png, "path": "missing.png"}, None]
    videos = ["frames", "empty_frames", "no_frames", "in_cwd.png", "", "empty_frames/", "no_frame_files",
              "linked_frames", "looped_frames", "loop_only"]
    frame_lists = [["frames/1.png", "frames/1.png"], ["frames/1.png", "gone.png"], [], ["frames/1.png", "frames"]]
    # a video value with bytes and a path: the video loader reads the file, whatever the bytes
    video_structs = [{"bytes": b"xx", "path": "gone.mp4"}, {"bytes": None, "path": "frames"}, None]
    image_struct = datasets.Features({"qry_image_path": datasets.Image(decode=False)})
    for kind, column, values, features in [
        ("image", "qry_image_path", images, None), ("image", "qry_image_path", structs, image_struct),
        ("video", "qry_video_path", videos, None), ("video", "qry_video_path", frame_lists, None),
        ("video", "qry_video_path", video_structs, None),
    ]:
        n = len(values)
        data = datasets.Dataset.from_dict({column: values}, features=features).add_column("qry", ["q"] * n)
        problems = validation.missing_file_problems(data.add_column("pos_text", ["p"] * n), str(root))
        flagged = np.zeros(n, dtype=bool)
        for problem in problems:
            flagged[problem.rows] = True
        expected = [_reference_misses(kind, v, str(root)) for v in values]
        assert flagged.tolist() == expected, (kind, values)
    assert sum(_reference_misses("image", v, str(root)) for v in images) == 5  # the test covers both outcomes


def test_a_frame_folder_with_no_frame_is_a_bad_row_of_its_own_cause(tmp_path, caplog):
    """A frame folder that holds no frame image (an extraction that failed) stops the loader when its batch comes, as a
    missing file does: the check names it with its own cause and fix, and under skip leaves its rows out without
    calling the image_root wrong (the folders are there)."""
    root = tmp_path / "videos"
    for name in ("empty_a", "empty_b"):
        (root / name).mkdir(parents=True)
    (root / "empty_b" / "frames.txt").write_text("a list, not a frame")
    _png(root / "full" / "frame_1.png")
    rows = [_row(qry_video_path=v) for v in ("full", "empty_a", "empty_b", "gone")]
    data = load_rows_dataset(_jsonl(tmp_path / "train.jsonl", rows))
    with pytest.raises(BadRowsError) as info:
        check_training_rows(data, image_root=str(root))
    message = str(info.value)
    assert "a frame folder in 'qry_video_path' that holds no frame image (rows 1, 2; lines 2, 3 of train.jsonl)" in (
        message
    )
    assert f"The first: 'empty_a' ('{root / 'empty_a'}'). Extract the video's frames into it" in message
    assert "a video in 'qry_video_path' that is not there (rows 3; lines 4 of train.jsonl)" in message
    with pytest.raises(VideoLoadError, match="holds no frame image"):  # the loader agrees
        load_video("empty_b", str(root), where="row 2")

    only_empty = data.select([1, 2])  # every video is an empty folder: the rows are bad, the root is right
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        with pytest.raises(BadRowsError, match="is bad .*holds no frame image.*nothing left to train on"):
            check_training_rows(only_empty, image_root=str(root), on_bad_row="skip")
    assert "point elsewhere" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_training_rows(data, image_root=str(root), on_bad_row="skip")
    assert kept["_row_index"][:] == [0]


def test_a_video_is_looked_for_in_the_order_images_are(tmp_path, monkeypatch):
    """image_root first, then the working directory: the first candidate that is a folder or a file (a folder in the
    working directory does not win over a file under image_root)."""
    root, cwd = tmp_path / "root", tmp_path / "cwd"
    root.mkdir()
    (root / "clip").write_bytes(b"a video file")
    _png(cwd / "clip" / "0001.png")
    monkeypatch.chdir(cwd)
    assert find_video("clip", str(root)) == str(root / "clip")
    assert find_video("clip") == str(cwd / "clip")
    assert find_video("clip/", str(tmp_path / "elsewhere")) == str(cwd / "clip")
    assert find_video("gone", str(root)) is None


def test_a_frame_folder_that_cannot_be_read_is_a_bad_row_not_a_crash(tmp_path, monkeypatch):
    """A frame folder the user running training may not list (its permissions) stopped the loader with a bare
    PermissionError hours in; the check names it, and the loader's error names the row and the folder."""
    root = tmp_path / "videos"
    for name in ("open", "locked", "listed_only"):
        _png(root / name / "0001.png")
    real_scandir, real_stat = os.scandir, os.stat

    # Root may read any folder, so the test cannot chmod them: as for a folder with mode 0311 (entered, not listed)
    # and one with mode 0444 (listed, with each entry's type, but not entered: nothing in it can be looked at).
    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def stat(path, *args, **kwargs):
        if f"{os.sep}listed_only{os.sep}" in os.fspath(path):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "stat", stat)
    data = datasets.Dataset.from_list([_row(qry_video_path=v) for v in ("open", "locked", "listed_only")])
    with pytest.raises(BadRowsError) as info:
        check_training_rows(data, image_root=str(root))
    assert "a frame folder in 'qry_video_path' that cannot be read (rows 1, 2)" in str(info.value)
    assert "its permissions" in str(info.value)
    assert check_training_rows(data, image_root=str(root), on_bad_row="skip")["_row_index"][:] == [0]
    for name in ("locked", "listed_only"):
        with pytest.raises(VideoLoadError, match=rf"row 1: the frame folder '.*{name}' cannot be read \(.*Permission"):
            load_video(name, str(root), where="row 1")


def test_a_json_field_that_mixes_paths_lists_and_image_dicts(tmp_path):
    """A JSON Lines field whose rows mix strings, lists and {"path", "bytes"} dicts loads as a datasets.Json column:
    each dict is its path (the loader's reading), not the dict's text as a file name."""
    root = tmp_path / "root"
    _png(root / "a.png")
    values = ["a.png", {"path": "a.png", "bytes": None}, ["a.png", {"path": "a.png"}], {"path": "gone.png"},
              ["a.png", "gone.png"], ""]
    rows = [_row(qry_image=v) for v in values]
    data = load_rows_dataset(_jsonl(tmp_path / "train.jsonl", rows))
    assert getattr(data.features["qry_image_path"], "_type", None) == "Json"
    flagged = np.zeros(len(values), dtype=bool)
    for problem in validation.missing_file_problems(data, str(root)):
        flagged[problem.rows] = True
    assert flagged.tolist() == [_reference_misses("image", v, str(root)) for v in values] == [
        False, False, False, True, True, False
    ]


def test_an_image_root_that_points_elsewhere_is_refused_under_skip_too(tmp_path, shapes_data, caplog):
    """When none of the files the rows name is there, the rows are not bad, the image_root is: skipping them would
    train on the rows without images. One file that is not there (a typo) is a bad row, whatever the other columns
    name. A skip logs each cause's fix once."""
    rows = shapes_data["train"].select(range(12))
    with pytest.raises(BadRowsError, match=r"None of the 12 files that the rows of the training dataset name is there"):
        check_training_rows(rows, image_root=str(tmp_path), on_bad_row="skip", num_negatives=0)
    stream = rows.to_iterable_dataset(num_shards=1)
    checked = check_training_rows(stream, image_root=str(tmp_path), on_bad_row="skip", num_negatives=0)
    with pytest.raises(BadRowsError, match=r"files that the first rows of the stream of the training dataset name"):
        next(iter(checked))
    _png(tmp_path / "a.png")
    for qry_image in ("a.png", ""):  # other files there, or none named but the typo: a bad row either way
        typo = datasets.Dataset.from_list([_row(qry_image=qry_image)] * 5 + [_row(pos_image="typo.png")])
        kept = check_training_rows(typo, image_root=str(tmp_path), on_bad_row="skip", num_negatives=0)
        assert len(kept) == 5, qry_image
    # some files there: the rows that name the others are left out, the fix logged once
    gone = [i for i in range(12) if rows[i]["qry_image_path"]][:2]
    renamed = rows.map(lambda row, i: {"qry_image_path": "lost.png" if i in gone else row["qry_image_path"]},
                       with_indices=True)
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_training_rows(renamed, image_root=str(shapes_data.image_root), on_bad_row="skip",
                                   num_negatives=0)
    assert len(kept) == 10
    assert caplog.text.count("The first: 'lost.png' (looked for as") == 1


@pytest.mark.parametrize("negatives", [None, 0, 1, 2])
def test_negative_images_are_looked_for_when_the_batch_takes_them(tmp_path, negatives):
    """Only the explicit negatives a batch takes: the first ``num_negatives`` pairs that are not empty (reference:
    the collator's own `row_negatives(row)[:k]`), all of them for None, none for 0."""
    from mm_embed_trl.data.schema import row_negatives

    _png(tmp_path / "a.png")
    rows = [
        _row(neg_text=["n0", "n1", "n2"], neg_image_path=["a.png", "gone.png", "a.png"]),
        _row(neg_text=["", "n1", "n2"], neg_image_path=["", "gone.png", "a.png"]),  # an empty pair does not count
        _row(neg_text=["n0", "n1", "n2"], neg_image_path=["a.png", "a.png", "gone.png"]),
        _row(neg_text=["n0", "n1", "n2"], neg_image_path=["gone.png"]),  # one image for every text
        _row(neg_text=["n0", "n1"], neg_image_path=["a.png", "a.png"]),
        _row(neg_text=["n0"], neg_image_path=["a.png", "gone.png"]),  # one text for every image
        _row(neg_text=[""], neg_image_path=["", "gone.png", "a.png"]),
        _row(neg_text=[], neg_image_path=["a.png", "gone.png"]),  # images without texts
    ]
    data = datasets.Dataset.from_list(rows)
    flagged = np.zeros(len(rows), dtype=bool)
    for problem in validation.missing_file_problems(data, str(tmp_path), negatives=negatives):
        flagged[problem.rows] = True
    taken = [row_negatives(row)[: negatives if negatives is not None else None] for row in rows]
    expected = [any(image == "gone.png" for _, image in pairs) for pairs in taken]
    assert flagged.tolist() == expected
    assert any(expected) or negatives == 0


def test_paths_shared_by_rows_are_looked_up_once(tmp_path, monkeypatch):
    """Targets and negatives repeat across rows: each distinct path costs one look-up, whatever the batch."""
    _png(tmp_path / "a.png")
    rows = [_row(qry_image="a.png", pos_image="b.png" if i % 7 == 0 else "a.png") for i in range(25)]
    data = datasets.Dataset.from_list(rows)
    looked: list[str] = []
    real = validation._FileLookup.__init__

    def counting(self, image_root):
        real(self, image_root)
        image = self.status_of["image"]
        self.status_of["image"] = lambda text: looked.append(text) or image(text)

    monkeypatch.setattr(validation._FileLookup, "__init__", counting)
    monkeypatch.setattr(validation, "_BATCH_ROWS", 10)  # three batches
    problems = validation.missing_file_problems(data, str(tmp_path))
    assert sorted(looked) == ["a.png", "b.png"]
    assert [p.rows.tolist() for p in problems] == [[0, 7, 14, 21]]


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, save_sentence_transformers=False, num_negatives=0,
        seed=3,
    )
    return HardNegContrastiveConfig(**{**defaults, **kw})


def _shapes_rows_missing(shapes_data, missing: dict[int, str], n=10):
    rows = shapes_data["train"].select(range(n)).remove_columns(["neg_text", "neg_image_path"]).to_list()
    for i, name in missing.items():
        rows[i] = {**rows[i], "pos_image_path": name}
    return rows


def test_a_run_with_missing_files_under_skip_trains_to_its_end(tiny_backbone, shapes_data, tmp_path, caplog):
    """Two of ten rows name images that are not there. Before, the run stopped when their batch came (ImageLoadError,
    under on_bad_row="skip" too); now they are left out before training and the run ends: 8 rows = 2 steps of 4."""
    data = datasets.Dataset.from_list(_shapes_rows_missing(shapes_data, {3: "lost/3.png", 8: "lost/8.png"}))
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    args = _config(tmp_path, image_root=str(shapes_data.image_root), on_bad_row="skip", num_train_epochs=1)
    trainer = HardNegContrastiveTrainer(model=model, args=args, train_dataset=data)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 2
    assert "Skipping row 3 of the training dataset: an image file in 'pos_image_path' that is not there" in caplog.text
    assert "2 of the training dataset" in caplog.text  # the report after training


def test_a_stream_looks_for_its_files_as_its_rows_stream_in(tiny_backbone, shapes_data, tmp_path, caplog):
    rows = _shapes_rows_missing(shapes_data, {2: "lost/2.png"}, n=9)
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset(num_shards=1)
    args = _config(tmp_path, image_root=str(shapes_data.image_root), max_steps=2)
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(model=model, args=args, train_dataset=stream)
    with pytest.raises(BadRowsError, match=r"(?s)an image file in 'pos_image_path' that is not there \(stream row 2"):
        trainer.train()

    args = _config(tmp_path, image_root=str(shapes_data.image_root), max_steps=2, on_bad_row="skip")
    trainer = HardNegContrastiveTrainer(model=model, args=args, train_dataset=stream)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 2 and trainer._stream_skipped["train"] == 1


_RANKS_SCRIPT = """
import json, sys, time

import datasets
from accelerate import PartialState

import mm_embed_trl  # noqa: F401  (registers the exit handler)
from mm_embed_trl.data import validation

root, out = sys.argv[1], sys.argv[2]
state = PartialState(cpu=True)
if state.process_index > 0:  # the other ranks must take the main process's answer, not ask the file system
    def refuse(self, paths, kind):
        raise AssertionError("a rank other than the main process looked files up")
    validation._FileLookup.problems = refuse
rows = {"qry": [f"q{i}" for i in range(6)], "pos_text": ["p"] * 6,
        "qry_image_path": ["a.png", "gone.png", "", "a.png", "lost.png", "a.png"]}
with state.main_process_first():
    kept = validation.check_training_rows(datasets.Dataset.from_dict(rows), image_root=root, on_bad_row="skip",
                                          num_negatives=0)
state.wait_for_everyone()
if state.is_main_process:  # a file appears; the same rows are checked again, every rank at once (as the miner does)
    open(f"{root}/gone.png", "wb").write(open(f"{root}/a.png", "rb").read())
state.wait_for_everyone()
validation._CHECKED.clear()
if state.is_main_process:
    time.sleep(3)  # the other rank asks first: it must wait for this answer, not take the first check's
again = validation.check_training_rows(datasets.Dataset.from_dict(rows), image_root=root, on_bad_row="skip",
                                       num_negatives=0)
with open(f"{out}/rank{state.process_index}.json", "w") as handle:
    json.dump([kept["_row_index"][:], again["_row_index"][:]], handle)
"""


@pytest.mark.slow
def test_every_rank_leaves_out_the_rows_the_main_process_found(tmp_path):
    """Two processes: the main process looks the files up, the other rank reads its answer from the process group's
    store (it may not look a file up) and keeps the same rows; a second check of the same rows after a file appeared,
    with both ranks asking at once, reads the main process's second answer, not the first."""
    import launching

    _png(tmp_path / "a.png")
    script = tmp_path / "ranks.py"
    script.write_text(_RANKS_SCRIPT)
    launching.run(script, str(tmp_path), str(tmp_path), processes=2, launcher="torchrun", timeout=300)
    kept = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert kept[0] == kept[1] == [[0, 2, 3, 5], [0, 1, 2, 3, 5]]
