"""MMEB-V2: the 78 tasks its papers report (images 36, videos 18, visual documents 24), read from the released data
layout, scored with each task's official metric, and tabulated per category as the papers do.

The task list, categories, splits, ranking kind (a query against its own candidates, VLM2Vec's ``eval_type: local``,
or against the task's whole corpus, ``global``) and metrics follow VLM2Vec's evaluation code at the pinned data
version :data:`MMEB_V2_DATA_VERSION` (``experiments/public/eval/{image,video,visdoc}.yaml``,
``src/constant/dataset_hf_path.py`` and ``experiments/report_score_v2.py``): Hit@1 for image and video tasks,
NDCG@5 with linear gain for visual documents.

The layout under ``data_root`` is the one VLM2Vec's local loaders read (``dataset_hflocal_path.py``):

* ``image-tasks/<task>/test-*.parquet``: MMEB_Test_Instruct rows (``qry_inst``, ``qry_text``, ``qry_img_path``,
  ``tgt_inst``, ``tgt_text`` list, ``tgt_img_path`` list; the first target is the answer), image paths relative to
  ``image-tasks/``;
* ``visdoc-tasks/<dataset>/{queries,corpus,qrels}/<split>-*.parquet``: BEIR layout (``query-id``, ``query``;
  ``corpus-id``, ``image``; ``query-id``, ``corpus-id``, ``score``), graded relevance from ``score`` (> 0 relevant);
* ``video-tasks/<dataset>[/<subset>]/<split>-*.parquet``: video classification (``video_id``, ``pos_text``: the
  class; frames in ``video-tasks/frames/video_cls/<task>/<video_id>/``; VLM2Vec ranks each video against its
  dataset's whole class list, which the data does not hold: give it as ``class_labels``) and video retrieval (a
  video name and its caption, in each dataset's own columns; frames in
  ``video-tasks/frames/video_ret/<task>/<name>/``) and video QA (Video-MME, NExTQA, EgoSchema, ActivityNetQA,
  MVBench: frames in ``video-tasks/frames/video_qa/<task>/``, MVBench's annotations and frames one folder per
  subset), Something-Something V2 and moment retrieval (QVHighlight, Charades-STA: clip frame folders per video;
  MomentSeeker: clip frame folders named by their path).

Embeddings of each task's queries and candidates are cached under ``cache_dir`` in blocks, keyed by the model, the
data version, the task, the side, the mode and the inputs themselves: a repeated run reads them back, an interrupted
one encodes only the blocks it had not finished. Under ``torch.distributed`` each rank encodes every ``world``-th
block; rank 0 scores and writes the results.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .._files import staged_file
from ..distributed.gather import rank as process_rank
from ..distributed.gather import world_size
from .metrics import graded_ranking_metrics

logger = logging.getLogger(__name__)

__all__ = [
    "MMEB_V2_CATEGORIES",
    "MMEB_V2_DATA_VERSION",
    "MMEB_V2_TASKS",
    "MMEBV2Results",
    "MMEBV2Task",
    "TaskData",
    "evaluate_mmeb_v2",
    "format_table",
    "load_task",
    "read_class_labels",
    "select_tasks",
    "task_folder",
]

# VLM2Vec at 6e1e1d4 (2026-01-27): visdoc page tasks on the "-fixed" datasets (55b056a, 2025-11-03), whose split
# moved published VisDoc-OOD scores by about a point. Scores of other versions are not comparable.
MMEB_V2_DATA_VERSION = "vlm2vec-6e1e1d4"

# category -> the papers' sub-columns, in their order
MMEB_V2_CATEGORIES = {
    "image": ("CLS", "QA", "RET", "VG"),
    "video": ("CLS", "QA", "RET", "MRET"),
    "visdoc": ("VDRv1", "VDRv2", "VR", "OOD"),
}
_METRICS = {"image": "hit@1", "video": "hit@1", "visdoc": "ndcg_linear@5"}


@dataclasses.dataclass(frozen=True)
class MMEBV2Task:
    """One MMEB-V2 task as VLM2Vec evaluates it.

    ``parser``: VLM2Vec's ``dataset_parser``; ``source``: (hub repository, subset, split) as VLM2Vec pins it;
    ``local_dir``: the folder under the category's root in the released layout; ``ranking``: ``"candidates"`` (each
    query its own list) or ``"corpus"`` (every query against all candidates)."""

    name: str
    category: str
    group: str
    parser: str
    source: tuple[str, str | None, str]
    local_dir: str
    ranking: str
    sample: int | None = None  # VLM2Vec's num_sample_per_subset: the first rows it evaluates
    # video classification: the dataset's classes, all of which VLM2Vec ranks every video against (its
    # VIDEOCLS_LABEL_MAPPING); a test split need not hold a video of each (Kinetics-700's does not)
    num_classes: int | None = None

    @property
    def metric(self) -> str:
        return _METRICS[self.category]

    @property
    def split(self) -> str:
        return self.source[2]


def _tasks() -> dict[str, MMEBV2Task]:
    tasks: list[MMEBV2Task] = []

    def image(group, parser, names):
        for name in names:
            tasks.append(MMEBV2Task(name, "image", group, parser, ("ziyjiang/MMEB_Test_Instruct", name, "test"),
                                    name, "candidates"))

    image("CLS", "image_cls", ["ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "Place365",
                               "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"])
    image("QA", "image_qa", ["OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W", "ScienceQA",
                             "VizWiz", "GQA", "TextVQA"])
    image("RET", "image_i2t", ["MSCOCO_i2t", "VisualNews_i2t"])
    image("RET", "image_t2i", ["VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "EDIS", "Wiki-SS-NQ"])
    image("RET", "image_i2i_vg", ["CIRR", "NIGHTS", "OVEN", "FashionIQ"])
    image("VG", "image_i2i_vg", ["MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"])

    def video(group, parser, ranking, entries):
        for name, repo, subset, split in entries:
            tasks.append(MMEBV2Task(name, "video", group, parser, (f"VLM2Vec/{repo}", subset, split), repo, ranking))

    video("CLS", "ssv2", "candidates", [("SmthSmthV2", "SmthSmthV2", None, "test")])
    tasks[-1] = dataclasses.replace(tasks[-1], sample=1000)
    video("CLS", "video_classification", "corpus", [
        ("HMDB51", "HMDB51", None, "test"), ("UCF101", "UCF101", None, "test"),
        ("K700", "Kinetics-700", None, "test"), ("Breakfast", "Breakfast", None, "test")])
    for i, classes in zip(range(-4, 0), (51, 101, 700, 10)):
        tasks[i] = dataclasses.replace(tasks[i], num_classes=classes)
    video("QA", "videomme", "candidates", [("Video-MME", "Video-MME", None, "test")])
    video("QA", "nextqa", "candidates", [("NExTQA", "NExTQA", "MC", "test")])
    video("QA", "egoschema", "candidates", [("EgoSchema", "EgoSchema", "Subset", "test")])
    video("QA", "mvbench", "candidates", [("MVBench", "MVBench", None, "train")])
    video("QA", "activitynetqa", "candidates", [("ActivityNetQA", "ActivityNetQA", None, "test")])
    video("RET", "msrvtt", "corpus", [("MSR-VTT", "MSR-VTT", "test_1k", "test")])
    video("RET", "msvd", "corpus", [("MSVD", "MSVD", None, "test")])
    video("RET", "didemo", "corpus", [("DiDeMo", "DiDeMo", None, "test")])
    video("RET", "youcook2", "corpus", [("YouCook2", "YouCook2", None, "val")])
    video("RET", "vatex", "corpus", [("VATEX", "VATEX", None, "test")])
    video("MRET", "moment_retrieval", "candidates", [("QVHighlight", "QVHighlight", None, "test"),
                                                     ("Charades-STA", "Charades-STA", None, "test")])
    video("MRET", "momentseeker", "candidates", [("MomentSeeker", "MomentSeeker", None, "test")])

    def visdoc(group, parser, entries):
        for name, repo, split in entries:
            tasks.append(MMEBV2Task(name, "visdoc", group, parser, (repo, None, split), repo.split("/")[1], "corpus"))

    vidore = [("arxivqa", "arxivqa_test_subsampled_beir"), ("docvqa", "docvqa_test_subsampled_beir"),
              ("infovqa", "infovqa_test_subsampled_beir"), ("tabfquad", "tabfquad_test_subsampled_beir"),
              ("tatdqa", "tatdqa_test_beir"), ("shiftproject", "shiftproject_test_beir")]
    vidore += [(f"syntheticDocQA_{topic}", f"syntheticDocQA_{topic}_test_beir") for topic in
               ("artificial_intelligence", "energy", "government_reports", "healthcare_industry")]
    visdoc("VDRv1", "vidore", [(f"ViDoRe_{name}", f"vidore/{repo}", "test") for name, repo in vidore])
    # the report's four ViDoRe v2 tasks: the human-labeled ESG set and the multilingual (all-language) sets
    visdoc("VDRv2", "vidore", [("ViDoRe_esg_reports_human_labeled_v2", "vidore/esg_reports_human_labeled_v2", "test")]
           + [(f"ViDoRe_{name}_v2_multilingual", f"vidore/{name}_v2", "test")
              for name in ("biomedical_lectures", "economics_reports", "esg_reports")])
    visdoc("VR", "visrag", [(f"VisRAG_{name}", f"openbmb/VisRAG-Ret-Test-{name}", "train")
                            for name in ("ArxivQA", "ChartQA", "MP-DocVQA", "SlideVQA", "InfoVQA", "PlotQA")])
    visdoc("OOD", "vidore", [("ViDoSeek-page", "VLM2Vec/ViDoSeek-page-fixed", "test"),
                             ("ViDoSeek-doc", "VLM2Vec/ViDoSeek", "test"),
                             ("MMLongBench-page", "VLM2Vec/MMLongBench-page-fixed", "test"),
                             ("MMLongBench-doc", "VLM2Vec/MMLongBench-doc", "test")])
    return {task.name: task for task in tasks}


MMEB_V2_TASKS: dict[str, MMEBV2Task] = _tasks()


def select_tasks(selection: str | Iterable[str] = "all") -> list[MMEBV2Task]:
    """Tasks by ``"all"``, a category (``"image"``, ``"video"``, ``"visdoc"``), task names, or a comma-separated mix
    of these; in the registry's order, each once."""
    names = selection.split(",") if isinstance(selection, str) else list(selection)
    chosen: set[str] = set()
    for name in (n.strip() for n in names if n.strip()):
        if name == "all":
            chosen.update(MMEB_V2_TASKS)
        elif name in MMEB_V2_CATEGORIES:
            chosen.update(t.name for t in MMEB_V2_TASKS.values() if t.category == name)
        elif name in MMEB_V2_TASKS:
            chosen.add(name)
        else:
            import difflib

            close = difflib.get_close_matches(name, MMEB_V2_TASKS, n=3)
            raise ValueError(
                f"{name!r} is no MMEB-V2 task or category; use 'all', one of {sorted(MMEB_V2_CATEGORIES)}, or task "
                f"names{f' (did you mean {close}?)' if close else ''}."
            )
    if not chosen:
        raise ValueError("No MMEB-V2 task selected: pass 'all', a category or task names.")
    return [task for name, task in MMEB_V2_TASKS.items() if name in chosen]


# ------------------------------------------------------------------------------------------------ reading the layout
@dataclasses.dataclass
class TaskData:
    """A task's inputs and judgments, ready to embed and score.

    ``queries`` and ``candidates``: ``model.encode`` inputs (dicts of text / image / video), each candidate once;
    ``candidate_lists``: per query the candidates it ranks (``None``: all of them); ``relevance``: per query
    ``{candidate index: gain}`` (gain > 0)."""

    task: MMEBV2Task
    queries: list[dict[str, Any]]
    candidates: list[dict[str, Any]]
    candidate_lists: list[list[int]] | None
    relevance: list[dict[int, float]]
    candidate_keys: list[str]
    # why the candidates are fewer than VLM2Vec ranks against (None: they are not), e.g. a class list not given
    fewer_candidates: str | None = None


def _read_parquet(folder: Path, split: str, task: MMEBV2Task):
    import datasets

    files = sorted(glob.glob(str(folder / f"{split}-*.parquet"))) or sorted(glob.glob(str(folder / "*.parquet")))
    if not files:
        raise FileNotFoundError(
            f"MMEB-V2 task {task.name}: no parquet file in {folder} (looked for {split}-*.parquet). Download the "
            f"released data ({task.source[0]}) into that folder, or point data_root at the folder that holds "
            "image-tasks/, video-tasks/ and visdoc-tasks/."
        )
    return datasets.load_dataset("parquet", data_files=files, split="train")


def _text(*parts: Any) -> str:
    return " ".join(str(p).replace("<|image_1|>", "").strip() for p in parts if p and str(p).strip())


def _instructed(instruction: str, text: Any = "", **visual: Any) -> dict[str, Any]:
    """An input with its task instruction kept apart from its own text: :func:`_encode` puts the instruction where the
    model's prompt template puts instructions."""
    return {"instruction": instruction, "text": text, **visual}


def with_instruction_in_text(value: dict[str, Any]) -> dict[str, Any]:
    """VLM2Vec's form of an input: its task instruction, a space, its text (one ``text``)."""
    if "instruction" not in value:
        return value
    out = {key: v for key, v in value.items() if key not in ("instruction", "text")}
    return {"text": _text(value["instruction"], value.get("text")), **out}


def _check_columns(table, columns: Sequence[str], where: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"{where} lacks column(s) {missing} (it has {table.column_names}); MMEB-V2 needs {columns}.")


class _Candidates:
    """Candidates named once each (as VLM2Vec keys its candidate embeddings by name)."""

    def __init__(self):
        self.inputs: list[dict[str, Any]] = []
        self.keys: list[str] = []
        self.index: dict[str, int] = {}

    def add(self, key: str, value: dict[str, Any]) -> int:
        if key not in self.index:
            self.index[key] = len(self.inputs)
            self.inputs.append(value)
            self.keys.append(key)
        return self.index[key]


_TEXT_CANDIDATES = ("image_cls", "image_qa", "image_i2t")


def _load_image_task(task: MMEBV2Task, root: Path) -> TaskData:
    image_root = root / "image-tasks"
    folder = image_root / task.local_dir
    rows = _read_parquet(folder, task.split, task)
    _check_columns(rows, ("qry_inst", "qry_text", "qry_img_path", "tgt_text", "tgt_img_path"), str(folder))
    candidates, queries, lists = _Candidates(), [], []

    def path(value):
        return str(image_root / value) if value else None

    for i, row in enumerate(rows):
        if len(row["tgt_text"]) != len(row["tgt_img_path"]) or not row["tgt_text"]:
            raise ValueError(
                f"{folder}: row {i} has {len(row['tgt_text'])} tgt_text and {len(row['tgt_img_path'])} tgt_img_path; "
                "each candidate needs one of each (\"\" for none), the first being the answer."
            )
        queries.append(_instructed(row["qry_inst"], row["qry_text"], image=path(row["qry_img_path"])))
        if task.parser in _TEXT_CANDIDATES:  # VLM2Vec embeds these candidates as bare texts, named by their text
            lists.append([candidates.add(text, {"text": text}) for text in row["tgt_text"]])
            continue
        # image candidates with the target instruction (and caption, where there is one), named by path
        instruction = row.get("tgt_inst") or ""
        lists.append([
            candidates.add(image if task.parser == "image_t2i" else f"{image}:{text.strip(chr(34))}",
                           _instructed(instruction, text, image=path(image)))
            for text, image in zip(row["tgt_text"], row["tgt_img_path"])
        ])
    relevance = [{cands[0]: 1.0} for cands in lists]
    return TaskData(task, queries, candidates.inputs, lists, relevance, candidates.keys)


def _load_visdoc_task(task: MMEBV2Task, root: Path) -> TaskData:
    folder = root / "visdoc-tasks" / task.local_dir
    queries = _read_parquet(folder / "queries", task.split, task)
    corpus = _read_parquet(folder / "corpus", task.split, task)
    qrels = _read_parquet(folder / "qrels", task.split, task)
    _check_columns(queries, ("query-id", "query"), str(folder / "queries"))
    _check_columns(corpus, ("corpus-id", "image"), str(folder / "corpus"))
    _check_columns(qrels, ("query-id", "corpus-id", "score"), str(folder / "qrels"))
    candidates = _Candidates()
    page = "Understand the content of the provided document image."  # VLM2Vec's vidore / visrag instructions
    for doc_id, image in zip(corpus["corpus-id"], corpus.cast_column("image", _undecoded_image())["image"]):
        candidates.add(str(doc_id), _instructed(page, image=image))
    judged: dict[str, dict[int, float]] = {}
    for query_id, doc_id, score in zip(qrels["query-id"], qrels["corpus-id"], qrels["score"]):
        if score <= 0:  # VLM2Vec keeps positive judgments only, the highest one of duplicates
            continue
        if str(doc_id) not in candidates.index:
            raise ValueError(
                f"{folder / 'qrels'}: query {query_id!r} is judged against page {doc_id!r}, which is not in "
                f"{folder / 'corpus'}; the three parts must come from the same data version ({MMEB_V2_DATA_VERSION})."
            )
        gains = judged.setdefault(str(query_id), {})
        doc = candidates.index[str(doc_id)]
        gains[doc] = max(gains.get(doc, 0.0), float(score))
    unjudged = [q for q in queries["query-id"] if str(q) not in judged]
    if unjudged:
        raise ValueError(
            f"{folder}: {len(unjudged)} queries have no positive judgment in qrels (first: {unjudged[0]!r}); every "
            "query needs one. Use the queries, corpus and qrels of one data version."
        )
    instruction = "Find a document image that matches the given query:"
    return TaskData(
        task, [_instructed(instruction, text) for text in queries["query"]], candidates.inputs, None,
        [judged[str(q)] for q in queries["query-id"]], candidates.keys,
    )


def _undecoded_image():
    import datasets

    return datasets.Image(decode=False)  # pages stay encoded until encode loads each batch


# VLM2Vec's query of each video classification task (video_classification_utils.DATASET_INSTRUCTION)
_VIDEO_CLS_INSTRUCTIONS = {
    "Kinetics-700": "Recognize the category of the video content.",
    "UCF101": "What activities or sports are being performed by the person in the video?",
    "HMDB51": "What actions or objects interactions are the person in the video doing?",
    "Breakfast": "Recognize the breakfast type that the person is cooking in the video.",
}


def _video_rows(task: MMEBV2Task, root: Path, columns: Sequence[str]):
    folder = task_folder(task, root)
    folder = folder / task.source[1] if task.source[1] else folder  # a subset is a sub-folder (MSR-VTT's test_1k)
    rows = _read_parquet(folder, task.split, task)
    _check_columns(rows, columns, str(folder))
    return rows


def _load_video_classification(task: MMEBV2Task, root: Path, class_labels: Sequence[str] | None = None) -> TaskData:
    rows = _video_rows(task, root, ("video_id", "pos_text"))
    frames = root / "video-tasks" / "frames" / "video_cls" / task.name
    # the class names are the corpus (every class of the dataset: `class_labels`, with the test rows' own); each
    # video's class is its answer
    tested = set(rows["pos_text"])
    labels = sorted(tested | set(class_labels or ()))
    candidates = _Candidates()
    for label in labels:
        candidates.add(label, {"text": label})
    instruction = _VIDEO_CLS_INSTRUCTIONS[task.local_dir]
    queries = [_instructed(instruction, video=str(frames / str(video_id))) for video_id in rows["video_id"]]
    relevance = [{candidates.index[label]: 1.0} for label in rows["pos_text"]]
    fewer = None
    if class_labels is not None and not tested <= set(class_labels):
        logger.warning("MMEB-V2 %s: %d classes of the test rows are not in its class list (a different spelling?), "
                       "e.g. %r; they are ranked as well.", task.name, len(tested - set(class_labels)),
                       sorted(tested - set(class_labels))[0])
    if task.num_classes is not None and len(labels) < task.num_classes:
        fewer = (f"{len(labels)} of its {task.num_classes} classes: "
                 + ("the test rows' only" if class_labels is None else "the class list given is short"))
    return TaskData(task, queries, candidates.inputs, None, relevance, candidates.keys, fewer)


# VLM2Vec's video retrieval parsers: task -> (query instruction, video name column, caption column)
_VIDEO_RETRIEVAL = {
    "MSR-VTT": ("Find a video that contains the following visual content:", "video_id", "caption"),
    "MSVD": ("Find the video snippet that corresponds to the given summary:", "video_id", "caption"),
    "DiDeMo": ("Find a video that includes the following described scenes:", "video", "caption"),
    "VATEX": ("Select a video that fits the description provided:", "videoID", "enCap"),
    "YouCook2": ("Find a video that demonstrates the following action while making a recipe:", "id", "sentence"),
}


def _load_video_retrieval(task: MMEBV2Task, root: Path) -> TaskData:
    """A caption finds its video among every video of the task (the rows' videos, each once)."""
    instruction, name_column, caption_column = _VIDEO_RETRIEVAL[task.name]
    rows = _video_rows(task, root, (name_column, caption_column))
    frames = root / "video-tasks" / "frames" / "video_ret" / task.name
    candidates, queries, relevance = _Candidates(), [], []
    for name, caption in zip(rows[name_column], rows[caption_column]):
        name = Path(name).stem if name_column == "video" else str(name)  # DiDeMo names a file
        caption = caption[0] if isinstance(caption, list) else caption  # MSVD, VATEX: the first caption
        queries.append(_instructed(instruction, caption))
        video = candidates.add(name, _instructed("Understand the content of the provided video.",
                                                 video=str(frames / name)))
        relevance.append({video: 1.0})
    return TaskData(task, queries, candidates.inputs, None, relevance, candidates.keys)


def _load_ssv2(task: MMEBV2Task, root: Path) -> TaskData:
    """Something-Something V2: a video ranks its row's own class list (``neg_text``, the class ``pos_text`` in it)."""
    rows = _video_rows(task, root, ("video_id", "pos_text", "neg_text"))
    frames = root / "video-tasks" / "frames" / "video_cls" / "SSv2"
    instruction = "What actions or object interactions are being performed by the person in the video?"
    candidates, queries, lists, relevance = _Candidates(), [], [], []
    for video, label, classes in zip(rows["video_id"], rows["pos_text"], rows["neg_text"]):
        if label not in classes:
            raise ValueError(f"{task_folder(task, root)}: video {video!r} is of class {label!r}, which its candidate "
                             "list (neg_text) lacks; fix the row or drop it.")
        queries.append(_instructed(instruction, video=str(frames / str(video))))
        lists.append([candidates.add(c, {"text": c}) for c in classes])
        relevance.append({candidates.index[label]: 1.0})
    return TaskData(task, queries, candidates.inputs, lists, relevance, candidates.keys)


def _load_moment_retrieval(task: MMEBV2Task, root: Path) -> TaskData:
    """QVHighlight, Charades-STA: a sentence and its whole video rank the clips cut from that video, frames in
    ``video-tasks/frames/video_mret/<task>/<video>/{query,positive*,negative*}/``."""
    rows = _video_rows(task, root, ("query", "video_path"))
    frames = root / "video-tasks" / "frames" / "video_mret" / task.name.replace("-", "_")
    candidates, queries, lists, relevance = _Candidates(), [], [], []
    clip = _instructed("Understand the content of the provided video.")
    for sentence, video in zip(rows["query"], rows["video_path"]):
        folder = frames / Path(video).stem
        clips = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name != "query") if folder.is_dir() else []
        positive = [name for name in clips if name.startswith("positive")]
        if len(positive) != 1:
            raise ValueError(f"{folder}: a moment-retrieval video needs its clips as frame folders, exactly one named "
                             f"positive*, beside query/; found {clips}. Extract the frames as VLM2Vec's loader does.")
        queries.append(_instructed("Find the clip that corresponds to the described scene in the given video:",
                                   sentence, video=str(folder / "query")))
        lists.append([candidates.add(str(folder / name), {**clip, "video": str(folder / name)}) for name in clips])
        relevance.append({candidates.index[str(folder / positive[0])]: 1.0})
    return TaskData(task, queries, candidates.inputs, lists, relevance, candidates.keys)


def _load_momentseeker(task: MMEBV2Task, root: Path) -> TaskData:
    """MomentSeeker: a text, a text and an image (``input_frames`` a .jpg), or a text and a video segment (a .mp4)
    ranks its positive and negative clips; any positive is a hit. Frames in
    ``video-tasks/frames/video_mret/MomentSeeker/`` (``video_frames/<path with / as _>/``, ``query_<image>``)."""
    rows = _video_rows(task, root, ("query", "positive_frames", "negative_frames", "input_frames"))
    frames = root / "video-tasks" / "frames" / "video_mret" / task.name
    instructions = {"video": "Find the clip that corresponds to the given sentence and video segment:",
                    "image": "Select the video clip that aligns with the given text and image:",
                    "text": "Find the clip that corresponds to the given text:"}

    def clip_folder(path: str) -> str:
        return str(frames / "video_frames" / path.replace("/", "_").split(".mp4")[0])

    candidates, queries, lists, relevance = _Candidates(), [], [], []
    clip = _instructed("Understand the content of the provided video clip.")
    for sentence, positives, negatives, given in zip(rows["query"], rows["positive_frames"], rows["negative_frames"],
                                                     rows["input_frames"]):
        if not positives:
            raise ValueError(f"{task_folder(task, root)}: query {sentence!r} has no positive clip; fix the row or "
                             "drop it.")
        if given and given.endswith(".mp4"):
            queries.append(_instructed(instructions["video"], sentence, video=clip_folder(given)))
        elif given and given.endswith(".jpg"):
            queries.append(_instructed(instructions["image"], sentence, image=str(frames / f"query_{given}")))
        else:
            queries.append(_instructed(instructions["text"], sentence))
        names = [clip_folder(entry["output_path"]) for entry in [*positives, *negatives]]
        lists.append([candidates.add(name, {**clip, "video": name}) for name in names])
        relevance.append(dict.fromkeys(lists[-1][: len(positives)], 1.0))
    return TaskData(task, queries, candidates.inputs, lists, relevance, candidates.keys)


_VIDEO_QA_PROMPT = ("Given a video and a question, select the most accurate answer from the provided candidates. "
                    "Return only the exact text of your chosen answer. Question:")


def _strip_letter(option: str) -> str:
    """"A. a dog" -> "a dog": the text VLM2Vec embeds for a lettered option (its name stays whole)."""
    return option[option.find(". "):].strip(". ")


def _video_qa_rows(task: MMEBV2Task, root: Path):
    """Per question, as VLM2Vec's parser of the task builds it: (video folder name, question text, option names,
    option texts, the answer's position among the options as given)."""
    if task.name == "Video-MME":
        rows = _video_rows(task, root, ("question", "videoID", "options", "answer"))
        for question, video, options, answer in zip(rows["question"], rows["videoID"], rows["options"],
                                                    rows["answer"]):
            position = "ABCD".find(answer) if len(answer) == 1 else -1
            yield str(video), question + "\n" + "\n".join(options), options, [_strip_letter(o) for o in options], \
                position, answer
    elif task.name == "ActivityNetQA":
        rows = _video_rows(task, root, ("video_name", "question", "answer"))
        for video, question, answer in zip(rows["video_name"], rows["question"], rows["answer"]):
            options = ["yes", "no"]
            yield f"v_{video}", question + "? (A) yes; (B) no.", options, options, \
                options.index(answer) if answer in options else -1, answer
    elif task.name == "NExTQA":  # the options are listed in the query, and embedded as given
        columns = [f"a{i}" for i in range(5)]
        rows = _video_rows(task, root, ("video", "question", "answer", *columns))
        for row in rows:
            options = [row[c] for c in columns]
            yield str(row["video"]), _lettered(row["question"], options)[0], options, options, int(row["answer"]), \
                row["answer"]
    elif task.name == "MVBench":
        yield from _mvbench_rows(task, root)
    else:  # EgoSchema: the options follow the question without a separator, as in VLM2Vec's query
        rows = _video_rows(task, root, ("video_idx", "question", "answer", "option"))
        for video, question, answer, options in zip(rows["video_idx"], rows["question"], rows["answer"],
                                                    rows["option"]):
            yield str(video), question + " ".join(options), options, [_strip_letter(o) for o in options], \
                int(answer), answer


# MVBench's 20 subsets, in the order VLM2Vec concatenates them (mvbench_dataset.subset_meta)
_MVBENCH_SUBSETS = (
    "episodic_reasoning", "action_sequence", "action_prediction", "action_antonym", "fine_grained_action",
    "unexpected_action", "object_existence", "object_interaction", "object_shuffle", "moving_direction",
    "action_localization", "scene_transition", "action_count", "moving_count", "moving_attribute", "state_change",
    "fine_grained_pose", "character_order", "egocentric_navigation", "counterfactual_inference",
)


def _lettered(question: str, options: Sequence[str]) -> tuple[str, list[str]]:
    """VLM2Vec's qa_template: the question followed by its options as "(A) ...", and those lettered options."""
    lettered = [f"({chr(ord('A') + i)}) {o}" for i, o in enumerate(options)]
    return f"{question}\nOptions:\n" + "\n".join(lettered), lettered


def _mvbench_rows(task: MMEBV2Task, root: Path):
    for subset in _MVBENCH_SUBSETS:
        folder = task_folder(task, root) / subset
        rows = _read_parquet(folder, task.split, task)
        _check_columns(rows, ("question", "video", "candidates", "answer"), str(folder))
        for question, video, options, answer in zip(rows["question"], rows["video"], rows["candidates"],
                                                    rows["answer"]):
            query, lettered = _lettered(question, options)
            yield f"{subset}/{video}", query, lettered, lettered, options.index(answer) if answer in options else -1, \
                answer


def _load_video_qa(task: MMEBV2Task, root: Path) -> TaskData:
    """Video QA (Video-MME, ActivityNetQA, NExTQA, EgoSchema, MVBench): a question about a video ranks its answer
    options, named as VLM2Vec names them."""
    frames = root / "video-tasks" / "frames" / "video_qa" / task.name
    candidates, queries, lists, relevance = _Candidates(), [], [], []
    for video, question, names, texts, position, answer in _video_qa_rows(task, root):
        if not 0 <= position < len(names):
            raise ValueError(
                f"{task_folder(task, root)}: question {question.splitlines()[0]!r} has answer {answer!r}, which names "
                f"none of its {len(names)} options; fix the row or drop it."
            )
        queries.append(_instructed(_VIDEO_QA_PROMPT, question, video=str(frames / video)))
        lists.append([candidates.add(name, {"text": text}) for name, text in zip(names, texts)])
        relevance.append({lists[-1][position]: 1.0})
    return TaskData(task, queries, candidates.inputs, lists, relevance, candidates.keys)


_LOADERS = {
    "image": _load_image_task,
    "visdoc": _load_visdoc_task,
    "video_classification": _load_video_classification,
    **{parser: _load_video_retrieval for parser in ("msrvtt", "msvd", "didemo", "vatex", "youcook2")},
    **{parser: _load_video_qa for parser in ("videomme", "activitynetqa", "nextqa", "egoschema", "mvbench")},
    "ssv2": _load_ssv2,
    "moment_retrieval": _load_moment_retrieval,
    "momentseeker": _load_momentseeker,
}


def _reader(task: MMEBV2Task):
    return _LOADERS.get(task.category if task.category != "video" else task.parser)


def task_folder(task: MMEBV2Task, data_root: str | os.PathLike) -> Path:
    """Where the released layout keeps ``task``'s annotations under ``data_root``."""
    return Path(data_root) / f"{task.category}-tasks" / task.local_dir


def _unavailable(tasks: Sequence[MMEBV2Task], data_root) -> dict[str, str]:
    """Task name -> why it cannot be evaluated here (no reader yet, or its folder is absent)."""
    out = {}
    for task in tasks:
        if _reader(task) is None:
            out[task.name] = f"no reader for VLM2Vec's {task.parser!r} parser yet"
        elif not task_folder(task, data_root).is_dir():
            out[task.name] = f"{task_folder(task, data_root)} is absent"
    return out


def read_class_labels(class_labels: Mapping[str, Sequence[str]] | str | os.PathLike | None) -> dict[str, list[str]]:
    """Video classification class lists by task: a mapping, or a JSON file of one, keyed by task name (``K700``) or
    dataset folder (``Kinetics-700``, as VLM2Vec's ``VIDEOCLS_LABEL_MAPPING``); other keys are ignored."""
    if class_labels is None:
        return {}
    form = 'a JSON object of task -> list of class names, e.g. {"HMDB51": ["ride_bike", ...]}'
    if isinstance(class_labels, (str, os.PathLike)):
        path = Path(class_labels)
        try:
            class_labels = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"The class list file {path} could not be read as JSON ({err}): write {form}.") from err
    if not isinstance(class_labels, Mapping):
        raise ValueError(f"class_labels must be {form} (or its file), not a {type(class_labels).__name__}.")
    out = {}
    for task in MMEB_V2_TASKS.values():
        if not task.num_classes:
            continue
        given = [class_labels[name] for name in dict.fromkeys((task.name, task.local_dir)) if name in class_labels]
        if len(given) > 1 and given[0] != given[1]:
            raise ValueError(f"class_labels gives {task.name} two different lists ({task.name!r} and "
                             f"{task.local_dir!r}): keep one.")
        if given:
            labels = given[0]
            if not isinstance(labels, (list, tuple)) or not all(isinstance(x, str) and x for x in labels):
                raise ValueError(f"The class list of {task.name} must be a list of non-empty class names; got "
                                 f"{type(labels).__name__}.")
            out[task.name] = list(labels)
    return out


def load_task(
    task: MMEBV2Task | str,
    data_root: str | os.PathLike,
    *,
    max_queries: int | None = None,
    class_labels: Sequence[str] | None = None,
) -> TaskData:
    """Read one task from the released layout under ``data_root`` (see the module docstring). ``class_labels``: a
    video classification task's full class list (its candidates; without it, the classes its test rows hold)."""
    task = MMEB_V2_TASKS[task] if isinstance(task, str) else task
    loader = _reader(task)
    if loader is None:
        raise NotImplementedError(
            f"MMEB-V2 task {task.name} (VLM2Vec parser {task.parser!r}) has no reader in this library yet; evaluate "
            "the other tasks (e.g. --tasks image,visdoc,HMDB51) or add its reader to mm_embed_trl.evaluation.mmeb_v2."
        )
    data = loader(task, Path(data_root), class_labels) if task.num_classes else loader(task, Path(data_root))
    if task.sample is not None:
        max_queries = task.sample if max_queries is None else min(max_queries, task.sample)
    if max_queries is not None:
        data.queries, data.relevance = data.queries[:max_queries], data.relevance[:max_queries]
        if data.candidate_lists is not None:
            data.candidate_lists = data.candidate_lists[:max_queries]
    return data


# ------------------------------------------------------------------------------------------------ embedding, cached
def _barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def _fingerprint(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def _input_key(value: dict[str, Any]) -> Any:
    from ..data.images import image_identity

    return {k: image_identity(v) if k == "image" else v for k, v in sorted(value.items())}


def _embed(model, inputs, *, side, modes, folder: Path, block_size, batch_size, show_progress_bar,
           encode_kwargs, seed: int | None = None) -> dict[str, Tensor]:
    """``{mode: (N, D)}`` embeddings of ``inputs``: blocks found in ``folder`` are read, the others encoded (each rank
    every ``world``-th block) and written there (through a staging name, so a block file is whole or absent).
    ``seed``: sampling draws block ``b`` from ``seed + b``, so samples do not depend on ranks or on resuming."""
    rank, world = process_rank(), world_size()
    folder.mkdir(parents=True, exist_ok=True)
    blocks = range(0, len(inputs), block_size)
    mode = "both" if len(modes) > 1 else _ENCODE_MODES[modes[0]]
    for number, start in enumerate(blocks):
        final = folder / f"block-{number:05d}.pt"
        if number % world != rank or final.exists():
            continue
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            if seed is not None:
                torch.manual_seed(seed + number)
            out = _encode(model, inputs[start:start + block_size], side=side, mode=mode, batch_size=batch_size,
                          show_progress_bar=show_progress_bar, **encode_kwargs)
        named = out if isinstance(out, Mapping) else {_ENCODE_MODES[modes[0]]: out}
        with staged_file(final) as staging:
            torch.save({key: torch.as_tensor(value).float().cpu() for key, value in named.items()}, staging)
    _barrier()
    parts = [torch.load(folder / f"block-{number:05d}.pt") for number in range(len(blocks))]
    return {m: F.normalize(torch.cat([p[_ENCODE_MODES[m]] for p in parts]), dim=-1) for m in modes}


_ENCODE_MODES = {"disc": "discriminative", "gen": "generative"}


def instruction_in_system(model) -> bool:
    """Whether the model's prompt template makes a task instruction the system message (GME, Qwen3-VL-Embedding), as
    ``encode(instruction=...)`` does, rather than the text's prefix (VLM2Vec, UniME, UME-R1)."""
    from ..data.templates import get_template

    name = getattr(getattr(model, "config", None), "prompt_template", None)
    return isinstance(name, str) and get_template(name).instruction_in_system


def _for_model(inputs: Sequence[dict[str, Any]], in_system: bool) -> list[dict[str, Any]]:
    """The harness's inputs as this model takes them: the instruction apart (system-message templates; its text
    cleaned as VLM2Vec cleans it), or before the text as VLM2Vec writes it."""
    if not in_system:
        return [with_instruction_in_text(x) for x in inputs]
    return [{**x, "text": _text(x["text"])} if "instruction" in x else x for x in inputs]


def _encode(model, inputs: Sequence[dict[str, Any]], **kwargs):
    """``model.encode`` of the inputs; inputs that carry an ``instruction`` are encoded per instruction, with it as
    encode's ``instruction`` (the system message), and put back in order."""
    if not any("instruction" in x for x in inputs):
        return model.encode(list(inputs), **kwargs)
    groups: dict[str | None, list[int]] = {}
    for i, x in enumerate(inputs):
        groups.setdefault(x.get("instruction"), []).append(i)
    result: dict[str, Tensor] = {}
    for instruction, rows in groups.items():
        bare = [{k: v for k, v in inputs[i].items() if k != "instruction"} for i in rows]
        out = model.encode(bare, instruction=instruction, **kwargs)
        for name, value in (out.items() if isinstance(out, Mapping) else [("", out)]):
            value = torch.as_tensor(value)
            if name not in result:
                result[name] = value.new_empty((len(inputs), *value.shape[1:]))
            result[name][torch.tensor(rows)] = value
    return result if set(result) != {""} else result[""]


# ------------------------------------------------------------------------------------------------ scoring
def task_scores(data: TaskData, query_emb: Tensor, candidate_emb: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Per query, the task's metric (Hit@1 or NDCG@5 with linear gain) of its ranking of its candidates (its own
    list, or all of them), ranked by cosine similarity, ties by list order."""
    k = int(data.task.metric.split("@")[1])
    num_queries, num_candidates = len(data.queries), len(data.candidates)
    # judgments as coordinates (query, candidate, gain), and the candidate lists as a padded index matrix
    counts = torch.tensor([len(judged) for judged in data.relevance])
    judged_query = torch.repeat_interleave(torch.arange(num_queries), counts)
    judged_candidate = torch.tensor([c for judged in data.relevance for c in judged], dtype=torch.long)
    judged_gain = torch.tensor([g for judged in data.relevance for g in judged.values()], dtype=torch.float64)
    if data.candidate_lists is not None:
        lengths = torch.tensor([len(c) for c in data.candidate_lists])
        valid = torch.arange(int(lengths.max())) < lengths[:, None]
        index = torch.zeros(valid.shape, dtype=torch.long)
        index[valid] = torch.tensor([c for cands in data.candidate_lists for c in cands], dtype=torch.long)
    out = []
    for start in range(0, num_queries, chunk_size):
        end = min(start + chunk_size, num_queries)
        in_chunk = (judged_query >= start) & (judged_query < end)
        gains = torch.zeros(end - start, num_candidates, dtype=torch.float64)
        gains[judged_query[in_chunk] - start, judged_candidate[in_chunk]] = judged_gain[in_chunk]
        if data.candidate_lists is None:
            scores = query_emb[start:end] @ candidate_emb.T
        else:
            rows = index[start:end]
            scores = torch.einsum("qd,qcd->qc", query_emb[start:end], candidate_emb[rows])
            scores = scores.masked_fill(~valid[start:end], float("-inf"))
            gains = gains.gather(1, rows)
        out.append(graded_ranking_metrics(scores, gains, k_values=(k,))[data.task.metric])
    return torch.cat(out)


@dataclasses.dataclass
class MMEBV2Results:
    """Per mode (``"disc"``, ``"gen"``, ``"oracle"``), per task, the score in [0, 1]; :meth:`table` lays them out as
    the papers do."""

    scores: dict[str, dict[str, float]]
    data_version: str = MMEB_V2_DATA_VERSION
    model_id: str = ""
    # task -> why it ranked fewer candidates than VLM2Vec does (its score is not comparable: it can only be higher)
    fewer_candidates: dict[str, str] = dataclasses.field(default_factory=dict)

    def table(self) -> str:
        return format_table(self.scores)

    def caveats(self) -> str:
        """What makes scores not comparable with VLM2Vec's ("" when nothing does)."""
        if not self.fewer_candidates:
            return ""
        listed = "; ".join(f"{name}: {why}" for name, why in self.fewer_candidates.items())
        return (f"Ranked against fewer candidates than VLM2Vec ranks, so not comparable (higher or equal): {listed}. "
                "Give the datasets' class lists (class_labels, --class_labels).")

    def to_json(self) -> str:
        summary = {mode: _summary(per_task) for mode, per_task in self.scores.items()}
        return json.dumps({"data_version": self.data_version, "model": self.model_id, "scores": self.scores,
                           "summary": summary, "fewer_candidates": self.fewer_candidates}, indent=2)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _summary(per_task: Mapping[str, float]) -> dict[str, float | None]:
    """Per category and sub-column, the mean over its evaluated tasks; ``All``: the mean over every evaluated task."""
    out: dict[str, float | None] = {}
    for category, groups in MMEB_V2_CATEGORIES.items():
        tasks = [t for t in MMEB_V2_TASKS.values() if t.category == category and t.name in per_task]
        for group in groups:
            out[f"{category}/{group}"] = _mean([per_task[t.name] for t in tasks if t.group == group])
        out[f"{category}/Overall"] = _mean([per_task[t.name] for t in tasks])
    out["All"] = _mean(list(per_task.values()))
    return out


def format_table(scores: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table in the papers' layout: one row per mode, the sub-columns and overall of each category and
    All, in percent ("-" where no task of a column was evaluated)."""
    columns = [f"{c}/{g}" for c, groups in MMEB_V2_CATEGORIES.items() for g in (*groups, "Overall")] + ["All"]
    counts = {col: 0 for col in columns}
    for task in MMEB_V2_TASKS.values():
        if any(task.name in per_task for per_task in scores.values()):
            counts[f"{task.category}/{task.group}"] += 1
            counts[f"{task.category}/Overall"] += 1
            counts["All"] += 1
    header = ["Mode"] + [f"{col.replace('/', ' ')} ({counts[col]})" for col in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mode, per_task in scores.items():
        summary = _summary(per_task)
        cells = ["-" if summary[col] is None else f"{100 * summary[col]:.1f}" for col in columns]
        lines.append("| " + " | ".join([mode, *cells]) + " |")
    return "\n".join(lines)


def _model_modes(model, modes: Sequence[str] | None) -> tuple[str, ...]:
    generative = getattr(getattr(model, "config", None), "generative_pooling_token", None) is not None
    if modes is None:
        return ("disc", "gen") if generative else ("disc",)
    unknown = [m for m in modes if m not in _ENCODE_MODES]
    if unknown:
        raise ValueError(f"modes {unknown} are not among {sorted(_ENCODE_MODES)} (oracle is derived from both).")
    if "gen" in modes and not generative:
        raise ValueError("mode 'gen' needs a UME-R1 model (config.generative_pooling_token set); use modes=('disc',).")
    return tuple(dict.fromkeys(modes))


def _model_id(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


def evaluate_mmeb_v2(
    model,
    data_root: str | os.PathLike,
    tasks: str | Iterable[str] = "all",
    *,
    modes: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    model_id: str | None = None,
    batch_size: int = 16,
    block_size: int = 256,
    max_queries: int | None = None,
    show_progress_bar: bool | None = None,
    encode_kwargs: Mapping[str, Any] | None = None,
    skip_missing: bool = False,
    pass_at_k: int | None = None,
    sampling_kwargs: Mapping[str, Any] | None = None,
    class_labels: Mapping[str, Sequence[str]] | str | os.PathLike | None = None,
) -> MMEBV2Results:
    """Evaluate ``model`` (anything with this library's ``encode``) on the selected MMEB-V2 tasks.

    ``modes``: ``("disc",)``, ``("gen",)`` or both (the default for UME-R1 models, which adds ``oracle``: per query
    the better of the two, an upper bound as UME-R1 reports it). ``cache_dir``: where embeddings are kept between runs
    (default ``~/.cache/mm_embed_trl/mmeb_v2``), keyed by ``model_id`` (default: the model's path; give one per
    checkpoint when a path is reused) and the data version. ``encode_kwargs`` go to ``model.encode`` (e.g.
    ``max_new_tokens`` of the generative mode) and into the cache key. Every rank of a ``torch.distributed`` job
    calls this; each returns the same results. A selected task without data under ``data_root`` (or without a
    reader yet) stops the run before anything is encoded, unless ``skip_missing`` (then it is left out, with a
    warning, and the table's task counts show it). ``pass_at_k=k`` (UME-R1 models) adds ``pass@k``: each query's
    reasoning sampled k times (``sampling_kwargs``: temperature, top_p, ... for ``encode``; each block seeded from
    the cache key), per query the best of the k against the greedy generative candidates. ``class_labels``: the
    video classification datasets' class lists (see :func:`read_class_labels`), which VLM2Vec ranks every video
    against; without them a task ranks the classes its test rows hold, which the results flag (``fewer_candidates``).
    """
    from tqdm.auto import tqdm

    from .._cache import cache_root

    modes = _model_modes(model, modes)
    if pass_at_k is not None and ("gen" not in modes or pass_at_k < 1):
        raise ValueError(f"pass_at_k={pass_at_k} needs the generative mode (a UME-R1 model, 'gen' in modes), k >= 1.")
    encode_kwargs = dict(encode_kwargs or {})
    model_id = model_id or _model_id(model)
    cache = Path(cache_dir) if cache_dir is not None else cache_root("mmeb_v2")
    selected = select_tasks(tasks)
    unavailable = _unavailable(selected, data_root)
    if unavailable and not skip_missing:
        listed = "; ".join(f"{name}: {why}" for name, why in list(unavailable.items())[:5])
        raise FileNotFoundError(
            f"{len(unavailable)} of the {len(selected)} selected MMEB-V2 tasks cannot be evaluated ({listed}"
            f"{'; ...' if len(unavailable) > 5 else ''}). Download their data into {data_root} in the released layout, "
            "select fewer tasks, or pass skip_missing=True (--skip_missing) to evaluate the others."
        )
    if unavailable:
        logger.warning("MMEB-V2: skipping %d tasks without data or reader: %s", len(unavailable),
                       ", ".join(unavailable))
        selected = [task for task in selected if task.name not in unavailable]
    rank = process_rank()
    scores: dict[str, dict[str, float]] = {m: {} for m in modes}
    if len(modes) > 1:
        scores["oracle"] = {}
    if pass_at_k is not None:
        scores[f"pass@{pass_at_k}"] = {}
    in_system = instruction_in_system(model)
    labels_by_task = read_class_labels(class_labels)
    fewer_candidates = {}
    for task in tqdm(selected, desc="MMEB-V2 tasks", disable=rank > 0 or show_progress_bar is False):
        data = load_task(task, data_root, max_queries=max_queries, class_labels=labels_by_task.get(task.name))
        if data.fewer_candidates:
            fewer_candidates[task.name] = data.fewer_candidates
            if rank == 0:
                logger.warning("MMEB-V2 %s ranks %s; VLM2Vec ranks all, so its Hit@1 is not comparable (higher or "
                               "equal). Give the class list: class_labels / --class_labels.", task.name,
                               data.fewer_candidates)
        queries, candidates = _for_model(data.queries, in_system), _for_model(data.candidates, in_system)
        embedded = {}
        for side, inputs, encode_side in (("queries", queries, "query"), ("candidates", candidates, "document")):
            key = _fingerprint(model_id, MMEB_V2_DATA_VERSION, task.name, side, modes, block_size, encode_kwargs,
                               [_input_key(x) for x in inputs])
            embedded[side] = _embed(model, inputs, side=encode_side, modes=modes,
                                    folder=cache / task.name / f"{side}-{key}", block_size=block_size,
                                    batch_size=batch_size, show_progress_bar=show_progress_bar,
                                    encode_kwargs=encode_kwargs)
        per_mode = {m: task_scores(data, embedded["queries"][m], embedded["candidates"][m]) for m in modes}
        for m, values in per_mode.items():
            scores[m][task.name] = float(values.mean())
        if len(modes) > 1:
            scores["oracle"][task.name] = float(torch.stack(list(per_mode.values())).amax(dim=0).mean())
        if pass_at_k is not None:
            sampled = {**encode_kwargs, **(sampling_kwargs or {}), "do_sample": True, "num_samples": pass_at_k}
            key = _fingerprint(model_id, MMEB_V2_DATA_VERSION, task.name, "sampled", block_size, sampled,
                               [_input_key(x) for x in queries])
            samples = _embed(model, queries, side="query", modes=("gen",),
                             folder=cache / task.name / f"sampled-{key}", block_size=block_size,
                             batch_size=batch_size, show_progress_bar=show_progress_bar, encode_kwargs=sampled,
                             seed=int(key[:8], 16))["gen"]  # (queries, k, dim)
            per_sample = [task_scores(data, samples[:, j], embedded["candidates"]["gen"]) for j in range(pass_at_k)]
            scores[f"pass@{pass_at_k}"][task.name] = float(torch.stack(per_sample).amax(dim=0).mean())
        logger.info("%s (%s): %s", task.name, task.metric,
                    ", ".join(f"{m} {s[task.name]:.4f}" for m, s in scores.items()))
    return MMEBV2Results(scores, model_id=model_id, fewer_candidates=fewer_candidates)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: Sequence[str] | None = None) -> MMEBV2Results | None:
    """``python -m mm_embed_trl.evaluation.mmeb_v2 --model PATH --data_root DIR [--tasks all|image|video|visdoc|
    NAMES] [--output_dir DIR]`` (``--list``: the tasks); under ``torchrun`` the ranks share the encoding. Prints the
    table and writes ``mmeb_v2.json`` and ``mmeb_v2.md`` to ``--output_dir``."""
    import argparse

    from .._files import write_text_atomic
    from ..modeling import MultimodalEmbeddingModel

    parser = argparse.ArgumentParser(prog="python -m mm_embed_trl.evaluation.mmeb_v2", description=main.__doc__)
    parser.add_argument("--model", help="a saved model folder or a published model's id")
    parser.add_argument("--data_root", help="the folder of image-tasks/, video-tasks/, visdoc-tasks/")
    parser.add_argument("--list", action="store_true", help="list the tasks (name, category, column, metric, source)")
    parser.add_argument("--tasks", default="all", help="'all', a category, task names, or a comma-separated mix")
    parser.add_argument("--modes", default=None, help="comma-separated: disc, gen (default: both for UME-R1 models)")
    parser.add_argument("--output_dir", default="mmeb_v2_results")
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--model_id", default=None, help="the cache key of this model (default: --model)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--block_size", type=int, default=256, help="inputs per cached block")
    parser.add_argument("--max_queries", type=int, default=None, help="the first N queries of each task")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="generative mode: reasoning length")
    parser.add_argument("--skip_missing", action="store_true", help="leave out tasks without data (or reader)")
    parser.add_argument("--pass_at_k", type=int, default=None, help="UME-R1 models: also pass@k of sampled reasoning")
    parser.add_argument("--temperature", type=float, default=1.0, help="pass@k: sampling temperature")
    parser.add_argument("--class_labels", default=None,
                        help="a JSON file: video classification task -> its dataset's class names (VLM2Vec ranks "
                             "every class; without it the classes of the test rows)")
    args = parser.parse_args(argv)
    if args.list:
        for task in MMEB_V2_TASKS.values():
            print(f"{task.name}\t{task.category}\t{task.group}\t{task.metric}\t{'/'.join(map(str, task.source))}")
        return None
    if not args.model or not args.data_root:
        parser.error("--model and --data_root are required (or --list)")

    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = process_rank()
    model = MultimodalEmbeddingModel.from_pretrained(args.model)
    if torch.cuda.is_available():
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    results = evaluate_mmeb_v2(
        model, args.data_root, args.tasks, modes=args.modes.split(",") if args.modes else None,
        cache_dir=args.cache_dir, model_id=args.model_id or args.model, batch_size=args.batch_size,
        block_size=args.block_size, max_queries=args.max_queries,
        encode_kwargs={"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else None,
        skip_missing=args.skip_missing, pass_at_k=args.pass_at_k, sampling_kwargs={"temperature": args.temperature},
        class_labels=args.class_labels,
    )
    if rank == 0:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "mmeb_v2.json", results.to_json())
        caveats = f"\n{results.caveats()}\n" if results.caveats() else ""
        write_text_atomic(out / "mmeb_v2.md", f"MMEB-V2 ({MMEB_V2_DATA_VERSION}), {results.model_id}\n\n"
                          f"{results.table()}\n{caveats}")
        print(results.table() + caveats)
    return results


if __name__ == "__main__":
    main()
