"""Property-based: the collator over random mixes of text-only, image-only and image+text rows, empty and very long
texts, odd image sizes and modes either returns a batch whose per-row embeddings equal those of the rows collated
one at a time, or raises a ValueError naming a bad row -- never another exception."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image

from mm_embed_trl.data.collators import EmbeddingCollator

SIZES = [(1, 1), (1, 500), (300, 7), (28, 28), (40, 64)]  # (width, height)
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "F"]
GOOD_TEXTS = st.one_of(
    st.sampled_from(["a red circle", "<|image_1|>\nRepresent the given image.", "two blue squares"]),
    st.text(min_size=1, max_size=40).filter(str.strip),
    st.just("blue square on the left " * 200),  # ~4800 characters: cut to max_length
)
BAD_TEXTS = st.sampled_from(["", "   ", "<|image_1|>"])  # nothing to embed without an image
TEXTS = st.one_of(GOOD_TEXTS, GOOD_TEXTS, GOOD_TEXTS, BAD_TEXTS)  # one_of picks branches alike: 1 in 4 bad


@st.composite
def images(draw):
    width, height = draw(st.sampled_from(SIZES))
    mode = draw(st.sampled_from(MODES))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        return Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)
    if mode == "F":
        return Image.fromarray(pixels[..., 0].astype(np.float32) / 255)
    return image.convert(mode)


@st.composite
def sides(draw):
    """(text, image) of one side: text-only, image-only, image+text, or (rarely) neither."""
    kind = draw(st.sampled_from(["text", "image", "both", "text", "both"]))
    text = draw(TEXTS) if kind != "image" else ""
    image = draw(images()) if kind != "text" else ""
    return text, image


@st.composite
def batches(draw):
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        (q_text, q_image), (p_text, p_image) = draw(sides()), draw(sides())
        rows.append({"qry": q_text, "qry_image_path": q_image, "pos_text": p_text, "pos_image_path": p_image})
    return rows


@pytest.fixture(scope="module")
def collator(qwen2_vl_model):
    return EmbeddingCollator(qwen2_vl_model.processor, "unime", max_length=64)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rows=batches())
def test_collator_batches_equal_rows_one_at_a_time_or_name_the_row(rows, collator, qwen2_vl_model):
    try:
        batch = collator(rows)
    except ValueError as err:
        assert re.search(r"batch row \d+", str(err)), f"a ValueError that names no row: {err}"
        event("refused: " + ("image" if "cannot be processed" in str(err) else "nothing to embed"))
        index = int(re.search(r"batch row (\d+)", str(err)).group(1))
        with pytest.raises(ValueError):  # the row it names is bad on its own too
            collator([rows[index]])
        return
    event(f"collated, {sum(bool(r['qry_image_path']) for r in rows)} query image(s)")
    for side, image_column in (("query", "qry_image_path"), ("positive", "pos_image_path")):
        enc = batch[side]
        has_image = [not (isinstance(r[image_column], str) and r[image_column] == "") for r in rows]
        assert enc["input_ids"].shape[0] == len(rows)
        assert enc["image_counts"].tolist() == [int(h) for h in has_image]  # one image per image row
        if any(has_image):
            assert enc["image_grid_thw"].shape[0] == sum(has_image)
        with torch.no_grad():
            together = qwen2_vl_model(**enc).embeddings
            alone = torch.cat([qwen2_vl_model(**collator([row])[side]).embeddings for row in rows])
        # float32, a 2-layer model: padding changes only the reduction order; the image profile bounds that rounding
        assert_close(together, alone, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
