"""The held-out evaluators keep the videos of MMEB-train rows (``qry_video_path`` / ``pos_video_path``): each clip is a
query of its own even when rows share the text, video positives are documents of their own, and the evaluator embeds
a video input as ``model.encode`` embeds the same ``EmbeddingInput`` (the video sampled as the model's processor is set
to, relative paths resolved against ``image_root``)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image

from mm_embed_trl.data.schema import EmbeddingInput
from mm_embed_trl.data.videos import load_video
from mm_embed_trl.evaluation import ReasoningFormatEvaluator, RetrievalEvaluator

QUESTION = "<video> What happens in this clip?"


def _media(root):
    """Two 4-frame folders (``clipA``, ``clipB``) and three loose frames under ``root``, all random pixels; the
    paths are returned relative to ``root``."""
    rng = np.random.default_rng(0)
    for clip in ("clipA", "clipB"):
        folder = root / clip
        folder.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(folder / f"frame_{i}.jpg")
    frames = []
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(root / f"f{i}.png")
        frames.append(f"f{i}.png")
    return frames


def _rows(frames):
    no_video = dict(qry_video_path="", pos_video_path=[])
    return [
        dict(qry=QUESTION, qry_image_path="", qry_video_path="clipA", pos_text="a man juggles", pos_image_path=""),
        dict(qry=QUESTION, qry_image_path="", qry_video_path="clipB", pos_text="a dog swims", pos_image_path=""),
        # clip A again: the same query, a second relevant document
        dict(qry=QUESTION, qry_image_path="", qry_video_path="clipA", pos_text="juggling", pos_image_path=""),
        # the same text without a video: a text-only query of its own
        dict(qry=QUESTION, qry_image_path="", pos_text="nothing happens", pos_image_path="", **no_video),
        # video positives (frame lists) with the same text: two documents
        dict(qry="find the juggler", qry_image_path="", qry_video_path="", pos_text="a clip", pos_image_path="",
             pos_video_path=frames),
        dict(qry="find the swimmer", qry_image_path="", qry_video_path="", pos_text="a clip", pos_image_path="",
             pos_video_path=frames[::-1]),
        # a row without video columns at all
        dict(qry="plain text", qry_image_path="", pos_text="plain answer", pos_image_path=""),
    ]


def test_from_rows_gives_each_clip_its_own_query_and_relevant_set(tmp_path):
    frames = _media(tmp_path)
    ev = RetrievalEvaluator.from_rows(_rows(frames), image_root=str(tmp_path), name="clips")
    assert [(q.text, q.image, q.video) for q in ev.queries] == [
        (QUESTION, None, "clipA"),
        (QUESTION, None, "clipB"),
        (QUESTION, None, None),
        ("find the juggler", None, None),
        ("find the swimmer", None, None),
        ("plain text", None, None),
    ]
    assert [(d.text, d.video) for d in ev.corpus] == [
        ("a man juggles", None),
        ("a dog swims", None),
        ("juggling", None),
        ("nothing happens", None),
        ("a clip", frames),
        ("a clip", frames[::-1]),
        ("plain answer", None),
    ]
    assert ev.relevant == [{0, 2}, {1}, {3}, {4}, {5}, {6}]
    # the constructor's {"text", "video"} inputs keep their video too
    direct = RetrievalEvaluator([{"text": "a", "video": "clipA"}, "a"], ["b"], [{0}, {0}])
    assert [q.video for q in direct.queries] == ["clipA", None]
    # the reasoning-format evaluator reads each row's query video
    formatting = ReasoningFormatEvaluator.from_rows(_rows(frames), image_root=str(tmp_path))
    assert [(x.text, x.video) for x in formatting.items[:4]] == [
        (QUESTION, "clipA"),
        (QUESTION, "clipB"),
        (QUESTION, "clipA"),
        (QUESTION, None),
    ]


def test_evaluator_embeds_videos_as_encode_does(qwen2_vl_model, tmp_path):
    model = qwen2_vl_model
    assert next(model.parameters()).dtype == torch.float32
    frames = _media(tmp_path)
    ev = RetrievalEvaluator.from_rows(_rows(frames), image_root=str(tmp_path), name="clips")
    seen = {}
    compute = ev.compute_metrics

    def record(queries, corpus):
        seen["queries"], seen["corpus"] = queries, corpus
        return compute(queries, corpus)

    ev.compute_metrics = record
    metrics = ev(model)
    assert set(metrics) >= {"clips_recall@1", "clips_mrr"}

    def video(value):
        value = [str(tmp_path / f) for f in value] if isinstance(value, list) else str(tmp_path / value)
        return load_video(value, processor=model.processor)

    queries = [
        EmbeddingInput(text=QUESTION, video=video("clipA")),
        EmbeddingInput(text=QUESTION, video=video("clipB")),
        QUESTION,
        "find the juggler",
        "find the swimmer",
        "plain text",
    ]
    corpus = [
        "a man juggles",
        "a dog swims",
        "juggling",
        "nothing happens",
        EmbeddingInput(text="a clip", video=video(frames)),
        EmbeddingInput(text="a clip", video=video(frames[::-1])),
        "plain answer",
    ]
    expected_q = F.normalize(model.encode(queries, side="query", batch_size=ev.batch_size), dim=-1)
    expected_c = F.normalize(model.encode(corpus, side="document", batch_size=ev.batch_size), dim=-1)
    # one forward of the tiny model with a vision tower per side, rounding alone between the two
    rtol = rounding_rtol(**TINY_IMAGE_FORWARD)
    assert_close(seen["queries"], expected_q, rtol=rtol)
    assert_close(seen["corpus"], expected_c, rtol=rtol)
    # the clips matter: the two video queries differ from each other and from the text alone; so do the video documents
    for emb, a, b in ((seen["queries"], 0, 1), (seen["queries"], 0, 2), (seen["corpus"], 4, 5)):
        assert not torch.allclose(emb[a], emb[b], atol=1e-3), (a, b)


def test_inputs_of_several_images_are_one_query_per_image_list_and_embed_as_encode_does(qwen2_vl_model, tmp_path):
    """Rows whose image column holds a list (several images of one input, as the collator and encode take them): the
    same list is one query, another order another query, and the evaluator embeds the list as encode does (it raised
    on a list, and never merged two equal lists)."""
    model = qwen2_vl_model
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(tmp_path / name)
    text = "<|image_1|><|image_2|> Which changed?"
    rows = [
        dict(qry=text, qry_image_path=["a.png", "b.png"], pos_text="the colour", pos_image_path=""),
        dict(qry=text, qry_image_path=["a.png", "b.png"], pos_text="the shape", pos_image_path=""),
        dict(qry=text, qry_image_path=["b.png", "a.png"], pos_text="nothing", pos_image_path=""),
    ]
    ev = RetrievalEvaluator.from_rows(rows, image_root=str(tmp_path), name="pairs")
    assert [q.image for q in ev.queries] == [["a.png", "b.png"], ["b.png", "a.png"]]
    assert ev.relevant == [{0, 1}, {2}]
    seen = {}
    compute = ev.compute_metrics

    def record(queries, corpus):
        seen["queries"] = queries
        return compute(queries, corpus)

    ev.compute_metrics = record
    ev(model)
    images = {name: Image.open(tmp_path / name).convert("RGB") for name in ("a.png", "b.png")}
    expected = F.normalize(model.encode(
        [EmbeddingInput(text=text, image=[images["a.png"], images["b.png"]]),
         EmbeddingInput(text=text, image=[images["b.png"], images["a.png"]])],
        side="query", batch_size=ev.batch_size), dim=-1)
    assert_close(seen["queries"], expected, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
