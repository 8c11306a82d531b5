"""A video row and a several-image row train through the trainers on CPU (one step each, gradients reach the vision
tower through both), the UME-R1 SFT length check measures them exactly, and 2 ranks, one with videos and one
without, neither hang nor differ from one process."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import launching
import numpy as np
import pytest
import torch
from numerics import TINY_IMAGE_BACKWARD, TINY_IMAGE_FORWARD, assert_close, assert_loss_close, rounding_rtol
from PIL import Image

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.data.reasoning import format_reasoning

STEP_SCRIPT = Path(__file__).resolve().parent / "dist_scripts" / "video_step.py"


def _media(tmp_path):
    """A 6-frame folder, a 3-frame list and two images, all on disk."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "video" / "clip0"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(folder / f"{i:04d}.jpg")
    images = []
    for i in range(5):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (56, 42, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
    return str(folder), images


def _rows(tmp_path, *, reasoning: bool = False):
    folder, images = _media(tmp_path)
    rows = [
        # a video query, a text target
        dict(qry="<video> what is happening?", qry_image_path=[], qry_video_path=folder, pos_text="a busy street",
             pos_image_path=[]),
        # two images in the query, one image target
        dict(qry="<|image_1|> then <|image_2|>: what changed?", qry_image_path=images[:2], qry_video_path="",
             pos_text="the light", pos_image_path=[images[2]]),
        # a frame-list video target
        dict(qry="find the clip", qry_image_path=[], qry_video_path="", pos_text="",
             pos_image_path=[], pos_video_path=images[2:5]),
        dict(qry="plain text", qry_image_path=[], qry_video_path="", pos_text="text", pos_image_path=[]),
    ]
    for row in rows:
        row.setdefault("pos_video_path", [])  # a list of frames per row ([]: none); qry_video_path: folders
        if reasoning:
            row["qry_reasoning"] = format_reasoning("looking", "a scene")
            row["pos_reasoning"] = format_reasoning("reading", "a scene")
    return datasets.Dataset.from_list(rows)


def _vision_grad(model) -> float:
    return sum(p.grad.abs().sum().item() for n, p in model.named_parameters() if "visual" in n and p.grad is not None)


class _KeepGrads:
    """Trainer callback that reads the vision tower's gradient before the optimizer step zeroes it."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.vision = _vision_grad(model)

        self.callback, self.vision = Callback(), 0.0


def test_hardneg_trainer_takes_videos_and_several_images(tiny_backbone, tmp_path):
    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    keep = _KeepGrads()
    config = HardNegContrastiveConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, use_cpu=True, report_to="none",
        save_strategy="no", num_hard_negatives=2, save_sentence_transformers=False, video_max_frames=4,
        gradient_cache_chunk_size=2, disable_tqdm=True,
    )
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=_rows(tmp_path),
                                        callbacks=[keep.callback])
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert keep.vision > 0
    assert model.processor.video_processor.mm_embed_max_frames == 4  # the option is the processor's, saved with it


def test_reasoning_sft_takes_videos_and_several_images(tiny_backbone, tmp_path):
    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    keep = _KeepGrads()
    config = EmbeddingSFTConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, use_cpu=True, report_to="none",
        save_strategy="no", save_sentence_transformers=False, disable_tqdm=True, max_sequence_length=4096,
    )
    trainer = EmbeddingSFTTrainer(model=model, args=config, train_dataset=_rows(tmp_path, reasoning=True),
                                  callbacks=[keep.callback])
    trainer.train()
    assert np.isfinite(trainer.state.log_history[-1]["train_loss"])
    assert keep.vision > 0


@pytest.mark.parametrize("template", ["ume_r1", "ume_r1_blank_image"])
def test_the_sft_length_check_measures_videos_and_image_lists_exactly(tiny_backbone, tmp_path, template):
    """Lengths from the pre-training check against the collator's own batches, for video rows, image-list rows and
    the text-only rows beside them (which the blank-image template gives a white square); with a limit between them,
    the check drops exactly the rows the collator would refuse."""
    from transformers import AutoProcessor

    from mm_embed_trl.data.reasoning import ReasoningCollator
    from mm_embed_trl.data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN
    from mm_embed_trl.data.validation import BadRowsError, check_reasoning_lengths, check_training_rows

    processor = AutoProcessor.from_pretrained(tiny_backbone("qwen2_vl"))
    processor.tokenizer.add_tokens([DISC_EMB_TOKEN, GEN_EMB_TOKEN])
    rows = check_training_rows(_rows(tmp_path, reasoning=True), reasoning=True)
    unlimited = ReasoningCollator(processor, template)  # no limit: every length is counted exactly
    lengths = unlimited.sequence_lengths(rows.with_format("arrow")[:])
    for side in ("query", "positive"):
        built = [unlimited([row])[side]["attention_mask"].sum().item() for row in rows]  # each row alone: no padding
        assert lengths[side].tolist() == built, side
    longest = np.maximum(lengths["query"], lengths["positive"])
    limit = int(np.sort(longest)[1])  # the two shortest rows fit
    limited = ReasoningCollator(processor, template, max_length=limit)
    with pytest.raises(BadRowsError, match=f"longer than max_sequence_length={limit}"):
        check_reasoning_lengths(rows, limited, what="training dataset", on_bad_row="raise")
    kept = check_reasoning_lengths(rows, limited, what="training dataset", on_bad_row="skip")
    assert len(kept) == int((longest <= limit).sum()) == 2
    limited(list(kept))  # the collator takes every row that is left
    refused = rows.select(np.flatnonzero(longest > limit))
    with pytest.raises(ValueError, match="max_sequence_length"):
        limited([refused[0]])


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["hardneg", "sft"])
def test_a_rank_with_videos_beside_a_rank_without_equals_one_process(tmp_path, trainer):
    """2 processes, rank 0's rows with a video (query side, then target side) and rank 1's rows text only, neither
    hangs and the step equals one process's on the 4 rows: loss and every gradient, with and without GradCache."""
    folder, _ = _media(tmp_path)
    rows = [
        dict(qry="<video> what is happening?", qry_video_path=folder, pos_text="a busy street"),
        dict(qry="find the clip", qry_video_path="", pos_text="", pos_video_path=folder),
        dict(qry="plain text", qry_video_path="", pos_text="text"),
        dict(qry="more text", qry_video_path="", pos_text="words"),
    ]
    for row in rows:
        row.setdefault("pos_video_path", "")
        row.update(qry_image_path="", pos_image_path="")  # rank 1: no image anywhere (the hard-negative trainer)
        row.update(qry_reasoning=format_reasoning("looking", "a scene"), pos_reasoning=format_reasoning("r", "s"))
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    outputs = {}
    for name, processes, extra in (("single", 1, ()), ("ddp", 2, ()), ("ddp_gradcache", 2, ("--chunk", "1"))):
        launching.run(STEP_SCRIPT, tmp_path / f"{name}.pt", path, trainer, *extra, processes=processes, timeout=300)
        outputs[name] = torch.load(tmp_path / f"{name}.pt")
    ref = outputs["single"]
    assert ref["world"] == 1 and outputs["ddp"]["world"] == 2
    assert any("visual" in key for key in ref["grads"])
    for name in ("ddp", "ddp_gradcache"):
        got = outputs[name]
        assert_loss_close(got["loss"], ref["loss"], rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / 0.05))
        assert got["grads"].keys() == ref["grads"].keys()
        for key in ref["grads"]:
            assert_close(got["grads"][key], ref["grads"][key], rtol=rounding_rtol(**TINY_IMAGE_BACKWARD, gain=20),
                         msg=f"{name}: {key}")


def test_rl_pairs_refuse_videos_and_several_images_by_name(tmp_path):
    """GRPO prompts take one image per side (TRL's GRPOTrainer): a video or an image list would vanish in the
    flattening; they are named instead, and a one-image list is that image."""
    from mm_embed_trl.data.samplers import flatten_pairs

    rows = _rows(tmp_path)  # row 0: a video query; row 1: two query images; row 2: a frame-list target
    with pytest.raises(ValueError, match=r"2 rows hold a video in 'qry_video_path' \(first: row 0\).*EmbeddingSFT"):
        flatten_pairs(rows.remove_columns(["pos_video_path"]).map(
            lambda row, i: {"qry_video_path": row["qry_video_path"] or ("clip" if i == 3 else "")}, with_indices=True))
    with pytest.raises(ValueError, match=r"1 rows hold several images in 'qry_image_path' \(first: row 1\)"):
        flatten_pairs(rows.remove_columns(["qry_video_path", "pos_video_path"]))
    single = rows.select([1, 3]).remove_columns(["qry_video_path", "pos_video_path"])
    single = single.map(lambda row: {"qry_image_path": row["qry_image_path"][:1]})
    flat = flatten_pairs(single)
    assert flat["image"] == [rows[1]["qry_image_path"][0], rows[1]["pos_image_path"][0], "", ""]

