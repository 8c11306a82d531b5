"""The pre-training data checks: misspelt/missing columns, every row checked (vectorised, cached), the on_bad_row
policy, dataset row indices in collator errors, and the contrastive trainer's last-batch handling."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import datasets
import launching
import numpy as np
import pytest
from PIL import Image

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.data import validation
from mm_embed_trl.data.loading import load_rows_dataset
from mm_embed_trl.data.schema import ROW_INDEX_COLUMN, row_negatives
from mm_embed_trl.data.validation import BadRowsError, check_training_rows

ROOT = Path(__file__).resolve().parents[1]


def _row(qry="find it", pos="a red circle", qry_image="", pos_image="", **extra):
    return {"qry": qry, "qry_image_path": qry_image, "pos_text": pos, "pos_image_path": pos_image, **extra}


def _jsonl(path: Path, rows, raw_lines: dict[int, bytes] | None = None) -> str:
    """Write rows as JSON Lines; `raw_lines` replaces line i (0-based) with raw bytes (bad encodings)."""
    lines = [json.dumps(r).encode() for r in rows]
    for i, raw in (raw_lines or {}).items():
        lines[i] = raw
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, disable_tqdm=True, save_sentence_transformers=False,
        num_hard_negatives=3, temperature=0.05,
    )
    defaults.update(kw)
    return HardNegContrastiveConfig(**defaults)


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if the trainer loads a model: the data checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(MultimodalEmbeddingModel, "from_pretrained", refuse)


# ------------------------------------------------------------------------------------- columns (issue #10, 3)
@pytest.mark.parametrize(
    "rename, named",
    [
        ({"qry_image_path": "qry_img_path"}, ["'qry_img_path'", "'qry_image_path'"]),
        ({"pos_image_path": "pos_image"}, ["'pos_image'", "'pos_image_path'"]),
        ({"qry_image_path": "image"}, ["'image'", "'qry_image_path'", "'pos_image_path'"]),
        ({"qry": "query"}, ["'query'", "'qry'"]),
        ({"neg_text": "negatives"}, ["'negatives'", "'neg_text'"]),
    ],
)
def test_misspelt_columns_are_errors_naming_the_column_and_the_fix(rename, named, tmp_path, no_model_loading):
    rows = [_row(qry="<|image_1|> Represent the image.", qry_image="a.png", neg_text=["x"], neg_image_path=[""])] * 4
    data = datasets.Dataset.from_list(rows).rename_columns(rename)
    with pytest.raises(ValueError, match="rename") as info:
        HardNegContrastiveTrainer(model="unused", args=_config(tmp_path), train_dataset=data)
    for name in named:
        assert name in str(info.value)


def test_metadata_columns_next_to_the_schema_columns_are_fine(shapes_data):
    """The generated data carries image_path / caption / task metadata besides the schema's image columns."""
    assert {"image_path", "caption", "task"} <= set(shapes_data["train"].column_names)
    checked = check_training_rows(shapes_data["train"].select(range(16)), image_root=shapes_data.image_root)
    assert len(checked) == 16 and checked[3][ROW_INDEX_COLUMN] == 3


@pytest.mark.parametrize("image_column", ["absent", "empty"])
def test_image_placeholders_without_any_image_are_an_error(image_column, tmp_path, no_model_loading):
    """Every image query would embed the same bare instruction: refused, naming the column."""
    rows = [_row(qry="<|image_1|>\nRepresent the given image.", pos=f"caption {i}") for i in range(6)]
    data = datasets.Dataset.from_list(rows)
    if image_column == "absent":
        data = data.remove_columns("qry_image_path")
    with pytest.raises(ValueError, match=rf"<\|image_1\|>.*'qry'.*'qry_image_path' is {image_column}"):
        HardNegContrastiveTrainer(model="unused", args=_config(tmp_path), train_dataset=data)


# ----------------------------------------------------------------------------------------- rows (issue #10, 9)
def test_non_utf8_text_is_found_before_training_with_its_file_line(tmp_path, no_model_loading):
    rows = [_row(pos=f"t{i}") for i in range(9)]
    path = _jsonl(tmp_path / "train.jsonl", rows, {1: b'{"qry": "caf\xe9", "qry_image_path": "", "pos_text": "x", '
                                                      b'"pos_image_path": ""}'})
    data = load_rows_dataset(path)
    with pytest.raises(BadRowsError, match=r"(?s)training dataset with a 'qry' that is not valid UTF-8 \(rows 1; "
                                           r"lines 2 of train\.jsonl\).*UTF-8.*on_bad_row='skip'"):
        HardNegContrastiveTrainer(model="unused", args=_config(tmp_path), train_dataset=data)


def test_numeric_texts_are_found_before_training(tmp_path, no_model_loading):
    mixed = _jsonl(tmp_path / "mixed.jsonl", [_row(), _row(pos=7), _row(pos="x")])
    with pytest.raises(BadRowsError, match=r"'pos_text' that is not a text.*\(rows 1; lines 2 of mixed\.jsonl\)"):
        HardNegContrastiveTrainer(model="unused", args=_config(tmp_path), train_dataset=load_rows_dataset(mixed))
    numbers = datasets.Dataset.from_dict({"qry": ["a", "b"], "pos_text": [1, 2]})
    with pytest.raises(TypeError, match=r"'pos_text'.*int64.*not strings.*cast_column"):
        HardNegContrastiveTrainer(model="unused", args=_config(tmp_path), train_dataset=numbers)


def test_an_empty_file_is_a_clear_error(tmp_path):
    for content in ("", "\n\n"):  # "" failed with a bare StopIteration
        (tmp_path / "train.jsonl").write_text(content)
        with pytest.raises(ValueError, match=r"train\.jsonl is empty"):
            load_rows_dataset(str(tmp_path / "train.jsonl"))
    empty = datasets.Dataset.from_dict({"qry": [], "pos_text": []})
    with pytest.raises(ValueError, match="no rows"):
        check_training_rows(empty)


def test_a_side_with_neither_text_nor_image_and_skip_policy(tmp_path, caplog, no_model_loading):
    rows = [_row(pos=f"t{i}") for i in range(10)]
    rows[0] = _row(qry="<|image_1|> What is shown?", qry_image=str(tmp_path / "a.png"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows[2] = _row(qry="   ")
    rows[5] = _row(pos="")
    rows[7] = _row(qry="<|image_1|>", pos="y")  # a placeholder is no text
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(BadRowsError) as info:
        check_training_rows(load_rows_dataset(path))
    message = str(info.value)
    assert "an empty 'qry' and no image in 'qry_image_path' (rows 2; lines 3 of train.jsonl)" in message
    assert "an empty 'pos_text' and no image in 'pos_image_path' (rows 5; lines 6 of train.jsonl)" in message
    assert "only an image placeholder in 'qry' but no image in 'qry_image_path' (rows 7" in message
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_training_rows(load_rows_dataset(path), on_bad_row="skip")
    assert kept[ROW_INDEX_COLUMN][:] == [0, 1, 3, 4, 6, 8, 9]
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipping row")]
    assert len(skipped) == 3 and "Skipping row 2 (line 3 of train.jsonl)" in skipped[0]
    assert any("Skipped 3 bad row(s) of 10" in r.getMessage() for r in caplog.records)


def _random_negative_rows(rng, n):
    """Rows whose neg_* fields take every shape row_negatives accepts: lists, scalars, '' and None, some of
    different lengths (invalid), some with pairs that hold nothing."""
    def field(length):
        kind = rng.integers(4)
        if kind == 0:
            return None
        if kind == 1:
            return rng.choice(["", "neg.png", "a negative"])
        return [str(rng.choice(["", "x", "img.png"])) for _ in range(length)]

    rows = []
    for _ in range(n):
        length = int(rng.integers(0, 4))
        other = length if rng.random() < 0.7 else int(rng.integers(0, 4))
        rows.append(_row(neg_text=field(length), neg_image_path=field(other)))
    return rows


def _expected_negatives(rows):
    counts, bad = [], []
    for row in rows:
        try:
            counts.append(len(row_negatives(row)))
            bad.append(False)
        except ValueError:
            counts.append(0)
            bad.append(True)
    return counts, bad


def test_negative_counts_match_row_negatives_on_random_rows(tmp_path):
    """The vectorised count against the collator's own per-row reading (`row_negatives`)."""
    rng = np.random.default_rng(0)
    rows = _random_negative_rows(rng, 300)
    data = load_rows_dataset(_jsonl(tmp_path / "neg.jsonl", rows))  # mixed types: datasets.Json columns
    counts, mismatch, _ = validation._negative_counts(data.with_format("arrow")[:])
    expected_counts, expected_bad = _expected_negatives(rows)
    assert sum(expected_bad) > 3 and len(set(expected_counts)) > 2  # the random rows cover the cases
    assert mismatch.tolist() == expected_bad and counts.tolist() == expected_counts
    # list-typed columns (one arrow type per column), lists of any lengths
    lists = [
        _row(
            neg_text=[str(rng.choice(["", "x"])) for _ in range(rng.integers(0, 4))],
            neg_image_path=[str(rng.choice(["", "i.png"])) for _ in range(rng.integers(0, 4))],
        )
        for _ in range(300)
    ]
    typed = datasets.Dataset.from_list(lists).select(range(7, 300))  # a sliced table: arrow offsets not from 0
    counts, mismatch, _ = validation._negative_counts(typed.with_format("arrow")[:])
    expected_counts, expected_bad = _expected_negatives(lists[7:])
    assert mismatch.tolist() == expected_bad and counts.tolist() == expected_counts


def test_negative_counts_must_agree_across_the_dataset():
    rows = [_row(neg_text=["a", "b"], neg_image_path=["", ""]) for _ in range(5)]
    rows[3] = _row(neg_text=["a"], neg_image_path=[""])
    data = datasets.Dataset.from_list(rows)
    with pytest.raises(BadRowsError, match=r"explicit negatives other than the 2 most rows carry \(rows 3\)"):
        check_training_rows(data)
    with pytest.raises(BadRowsError, match=r"fewer than num_negatives=2 explicit negatives \(rows 3\)"):
        check_training_rows(data, num_negatives=2)
    assert len(check_training_rows(data, num_negatives=1)) == 5
    assert len(check_training_rows(data, num_negatives=0)) == 5


def test_the_check_is_cached_by_fingerprint(tmp_path, monkeypatch):
    """A re-run on the same file reads the cached facts: the per-batch check does not run again."""
    path = _jsonl(tmp_path / "train.jsonl", [_row(pos=f"t{i}") for i in range(50)])
    calls = []
    original = validation._contrastive_facts
    monkeypatch.setattr(validation, "_contrastive_facts", lambda batch, **kw: calls.append(1) or original(batch, **kw))
    monkeypatch.setattr(validation, "_CHECKED", set())  # a fresh process
    check_training_rows(load_rows_dataset(path))
    assert len(calls) == 1
    monkeypatch.setattr(validation, "_CHECKED", set())
    check_training_rows(load_rows_dataset(path))
    assert len(calls) == 1  # read from the cache file next to the dataset's
    check_training_rows(load_rows_dataset(path), num_negatives=0)  # other options: other facts
    assert len(calls) == 2


def test_a_checked_dataset_is_not_checked_again(shapes_data, monkeypatch):
    """The example checks before the model loads, the trainer again: the second costs nothing."""
    checked = check_training_rows(shapes_data["train"].select(range(8)), image_root=shapes_data.image_root)
    monkeypatch.setattr(validation, "row_facts", mock.Mock(side_effect=AssertionError("checked twice")))
    monkeypatch.setattr(validation, "missing_file_problems", mock.Mock(side_effect=AssertionError("looked twice")))
    assert check_training_rows(checked, image_root=shapes_data.image_root) is checked


def test_negatives_that_are_not_texts_are_refused_before_training(tmp_path, no_model_loading):
    """neg_text as a list of lists passed the check, then failed with an AttributeError at the first batch."""
    nested = datasets.Dataset.from_list(
        [_row(pos=f"t{i}", neg_text=[["a", "b"], ["c"]], neg_image_path=["", ""]) for i in range(4)]
    )
    with pytest.raises(TypeError, match=r"'neg_text'.*list<.*not texts.*one text per negative"):
        HardNegContrastiveTrainer(model="unused", args=_config(tmp_path), train_dataset=nested)
    # in a JSON file whose rows differ, only the rows with a nested or numeric negative are bad
    rows = [_row(pos=f"t{i}", neg_text=["a", "b"], neg_image_path=["", ""]) for i in range(6)]
    rows[2]["neg_text"] = [["a", "b"], "c"]
    rows[4]["neg_text"] = ["a", 7]
    data = load_rows_dataset(_jsonl(tmp_path / "train.jsonl", rows))
    with pytest.raises(BadRowsError, match=r"a negative in 'neg_text' that is not a text \(rows 2, 4; lines 3, 5"):
        check_training_rows(data)
    assert check_training_rows(load_rows_dataset(str(tmp_path / "train.jsonl")), on_bad_row="skip")[
        ROW_INDEX_COLUMN][:] == [0, 1, 3, 5]


# ------------------------------------------------------------------- images stored in the data (issue 22, 11)
def _png_bytes(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_column_rows(n, bad: dict[int, bytes]):
    rows = [_row(qry="find it", pos=f"target {i}", qry_image={"bytes": _png_bytes((8 * i, 0, 0)), "path": None})
            for i in range(n)]
    for i, data in bad.items():
        rows[i]["qry_image_path"] = {"bytes": data, "path": f"photo{i}.jpg"}
    return datasets.Dataset.from_list(rows).cast_column("qry_image_path", datasets.Image())


def test_an_unreadable_image_in_an_image_column_is_a_bad_row(tmp_path, caplog):
    """A corrupt image in a datasets.Image column passed the check, then datasets raised a bare
    UnidentifiedImageError when its batch came (no row, no column, and on_bad_row='skip' could not help)."""
    data = _image_column_rows(8, {2: b"this is not an image", 5: b"\x89PNG broken"})
    with pytest.raises(BadRowsError, match=r"an image in 'qry_image_path' that is not a readable image \(rows 2, 5\)"):
        check_training_rows(data)
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_training_rows(data, on_bad_row="skip")
    assert kept[ROW_INDEX_COLUMN][:] == [0, 1, 3, 4, 6, 7]


def test_image_columns_are_decoded_by_the_librarys_loader(tiny_backbone, tmp_path):
    """A truncated image (its header reads, its pixels do not) fails when its batch comes: with the loader of this
    library (row, column and fix named), not inside datasets (UnidentifiedImageError / OSError, nothing named)."""
    from mm_embed_trl.data.images import ImageLoadError

    noise = np.random.default_rng(0).integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    truncated = buffer.getvalue()[:1000]  # of about 3 kB of noise: the header is whole, the pixels are not
    data = _image_column_rows(8, {3: truncated})
    checked = check_training_rows(data)
    assert checked.features["qry_image_path"].decode is False  # rows hand the collator the encoded image
    assert isinstance(checked[0]["qry_image_path"], dict)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(model=model, args=_config(tmp_path, max_steps=1), train_dataset=data)
    with pytest.raises(ImageLoadError, match=r"dataset row 3 .*'qry_image_path'.*photo3\.jpg.*truncated or corrupt"):
        trainer.train()


# ------------------------------------------------------------------------------- options (issue 22, 12)
def _configs():
    from mm_embed_trl import DistillEmbedConfig, EmbeddingGRPOConfig, EmbeddingSFTConfig

    return [HardNegContrastiveConfig, DistillEmbedConfig, EmbeddingSFTConfig, EmbeddingGRPOConfig]


@pytest.mark.parametrize("config_class", _configs(), ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "option, value, kind",
    [
        ("learning_rate", [1e-4], "a list"),
        ("learning_rate", None, "null"),
        ("per_device_train_batch_size", None, "null"),
        ("seed", {"a": 1}, "a mapping"),
        ("max_train_samples", [3], "a list"),  # a script option
        ("lora_r", None, "null"),  # a model option (TRL's ModelConfig)
    ],
)
def test_a_list_or_null_for_a_scalar_option_in_a_recipe_names_the_option(
    config_class, option, value, kind, tmp_path, monkeypatch
):
    """A YAML recipe's values bypass argparse's type conversion: a list or null reached torch as it was."""
    import sys

    import yaml
    from trl import ModelConfig, TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments, parse_args

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({option: value, "image_root": None}))  # null is fine where None is an option
    monkeypatch.setattr(sys, "argv", ["train.py", "--config", str(recipe), "--output_dir", str(tmp_path / "out")])
    parser = TrlParser((EmbeddingScriptArguments, config_class, ModelConfig))
    with pytest.raises(ValueError, match=rf"Option {option} \(--{option}\).*{kind}"):
        parse_args(parser, {})


def test_a_null_for_an_option_whose_default_is_none_is_kept(tmp_path):
    args = _config(tmp_path, max_length=None, num_negatives=None, image_root=None)
    assert args.max_length is None and args.num_negatives is None


# --------------------------------------------------------------- UME-R1 reasoning rows (issue 22, 3 and 10)
def _reasoning_row(i, **extra):
    from mm_embed_trl.data.reasoning import format_reasoning

    row = _row(qry=f"find thing {i}", pos=f"thing number {i}", **extra)
    row.setdefault("qry_reasoning", format_reasoning(f"looking for thing {i}", f"thing {i}"))
    row.setdefault("pos_reasoning", format_reasoning(f"this shows thing {i}", f"thing {i}"))
    return row


def _sft_config(tmp_path, **kw):
    from mm_embed_trl import EmbeddingSFTConfig

    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, report_to="none", use_cpu=True,
        save_strategy="no", disable_tqdm=True, save_sentence_transformers=False,
    )
    return EmbeddingSFTConfig(**{**defaults, **kw})


def test_reasoning_rows_break_their_contract_before_training_not_at_their_batch(tmp_path, caplog, no_model_loading):
    """Missing targets, targets without <gen_emb> or outside UME-R1's format, and vision tokens in a target (which
    crashed the model at random: "Image features and image tokens do not match") or a prompt text were found only
    when their batch came, without the skip policy; now they are rows the pre-training check names."""
    from mm_embed_trl import EmbeddingSFTTrainer

    rows = [_reasoning_row(i) for i in range(14)]
    rows[1]["qry_reasoning"] = None
    rows[3]["pos_reasoning"] = "<think>a circle</think><answer>circle</answer>"
    rows[5]["qry_reasoning"] = "a circle, I think <gen_emb>"
    rows[7]["pos_reasoning"] = rows[7]["pos_reasoning"].replace("<answer>", "<|image_pad|><answer>")
    rows[8]["qry_reasoning"] = rows[8]["qry_reasoning"].replace("<answer>", "<image><answer>")
    rows[10]["qry"] = "the clip <|video_pad|> shows"
    path = _jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(BadRowsError) as info:
        EmbeddingSFTTrainer(model="unused", args=_sft_config(tmp_path), train_dataset=load_rows_dataset(path))
    message = str(info.value)
    assert "no reasoning target in 'qry_reasoning' (rows 1; lines 2 of train.jsonl)" in message
    assert "a reasoning target in 'pos_reasoning' without <gen_emb> (rows 3;" in message
    assert "a reasoning target in 'qry_reasoning' outside UME-R1's format" in message and "(rows 5;" in message
    assert "an image or video token (<|image_pad|>, <|video_pad|>, <image>, <video>) in 'pos_reasoning' (rows 7;" in (
        message
    )
    assert "in 'qry_reasoning' (rows 8;" in message
    assert "a video placeholder (<video>, <|video_pad|>, <|video_1|>) in 'qry' but no video in 'qry_video_path' " \
        "(rows 10;" in message
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_training_rows(load_rows_dataset(path), reasoning=True, on_bad_row="skip")
    assert kept[ROW_INDEX_COLUMN][:] == [0, 2, 4, 6, 9, 11, 12, 13]
    # negatives are texts the processor sees too (contrastive training)
    negatives = [_row(pos=f"t{i}", neg_text=["a <video> clip" if i == 2 else "x"]) for i in range(4)]
    with pytest.raises(BadRowsError, match=r"a video placeholder \(<video>, .*\) in 'neg_text' \(rows 2\)"):
        check_training_rows(datasets.Dataset.from_list(negatives))
    # a missing column is a column problem, with the way out of reasoning SFT
    no_column = datasets.Dataset.from_list([_reasoning_row(i) for i in range(4)]).remove_columns("pos_reasoning")
    with pytest.raises(KeyError, match=r"'pos_reasoning'.*discriminative_only"):
        EmbeddingSFTTrainer(model="unused", args=_sft_config(tmp_path), train_dataset=no_column)
    # DUME (discriminative only) rows need no reasoning
    assert len(check_training_rows(no_column, reasoning=False)) == 4


def test_the_format_check_is_ume_r1s_regex_vectorised():
    """The Arrow (RE2) form of the format check against follows_format (Python's re) on random targets."""
    from mm_embed_trl.data.reasoning import follows_format

    rng = np.random.default_rng(0)
    well_formed = ["<think>", "a\nb", "</think>", "\n ", "<answer>", "y z", "</answer>", "<gen_emb>"]
    noise = ["<think", "gen_emb>", "\n", " ", "<answer>", "</think>", "x"]
    targets = []
    for _ in range(3000):  # UME-R1's layout with pieces dropped, swapped or added at random
        pieces = [p for p in well_formed if rng.random() > 0.1]
        for _ in range(rng.integers(0, 3)):
            pieces.insert(int(rng.integers(0, len(pieces) + 1)), str(rng.choice(noise)))
        if rng.random() < 0.2 and len(pieces) > 1:
            i, j = rng.choice(len(pieces), size=2, replace=False)
            pieces[i], pieces[j] = pieces[j], pieces[i]
        targets.append("".join(pieces))
    facts = validation._reasoning_facts(targets)
    expected = np.array([follows_format(t) for t in targets])
    assert 0.05 < expected.mean() < 0.95  # the random targets cover both outcomes
    assert (facts["follows_format"] == expected).all()


def _length_rows(tmp_path, n, rng):
    """Rows whose prompt + target lengths straddle a limit: random texts, targets and image sizes (some images
    stored rotated by an EXIF tag, so their size is the upright one), some sides without an image."""
    from mm_embed_trl.data.reasoning import format_reasoning

    words = ["red", "circle", "blue", "square", "left", "right", "small", "large"]
    rows = []
    for i in range(n):
        row = {}
        for side, (text_col, image_col, target_col) in {
            "q": ("qry", "qry_image_path", "qry_reasoning"), "p": ("pos_text", "pos_image_path", "pos_reasoning")
        }.items():
            row[text_col] = " ".join(rng.choice(words, size=rng.integers(1, 30)))
            row[target_col] = format_reasoning(" ".join(rng.choice(words, size=rng.integers(1, 60))), "a thing")
            row[image_col] = ""
            if rng.random() < 0.7:
                width, height = (int(x) for x in rng.integers(28, 400, size=2))
                name = f"{side}{i}.jpg"
                image = Image.new("RGB", (width, height), tuple(int(c) for c in rng.integers(0, 255, size=3)))
                exif = Image.Exif()
                if rng.random() < 0.3:
                    exif[0x0112] = 6  # stored sideways: the upright image is height x width
                image.save(tmp_path / name, exif=exif)
                row[image_col] = name
        rows.append(row)
    return rows


def _sft_collator(tiny_backbone, image_root, max_sequence_length, template="ume_r1"):
    from transformers import AutoProcessor

    from mm_embed_trl.data.images import set_image_pixel_budget
    from mm_embed_trl.data.reasoning import ReasoningCollator
    from mm_embed_trl.data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN

    processor = AutoProcessor.from_pretrained(tiny_backbone("qwen2_vl"))
    processor.tokenizer.add_tokens([DISC_EMB_TOKEN, GEN_EMB_TOKEN])
    set_image_pixel_budget(processor, 160 * 160)  # at most 32 tokens per image
    return ReasoningCollator(
        processor, template, image_root=image_root, max_length=max_sequence_length, max_text_length=24
    )


@pytest.mark.parametrize("template", ["ume_r1", "ume_r1_blank_image"])
def test_the_length_check_counts_the_tokens_the_collator_makes(tiny_backbone, tmp_path, monkeypatch, template):
    """Lengths from the pre-training check (texts and targets tokenized in batches, image tokens from the image
    headers, only where an image could push a row over) against the collator's own batches; with
    ``ume_r1_blank_image`` (the SFT default) text-only rows carry the white square's tokens too (the check once
    left them out and passed rows that the collator then refused)."""
    from mm_embed_trl.data import reasoning
    from mm_embed_trl.data.validation import check_reasoning_lengths

    rng = np.random.default_rng(0)
    rows = _length_rows(tmp_path, 40, rng)
    unlimited = _sft_collator(tiny_backbone, tmp_path, None, template)
    actual = {}
    for side in ("query", "positive"):
        batch = [unlimited([row])[side]["attention_mask"].sum().item() for row in rows]
        actual[side] = np.array(batch)
    limit = int(np.median(np.maximum(actual["query"], actual["positive"])))
    over = (actual["query"] > limit) | (actual["positive"] > limit)
    assert 5 < over.sum() < 35
    collator = _sft_collator(tiny_backbone, tmp_path, limit, template)
    data = check_training_rows(datasets.Dataset.from_list(rows), reasoning=True, image_root=tmp_path)
    opened = []
    image_size = reasoning.image_size
    monkeypatch.setattr(reasoning, "image_size", lambda *a, **k: opened.append(a[0]) or image_size(*a, **k))
    lengths = collator.sequence_lengths(data.with_format("arrow")[:])
    images = [r[c] for r in rows for c in ("qry_image_path", "pos_image_path") if r[c]]
    assert 0 < len(opened) < len(images)  # only images that could take their row over the limit are opened
    for side in ("query", "positive"):
        exceeds = actual[side] > limit
        assert ((lengths[side] > limit) == exceeds).all()
        assert (lengths[side][exceeds] == actual[side][exceeds]).all()  # exact where it matters (the message)
        assert (lengths[side] >= actual[side]).all()  # elsewhere a bound that fits
    with pytest.raises(BadRowsError, match=rf"longer than max_sequence_length={limit} tokens.*--max_sequence_length"):
        check_reasoning_lengths(data, collator, what="training dataset", on_bad_row="raise")
    kept = check_reasoning_lengths(data, collator, what="training dataset", on_bad_row="skip")
    assert kept[ROW_INDEX_COLUMN][:] == np.flatnonzero(~over).tolist()
    for row in kept:  # the collator takes every row that is left
        collator([row])


def test_sft_skips_over_long_rows_before_training(tiny_backbone, tmp_path, caplog):
    """An over-long reasoning stopped the run when its batch came, with an error naming max_length."""
    from mm_embed_trl import EmbeddingSFTTrainer

    rows = [_reasoning_row(i) for i in range(9)]
    rows[4]["pos_reasoning"] = rows[4]["pos_reasoning"].replace("this shows", "this shows " + "very " * 200)
    data = datasets.Dataset.from_list(rows)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    with pytest.raises(BadRowsError, match=r"'pos_reasoning'.*longer than max_sequence_length=200.*\(rows 4\)"):
        EmbeddingSFTTrainer(model=model, args=_sft_config(tmp_path, max_sequence_length=200), train_dataset=data)
    trainer = EmbeddingSFTTrainer(
        model=model, args=_sft_config(tmp_path, max_sequence_length=200, on_bad_row="skip", max_steps=2),
        train_dataset=data,
    )
    assert trainer.train_dataset[ROW_INDEX_COLUMN][:] == [0, 1, 2, 3, 5, 6, 7, 8]
    assert trainer.skipped_rows == {"training dataset": 1}
    trainer.train()


# ----------------------------------------------------------------- distillation data (issue #10, 9: stage 1)
def test_distill_rows_all_zero_teacher_vectors_and_skip(qwen2_vl_model, tmp_path, caplog):
    from mm_embed_trl import DistillEmbedConfig, DistillEmbedTrainer
    from mm_embed_trl.data.distill_rows import check_distill_rows

    vectors = [[0.1, 0.2, 0.3], [0.0, 0.0, 0.0], [0.3, 0.1, 0.2], [float("nan"), 0.0, 1.0], [0.2, 0.2, 0.1]]
    data = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d", ""], "teacher_embedding": vectors})
    with pytest.raises(BadRowsError) as info:
        check_distill_rows(data)
    message = str(info.value)
    assert "all-zero teacher embedding in 'teacher_embedding' (rows 1)" in message
    assert "non-finite (NaN/inf) values in 'teacher_embedding' (rows 3)" in message
    assert "empty or missing 'text' (rows 4)" in message
    config = DistillEmbedConfig(
        output_dir=str(tmp_path / "o"), report_to="none", use_cpu=True, on_bad_row="skip", disable_tqdm=True
    )
    with caplog.at_level(logging.WARNING):
        trainer = DistillEmbedTrainer(model=qwen2_vl_model, args=config, train_dataset=data)
    assert trainer.train_dataset[ROW_INDEX_COLUMN][:] == [0, 2]
    assert trainer.skipped_rows == {"training dataset": 3}
    assert sum(r.getMessage().startswith("Skipping row") for r in caplog.records) == 3


def test_non_utf8_texts_for_the_teacher_are_named(tmp_path):
    from mm_embed_trl.data.distill_rows import check_texts

    path = _jsonl(tmp_path / "t.jsonl", [{"text": "fine"}, {"text": "x"}], {1: b'{"text": "caf\xe9"}'})
    with pytest.raises(ValueError, match=r"1 row\(s\).*'text' that is not a valid UTF-8 string \(rows 1\)"):
        check_texts(load_rows_dataset(path), "text")


# ---------------------------------------------------------------------------------- the policy and the config
def test_on_bad_row_is_validated_and_documented():
    from dataclasses import fields

    with pytest.raises(ValueError, match="on_bad_row"):
        HardNegContrastiveConfig(output_dir="x", use_cpu=True, on_bad_row="ignore")
    help_text = next(f for f in fields(HardNegContrastiveConfig) if f.name == "on_bad_row").metadata["help"]
    assert "raise" in help_text and "skip" in help_text


def test_skipped_rows_are_reported_at_the_end_of_training(tiny_backbone, tmp_path, caplog):
    rows = [_row(qry=f"query {i}", pos=f"target {i}") for i in range(17)]
    rows[4] = _row(qry="", pos="t")
    data = datasets.Dataset.from_list(rows)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(
        model=model, args=_config(tmp_path, on_bad_row="skip", max_steps=1), train_dataset=data
    )
    assert len(trainer.train_dataset) == 16
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.trainers.base"):
        trainer.train()
    assert any("Bad rows left out of training" in r.getMessage() and "1 of the training dataset" in r.getMessage()
               for r in caplog.records)


# ------------------------------------------------------------------------ dataset row in errors (issue #10, 8)
def test_collator_errors_name_the_dataset_row_not_the_batch_position(tiny_backbone, tmp_path):
    """An image that goes missing after the pre-training check (deleted while the run goes on) surfaces in the
    collator: the error names the dataset row (line 2 of the file), not the row's position in the shuffled batch."""
    from mm_embed_trl.data.images import ImageLoadError

    rows = [_row(qry=f"query {i}", pos=f"target {i}") for i in range(8)]
    rows[1] = _row(qry="<|image_1|> find", qry_image="images/missing.png")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "missing.png")  # there when the rows are checked
    data = load_rows_dataset(_jsonl(tmp_path / "train.jsonl", rows))
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(
        model=model, args=_config(tmp_path, image_root=str(tmp_path), max_steps=1, seed=3), train_dataset=data
    )
    (tmp_path / "images" / "missing.png").unlink()
    with pytest.raises(ImageLoadError, match=r"dataset row 1 \(batch row \d\).*qry_image_path.*missing\.png"):
        trainer.train()


# -------------------------------------------------------------------- the last contrastive batch (issue #10, 5)
def test_a_last_batch_of_one_row_no_longer_ends_the_epoch(tiny_backbone, tmp_path, caplog):
    """9 rows in batches of 8 left a last batch of 1 row, which crashed at the end of the epoch."""
    rows = [_row(qry=f"query {i}", pos=f"target {i}") for i in range(9)]
    data = datasets.Dataset.from_list(rows)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.trainers.hardneg_trainer"):
        trainer = HardNegContrastiveTrainer(model=model, args=_config(tmp_path, num_train_epochs=2), train_dataset=data)
    assert trainer.args.dataloader_drop_last  # the contrastive default
    assert any("leaves out 1 of the 9" in r.getMessage() for r in caplog.records)
    trainer.train()
    assert trainer.state.global_step == 2
    # without drop_last the same data is refused up front, with advice that helps
    with pytest.raises(ValueError, match=r"last batch of every epoch would hold 1 row.*dataloader_drop_last=True"):
        HardNegContrastiveTrainer(model=model, args=_config(tmp_path, dataloader_drop_last=False), train_dataset=data)


def _batch_args(per_device, world, drop_last=True, even_batches=True, num_negatives=None):
    return SimpleNamespace(
        per_device_train_batch_size=per_device, world_size=world, dataloader_drop_last=drop_last,
        num_negatives=num_negatives, accelerator_config=SimpleNamespace(even_batches=even_batches),
    )


def test_the_global_batch_is_per_device_times_processes(caplog):
    from mm_embed_trl.trainers.hardneg_trainer import check_last_batch

    data = datasets.Dataset.from_list([_row(pos=f"t{i}") for i in range(17)])
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.trainers.hardneg_trainer"):
        check_last_batch(data, _batch_args(4, 2))
    assert any("leaves out 1 of the 17" in r.getMessage() and "4 per device x 2 process(es) = 8" in r.getMessage()
               for r in caplog.records)
    # the rows accelerate repeats to complete a multi-process last batch (even_batches) stay out of the loss
    for even_batches in (True, False):
        with pytest.raises(ValueError, match="1 row"):
            check_last_batch(data, _batch_args(4, 2, drop_last=False, even_batches=even_batches))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        check_last_batch(data, _batch_args(16, 2))
    with pytest.raises(ValueError, match="global batch of 1 row"):
        check_last_batch(data, _batch_args(1, 1))
    # rows with explicit negatives contrast even alone
    with_negatives = data.add_column("neg_text", [["n"]] * 17)
    check_last_batch(with_negatives, _batch_args(1, 1))
    check_last_batch(with_negatives, _batch_args(8, 1, drop_last=False))


# ------------------------------------------------------------------------------------------ the examples' CLI
def _run_example(args, tmp_path, timeout=300):
    return launching.run(ROOT / "examples" / "train_hardneg.py", *args, cwd=tmp_path, timeout=timeout, check=False)


def _cli_data(tmp_path) -> str:
    rows = [_row(qry=f"query {i}", pos=f"target {i}") for i in range(17)]
    rows[3] = _row(qry="   ")
    rows[5] = _row(qry="a long query " * 50, pos="target 5")
    return _jsonl(tmp_path / "train.jsonl", rows)


def test_example_refuses_bad_rows_before_loading_the_model(tmp_path):
    proc = _run_example(["--dataset_name", _cli_data(tmp_path), "--output_dir", str(tmp_path / "o")], tmp_path)
    assert proc.returncode != 0
    assert "an empty 'qry' and no image in 'qry_image_path' (rows 3; lines 4 of train.jsonl)" in proc.stderr
    assert "tiny random" not in proc.stdout  # the backbone was never resolved


@pytest.mark.slow
def test_example_skips_bad_rows_with_on_bad_row_skip(tmp_path):
    out = tmp_path / "o"
    proc = _run_example(
        ["--dataset_name", _cli_data(tmp_path), "--output_dir", str(out), "--on_bad_row", "skip",
         "--per_device_train_batch_size", "5", "--num_train_epochs", "1", "--save_sentence_transformers", "false",
         "--max_length", "16"],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Skipping row 3 (line 4 of train.jsonl) of the training dataset" in proc.stderr
    assert "Bad rows left out of training (on_bad_row='skip'): 1 of the training dataset" in proc.stderr
    # 16 rows left in batches of 5: the contrastive default drops the last row of each epoch, and says so
    assert "leaves out 1 of the 16 training rows" in proc.stderr
    assert "longer than max_length=16 text tokens and were truncated" in proc.stderr
    assert (out / "model.safetensors").exists()
