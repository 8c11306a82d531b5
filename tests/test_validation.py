"""The pre-training data checks: misspelt/missing columns, every row checked (vectorised, cached), the on_bad_row
policy, dataset row indices in collator errors, and the contrastive trainer's last-batch handling."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import datasets
import launching
import numpy as np
import pytest

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
    checked = check_training_rows(shapes_data["train"].select(range(16)))
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
    rows[0] = _row(qry="<|image_1|> What is shown?", qry_image="a.png")
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
    checked = check_training_rows(shapes_data["train"].select(range(8)))
    monkeypatch.setattr(validation, "row_facts", mock.Mock(side_effect=AssertionError("checked twice")))
    assert check_training_rows(checked) is checked


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
    """A missing image surfaces mid-training in the collator: the error names the dataset row (line 2 of the
    file), not the row's position in the shuffled batch."""
    from mm_embed_trl.data.images import ImageLoadError

    rows = [_row(qry=f"query {i}", pos=f"target {i}") for i in range(8)]
    rows[1] = _row(qry="<|image_1|> find", qry_image="images/missing.png")
    data = load_rows_dataset(_jsonl(tmp_path / "train.jsonl", rows))
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(
        model=model, args=_config(tmp_path, image_root=str(tmp_path), max_steps=1, seed=3), train_dataset=data
    )
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
