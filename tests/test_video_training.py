"""A video row and a several-image row train through every trainer on CPU (one step each, gradients reach the vision
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
from grpo_spies import capture_rewards
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


def test_the_end_of_run_export_reads_videos_when_asked(tiny_backbone, tmp_path):
    """`sentence_transformers_video_inputs=True`: the export the final save writes reads a frame folder as encode does
    (with the video option trained with); a model that takes no video is refused before training, naming the option."""
    from sentence_transformers import SentenceTransformer

    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer
    from mm_embed_trl.data.videos import video_sampling
    from mm_embed_trl.export.final_save import ST_SUBDIR

    def config(name, **kw):
        return HardNegContrastiveConfig(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
            report_to="none", save_strategy="no", disable_tqdm=True, sentence_transformers_video_inputs=True, **kw)

    torch.manual_seed(0)
    rows = _rows(tmp_path)
    trainer = HardNegContrastiveTrainer(model=MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl")),
                                        args=config("out", video_max_frames=4), train_dataset=rows)
    trainer.train()
    out = Path(trainer.save_for_inference())
    info = json.loads((out / ST_SUBDIR / "mm_embed_trl_export.json").read_text())
    assert info["video_inputs"]
    st = SentenceTransformer(str(out / ST_SUBDIR), device="cpu", trust_remote_code=True)
    assert video_sampling(st[0].processor).max_frames == 4
    saved = MultimodalEmbeddingModel.from_pretrained(out)
    clip = {"video": rows[0]["qry_video_path"], "text": "what is happening?"}
    theirs = torch.as_tensor(st.encode_query([clip], convert_to_tensor=True)).float()
    assert_close(theirs, saved.encode([clip], side="query"), rtol=rounding_rtol(**TINY_IMAGE_FORWARD))

    with pytest.raises(ValueError, match="sentence_transformers_video_inputs=True: .*no video processor"):
        HardNegContrastiveTrainer(model=MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text")),
                                  args=config("text"), train_dataset=rows)


def test_the_examples_command_line_passes_the_video_inputs_option_to_the_final_export(tmp_path, monkeypatch):
    """`--sentence_transformers_video_inputs true` on the example's command line reaches the end-of-run export."""
    import runpy
    import sys

    from mm_embed_trl.export.final_save import ST_SUBDIR

    out = tmp_path / "run"
    argv = [
        "train_hardneg.py", "--output_dir", str(out), "--sentence_transformers_video_inputs", "true",
        "--max_steps", "1", "--generated_train_size", "16", "--generated_eval_size", "8",
        "--per_device_train_batch_size", "4", "--evaluate_before_training", "false", "--report_to", "none",
        "--save_strategy", "no", "--dataloader_num_workers", "0", "--disable_tqdm", "true",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "train_hardneg.py"), run_name="__main__")
    assert json.loads((out / ST_SUBDIR / "mm_embed_trl_export.json").read_text())["video_inputs"]


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


def test_rl_pairs_keep_every_image_and_video():
    """Flattened GRPO rows keep a side's several images as a list, in order (plain paths when no side has more
    than one), and its video: a file or folder in ``video``, a frame list in ``video_frames``; content ids hash all."""
    from mm_embed_trl.data.samplers import flatten_pairs

    pairs = datasets.Dataset.from_list([
        dict(qry="two", qry_image_path=["a.png", "b.png"], qry_video_path="", pos_text="t", pos_image_path=["c.png"],
             pos_video_path=[]),
        dict(qry="clip", qry_image_path=[], qry_video_path="clips/0", pos_text="", pos_image_path=[],
             pos_video_path=["f0.jpg", "f1.jpg"]),
    ])
    flat = flatten_pairs(pairs)
    assert flat["image"] == [["a.png", "b.png"], ["c.png"], [], []]
    assert flat["video"] == ["", "", "clips/0", ""] and flat["video_frames"] == [[], [], [], ["f0.jpg", "f1.jpg"]]
    assert len(set(flat["content_id"])) == 4
    plain = flatten_pairs(pairs.remove_columns(["qry_video_path", "pos_video_path"])
                          .map(lambda row: {"qry_image_path": row["qry_image_path"][:1]}))
    assert plain["image"] == ["a.png", "c.png", "", ""] and "video" not in plain.column_names
    lists = flatten_pairs(pairs.remove_columns(["qry_video_path", "pos_video_path"]))
    assert plain["content_id"][1] == lists["content_id"][1]  # the same input hashes alike in either form


_BACKBONE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw",
                  "pixel_values_videos", "video_grid_thw")


def _grpo_pairs(tmp_path, kind: str):
    folder, images = _media(tmp_path)
    if kind == "images":  # a query of two images, a target of three
        rows = [dict(qry="what changed?", qry_image_path=images[:2], pos_text="the light", pos_image_path=[]),
                dict(qry="find them", qry_image_path=[], pos_text="three views", pos_image_path=images[2:5])]
    else:  # a frame-folder video query, a frame-list video target
        rows = [dict(qry="what happens?", qry_image_path=[], qry_video_path=folder, pos_text="a street",
                     pos_image_path=[], pos_video_path=[]),
                dict(qry="find the clip", qry_image_path=[], qry_video_path="", pos_text="", pos_image_path=[],
                     pos_video_path=images[2:5])]
    rows += [dict(qry="one picture", qry_image_path=[images[0]], pos_text="a picture", pos_image_path=[]),
             dict(qry="plain text", qry_image_path=[], pos_text="words", pos_image_path=[])]
    if kind == "video":
        for row in rows:
            row.setdefault("qry_video_path", "")
            row.setdefault("pos_video_path", [])
    return datasets.Dataset.from_list(rows)


def _grpo_trainer(tiny_backbone, tmp_path, pairs, **overrides):
    from mm_embed_trl import EmbeddingGRPOConfig, EmbeddingGRPOTrainer

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    keep = _KeepGrads()
    options = dict(
        output_dir=str(tmp_path / "out"), num_generations=2, per_device_train_batch_size=16, max_completion_length=16,
        max_steps=1, report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, save_strategy="no",
        learning_rate=0.0, seed=0, disable_tqdm=True, save_sentence_transformers=False, video_max_frames=4,
    )
    options.update(overrides)
    trainer = EmbeddingGRPOTrainer(model=model, args=EmbeddingGRPOConfig(**options), train_dataset=pairs,
                                   callbacks=[keep.callback])
    return model, trainer, keep


@pytest.mark.parametrize("kind", ["images", "video"])
def test_grpo_rolls_out_several_images_and_videos_with_all_of_them(tiny_backbone, tmp_path, kind):
    """Pairs with a side of several images, or a video (a frame folder, a frame list): generation gets every image and
    video of each prompt, the vision tower gets gradients through the policy's loss, and each rollout's reward is the
    UME-R1 reward of embeddings computed independently (the collator's prompt with all the side's visuals, the
    completion appended, one forward per row)."""
    from mm_embed_trl.data.images import load_images
    from mm_embed_trl.data.reasoning import append_completions
    from mm_embed_trl.data.schema import EmbeddingInput
    from mm_embed_trl.data.videos import load_video
    from mm_embed_trl.losses import ume_r1_retrieval_reward
    from mm_embed_trl.modeling.pooling import TokenPooling
    from mm_embed_trl.trainers.grpo_trainer import ROW_INPUT

    model, trainer, keep = _grpo_trainer(tiny_backbone, tmp_path, _grpo_pairs(tmp_path, kind), beta=0.04)
    tok = trainer.processing_class.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    placeholders = [tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")]
    seen = []

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        seen.append(([[sum(t == p for t in ids) for p in placeholders] for ids in prompt_ids], multimodal_fields))
        words = ["red", "blue", "green", "dark"]
        texts = [format_reasoning(f"a {words[(sum(ids) + i) % 4]} thing" + " more" * (i % 2), words[i % 4])
                 for i, ids in enumerate(prompt_ids)]
        return [tok(t, add_special_tokens=False)["input_ids"] + [end] for t in texts], None

    trainer._generate_single_turn = generate
    captured = capture_rewards(trainer)
    scored = []
    score = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda rows: scored.append(score(rows)) or scored[-1]
    trainer.train()
    assert keep.vision > 0
    inputs, completions, rewards = captured["inputs"], captured["completions"], captured["rewards"]
    given = {(r["pair_id"], r["side"]): r[ROW_INPUT] for r in inputs}
    pads, fields = seen[0]
    merge = model.processor.image_processor.merge_size ** 2
    if kind == "images":  # every image of a side is in its prompt; text-only sides get UME-R1's white square
        assert len(given[0, "query"].images) == 2 and len(given[1, "target"].images) == 3
        assert fields["image_grid_thw"].shape[0] == sum(len(r[ROW_INPUT].images) for r in inputs)
    else:
        assert given[0, "query"].video is not None and given[1, "target"].video is not None
        assert fields["video_grid_thw"].shape[0] == sum(r[ROW_INPUT].video is not None for r in inputs)
        assert int(fields["video_grid_thw"].prod(-1).sum()) // merge == sum(p[1] for p in pads)
    assert int(fields["image_grid_thw"].prod(-1).sum()) // merge == sum(p[0] for p in pads)
    model.eval()
    collator = model.make_collator(template=trainer.template.name)
    gen_id = tok.convert_tokens_to_ids("<gen_emb>")
    reference, reference_logps = [], []
    with torch.no_grad():
        for row, completion in zip(inputs, completions):
            paths = row["image"] if isinstance(row["image"], list) else [row["image"]]
            video = load_video(row.get("video_frames") or row.get("video"), processor=model.processor)
            inp = EmbeddingInput(row["text"], load_images([p for p in paths if p]) or None, video)
            prompt = collator.encode_inputs([inp], side=row["side"])
            batch = append_completions(prompt, [completion], tok.pad_token_id)
            out = model(**batch, pool_tokens={"gen": TokenPooling(gen_id, "completion")})
            reference.append(out.named_embeddings["gen"][0])
            # the reference model's log-probabilities of the completion (TRL's forward with the rows' visuals)
            logits = model.backbone(**{k: v for k, v in batch.items() if k in _BACKBONE_KEYS}).logits[0].float()
            start = batch["completion_start"]
            logps = torch.log_softmax(logits[start - 1 : start - 1 + len(completion)], -1)
            reference_logps.append(logps.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1))
    got = scored[0]["ref_per_token_logps"]
    for i, want_logps in enumerate(reference_logps):
        assert_close(got[i, : len(want_logps)], want_logps, rtol=rounding_rtol(**TINY_IMAGE_FORWARD), msg=f"row {i}")
    side = torch.tensor([0 if r["side"] == "query" else 1 for r in inputs])
    want = ume_r1_retrieval_reward(torch.stack(reference), side, torch.tensor([r["pair_id"] for r in inputs]), 2,
                                   content_ids=torch.tensor([r["content_id"] for r in inputs]),
                                   pool_id=torch.zeros_like(side))
    # one float32 reduction chain through the tiny model, then similarities of 64 features
    assert_close(rewards[:, trainer._retrieval_column], want.reward, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_grpo_generates_from_videos_and_trains(tiny_backbone, tmp_path):
    """Real sampling (no stub) from prompts with videos and image lists, two optimizer steps with the generation
    buffer split into micro-batches (TRL shuffles and cuts the rows' visual inputs with them): finite losses, the
    vision tower moves."""
    model, trainer, keep = _grpo_trainer(
        tiny_backbone, tmp_path, _grpo_pairs(tmp_path, "video"), max_steps=2, per_device_train_batch_size=8,
        steps_per_generation=2, max_completion_length=8, learning_rate=1e-3, beta=0.04, logging_steps=1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "visual" in n}
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert losses and all(np.isfinite(losses))
    assert keep.vision > 0
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if "visual" in n)
