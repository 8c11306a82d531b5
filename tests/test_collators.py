"""EmbeddingCollator: one processor call per side, MMEB rows, negatives, content ids, chunk splitting, bad rows."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol

from mm_embed_trl.data.collators import EmbeddingCollator, split_batch
from mm_embed_trl.data.images import ImageLoadError
from mm_embed_trl.data.schema import EmbeddingInput


@pytest.fixture(scope="module")
def collator(qwen2_vl_model, shapes_data):
    return EmbeddingCollator(qwen2_vl_model.processor, "unime", image_root=str(shapes_data.image_root))


def _rows(shapes_data, n=6, split="train"):
    return [shapes_data[split][i] for i in range(n)]


def test_collates_generated_rows_with_one_processor_call_per_side(collator, shapes_data):
    rows = _rows(shapes_data, 8)
    with mock.patch.object(collator, "processor", wraps=collator.processor) as spy:
        batch = collator(rows)
    assert spy.call_count == 3  # query, positive, negative sides
    assert batch["num_negatives"] == 2
    q, p, n = batch["query"], batch["positive"], batch["negative"]
    assert q["input_ids"].shape[0] == p["input_ids"].shape[0] == 8 and n["input_ids"].shape[0] == 16
    # left padding: every row ends with an attended token
    assert bool((q["attention_mask"][:, -1] == 1).all())
    # every image row got its image tokens, marked in mm_token_type_ids, matching image_grid_thw (2x2 merge)
    tok = collator.tokenizer
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    expected_rows = torch.tensor([bool(r["qry_image_path"]) for r in rows])
    assert torch.equal(q["image_counts"].bool(), expected_rows)
    n_pad = (q["input_ids"] == image_pad).sum(-1)
    assert torch.equal(n_pad > 0, expected_rows)
    assert int(n_pad.sum()) == int(q["image_grid_thw"].prod(-1).sum()) // 4
    assert torch.equal(q["mm_token_type_ids"].bool(), q["input_ids"] == image_pad)


def test_mixed_text_and_image_batch(collator):
    rows = [
        {"qry": "Find a caption", "qry_image_path": "", "pos_text": "a red circle", "pos_image_path": ""},
        {"qry": "<|image_1|>\nRepresent the given image.", "qry_image_path": None, "pos_text": "x",
         "pos_image_path": ""},
    ]
    # second query has placeholder text but no image: it must embed as text, not fail
    batch = collator(rows)
    assert "pixel_values" not in batch["query"]
    assert batch["num_negatives"] == 0


def test_identical_targets_share_content_ids(collator, shapes_data):
    row = dict(shapes_data["train"][0])
    other = dict(shapes_data["train"][1])
    batch = collator([row, dict(row), other])
    ids = batch["positive_ids"].tolist()
    assert ids[0] == ids[1] != ids[2]


def test_split_batch_gives_the_same_embeddings(qwen2_vl_model, collator, shapes_data):
    text_row = {"qry": "text only", "qry_image_path": "", "pos_text": "t", "pos_image_path": "",
                "neg_text": ["u", "v"], "neg_image_path": ["", ""]}
    rows = _rows(shapes_data, 7) + [text_row]
    batch = collator(rows)
    for side in ("query", "positive", "negative"):
        enc = batch[side]
        whole = qwen2_vl_model(**enc).embeddings
        chunks = split_batch(enc, 3)
        assert len(chunks) == -(-enc["input_ids"].shape[0] // 3)
        parts = torch.cat([qwen2_vl_model(**c).embeddings for c in chunks])
        # chunks of 3 rows instead of one batch: other padding and kernel shapes, rounding only
        assert_close(parts, whole, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_split_batch_refuses_unknown_keys():
    enc = {"input_ids": torch.zeros(4, 2), "mystery": torch.zeros(4)}
    with pytest.raises(ValueError, match="mystery"):
        split_batch(enc, 2)


def test_negative_count_mismatch_names_the_rows(collator, shapes_data):
    rows = [dict(r) for r in _rows(shapes_data, 3)]
    rows[1]["neg_text"] = rows[1]["neg_text"][:1]
    rows[1]["neg_image_path"] = rows[1]["neg_image_path"][:1]
    with pytest.raises(ValueError, match=r"same number of explicit negatives.*row 1 .*has 1"):
        collator(rows)


def test_empty_text_and_no_image_names_the_row(collator):
    rows = [
        {"qry": "fine", "qry_image_path": "", "pos_text": "ok", "pos_image_path": ""},
        {"id": "abc", "qry": "  ", "qry_image_path": "", "pos_text": "ok", "pos_image_path": ""},
    ]
    with pytest.raises(ValueError, match=r"row 1 \(id=abc\).*'qry' is empty"):
        collator(rows)


def test_missing_image_names_row_and_path(collator):
    rows = [{"qry": "<|image_1|> x", "qry_image_path": "images/nope.png", "pos_text": "ok", "pos_image_path": ""}]
    with pytest.raises(ImageLoadError, match=r"row 0.*qry_image_path.*nope\.png"):
        collator(rows)


def test_missing_columns_is_a_clear_error(collator):
    with pytest.raises(KeyError, match="MMEB training schema"):
        collator([{"query": "x", "positive": "y"}])


def test_text_only_processor_refuses_images(tiny_backbone):
    from PIL import Image
    from transformers import AutoTokenizer

    from mm_embed_trl.data.schema import EmbeddingInput

    tok = AutoTokenizer.from_pretrained(tiny_backbone("text"))
    col = EmbeddingCollator(tok, "unime")
    enc = col.encode_inputs([EmbeddingInput(text="hello there"), EmbeddingInput(text="a")])
    assert enc["input_ids"].shape[0] == 2 and "token_type_ids" not in enc
    with pytest.raises(ValueError, match="text-only"):
        col.encode_inputs([EmbeddingInput(image=Image.new("RGB", (8, 8)))])


def test_max_length_truncates_text_but_keeps_the_prompt(qwen2_vl_model):
    from mm_embed_trl.data.schema import EmbeddingInput

    col = EmbeddingCollator(qwen2_vl_model.processor, "unime", max_length=4)
    long = EmbeddingInput(text="red green blue yellow purple orange circle square triangle " * 5)
    enc = col.encode_inputs([long])
    full = EmbeddingCollator(qwen2_vl_model.processor, "unime").encode_inputs([long])
    assert enc["input_ids"].shape[1] < full["input_ids"].shape[1]
    # the prompt's end (the pooled position) is untouched
    assert torch.equal(enc["input_ids"][0, -6:], full["input_ids"][0, -6:])


def test_empty_negative_fields_mean_no_negatives(collator):
    rows = [
        {"qry": "q1", "qry_image_path": "", "pos_text": "a", "pos_image_path": "", "neg_text": "",
         "neg_image_path": ""},
        {"qry": "q2", "qry_image_path": "", "pos_text": "b", "pos_image_path": "", "neg_text": None,
         "neg_image_path": ""},
    ]
    batch = collator(rows)
    assert batch["num_negatives"] == 0 and "negative" not in batch
    # one text negative per row with a scalar "" image field broadcast over the list
    rows[0].update(neg_text=["x"], neg_image_path="")
    rows[1].update(neg_text=["y"], neg_image_path="")
    assert collator(rows)["num_negatives"] == 1


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_split_batch_on_other_vision_families(family, tiny_backbone):
    from PIL import Image

    from mm_embed_trl.data.schema import EmbeddingInput
    from mm_embed_trl.modeling import MultimodalEmbeddingModel

    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone(family))
    images = [Image.new("RGB", (64, 48), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    inputs = [EmbeddingInput(text="red", image=images[0]), EmbeddingInput(text="text only"),
              EmbeddingInput(image=images[1]), EmbeddingInput(text="blue", image=images[2]), EmbeddingInput(text="x")]
    enc = model.make_collator().encode_inputs(inputs)
    whole = model(**enc).embeddings
    parts = torch.cat([model(**c).embeddings for c in split_batch(enc, 2)])
    assert_close(parts, whole, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_long_texts_are_truncated_by_default_and_the_log_says_so_once(qwen2_vl_model, caplog):
    """A 100k-character text used to go to the model whole (out of memory): the default max_length cuts the text
    (the prompt is kept) and one warning says how many texts were cut."""
    import logging

    from mm_embed_trl.data.collators import DEFAULT_MAX_TEXT_TOKENS
    from mm_embed_trl.trainers import EmbeddingTrainingArguments

    assert EmbeddingTrainingArguments(output_dir="x", use_cpu=True).max_length == DEFAULT_MAX_TEXT_TOKENS
    col = EmbeddingCollator(qwen2_vl_model.processor, "unime")
    assert col.max_length == DEFAULT_MAX_TEXT_TOKENS
    huge = "red circle " * 10_000  # 110k characters, ~20k tokens
    rows = [
        {"qry": huge, "qry_image_path": "", "pos_text": "short", "pos_image_path": ""},
        {"qry": huge, "qry_image_path": "", "pos_text": huge, "pos_image_path": ""},
        {"qry": "short", "qry_image_path": "", "pos_text": "short too", "pos_image_path": ""},
    ]
    prompt_only = EmbeddingCollator(qwen2_vl_model.processor, "unime").encode_inputs(
        [EmbeddingInput(text="x")]
    )["input_ids"].shape[1] - 1
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.data.collators"):
        batch = col(rows)
        col(rows)  # a second batch with long texts: counted, not logged again
    lengths = batch["query"]["attention_mask"].sum(-1)
    assert int(lengths.max()) == DEFAULT_MAX_TEXT_TOKENS + prompt_only
    # the prompt's end (the pooled position) is the same as for a short text
    short = col.encode_inputs([EmbeddingInput(text="red circle")])["input_ids"][0]
    torch.testing.assert_close(batch["query"]["input_ids"][0, -6:], short[-6:])
    warnings = [r for r in caplog.records if "max_length" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "2 of 3 texts" in warnings[0].getMessage() and str(DEFAULT_MAX_TEXT_TOKENS) in warnings[0].getMessage()
    assert col.num_truncated == 6  # 3 long texts per batch, two batches
    # None keeps whole texts (what encode() does)
    assert EmbeddingCollator(qwen2_vl_model.processor, max_length=None).max_length is None


class _StubEncodingCollator(EmbeddingCollator):
    """The collator's row handling without a processor: `encode_inputs` only counts, or refuses the text 'bad'."""

    def __init__(self, **kwargs):
        super().__init__(object(), "plain", **kwargs)

    def encode_inputs(self, inputs, side="query", instruction=None):
        from mm_embed_trl.data.collators import InputEncodingError

        for i, item in enumerate(inputs):
            if item.text == "bad":
                raise InputEncodingError(i, "cannot encode this one")
        return {"n": len(inputs)}


def test_negative_errors_name_the_column_index_the_row_holds(tmp_path):
    """Empty (text, image) pairs are dropped before collation; errors still name the pair's index in the row."""
    collator = _StubEncodingCollator(image_root=str(tmp_path))
    row = {"qry": "q", "pos_text": "p", "neg_text": ["", "b"], "neg_image_path": ["", "missing.jpg"], "_row_index": 7}
    with pytest.raises(ImageLoadError, match=r"dataset row 7 .*'neg_image_path'\[1\].*missing\.jpg"):
        collator([row])
    # an encoding failure names the same index: the 'bad' negative is the row's third pair, its second kept one
    rows = [
        {"qry": "q", "pos_text": "p", "neg_text": ["a", "c"]},
        {"qry": "q", "pos_text": "p", "neg_text": ["", "a", "bad"], "neg_image_path": ""},
    ]
    with pytest.raises(ValueError, match=r"batch row 1 .*'neg_image_path'\[2\]: cannot encode this one"):
        collator(rows)


def test_negative_count_mismatch_blames_the_odd_row_even_when_it_is_row_0():
    collator = _StubEncodingCollator()
    rows = [{"qry": "q", "pos_text": "p", "neg_text": ["a", "b", "c"]}] + [
        {"qry": "q", "pos_text": "p", "neg_text": ["a", "b"]} for _ in range(3)
    ]
    with pytest.raises(ValueError, match=r"same number of explicit negatives \(2 expected\)") as err:
        collator(rows)
    message = str(err.value)
    assert "batch row 0 [qry='q'] has 3" in message
    assert not any(f"batch row {i}" in message for i in (1, 2, 3)), message
    # the odd row out later in the batch is blamed just the same
    with pytest.raises(ValueError, match=r"\(2 expected\): batch row 3 \[qry='q'\] has 3\."):
        collator(rows[1:] + rows[:1])
