"""UME-R1 reasoning batches: labels against a re-implementation of UME-R1's masking, the generation layout, chunking,
bad rows, the generated dataset's reasoning targets and the converter of UME-R1's SFT JSON."""

from __future__ import annotations

import json

import pytest
import torch
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol

from mm_embed_trl.data.collators import split_batch
from mm_embed_trl.data.reasoning import ReasoningCollator, append_completions, format_reasoning, load_ume_r1_sft_json
from mm_embed_trl.data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN, UME_R1_INSTRUCTION
from mm_embed_trl.modeling import MultimodalEmbeddingModel


@pytest.fixture(scope="module")
def ume_model(tiny_backbone):
    """The tiny generative Qwen2-VL with UME-R1's two tokens (plain add_tokens: the collator needs only the vocab)."""
    model = MultimodalEmbeddingModel.from_pretrained(
        tiny_backbone("qwen2_vl"), encoder_kind="generative", prompt_template="ume_r1"
    )
    tok = model.processor.tokenizer
    tok.add_tokens([DISC_EMB_TOKEN, GEN_EMB_TOKEN])
    model.backbone.resize_token_embeddings(len(tok), mean_resizing=False)
    return model


@pytest.fixture(scope="module")
def collator(ume_model, shapes_data):
    return ReasoningCollator(ume_model.processor, image_root=str(shapes_data.image_root))


def _ume_r1_labels(tokenizer, user_text: str, target: str) -> tuple[list[int], list[int]]:
    """UME-R1's preprocess_qwen_2_visual for one text-only side (qwenvl/data/data_qwen.py): the system turn and the
    user turn are masked, the assistant turn is supervised except its header (<|im_start|>assistant\\n)."""

    def turn(role, content):
        return tokenizer(f"<|im_start|>{role}\n{content}<|im_end|>\n", add_special_tokens=False)["input_ids"]

    ids, labels = [], []
    for role, content in (("system", "You are a helpful assistant."), ("user", user_text)):
        part = turn(role, content)
        ids += part
        labels += [-100] * len(part)
    part = turn("assistant", target)
    # UME-R1 writes [:3], the header's length in Qwen's vocabulary; the tiny BPE splits "assistant" further
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    ids += part
    labels += [-100] * header + part[header:]
    return ids, labels


def test_labels_match_ume_r1s_masking_and_the_supervised_span_is_the_target(collator, ume_model):
    tok = ume_model.processor.tokenizer
    targets = [format_reasoning("a short trace", "a red circle"), format_reasoning("longer " * 9, "two stars")]
    rows = [
        {"qry": "a red circle on the left", "qry_image_path": "", "pos_text": "two blue stars", "pos_image_path": "",
         "qry_reasoning": targets[0], "pos_reasoning": targets[1]},
        {"qry": "x", "qry_image_path": "", "pos_text": "y", "pos_image_path": "",
         "qry_reasoning": targets[1], "pos_reasoning": targets[0]},
    ]
    batch = collator(rows)
    for side, text_col, target_col in (("query", "qry", "qry_reasoning"), ("positive", "pos_text", "pos_reasoning")):
        enc = batch[side]
        for i, row in enumerate(rows):
            mask = enc["attention_mask"][i].bool()
            want_ids, want_labels = _ume_r1_labels(tok, f"{row[text_col]}\n{DISC_EMB_TOKEN}\n{UME_R1_INSTRUCTION}",
                                                   row[target_col])
            assert enc["input_ids"][i][mask].tolist() == want_ids
            assert enc["labels"][i][mask].tolist() == want_labels
            assert bool((enc["labels"][i][~mask] == -100).all())  # padding never supervised
            supervised = enc["labels"][i][enc["labels"][i] != -100]
            assert tok.decode(supervised) == row[target_col] + "<|im_end|>\n"
    # the generation layout: left-padded prompts, completions from one common start, right-padded
    q = batch["query"]
    start = int(q["completion_start"][0])
    assert bool((q["completion_start"] == start).all())
    assert bool((q["labels"][:, :start] == -100).all())
    assert bool((q["attention_mask"][:, start - 1] == 1).all())  # every prompt ends right before the start


def test_image_rows_keep_their_image_tokens_and_chunks_give_the_same_outputs(collator, ume_model, shapes_data):
    from mm_embed_trl.modeling.pooling import TokenPooling

    rows = [shapes_data["train"][i] for i in range(5)]
    enc = collator(rows)["query"]
    tok = ume_model.processor.tokenizer
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == image_pad)
    disc, gen = tok.convert_tokens_to_ids([DISC_EMB_TOKEN, GEN_EMB_TOKEN])
    pools = {"disc": TokenPooling(disc, "prompt"), "gen": TokenPooling(gen, "completion")}
    whole = ume_model(**enc, pool_tokens=pools)  # labels ride in the batch
    parts = [ume_model(**c, pool_tokens=pools) for c in split_batch(enc, 2)]
    assert bool(whole.named_token_found["gen"].all())
    for name in ("disc", "gen"):
        assert_close(torch.cat([p.named_embeddings[name] for p in parts]), whole.named_embeddings[name],
                     rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    assert sum(int(p.lm_num_tokens) for p in parts) == int(whole.lm_num_tokens)
    assert_close(sum(p.lm_loss_sum for p in parts), whole.lm_loss_sum, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_append_completions_matches_the_collators_layout(collator, ume_model):
    tok = ume_model.processor.tokenizer
    row = {"qry": "a", "qry_image_path": "", "pos_text": "b", "pos_image_path": "",
           "qry_reasoning": format_reasoning("t", "a"), "pos_reasoning": format_reasoning("u", "b")}
    enc = collator([row, dict(row, qry="longer text here")])["query"]
    from mm_embed_trl.data.schema import EmbeddingInput

    prompt = collator.encode_inputs([EmbeddingInput(text="a"), EmbeddingInput(text="longer text here")])
    completion = tok(format_reasoning("t", "a") + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    rebuilt = append_completions(prompt, [completion, completion], tok.pad_token_id, with_labels=True)
    for key in ("input_ids", "attention_mask", "labels", "completion_start"):
        assert torch.equal(rebuilt[key], enc[key]), key


def _row(**kw):
    row = {"qry": "q", "qry_image_path": "", "pos_text": "p", "pos_image_path": "",
           "qry_reasoning": format_reasoning("t", "q"), "pos_reasoning": format_reasoning("t", "p")}
    row.update(kw)
    return row


def test_bad_rows_are_clear_errors_naming_the_row(collator, ume_model):
    with pytest.raises(ValueError, match=r"row 1.*'pos_reasoning'.*has no <gen_emb>"):
        collator([_row(), _row(pos_reasoning="<think>t</think><answer>p</answer>")])
    with pytest.raises(ValueError, match=r"row 0.*'qry_reasoning'.*reasoning target is '  '"):
        collator([_row(qry_reasoning="  ")])
    with pytest.raises(ValueError, match=r"row 0.*'qry_reasoning'.*missing"):
        collator([{k: v for k, v in _row().items() if k != "qry_reasoning"}])
    short = ReasoningCollator(ume_model.processor, max_length=50)
    # the option is max_sequence_length (--max_sequence_length); the error named max_length, another option
    with pytest.raises(ValueError, match=r"row 0.*needs \d+ tokens .* max_sequence_length is 50.*drop <gen_emb>.*"
                                         r"--max_sequence_length"):
        short([_row()])
    no_disc = ReasoningCollator(ume_model.processor, template="plain")
    with pytest.raises(ValueError, match=r"row 0.*the prompt has no <disc_emb>"):
        no_disc([_row()])


def test_a_tokenizer_without_the_embedding_tokens_is_refused(tiny_backbone):
    plain = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises(ValueError, match="no single token '<disc_emb>'.*add_embedding_tokens"):
        ReasoningCollator(plain.processor)


def test_generated_rows_carry_correct_reasoning_targets(shapes_data):
    for row in shapes_data["train"].select(range(20)):
        for column in ("qry_reasoning", "pos_reasoning"):
            target = row[column]
            assert target.endswith(f"<answer>{row['caption']}</answer>{GEN_EMB_TOKEN}")
            n = len(row["objects"])
            assert ("one shape" if n == 1 else "two" if n == 2 else "three") in target  # the trace counts the shapes
        image_side = "qry_reasoning" if row["task"] == "i2t" else "pos_reasoning"
        assert row[image_side].startswith("<think>The image shows")


def test_ume_r1_sft_json_converts_to_rows(tmp_path):
    instruction = f"\n{DISC_EMB_TOKEN}\n{UME_R1_INSTRUCTION}"
    records = [
        {
            "data_path": "/data/MMEB-train",
            "qry": {"image": "images/cat.jpg", "conversations": [
                {"from": "human", "value": "<image>\nRepresent the given image." + instruction},
                {"from": "gpt", "value": "<think>a cat</think><answer>cat<gen_emb>"}]},
            "pos": {"image": "images/blank.jpg", "conversations": [
                {"from": "human", "value": "<image>\nA photo of a cat." + instruction},
                {"from": "gpt", "value": "<think>text about a cat</think><answer>cat</answer><gen_emb>"}]},
        }
    ]
    path = tmp_path / "UME-sft-train.json"
    path.write_text(json.dumps(records))
    (row,) = load_ume_r1_sft_json(path)
    assert row == {
        "qry": "<image>\nRepresent the given image.",
        "qry_image_path": "/data/MMEB-train/images/cat.jpg",
        "qry_reasoning": "<think>a cat</think><answer>cat<gen_emb>",
        "pos_text": "<image>\nA photo of a cat.",
        "pos_image_path": "",  # UME-R1's blank placeholder of text-only sides
        "pos_reasoning": "<think>text about a cat</think><answer>cat</answer><gen_emb>",
    }
    # a video side (LLaVA-Hound, MMEB-V2 video) and a side of several images, blank placeholders dropped from lists
    records[0]["qry"]["video"] = "videos/clip.mp4"
    records[0]["pos"]["image"] = ["images/a.jpg", "images/blank.jpg", "images/b.jpg"]
    records[0]["pos"]["video"] = ["frames/0.jpg", "frames/1.jpg"]
    path.write_text(json.dumps(records))
    (row,) = load_ume_r1_sft_json(path)
    assert row["qry_video_path"] == "/data/MMEB-train/videos/clip.mp4"
    assert row["qry_image_path"] == "/data/MMEB-train/images/cat.jpg"  # one image per row in this column: plain
    assert row["pos_image_path"] == ["/data/MMEB-train/images/a.jpg", "/data/MMEB-train/images/b.jpg"]
    assert row["pos_video_path"] == ["/data/MMEB-train/frames/0.jpg", "/data/MMEB-train/frames/1.jpg"]


def test_ume_r1_sft_json_names_a_file_that_mixes_frame_lists_and_video_paths(tmp_path):
    side = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    records = [{"qry": {**side, "video": "clip.mp4"}, "pos": side}, {"qry": {**side, "video": ["0.jpg"]}, "pos": side}]
    path = tmp_path / "UME-sft-train.json"
    path.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"'qry_video_path' holds a list of frames \(record 1\) and a video path"):
        load_ume_r1_sft_json(path)
