"""The MMEB-V2 harness: its task registry against VLM2Vec's configs, its metric against a port of VLM2Vec's, the
whole harness on small fixtures in the released layout (built here) against a reference computed from the fixtures'
own description, the embedding cache (a repeated run encodes nothing, an interrupted one only what was left), bad
data, and the command line under 1 and 2 processes."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import datasets
import launching
import numpy as np
import pytest
import torch
import vlm2vec_reference as ref
from PIL import Image

from mm_embed_trl.evaluation.metrics import graded_ranking_metrics
from mm_embed_trl.evaluation.mmeb_v2 import (
    MMEB_V2_TASKS,
    evaluate_mmeb_v2,
    format_table,
    load_task,
    read_class_labels,
    select_tasks,
    with_instruction_in_text,
)

FIXTURE_TASKS = ["ImageNet-1K", "MSCOCO_t2i", "CIRR", "SmthSmthV2", "HMDB51", "Video-MME", "NExTQA", "EgoSchema",
                 "ActivityNetQA", "MVBench", "MSR-VTT", "Charades-STA", "MomentSeeker", "ViDoRe_arxivqa",
                 "ViDoRe_esg_reports_human_labeled_v2"]
MVBENCH_SUBSETS = [  # VLM2Vec's mvbench_dataset.subset_meta, in its order
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change",
    "fine_grained_pose", "character_order", "egocentric_navigation", "counterfactual_inference",
]
QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. Return only "
             "the exact text of your chosen answer. Question:")


# ------------------------------------------------------------------------------------------------ registry
def test_the_registry_holds_the_78_tasks_of_vlm2vecs_report_in_the_papers_columns():
    by_category = {c: [t for t in MMEB_V2_TASKS.values() if t.category == c] for c in ("image", "video", "visdoc")}
    assert {c: len(ts) for c, ts in by_category.items()} == {"image": 36, "video": 18, "visdoc": 24}
    groups = {c: sorted({t.group for t in ts}, key=[t.group for t in ts].index) for c, ts in by_category.items()}
    counts = {(t.category, t.group): 0 for t in MMEB_V2_TASKS.values()}
    for t in MMEB_V2_TASKS.values():
        counts[t.category, t.group] += 1
    assert groups == {"image": ["CLS", "QA", "RET", "VG"], "video": ["CLS", "QA", "RET", "MRET"],
                      "visdoc": ["VDRv1", "VDRv2", "VR", "OOD"]}
    assert [counts["image", g] for g in groups["image"]] == [10, 10, 12, 4]
    assert [counts["video", g] for g in groups["video"]] == [5, 5, 5, 3]
    assert [counts["visdoc", g] for g in groups["visdoc"]] == [10, 4, 6, 4]
    assert {t.metric for t in by_category["visdoc"]} == {"ndcg_linear@5"}
    assert {t.metric for t in by_category["image"] + by_category["video"]} == {"hit@1"}
    # the pinned version: the page tasks on the fixed datasets, split and subset as VLM2Vec loads them
    assert MMEB_V2_TASKS["ViDoSeek-page"].source == ("VLM2Vec/ViDoSeek-page-fixed", None, "test")
    assert MMEB_V2_TASKS["MMLongBench-page"].source == ("VLM2Vec/MMLongBench-page-fixed", None, "test")
    assert MMEB_V2_TASKS["MVBench"].split == "train" and MMEB_V2_TASKS["VisRAG_PlotQA"].split == "train"
    assert MMEB_V2_TASKS["K700"].local_dir == "Kinetics-700" and MMEB_V2_TASKS["MSR-VTT"].source[1] == "test_1k"
    assert MMEB_V2_TASKS["HMDB51"].ranking == "corpus" and MMEB_V2_TASKS["SmthSmthV2"].ranking == "candidates"
    assert MMEB_V2_TASKS["SmthSmthV2"].sample == 1000 and MMEB_V2_TASKS["HMDB51"].sample is None
    assert len(select_tasks("all")) == 78 and len(select_tasks("video")) == 18
    assert [t.name for t in select_tasks("HMDB51,visdoc")][:2] == ["HMDB51", "ViDoRe_arxivqa"]
    with pytest.raises(ValueError, match=r"'ImageNet1K' is no MMEB-V2 task.*did you mean \['ImageNet-1K'"):
        select_tasks("ImageNet1K")


def test_the_command_line_lists_the_tasks(capsys):
    from mm_embed_trl.evaluation.mmeb_v2 import main

    main(["--list"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 78
    assert "ViDoSeek-page\tvisdoc\tOOD\tndcg_linear@5\tVLM2Vec/ViDoSeek-page-fixed/None/test" in lines
    with pytest.raises(SystemExit):
        main(["--tasks", "image"])  # no model, no data: the usage error


# ------------------------------------------------------------------------------------------------ metric
def test_the_metric_equals_vlm2vecs_on_random_graded_cases():
    rng = np.random.default_rng(0)
    for _ in range(30):
        queries, docs = int(rng.integers(1, 6)), int(rng.integers(1, 12))
        scores = torch.tensor(rng.standard_normal((queries, docs)))
        gains = torch.tensor(rng.choice([0, 0, 0, 1, 2, 3], size=(queries, docs)), dtype=torch.float64)
        ours = graded_ranking_metrics(scores, gains, k_values=(1, 5))
        names = [f"d{j}" for j in range(docs)]
        for q in range(queries):
            labels = [names[j] for j in range(docs) if gains[q, j] > 0]
            rels = [float(gains[q, j]) for j in range(docs) if gains[q, j] > 0]
            prediction = ref.ranked(scores[q].numpy(), names)
            for k in (1, 5):
                assert ours[f"hit@{k}"][q] == ref.hit_at_k(prediction, labels, k)
                expected = ref.ndcg_at_k(prediction, labels, k, rels) if labels else 0.0
                assert math.isclose(float(ours[f"ndcg_linear@{k}"][q]), expected, rel_tol=1e-12, abs_tol=1e-15)


def test_the_metric_by_hand_with_padding_and_ties():
    # ranking 0, 1, 2, 3: gains 0, 2, 0, 1 -> DCG = 2/log2(3) + 1/log2(5), IDCG = 2 + 1/log2(3)
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, float("-inf"), 0.5]])
    gains = torch.tensor([[0.0, 2.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    out = graded_ranking_metrics(scores, gains, k_values=(1, 5))
    assert math.isclose(float(out["ndcg_linear@5"][0]), (2 / math.log2(3) + 1 / math.log2(5)) / (2 + 1 / math.log2(3)))
    assert out["hit@1"].tolist() == [0.0, 0.0]  # query 1: a tie at the top goes to the earlier candidate
    assert out["hit@5"].tolist() == [1.0, 1.0]
    # query 1 ranks 0, 1, 3: the padding column (-inf) is no candidate, its gain counts nowhere
    assert math.isclose(float(out["ndcg_linear@5"][1]), 1 / math.log2(3))


# ------------------------------------------------------------------------------------------------ fixtures
def _image(path: Path, rng) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)).save(path)


def _parquet(rows: list[dict], path: Path, features=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))


def build_fixture(root: Path) -> dict[str, dict]:
    """A few rows of five tasks in the released layout, and per task what a reader must make of them: each query's
    encode input, its candidates' names (``None``: the whole corpus), each candidate's input, the judged names."""
    rng = np.random.default_rng(1)
    spec: dict[str, dict] = {}
    images = root / "image-tasks"

    classes = ["cat", "dog", "bird", "fish", "horse"]
    rows, queries, lists, judged = [], [], [], []
    for i in range(6):
        _image(images / "images" / "ImageNet-1K" / f"{i}.png", rng)
        answer = classes[i % 5]
        targets = [answer] + [c for c in classes if c != answer][:3]
        rows.append(dict(qry_inst="<|image_1|> Represent the given image for classification", qry_text="",
                         qry_img_path=f"images/ImageNet-1K/{i}.png", tgt_inst="Represent the class label:",
                         tgt_text=targets, tgt_img_path=[""] * 4))  # VLM2Vec's cls parser ignores tgt_inst
        queries.append({"text": "Represent the given image for classification",
                        "image": str(images / "images" / "ImageNet-1K" / f"{i}.png")})
        lists.append(targets)
        judged.append({answer: 1.0})
    _parquet(rows, images / "ImageNet-1K" / "test-00000-of-00001.parquet")
    spec["ImageNet-1K"] = dict(queries=queries, lists=lists, judged=judged,
                               candidates={c: {"text": c, "image": None} for c in classes})

    rows, queries, lists, judged, candidates = [], [], [], [], {}
    for i in range(4):
        paths = [f"images/coco/{i}-{j}.png" for j in range(3)]
        for p in paths:
            _image(images / p, rng)
            candidates[p] = {"text": "Represent the given image.", "image": str(images / p)}
        rows.append(dict(qry_inst="Find me an everyday image that matches the given caption:",
                         qry_text=f"caption {i}", qry_img_path="", tgt_inst="<|image_1|> Represent the given image.",
                         tgt_text=["", "", ""], tgt_img_path=paths))
        queries.append({"text": f"Find me an everyday image that matches the given caption: caption {i}",
                        "image": None})
        lists.append(paths)
        judged.append({paths[0]: 1.0})
    _parquet(rows, images / "MSCOCO_t2i" / "test-00000-of-00001.parquet")
    spec["MSCOCO_t2i"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    rows, queries, lists, judged, candidates = [], [], [], [], {}
    for i in range(3):
        paths = [f"images/cirr/{i}-{j}.png" for j in range(3)]
        for p in [f"images/cirr/q{i}.png", *paths]:
            _image(images / p, rng)
        captions = [f'"target {i}-{j}"' for j in range(3)]
        rows.append(dict(qry_inst="<|image_1|> Given an image, find a similar image with the changes:",
                         qry_text=f"make it blue {i}", qry_img_path=f"images/cirr/q{i}.png",
                         tgt_inst="<|image_1|> Represent the given image with the caption:", tgt_text=captions,
                         tgt_img_path=paths))
        queries.append({"text": f"Given an image, find a similar image with the changes: make it blue {i}",
                        "image": str(images / f"images/cirr/q{i}.png")})
        names = [f"{p}:target {i}-{j}" for j, p in enumerate(paths)]  # VLM2Vec's i2i names: path:caption
        lists.append(names)
        judged.append({names[0]: 1.0})
        candidates.update({n: {"text": f"Represent the given image with the caption: {c}", "image": str(images / p)}
                           for n, c, p in zip(names, captions, paths)})
    _parquet(rows, images / "CIRR" / "test-00000-of-00001.parquet")
    spec["CIRR"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    videos = root / "video-tasks"
    actions = ["run", "jump", "wave"]
    rows, queries, judged = [], [], []
    for i in range(5):
        for f in range(4):
            _image(videos / "frames" / "video_cls" / "HMDB51" / f"v{i}" / f"{f:04d}.jpg", rng)
        rows.append({"video_id": f"v{i}", "pos_text": actions[i % 3]})
        queries.append({"text": "What actions or objects interactions are the person in the video doing?",
                        "video": str(videos / "frames" / "video_cls" / "HMDB51" / f"v{i}")})
        judged.append({actions[i % 3]: 1.0})
    _parquet(rows, videos / "HMDB51" / "test-00000-of-00001.parquet")
    spec["HMDB51"] = dict(queries=queries, lists=None, judged=judged,
                          candidates={a: {"text": a} for a in sorted(actions)})

    rows, queries, judged, candidates = [], [], [], {}
    for i in range(5):
        name = f"video{i % 4}"  # two captions of one video: the corpus holds it once
        for f in range(3):
            _image(videos / "frames" / "video_ret" / "MSR-VTT" / name / f"{f:04d}.jpg", rng)
        rows.append({"video_id": name, "video": f"{name}.mp4", "caption": f"caption {i}"})
        queries.append({"text": f"Find a video that contains the following visual content: caption {i}"})
        judged.append({name: 1.0})
        candidates[name] = {"text": "Understand the content of the provided video.",
                            "video": str(videos / "frames" / "video_ret" / "MSR-VTT" / name)}
    _parquet(rows, videos / "MSR-VTT" / "test_1k" / "test-00000-of-00001.parquet")
    spec["MSR-VTT"] = dict(queries=queries, lists=None, judged=judged, candidates=candidates)

    rows, queries, lists, judged = [], [], [], []
    ssv2_classes = ["pushing", "pulling", "lifting", "dropping", "holding"]
    for i in range(3):
        for f in range(2):
            _image(videos / "frames" / "video_cls" / "SSv2" / str(100 + i) / f"{f:04d}.jpg", rng)
        classes = ssv2_classes[i:i + 3]
        rows.append({"video_id": str(100 + i), "pos_text": classes[1], "neg_text": classes})
        queries.append({"text": "What actions or object interactions are being performed by the person in the video?",
                        "video": str(videos / "frames" / "video_cls" / "SSv2" / str(100 + i))})
        lists.append(classes)
        judged.append({classes[1]: 1.0})
    _parquet(rows, videos / "SmthSmthV2" / "test-00000-of-00001.parquet")
    spec["SmthSmthV2"] = dict(queries=queries, lists=lists, judged=judged,
                              candidates={c: {"text": c} for c in ssv2_classes})

    rows, queries, lists, judged, candidates = [], [], [], [], {}
    moments = videos / "frames" / "video_mret" / "Charades_STA"
    for i in range(3):
        clips = ["negative_0", "negative_1", "positive", "negative_2"]
        for part in ["query", *clips]:
            for f in range(2):
                _image(moments / f"movie{i}" / part / f"{f:04d}.jpg", rng)
        rows.append({"query": f"a person opens door {i}", "video_path": f"videos/movie{i}.mp4"})
        queries.append({"text": f"Find the clip that corresponds to the described scene in the given video: a person "
                                f"opens door {i}", "video": str(moments / f"movie{i}" / "query")})
        names = [str(moments / f"movie{i}" / c) for c in sorted(clips)]
        lists.append(names)
        judged.append({str(moments / f"movie{i}" / "positive"): 1.0})
        candidates.update({n: {"text": "Understand the content of the provided video.", "video": n} for n in names})
    _parquet(rows, videos / "Charades-STA" / "test-00000-of-00001.parquet")
    spec["Charades-STA"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    seeker = videos / "frames" / "video_mret" / "MomentSeeker"
    rows, queries, lists, judged, candidates = [], [], [], [], {}
    kinds = [("", "Find the clip that corresponds to the given text:", None),
             ("ego/seg0.jpg", "Select the video clip that aligns with the given text and image:", "image"),
             ("ego/seg1.mp4", "Find the clip that corresponds to the given sentence and video segment:", "video")]
    for i, (given, instruction, kind) in enumerate(kinds):
        positives = [f"clips/m{i}/pos{j}.mp4" for j in range(1 + i % 2)]
        negatives = [f"clips/m{i}/neg{j}.mp4" for j in range(2)]
        for path in positives + negatives:
            for f in range(2):
                _image(seeker / "video_frames" / path.replace("/", "_")[:-4] / f"{f:04d}.jpg", rng)
        rows.append({"query": f"the moment {i}", "input_frames": given,
                     "positive_frames": [{"output_path": p} for p in positives],
                     "negative_frames": [{"output_path": p} for p in negatives]})
        query = {"text": f"{instruction} the moment {i}"}
        if kind == "image":
            _image(seeker / "query_ego/seg0.jpg", rng)
            query["image"] = str(seeker / "query_ego/seg0.jpg")
        elif kind == "video":
            for f in range(2):
                _image(seeker / "video_frames" / "ego_seg1" / f"{f:04d}.jpg", rng)
            query["video"] = str(seeker / "video_frames" / "ego_seg1")
        queries.append(query)
        names = [str(seeker / "video_frames" / p.replace("/", "_")[:-4]) for p in positives + negatives]
        lists.append(names)
        judged.append(dict.fromkeys(names[: len(positives)], 1.0))
        candidates.update({n: {"text": "Understand the content of the provided video clip.", "video": n}
                           for n in names})
    _parquet(rows, videos / "MomentSeeker" / "test-00000-of-00001.parquet")
    spec["MomentSeeker"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    qa_frames = videos / "frames" / "video_qa"
    rows, queries, lists, judged, candidates = [], [], [], [], {}
    for i in range(4):
        for f in range(2):
            _image(qa_frames / "Video-MME" / f"clip{i}" / f"{f:04d}.jpg", rng)
        options = [f"{letter}. answer {letter.lower()}{i % 2}" for letter in "ABCD"]
        answer = "ABCD"[i]
        rows.append({"question": f"what happens {i}?", "videoID": f"clip{i}", "options": options, "answer": answer})
        queries.append({"text": f"{QA_PROMPT} what happens {i}?\n" + "\n".join(options),
                        "video": str(qa_frames / "Video-MME" / f"clip{i}")})
        lists.append(options)
        judged.append({options["ABCD".index(answer)]: 1.0})
        candidates.update({o: {"text": o[3:]} for o in options})  # two questions share each option: embedded once
    _parquet(rows, videos / "Video-MME" / "test-00000-of-00001.parquet")
    spec["Video-MME"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    rows, queries, lists, judged = [], [], [], []
    for i in range(3):
        for f in range(2):
            _image(qa_frames / "NExTQA" / f"n{i}" / f"{f:04d}.jpg", rng)
        options = [f"option {j} of {i}" for j in range(5)]
        rows.append({"video": f"n{i}", "question": f"why {i}", "answer": (i + 1) % 5, "qid": i, "type": "CW",
                     **{f"a{j}": o for j, o in enumerate(options)}})
        listed = "\n".join(f"({'ABCDE'[j]}) {o}" for j, o in enumerate(options))
        queries.append({"text": f"{QA_PROMPT} why {i}\nOptions:\n{listed}",
                        "video": str(qa_frames / "NExTQA" / f"n{i}")})
        lists.append(options)
        judged.append({options[(i + 1) % 5]: 1.0})
    _parquet(rows, videos / "NExTQA" / "MC" / "test-00000-of-00001.parquet")
    spec["NExTQA"] = dict(queries=queries, lists=lists, judged=judged,
                          candidates={o: {"text": o} for options in lists for o in options})

    rows, queries, lists, judged, candidates = [], [], [], [], {}
    for i in range(3):
        for f in range(2):
            _image(qa_frames / "EgoSchema" / f"e{i}" / f"{f:04d}.jpg", rng)
        options = [f"{letter}. doing {letter.lower()}{i}" for letter in "ABCDE"]
        rows.append({"video_idx": f"e{i}", "question": f"what is c doing {i}?", "answer": str(4 - i),
                     "question_idx": str(i), "option": options})
        queries.append({"text": f"{QA_PROMPT} what is c doing {i}?" + " ".join(options),
                        "video": str(qa_frames / "EgoSchema" / f"e{i}")})
        lists.append(options)
        judged.append({options[4 - i]: 1.0})
        candidates.update({o: {"text": o[3:]} for o in options})
    _parquet(rows, videos / "EgoSchema" / "Subset" / "test-00000-of-00001.parquet")
    spec["EgoSchema"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    queries, lists, judged, candidates = [], [], [], {}
    for i, subset in enumerate(MVBENCH_SUBSETS):  # one question per subset, in VLM2Vec's order of subsets
        for f in range(2):
            _image(qa_frames / "MVBench" / subset / f"c{i}.mp4" / f"{f:04d}.jpg", rng)
        options = ["left", "right", "up"][: 2 + i % 2]
        _parquet([{"question": f"where {i}?", "video": f"c{i}.mp4", "candidates": options, "answer": options[i % 2]}],
                 videos / "MVBench" / subset / "train-00000-of-00001.parquet")
        lettered = [f"({'ABC'[j]}) {o}" for j, o in enumerate(options)]
        queries.append({"text": f"{QA_PROMPT} where {i}?\nOptions:\n" + "\n".join(lettered),
                        "video": str(qa_frames / "MVBench" / subset / f"c{i}.mp4")})
        lists.append(lettered)
        judged.append({lettered[i % 2]: 1.0})
        candidates.update({o: {"text": o} for o in lettered})
    spec["MVBench"] = dict(queries=queries, lists=lists, judged=judged, candidates=candidates)

    rows, queries, lists, judged = [], [], [], []
    for i in range(4):
        for f in range(2):
            _image(qa_frames / "ActivityNetQA" / f"v_act{i}" / f"{f:04d}.jpg", rng)
        answer = ("yes", "no")[i % 2]
        rows.append({"video_name": f"act{i}", "question": f"is it raining {i}", "answer": answer,
                     "question_id": str(i)})
        queries.append({"text": f"{QA_PROMPT} is it raining {i}? (A) yes; (B) no.",
                        "video": str(qa_frames / "ActivityNetQA" / f"v_act{i}")})
        lists.append(["yes", "no"])
        judged.append({answer: 1.0})
    _parquet(rows, videos / "ActivityNetQA" / "test-00000-of-00001.parquet")
    spec["ActivityNetQA"] = dict(queries=queries, lists=lists, judged=judged,
                                 candidates={"yes": {"text": "yes"}, "no": {"text": "no"}})

    for name, folder, graded in (("ViDoRe_arxivqa", "arxivqa_test_subsampled_beir", False),
                                 ("ViDoRe_esg_reports_human_labeled_v2", "esg_reports_human_labeled_v2", True)):
        base = root / "visdoc-tasks" / folder
        pages, page_inputs = [], {}
        for p in range(7):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(buffer, format="PNG")
            pages.append({"corpus-id": f"page{p}", "image": {"bytes": buffer.getvalue(), "path": None}})
            page_inputs[f"page{p}"] = {"text": "Understand the content of the provided document image.",
                                       "image": buffer.getvalue()}
        _parquet(pages, base / "corpus" / "test-00000-of-00001.parquet",
                 datasets.Features({"corpus-id": datasets.Value("string"), "image": datasets.Image()}))
        qrels, queries, judged = [], [], []
        for q in range(5):
            relevant = rng.choice(7, size=3 if graded else 1, replace=False)
            scores = [int(s) for s in rng.integers(1, 3, size=len(relevant))] if graded else [1]
            qrels += [{"query-id": f"q{q}", "corpus-id": f"page{int(d)}", "score": s} for d, s in zip(relevant, scores)]
            qrels.append({"query-id": f"q{q}", "corpus-id": f"page{int((relevant[0] + 1) % 7)}", "score": 0})
            queries.append({"text": f"Find a document image that matches the given query: question {q}"})
            judged.append({})
            for d, s in zip(relevant, scores):
                judged[-1][f"page{int(d)}"] = float(s)
        _parquet([{"query-id": f"q{q}", "query": f"question {q}"} for q in range(5)],
                 base / "queries" / "test-00000-of-00001.parquet")
        _parquet(qrels, base / "qrels" / "test-00000-of-00001.parquet")
        spec[name] = dict(queries=queries, lists=None, judged=judged, candidates=page_inputs)
    return spec


class KeyedEncoder:
    """A stand-in model whose embedding of an input is a function of that input alone (its text, image content or
    path, video path), so the harness's numbers can be recomputed from the fixture's description. Counts calls."""

    def __init__(self, generative: bool = False, noise: float = 0.0):
        self.calls, self.noise = 0, noise
        self.fail_at_call: int | None = None

        class Config:
            _name_or_path = "keyed-encoder"
            generative_pooling_token = "<gen_emb>" if generative else None

        self.config = Config()

    @staticmethod
    def key(value: dict) -> str:
        image = value.get("image")
        if isinstance(image, dict):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, bytes):
            image = hashlib.sha256(image).hexdigest()
        return json.dumps([value.get("text") or "", str(image or ""), str(value.get("video") or "")])

    @classmethod
    def vector(cls, value: dict, mode: str, side: str) -> torch.Tensor:
        seed = int(hashlib.sha256(f"{cls.key(value)}|{mode}".encode()).hexdigest()[:12], 16)
        return torch.randn(16, generator=torch.Generator().manual_seed(seed))

    def encode(self, inputs, *, side, mode="discriminative", batch_size=16, show_progress_bar=None, num_samples=1,
               do_sample=False, **kwargs):
        self.calls += 1
        if self.fail_at_call == self.calls:
            raise RuntimeError("killed")
        if do_sample:  # sample j: its own keyed vector, plus noise from torch's generator when asked
            return torch.stack([
                torch.stack([self.vector(x, f"sample{j}", side) + self.noise * torch.randn(16)
                             for j in range(num_samples)]) for x in inputs
            ])
        modes = ("discriminative", "generative") if mode == "both" else (mode,)
        out = {m: torch.stack([self.vector(x, m, side) for x in inputs]) for m in modes}
        return out if mode == "both" else out[mode]


def _reference_scores(spec: dict, mode: str, candidate_mode: str | None = None) -> list[float]:
    """Per query, VLM2Vec's metric (the port) of the ranking the keyed embeddings give."""
    out = []
    names_all = list(spec["candidates"])
    metric_k = 5 if "gain" in spec else 1
    for query, names, judged in zip(spec["queries"], spec["lists"] or [None] * len(spec["queries"]), spec["judged"]):
        names = names or names_all
        q = torch.nn.functional.normalize(KeyedEncoder.vector(query, mode, "query"), dim=0)
        c = torch.nn.functional.normalize(torch.stack([KeyedEncoder.vector(spec["candidates"][n],
                                                                           candidate_mode or mode, "document")
                                                       for n in names]), dim=1)
        prediction = ref.ranked((c @ q).numpy(), names)
        labels, rels = list(judged), list(judged.values())
        if spec.get("gain"):
            out.append(ref.ndcg_at_k(prediction, labels, metric_k, rels))
        else:
            out.append(ref.hit_at_k(prediction, labels, metric_k))
    return out


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mmeb_v2")
    spec = build_fixture(root)
    for name in ("ViDoRe_arxivqa", "ViDoRe_esg_reports_human_labeled_v2"):
        spec[name]["gain"] = True
    return root, spec


def test_the_readers_make_the_inputs_and_judgments_the_layout_describes(fixture_data):
    root, spec = fixture_data
    for name in FIXTURE_TASKS:
        data, expected = load_task(name, root), spec[name]
        keys = [KeyedEncoder.key(with_instruction_in_text(x)) for x in data.candidates]
        by_key = {KeyedEncoder.key(v): n for n, v in expected["candidates"].items()}
        assert sorted(keys) == sorted(by_key), name  # each candidate once
        assert [KeyedEncoder.key(with_instruction_in_text(x)) for x in data.queries] == [
            KeyedEncoder.key(q) for q in expected["queries"]]
        names = [by_key[k] for k in keys]
        if expected["lists"] is None:
            assert data.candidate_lists is None
        else:
            assert [[names[i] for i in c] for c in data.candidate_lists] == expected["lists"]
        assert [{names[i]: g for i, g in r.items()} for r in data.relevance] == expected["judged"], name


def test_task_instructions_go_where_the_models_prompt_template_puts_them(fixture_data, tiny_backbone, tmp_path):
    """A model whose template makes the instruction the system message (GME, Qwen3-VL-Embedding) gets each task's
    instruction as encode's ``instruction`` beside the bare inputs; one that prefixes it (UniME, as VLM2Vec) gets
    VLM2Vec's texts and no ``instruction``. Either way every query and candidate is embedded once."""
    from mm_embed_trl import MultimodalEmbeddingModel

    root, _ = fixture_data
    for template in ("gme", "unime"):
        model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template=template)
        encode, calls = model.encode, []

        def spy(inputs, encode=encode, calls=calls, **kwargs):
            calls.append((kwargs["side"], kwargs.get("instruction"), list(inputs)))
            return encode(inputs, **kwargs)

        model.encode = spy
        # image queries with a text, and video queries that are only an instruction; text classes
        for name in ("ImageNet-1K", "HMDB51"):
            calls.clear()
            evaluate_mmeb_v2(model, root, [name], cache_dir=tmp_path / template, show_progress_bar=False)
            data = load_task(name, root)
            for side, inputs in (("query", data.queries), ("document", data.candidates)):
                got = [(instruction, x) for s, instruction, batch in calls if s == side for x in batch]
                if template == "unime":
                    assert got == [(None, with_instruction_in_text(x)) for x in inputs], (name, side)
                    continue
                want = [(x.get("instruction"), {k: v for k, v in x.items() if k != "instruction"}) for x in inputs]
                assert sorted(map(repr, got)) == sorted(map(repr, want)), (name, side)
                assert any(instruction for instruction, _ in got) == any("instruction" in x for x in inputs)


@pytest.mark.parametrize("generative", [False, True])
def test_the_harness_scores_every_task_as_vlm2vec_would(fixture_data, tmp_path, generative):
    root, spec = fixture_data
    model = KeyedEncoder(generative=generative)
    results = evaluate_mmeb_v2(model, root, ",".join(FIXTURE_TASKS), cache_dir=tmp_path / "cache", block_size=3)
    modes = ["disc", "gen", "oracle"] if generative else ["disc"]
    assert list(results.scores) == modes
    for name in FIXTURE_TASKS:
        per_mode = {m: _reference_scores(spec[name], e) for m, e in (("disc", "discriminative"),
                                                                       ("gen", "generative"))}
        per_mode["oracle"] = list(np.maximum(per_mode["disc"], per_mode["gen"]))
        for mode in modes:
            assert math.isclose(results.scores[mode][name], float(np.mean(per_mode[mode])), abs_tol=1e-9), (mode, name)
    summary = json.loads(results.to_json())["summary"]["disc"]
    image = [results.scores["disc"][n] for n in ("ImageNet-1K", "MSCOCO_t2i", "CIRR")]
    assert math.isclose(summary["image/Overall"], np.mean(image)) and summary["image/VG"] is None
    assert math.isclose(summary["All"], np.mean([results.scores["disc"][n] for n in FIXTURE_TASKS]))
    table = results.table().splitlines()
    assert table[0].startswith("| Mode | image CLS (1) | image QA (0) | image RET (2) | image VG (0) | image Overall")
    assert table[0].endswith("visdoc OOD (0) | visdoc Overall (2) | All (15) |")
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {m}" for m in modes]
    assert format_table({"disc": {}}).splitlines()[2].count("-") == 16


def test_pass_at_k_is_per_query_the_best_of_k_sampled_reasonings(fixture_data, tmp_path):
    root, spec = fixture_data
    tasks = ["ImageNet-1K", "Charades-STA", "ViDoRe_esg_reports_human_labeled_v2"]
    results = evaluate_mmeb_v2(KeyedEncoder(generative=True), root, tasks, cache_dir=tmp_path / "a", pass_at_k=3,
                               block_size=2)
    assert list(results.scores) == ["disc", "gen", "oracle", "pass@3"] and "| pass@3 |" in results.table()
    for name in tasks:
        per_sample = [_reference_scores(spec[name], f"sample{j}", "generative") for j in range(3)]
        expected = float(np.mean(np.max(per_sample, axis=0)))
        assert math.isclose(results.scores["pass@3"][name], expected, abs_tol=1e-9), name
    # sampling draws from a generator seeded per block: a rerun (or another split of blocks over ranks) samples alike
    noisy = []
    for i in range(2):
        torch.manual_seed(i)  # the caller's generator state must not matter
        noisy.append(evaluate_mmeb_v2(KeyedEncoder(generative=True, noise=2.0), root, tasks,
                                      cache_dir=tmp_path / f"n{i}", pass_at_k=3, block_size=2).scores["pass@3"])
    assert noisy[0] == noisy[1]
    with pytest.raises(ValueError, match="pass_at_k=2 needs the generative mode"):
        evaluate_mmeb_v2(KeyedEncoder(), root, tasks, cache_dir=tmp_path / "c", pass_at_k=2)


def test_a_repeated_run_encodes_nothing_and_an_interrupted_one_only_what_was_left(fixture_data, tmp_path):
    root, _ = fixture_data
    tasks = "MSCOCO_t2i,ViDoRe_arxivqa"
    first = KeyedEncoder()
    whole = evaluate_mmeb_v2(first, root, tasks, cache_dir=tmp_path / "a", block_size=2)
    again = KeyedEncoder()
    assert evaluate_mmeb_v2(again, root, tasks, cache_dir=tmp_path / "a", block_size=2).scores == whole.scores
    assert again.calls == 0
    killed = KeyedEncoder()
    killed.fail_at_call = 5
    with pytest.raises(RuntimeError, match="killed"):
        evaluate_mmeb_v2(killed, root, tasks, cache_dir=tmp_path / "b", block_size=2)
    assert not list((tmp_path / "b").rglob(".block-*"))  # no half-written block left
    resumed = KeyedEncoder()
    assert evaluate_mmeb_v2(resumed, root, tasks, cache_dir=tmp_path / "b", block_size=2).scores == whole.scores
    assert resumed.calls == first.calls - 4  # the 4 blocks done before the kill were read back
    other = KeyedEncoder()
    evaluate_mmeb_v2(other, root, tasks, cache_dir=tmp_path / "a", block_size=2, model_id="another-checkpoint")
    assert other.calls == first.calls  # another model never reads this one's embeddings


def test_video_classification_ranks_every_class_of_its_dataset_when_given_them(fixture_data, tmp_path, caplog):
    """VLM2Vec ranks each video against its dataset's whole class list (video_classification_datasets.py: the corpus
    is VIDEOCLS_LABEL_MAPPING[dataset]), which a test split need not cover. Without the list a task ranks its rows'
    classes, and the results say its score is not comparable; with it every class is a candidate."""
    root, spec = fixture_data
    tested = list(spec["HMDB51"]["candidates"])  # the fixture's rows hold 3 of HMDB51's 51 classes
    every = tested + [f"class_{i}" for i in range(48)]
    partial = evaluate_mmeb_v2(KeyedEncoder(), root, "HMDB51", cache_dir=tmp_path / "c")
    assert partial.fewer_candidates == {"HMDB51": "3 of its 51 classes: the test rows' only"}
    assert "HMDB51: 3 of its 51 classes" in partial.caveats()
    assert json.loads(partial.to_json())["fewer_candidates"] == partial.fewer_candidates
    assert "VLM2Vec ranks all" in caplog.text

    # keyed as VLM2Vec's VIDEOCLS_LABEL_MAPPING (dataset folders; SmthSmthV2's list is not a corpus: ignored)
    labels = tmp_path / "classes.json"
    labels.write_text(json.dumps({"HMDB51": every[::-1], "SmthSmthV2": ["ignored"], "Kinetics-700": ["a", "b"]}))
    assert read_class_labels(labels) == {"HMDB51": every[::-1], "K700": ["a", "b"]}
    assert sorted(load_task("HMDB51", root, class_labels=every).candidate_keys) == sorted(every)
    full = evaluate_mmeb_v2(KeyedEncoder(), root, "HMDB51", cache_dir=tmp_path / "c", class_labels=labels)
    assert full.fewer_candidates == {} and full.caveats() == ""
    reference = {**spec["HMDB51"], "candidates": {c: {"text": c} for c in sorted(every)}}
    assert math.isclose(full.scores["disc"]["HMDB51"], np.mean(_reference_scores(reference, "discriminative")),
                        abs_tol=1e-9)
    assert full.scores["disc"]["HMDB51"] < partial.scores["disc"]["HMDB51"]  # more classes to confuse it with

    short = evaluate_mmeb_v2(KeyedEncoder(), root, "HMDB51", cache_dir=tmp_path / "c",
                             class_labels={"HMDB51": ["run", "other"]})
    assert short.fewer_candidates == {"HMDB51": "4 of its 51 classes: the class list given is short"}
    assert "2 classes of the test rows are not in its class list" in caplog.text
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not be read as JSON"):
        read_class_labels(tmp_path / "bad.json")
    for bad in ({"UCF101": "Archery"}, {"HMDB51": 5}):
        with pytest.raises(ValueError, match="list of non-empty class names"):
            read_class_labels(bad)
    with pytest.raises(ValueError, match="two different lists"):
        read_class_labels({"K700": ["a"], "Kinetics-700": ["b"]})
    assert read_class_labels({"K700": ["a"], "Kinetics-700": ["a"]}) == {"K700": ["a"]}
    for bad in (["run", "jump"], 3):
        with pytest.raises(ValueError, match="JSON object of task -> list of class names"):
            read_class_labels(bad)


def test_bad_data_names_the_file_and_the_fix(fixture_data, tmp_path):
    root, _ = fixture_data
    with pytest.raises(FileNotFoundError, match=r"no parquet file in .*image-tasks/OK-VQA.*MMEB_Test_Instruct"):
        load_task("OK-VQA", root)
    import dataclasses

    unknown = dataclasses.replace(MMEB_V2_TASKS["HMDB51"], name="NewTask", parser="new_parser")
    with pytest.raises(NotImplementedError, match=r"NewTask \(VLM2Vec parser 'new_parser'\) has no reader"):
        load_task(unknown, root)
    broken = tmp_path / "broken"
    base = broken / "visdoc-tasks" / "arxivqa_test_subsampled_beir"
    source = root / "visdoc-tasks" / "arxivqa_test_subsampled_beir"
    for part in ("queries", "corpus"):
        (base / part).mkdir(parents=True)
        for file in (source / part).iterdir():
            (base / part / file.name).write_bytes(file.read_bytes())
    _parquet([{"query-id": "q0", "corpus-id": "page99", "score": 1}], base / "qrels" / "test-0.parquet")
    with pytest.raises(ValueError, match=r"qrels: query 'q0' is judged against page 'page99', which is not in"):
        load_task("ViDoRe_arxivqa", broken)
    _parquet([{"query-id": "q0", "corpus-id": "page1", "score": 1}], base / "qrels" / "test-0.parquet")
    with pytest.raises(ValueError, match=r"4 queries have no positive judgment in qrels \(first: 'q1'\)"):
        load_task("ViDoRe_arxivqa", broken)
    with pytest.raises(FileNotFoundError, match=r"2 of the 3 selected .*UCF101: .*video-tasks/UCF101 is absent; "
                       r"MSVD: .*video-tasks/MSVD is absent.*--skip_missing"):
        evaluate_mmeb_v2(KeyedEncoder(), root, "HMDB51,MSVD,UCF101", cache_dir=tmp_path / "c")
    skipped = evaluate_mmeb_v2(KeyedEncoder(), root, "HMDB51,MSVD,UCF101", cache_dir=tmp_path / "c",
                               skip_missing=True)
    assert list(skipped.scores["disc"]) == ["HMDB51"] and "| All (1) |" in skipped.table()
    qa = broken / "video-tasks" / "Video-MME"
    _parquet([{"question": "why?", "videoID": "v", "options": ["A. x", "B. y"], "answer": "C"}], qa / "test-0.parquet")
    with pytest.raises(ValueError, match=r"Video-MME: question 'why\?' has answer 'C', which names none of its 2 opt"):
        load_task("Video-MME", broken)
    _parquet([{"query": "q", "video_path": "v/m.mp4"}], broken / "video-tasks" / "Charades-STA" / "test-0.parquet")
    for part in ("query", "negative_0"):
        _image(broken / "video-tasks" / "frames" / "video_mret" / "Charades_STA" / "m" / part / "0.jpg",
               np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"Charades_STA/m: .*exactly one named positive\*.*found \['negative_0'\]"):
        load_task("Charades-STA", broken)
    with pytest.raises(ValueError, match="mode 'gen' needs a UME-R1 model"):
        evaluate_mmeb_v2(KeyedEncoder(), root, "HMDB51", modes=["gen"], cache_dir=tmp_path / "c")


# ------------------------------------------------------------------------------------------------ end to end
_CLI = "from mm_embed_trl.evaluation.mmeb_v2 import main\nmain()\n"


@pytest.mark.slow
def test_the_command_line_on_the_tiny_model_gives_the_same_table_under_1_and_2_processes(fixture_data, tiny_backbone,
                                                                                          tmp_path):
    root, _ = fixture_data
    script = tmp_path / "mmeb_v2_cli.py"
    script.write_text(_CLI)
    results = {}
    for processes in (1, 2):
        out = tmp_path / f"out{processes}"
        finished = launching.run(
            script, "--model", tiny_backbone("qwen2_vl"), "--data_root", root, "--tasks", "all",
            "--output_dir", out, "--cache_dir", tmp_path / f"cache{processes}", "--block_size", "4", "--skip_missing",
            processes=processes, timeout=420,
        )
        assert "| Mode | image CLS (1)" in finished.stdout
        results[processes] = json.loads((out / "mmeb_v2.json").read_text())
        assert (out / "mmeb_v2.md").read_text().count("| disc |") == 1
    one, two = results[1]["scores"]["disc"], results[2]["scores"]["disc"]
    assert sorted(one) == sorted(FIXTURE_TASKS) and all(0.0 <= v <= 1.0 for v in one.values())
    for name in FIXTURE_TASKS:
        assert math.isclose(two[name], one[name], abs_tol=1e-9), name
    assert results[1]["data_version"] == "vlm2vec-6e1e1d4"
    blocks = sorted(p.name for p in (tmp_path / "cache2" / "HMDB51").glob("queries-*/block-*.pt"))
    assert blocks == ["block-00000.pt", "block-00001.pt"]  # 5 videos, blocks of 4: one block per rank


def test_a_ume_r1_model_is_scored_in_its_three_modes(fixture_data, tiny_backbone, tmp_path):
    """The real encode path of a UME-R1 model: disc and gen from one generation (mode="both"), and the oracle at
    least as good as either on every task (per query the better of the two)."""
    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel

    root, _ = fixture_data
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    EmbeddingSFTTrainer(model=model, args=EmbeddingSFTConfig(output_dir=str(tmp_path / "sft"), report_to="none",
                                                             use_cpu=True))  # adds and sets UME-R1's tokens
    results = evaluate_mmeb_v2(model, root, "ImageNet-1K,ActivityNetQA,ViDoRe_arxivqa", cache_dir=tmp_path / "cache",
                               encode_kwargs={"max_new_tokens": 4}, show_progress_bar=False)
    assert list(results.scores) == ["disc", "gen", "oracle"]
    for name, oracle in results.scores["oracle"].items():
        assert oracle >= max(results.scores["disc"][name], results.scores["gen"][name]), name
    assert "| oracle |" in results.table()
