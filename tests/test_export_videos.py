"""Several images and videos through the sentence-transformers exports: the stock export (no remote code) takes image
lists and frame lists, an export made with ``video_inputs=True`` and the generative export read videos (frame folder,
frame paths, video file) as ``MultimodalEmbeddingModel.encode`` does, with the video options saved in the processor,
and refuse bad videos with encode's own errors. The reference is always ``encode`` on the same inputs and side."""

from __future__ import annotations

import re

import pytest
import torch
from media import frame, frame_folder, video_file
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol

from mm_embed_trl.data.collators import EmbeddingCollator
from mm_embed_trl.data.inputs import to_embedding_input
from mm_embed_trl.data.videos import VideoLoadError, VideoSampling, set_video_options, video_sampling
from mm_embed_trl.export import export_sentence_transformers
from mm_embed_trl.export.sentence_transformers import describe_export
from mm_embed_trl.modeling import MultimodalEmbeddingModel

# Both sides run the same float32 forward of the tiny backbone (vision tower, then decoder) on the same tokens and
# pixels; only the batch composition differs (sentence-transformers sorts by length), which changes the reduction
# order of the kernels and nothing else: rounding of an image forward's depth, as in tests/test_export.py.
RTOL = rounding_rtol(**TINY_IMAGE_FORWARD)


def _st(path, **kwargs):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu", **kwargs)


def _assert_same(st, model, inputs, **encode_kwargs):
    for side, fn in (("query", st.encode_query), ("document", st.encode_document)):
        theirs = torch.as_tensor(fn(inputs, convert_to_tensor=True, batch_size=3)).float()
        assert_close(theirs, model.encode(inputs, side=side, **encode_kwargs), rtol=RTOL)


@pytest.fixture(scope="module")
def model(tiny_backbone):
    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))


def _fresh(tiny_backbone):
    """A model of its own, for a test that changes its processor's video options."""
    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))


@pytest.fixture
def media(tmp_path):
    folder = frame_folder(tmp_path / "clip", 12)  # more frames than the default 8: encode samples them
    images = [frame(40 * i, (56, 42)) for i in range(3)]
    return {"folder": str(folder), "paths": [str(p) for p in sorted(folder.iterdir())], "images": images}


def test_the_stock_export_takes_image_lists_and_frame_lists_without_remote_code(model, tiny_backbone, media, tmp_path):
    out = export_sentence_transformers(model, tmp_path / "stock")
    st = _st(out)  # trust_remote_code stays False: stock modules only
    assert type(st[0]).__module__.startswith("sentence_transformers.")
    frames = [frame(20 * i) for i in range(5)]
    inputs = [
        {"image": media["images"], "text": "Which one is red?"},
        {"image": media["images"][:2]},
        {"video": frames, "text": "What happens?"},
        {"video": [frame(30 * i) for i in range(8)]},
        "a plain text",
        media["images"][0],
    ]
    _assert_same(st, model, inputs)
    two, one = (model.encode({"image": media["images"][:n], "text": "x"}) for n in (2, 1))
    assert (two - one).abs().max() > 1e-3  # the second image counts
    # A processor that samples video files by fps (transformers then refuses to sample a frame list) still takes
    # frames: the export passes them on as given.
    by_fps = _fresh(tiny_backbone)
    set_video_options(by_fps.processor, fps=2.0)
    sampled = export_sentence_transformers(by_fps, tmp_path / "stock_fps")
    _assert_same(_st(sampled), by_fps, [{"video": frames, "text": "What happens?"}])


@pytest.mark.parametrize("kind", ["folder", "paths", "file"])
def test_a_video_inputs_export_reads_videos_as_encode_does(kind, model, media, tmp_path):
    out = export_sentence_transformers(model, tmp_path / "videos", video_inputs=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        _st(out)  # our input module is code: never run without consent
    st = _st(out, trust_remote_code=True)
    video = video_file(tmp_path / "clip.mp4", count=16) if kind == "file" else media[kind]
    inputs = [
        {"video": str(video), "text": "What happens in this clip?"} if kind == "file" else {"video": video},
        {"image": media["images"], "text": "Which one is red?"},
        {"video": media["paths"][:3], "image": media["images"][0], "text": "both"},
        "a plain text",
    ]
    _assert_same(st, model, inputs)
    info = describe_export(model, video_inputs=True)
    assert info["takes_video"] and info["video_inputs"]


def test_video_options_are_saved_with_the_export_and_honoured(tiny_backbone, media, tmp_path):
    """A non-default budget (fps, max frames, pixels per frame) survives export -> SentenceTransformer load, and the
    loaded export gives the video as many tokens (and the same vector) as encode."""
    model = _fresh(tiny_backbone)
    default_tokens = _video_tokens(model.processor, media["folder"])
    set_video_options(model.processor, fps=2.0, max_frames=4, max_pixels=28 * 28 * 4)
    out = export_sentence_transformers(model, tmp_path / "budget", video_inputs=True)
    st = _st(out, trust_remote_code=True)
    processor = st[0].processor
    assert video_sampling(processor) == VideoSampling(fps=2.0, max_frames=4)
    assert processor.video_processor.size["longest_edge"] == 28 * 28 * 4
    features = st.preprocess([{"video": media["folder"]}])
    tokens = _video_tokens(model.processor, media["folder"])
    assert tokens < default_tokens  # the budget changes the token count, so this test can fail
    video_pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int(features["video_grid_thw"].prod()) // 4 == int((features["input_ids"] == video_pad).sum()) == tokens
    _assert_same(st, model, [{"video": media["folder"], "text": "What happens?"}])
    # and the model rebuilt from the export samples as the trained one did
    rebuilt = MultimodalEmbeddingModel.from_pretrained(out)
    assert video_sampling(rebuilt.processor) == VideoSampling(fps=2.0, max_frames=4)
    assert_close(rebuilt.encode({"video": media["folder"]}), model.encode({"video": media["folder"]}), rtol=RTOL)


def _video_tokens(processor, folder) -> int:
    """The number of video placeholder tokens encode's collator gives the video in ``folder``."""
    inputs = [to_embedding_input({"video": folder}, processor=processor)]
    enc = EmbeddingCollator(processor, "unime").encode_inputs(inputs)
    return int(enc["video_grid_thw"].prod()) // processor.video_processor.merge_size**2


@pytest.mark.parametrize("bad", ["missing", "empty-folder"])
def test_bad_videos_raise_encodes_error_through_the_export(bad, model, tmp_path):
    out = export_sentence_transformers(model, tmp_path / "bad", video_inputs=True)
    st = _st(out, trust_remote_code=True)
    value = str(tmp_path / "nowhere") if bad == "missing" else str((tmp_path / "empty").mkdir() or tmp_path / "empty")
    with pytest.raises(VideoLoadError) as ours:
        model.encode([{"video": value, "text": "x"}])
    with pytest.raises(VideoLoadError) as theirs:
        st.encode([{"video": value, "text": "x"}])
    assert str(theirs.value) == str(ours.value)
    assert re.search("video not found" if bad == "missing" else "holds no frame image", str(theirs.value))


def test_video_inputs_is_refused_for_a_model_without_videos(tiny_backbone, tmp_path):
    text_model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    with pytest.raises(ValueError, match="video_inputs=True.*has no video processor"):
        export_sentence_transformers(text_model, tmp_path / "text", video_inputs=True)
    plain = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template="mmeb")
    assert describe_export(plain)["takes_video"]
    vlm2vec = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template="vlm2vec")
    with pytest.raises(ValueError, match="renders without a chat template"):
        describe_export(vlm2vec, video_inputs=True)
    assert not (tmp_path / "text").exists()


def test_a_template_without_chat_template_refuses_image_lists_and_videos_by_name(tiny_backbone, tmp_path):
    vlm2vec = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template="vlm2vec")
    st = _st(export_sentence_transformers(vlm2vec, tmp_path / "vlm2vec"))
    for value in ({"image": [frame(1), frame(2)], "text": "x"}, {"video": [frame(1), frame(2)]}):
        with pytest.raises(Exception, match="renders without a chat template.*at most one image"):
            st.encode([value])
    assert_close(st.encode({"image": frame(1), "text": "x"}, convert_to_tensor=True).float(),
                 vlm2vec.encode({"image": frame(1), "text": "x"}), rtol=RTOL)


def test_the_generative_export_takes_videos_and_image_lists(tiny_backbone, media, tmp_path):
    from mm_embed_trl.export.generative import export_generative_sentence_transformers
    from mm_embed_trl.trainers.sft_trainer import prepare_embedding_tokens

    model = MultimodalEmbeddingModel.from_pretrained(
        tiny_backbone("qwen2_vl"), encoder_kind="generative", prompt_template="ume_r1"
    )
    prepare_embedding_tokens(model, model.processor)
    set_video_options(model.processor, max_frames=4)  # a non-default budget, saved with the model inside
    out = export_generative_sentence_transformers(model, tmp_path / "generative", generation={"max_new_tokens": 4})
    st = _st(out, trust_remote_code=True)
    assert video_sampling(st[0].model.processor).max_frames == 4
    inputs = [{"video": media["folder"], "text": "What happens?"}, {"image": media["images"]}, "a text"]
    _assert_same(st, model, inputs, mode="generative", max_new_tokens=4)
    with pytest.raises(VideoLoadError, match="video not found"):
        st.encode([{"video": str(tmp_path / "nowhere")}])


def test_the_card_shows_image_lists_and_videos_with_snippets_that_run(model, tmp_path):
    for video_inputs in (False, True):
        out = export_sentence_transformers(model, tmp_path / f"card{video_inputs}", video_inputs=video_inputs)
        card = (out / "README.md").read_text()
        section = card.split("### sentence-transformers", 1)[1].split("### transformers", 1)[0]
        blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
        assert len(blocks) == 2 and '"video"' in blocks[1] and '"image": [red, blue]' in blocks[1]
        assert ("trust_remote_code=True" in blocks[0]) == video_inputs
        scope: dict = {"print": lambda *a, **k: None}
        exec(blocks[0] + blocks[1], scope)  # noqa: S102 - our own generated snippets
        assert scope["clip"].shape == (1, model.embedding_size)
        assert_close(torch.as_tensor(scope["pair"]), model.encode(
            [{"image": [scope["red"], scope["blue"]], "text": "Which picture is red?"}]), rtol=RTOL)
        if video_inputs:
            expected = model.encode([{"video": scope["frame_dir"], "text": "What happens in this clip?"}])
        else:
            expected = model.encode([{"video": scope["frames"], "text": "What happens in this clip?"}])
            assert "video_inputs=True" in section  # the way to frame folders and files
        assert_close(torch.as_tensor(scope["clip"]), expected, rtol=RTOL)
