"""Video and several-image inputs: loading and sampling, errors that name the row, the collator, GradCache's split,
encode, and the sharded-training hook that runs the vision tower alike on every rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from media import frame as _frame
from media import frame_folder as _frame_folder
from media import video_file as _video_file
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol

from mm_embed_trl.data.collators import EmbeddingCollator, split_batch
from mm_embed_trl.data.schema import EmbeddingInput
from mm_embed_trl.data.videos import (
    VideoLoadError,
    VideoSampling,
    evenly_spaced,
    load_video,
    set_video_options,
    video_sampling,
)


def _red(image) -> int:
    return int(np.asarray(image)[..., 0].mean().round())


def test_evenly_spaced_is_mmeb_v2s_frame_rule():
    # VLM2Vec's sample_frames: np.linspace(0, n - 1, k, dtype=int), first and last frame included
    assert evenly_spaced(64, 8).tolist() == [0, 9, 18, 27, 36, 45, 54, 63]
    assert evenly_spaced(5, 8).tolist() == [0, 1, 2, 3, 4]


def test_a_frame_folder_is_read_in_natural_order_and_sampled(tmp_path):
    folder = _frame_folder(tmp_path / "vid", 12)
    video = load_video(str(folder), sampling=VideoSampling(max_frames=4))
    assert [_red(f) for f in video.frames] == [0, 30, 70, 110]  # frames 0, 3, 7, 11
    relative = load_video("vid", tmp_path, sampling=VideoSampling(max_frames=20))
    assert len(relative) == 12 and _red(relative.frames[10]) == 100


def test_a_list_of_frames_mixes_paths_and_images(tmp_path):
    folder = _frame_folder(tmp_path / "v", 3, ext="png")
    video = load_video([str(folder / "frame_0.png"), _frame(200), "v/frame_2.png"], tmp_path)
    assert [_red(f) for f in video.frames] == [0, 200, 20]


def test_a_video_file_is_decoded_and_sampled_by_fps(tmp_path):
    path = _video_file(tmp_path / "clip.mp4", count=16, fps=4)  # 4 s
    evenly = load_video(str(path), sampling=VideoSampling(max_frames=4))
    assert len(evenly) == 4 and evenly.fps == pytest.approx(4.0)
    # 1 frame per second of a 4-second video, by the rule transformers applies to the same file
    by_fps = load_video(str(path), sampling=VideoSampling(fps=1.0, max_frames=32))
    assert len(by_fps) == 4
    brightness = [_red(f) for f in by_fps.frames]
    assert brightness == sorted(brightness) and brightness[0] < 16 < brightness[-1]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: "missing_dir", r"row 3, column 'qry_video_path': video not found: 'missing_dir'"),
        (lambda tmp: str((tmp / "empty").mkdir() or tmp / "empty"), r"holds no frame image"),
        (lambda tmp: str(_write(tmp / "bad.mp4", b"not a video at all")), r"could not decode the video file"),
        (lambda tmp: [str(tmp / "nope.jpg")], r"row 3, column 'qry_video_path', frame 0: image file not found"),
    ],
    ids=["missing", "empty-folder", "unreadable-file", "missing-frame"],
)
def test_bad_videos_name_the_row_and_column(tmp_path, make, message):
    pytest.importorskip("av")
    with pytest.raises(VideoLoadError if "frame 0" not in message else ValueError, match=message):
        load_video(make(tmp_path), tmp_path, where="row 3, column 'qry_video_path'")


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_video_options_are_saved_with_the_processor(tiny_backbone, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_backbone("qwen2_vl"))
    assert video_sampling(processor) == VideoSampling(fps=None, max_frames=8)
    set_video_options(processor, fps=2.0, max_frames=6, max_pixels=28 * 28 * 8)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert video_sampling(reloaded) == VideoSampling(fps=2.0, max_frames=6)
    assert reloaded.video_processor.size["longest_edge"] == 28 * 28 * 8
    with pytest.raises(ValueError, match="below the processor's minimum"):
        set_video_options(processor, max_pixels=10)


def _rows(tmp_path):
    folder = _frame_folder(tmp_path / "frames", 6)
    images = [_frame(40 * i, (56, 42)) for i in range(4)]
    return [
        {"qry": "what happens <video>", "qry_image_path": "", "qry_video_path": str(folder), "pos_text": "a clip",
         "pos_image_path": [images[0], images[1]]},
        {"qry": "text only", "qry_image_path": "", "qry_video_path": "", "pos_text": "b", "pos_image_path": ""},
        {"qry": "compare <|image_1|> <|image_2|>", "qry_image_path": [images[2], images[3]],
         "qry_video_path": [images[0], images[1], images[2]], "pos_text": "", "pos_image_path": images[3]},
    ]


def test_the_collator_encodes_videos_and_several_images_per_side(qwen2_vl_model, tmp_path):
    batch = EmbeddingCollator(qwen2_vl_model.processor, "mmeb")(_rows(tmp_path))
    query, positive = batch["query"], batch["positive"]
    assert query["video_counts"].tolist() == [1, 0, 1] and query["image_counts"].tolist() == [0, 0, 2]
    assert positive["image_counts"].tolist() == [2, 0, 1] and "video_counts" not in positive
    tokenizer = qwen2_vl_model.processor.tokenizer
    video_pad, image_pad = tokenizer.convert_tokens_to_ids(["<|video_pad|>", "<|image_pad|>"])
    merge = qwen2_vl_model.processor.video_processor.merge_size ** 2
    # every video's patches have their placeholder tokens in the row that owns the video
    tokens = (query["input_ids"] == video_pad).sum(dim=1)
    assert tokens.tolist() == [int(query["video_grid_thw"][0].prod()) // merge, 0,
                               int(query["video_grid_thw"][1].prod()) // merge]
    assert (query["input_ids"] == image_pad).sum(dim=1).tolist()[2] == int(query["image_grid_thw"].prod(-1).sum()) // 4
    # placeholders in the text are dropped: the video and images are where their content items put them
    text = tokenizer.decode(query["input_ids"][0])
    assert "<video>" not in text and text.count("<|vision_start|>") == 1


def test_split_batch_of_videos_equals_the_whole_batch(qwen2_vl_model, tmp_path):
    enc = EmbeddingCollator(qwen2_vl_model.processor, "mmeb")(_rows(tmp_path))["query"]
    with torch.no_grad():
        whole = qwen2_vl_model(**enc).embeddings
        for size in (1, 2):
            chunks = split_batch(enc, size)
            assert sum(int(c.get("video_counts", torch.zeros(0)).sum()) for c in chunks) == 2
            parts = torch.cat([qwen2_vl_model(**c).embeddings for c in chunks])
            assert_close(parts, whole, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_encode_takes_videos_and_image_lists_as_the_collator_does(qwen2_vl_model, tmp_path):
    rows = _rows(tmp_path)
    expected = qwen2_vl_model.encode(
        [EmbeddingInput(text="a", video=load_video(rows[0]["qry_video_path"])), "b"], batch_size=2
    )
    got = qwen2_vl_model.encode([{"text": "a", "video": rows[0]["qry_video_path"]}, "b"], batch_size=1)
    assert_close(got, expected, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    two = qwen2_vl_model.encode({"image": rows[2]["qry_image_path"], "text": "x"})
    one = qwen2_vl_model.encode({"image": rows[2]["qry_image_path"][0], "text": "x"})
    assert two.shape == one.shape and not torch.allclose(two, one)  # the second image counts


def test_the_sharded_hook_runs_the_vision_tower_twice_in_every_forward(tiny_backbone, tmp_path):
    """ZeRO-3 / FSDP gather each module's weights as it runs: a rank with a video and a rank with text only must run
    the vision tower as often (once for images, once for videos), or both ranks hang."""
    from mm_embed_trl.modeling import MultimodalEmbeddingModel

    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.run_vision_tower_in_every_forward()
    calls = []
    model._hidden_state_module().visual.register_forward_hook(lambda *args: calls.append(1))
    collator = EmbeddingCollator(model.processor, "mmeb")
    rows = _rows(tmp_path)
    inputs = {
        "text only": [EmbeddingInput(text="x")],
        "images only": [EmbeddingInput(text="x", image=_frame(1))],
        "video only": [collator._side_input(rows[0], 0, "qry", "qry_image_path", "qry_video_path")],
        "both": [collator._side_input(rows[2], 2, "qry", "qry_image_path", "qry_video_path")],
    }
    reference = {}
    for name, batch in inputs.items():
        calls.clear()
        enc = collator.encode_inputs(batch)
        out = model(**enc).embeddings
        assert len(calls) == 2, name
        model._blank_image = None  # the same forward without the hook: the blank inputs change nothing
        reference[name] = model(**enc).embeddings
        model.run_vision_tower_in_every_forward()
        assert_close(out, reference[name], rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
