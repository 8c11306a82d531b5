"""The real-digits demo dataset: captions from each image's own pixels, a held-out split of other scans, UME-R1 rows."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch
from numerics import assert_close, rounding_rtol

from mm_embed_trl.data.images import load_image
from mm_embed_trl.data.reasoning import follows_format
from mm_embed_trl.data.schema import POS_IMAGE, POS_REASONING, POS_TEXT, QUERY_IMAGE, QUERY_REASONING, QUERY_TEXT
from mm_embed_trl.demo.digits import DIGIT_WORDS, digit_attributes, make_digits_dataset

load_digits = pytest.importorskip("sklearn.datasets").load_digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return make_digits_dataset(tmp_path_factory.mktemp("digits") / "data", num_eval=300, seed=1)


def _hand_attributes(image: np.ndarray) -> tuple[float, float]:
    """Total ink and slant of one 8x8 image, pixel by pixel in float64 (the module's vectorised code is not used)."""
    ink = sum(float(image[y, x]) for y in range(8) for x in range(8))
    mx = sum(x * float(image[y, x]) for y in range(8) for x in range(8)) / ink
    my = sum(y * float(image[y, x]) for y in range(8) for x in range(8)) / ink
    cov = sum((x - mx) * (y - my) * float(image[y, x]) for y in range(8) for x in range(8)) / ink
    var = sum((y - my) ** 2 * float(image[y, x]) for y in range(8) for x in range(8)) / ink
    return ink, -cov / var  # y grows downwards: leaning right means x grows as y falls


def test_attributes_match_a_pixel_by_pixel_reference():
    data = load_digits()
    picks = np.arange(0, 1797, 97)
    attrs = digit_attributes(data.images, data.target)
    expected = torch.tensor([_hand_attributes(data.images[i]) for i in picks], dtype=torch.float64)
    actual = torch.tensor(np.stack([attrs["ink"][picks], attrs["slant"][picks]], axis=1))
    # 64-term sums, four chained (means, moments, the ratio), in float64
    assert_close(actual, expected, rtol=rounding_rtol(terms=64, depth=4, dtype=torch.float64))
    # a '1' written as "/" leans right; the same pixels mirrored left-right lean left by as much
    stroke = np.zeros((1, 8, 8))
    for y in range(8):
        stroke[0, y, 7 - y] = 16.0
    right = digit_attributes(stroke, [1])["slant"][0]
    left = digit_attributes(stroke[:, :, ::-1], [1])["slant"][0]
    assert right > 0.9 and left == pytest.approx(-right)


def test_rows_describe_their_own_image(digits):
    data = load_digits()
    root = digits.image_root
    for split in ("train", "eval"):
        rows = digits[split]
        assert Counter(rows["task"]).keys() == {"i2t", "t2i"}
        for row in rows.select(range(0, len(rows), 37)):
            i = row["source_index"]
            caption = row["caption"]
            digit, bold, right = row["digit"], row["bold"], row["leans_right"]
            assert digit == data.target[i]
            weight, lean = "bold" if bold else "thin", "right" if right else "left"
            assert caption == f"a {weight} {DIGIT_WORDS[digit]} leaning {lean}"
            pixels = np.asarray(load_image(row["image_path"], root).convert("L"), dtype=np.float64)
            assert pixels.shape == (8, 8)
            np.testing.assert_array_equal(pixels, np.rint(data.images[i] * 255 / 16))  # the scan itself
            if row["task"] == "i2t":
                assert (row[QUERY_IMAGE], row[POS_TEXT], row[POS_IMAGE]) == (row["image_path"], caption, "")
                image_side, text_side = row[QUERY_REASONING], row[POS_REASONING]
            else:
                assert row[QUERY_IMAGE] == "" and row[POS_IMAGE] == row["image_path"]
                assert row[QUERY_TEXT].endswith(caption)
                image_side, text_side = row[POS_REASONING], row[QUERY_REASONING]
            for reasoning in (image_side, text_side):
                assert follows_format(reasoning)
                assert re.search(r"<answer>(.*)</answer>", reasoning).group(1) == caption
            assert f"strokes are {'bold' if bold else 'thin'}" in image_side


def test_properties_split_each_digit_at_its_median(digits):
    rows = [r for split in ("train", "eval") for r in digits[split]]
    for digit in range(10):
        mine = [r for r in rows if r["digit"] == digit]
        ink = np.array([r["ink"] for r in mine])
        slant = np.array([r["slant"] for r in mine])
        assert all(r["bold"] == (r["ink"] > np.median(ink)) for r in mine)
        assert all(r["leans_right"] == (r["slant"] > np.median(slant)) for r in mine)
        # halves (ink ties at the median fall on the thin side)
        assert sum(r["leans_right"] for r in mine) == len(mine) // 2
        assert len(mine) // 2 - 12 <= sum(r["bold"] for r in mine) <= len(mine) // 2
    assert len({r["caption"] for r in rows}) == 40


def test_heldout_split_holds_other_scans(digits):
    train, held_out = list(digits["train"]["source_index"]), list(digits["eval"]["source_index"])
    assert (len(train), len(held_out)) == (1797 - 300, 300)
    assert set(train).isdisjoint(held_out)
    assert sorted(train + held_out) == list(range(1797))
    # another seed draws another split; the same parameters reuse the folder as it is
    again = make_digits_dataset(num_eval=300, seed=1, output_dir=digits.image_root)
    assert list(again["eval"]["source_index"]) == held_out


def test_bad_parameters_and_foreign_folders(tmp_path):
    with pytest.raises(ValueError, match="num_eval"):
        make_digits_dataset(tmp_path / "a", num_eval=1797)
    with pytest.raises(ValueError, match="t2i_fraction"):
        make_digits_dataset(tmp_path / "a", t2i_fraction=1.5)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds something else"):
        make_digits_dataset(tmp_path / "b")
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
