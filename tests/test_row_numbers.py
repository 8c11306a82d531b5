"""Row numbers in errors after ``on_bad_row="skip"`` left rows out: a later check (the reasoning lengths) and the GRPO
rollouts name the row of the user's dataset (its ROW_INDEX_COLUMN), not its position among the rows that are left."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import datasets
import numpy as np
import pytest

from mm_embed_trl.data.loading import load_rows_dataset
from mm_embed_trl.data.samplers import flatten_pairs
from mm_embed_trl.data.schema import ROW_INDEX_COLUMN
from mm_embed_trl.data.validation import BadRowsError, check_reasoning_lengths, check_training_rows


class _Lengths:
    """Stands in for the reasoning collator's token counts: the row whose query is ``"q3"`` is too long."""

    max_sequence_length = 10

    def sequence_lengths(self, batch):
        texts = batch["qry"].to_pylist()
        return {"query": np.array([100 if t == "q3" else 1 for t in texts]), "positive": np.ones(len(texts), int)}

    def length_options(self):
        return {"collator": "fake lengths"}


def _rows():  # row 1 (an empty side) is left out by the contrastive check, row 3 is too long for the length check
    return {"qry": ["q0", "", "q2", "q3"], "pos_text": ["p0", "p1", "p2", "p3"]}


def test_the_length_check_after_a_skip_names_the_users_rows(caplog):
    checked = check_training_rows(datasets.Dataset.from_dict(_rows()), on_bad_row="skip", num_negatives=0)
    assert checked[ROW_INDEX_COLUMN][:] == [0, 2, 3]
    with pytest.raises(BadRowsError, match=r"\(rows 3\)"):
        check_reasoning_lengths(checked, _Lengths(), on_bad_row="raise")
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        kept = check_reasoning_lengths(checked, _Lengths(), on_bad_row="skip")
    assert "Skipping row 3 of the training dataset" in caplog.text
    assert "Skipping row 2 " not in caplog.text
    assert kept[ROW_INDEX_COLUMN][:] == [0, 2]


def test_the_length_check_after_a_skip_names_the_lines_of_the_file(tmp_path, caplog):
    rows = _rows()
    records = [json.dumps({"qry": q, "pos_text": p}) for q, p in zip(rows["qry"], rows["pos_text"])]
    path = tmp_path / "train.jsonl"
    path.write_text(records[0] + "\n\n" + "\n".join(records[1:]) + "\n")  # a blank line 2: row 3 is on line 5
    checked = check_training_rows(load_rows_dataset(str(path)), on_bad_row="skip", num_negatives=0)
    with pytest.raises(BadRowsError, match=r"\(rows 3; lines 5 of train\.jsonl\)"):
        check_reasoning_lengths(checked, _Lengths(), on_bad_row="raise")
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.validation"):
        check_reasoning_lengths(checked, _Lengths(), on_bad_row="skip")
    assert "Skipping row 3 (line 5 of train.jsonl) of the training dataset" in caplog.text


def test_grpo_rollouts_after_a_skip_name_the_users_row(tmp_path):
    from PIL import Image

    from mm_embed_trl.data.images import ImageLoadError
    from mm_embed_trl.trainers.grpo_trainer import EmbeddingGRPOTrainer

    image = tmp_path / "vanishes.png"
    Image.new("RGB", (8, 8)).save(image)  # there when the rows are checked, gone when row 2 is rolled out
    rows = {**_rows(), "pos_image_path": ["", "", str(image), ""]}
    checked = check_training_rows(datasets.Dataset.from_dict(rows), on_bad_row="skip", num_negatives=0)
    image.unlink()
    flat = flatten_pairs(checked)
    assert flat["pair_id"][:] == [0, 0, 1, 1, 2, 2]  # the reward pairs the sides by pair_id: unchanged
    assert flat[ROW_INDEX_COLUMN][:] == [0, 0, 2, 2, 3, 3]
    trainer = SimpleNamespace(args=SimpleNamespace(image_root=str(tmp_path)), processing_class=None)
    with pytest.raises(ImageLoadError, match=r"dataset row 2 \(target side\) image"):
        EmbeddingGRPOTrainer._row_input(trainer, flat[3])
