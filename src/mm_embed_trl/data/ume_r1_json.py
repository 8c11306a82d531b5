"""UME-R1's released SFT / RL annotation files (``UME-sft-train.json``) read into this library's schema.

Its own module so that ``data.loading`` can read such a file without importing the reasoning collator (which imports
the row checks, which import ``data.loading``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .schema import (
    NEG_IMAGE,
    NEG_TEXT,
    POS_IMAGE,
    POS_REASONING,
    POS_TEXT,
    POS_VIDEO,
    QUERY_IMAGE,
    QUERY_REASONING,
    QUERY_TEXT,
    QUERY_VIDEO,
)
from .templates import DISC_EMB_TOKEN

__all__ = ["load_ume_r1_sft_json"]


def _ume_r1_side(side, record, where: str, placeholder_images: Sequence[str]):
    """(text, image paths (a list, placeholders left out), video ("" , a path or a list of frames), reasoning target
    or None) of one side of a UME-R1 record; paths join the record's ``data_path``."""
    if not isinstance(side, Mapping) or "conversations" not in side:
        raise ValueError(f"{where}: expected {{'conversations': [...], 'image': ...}}, got {side!r:.120}.")
    turns = {turn.get("from", turn.get("role")): turn.get("value", turn.get("content")) for turn in
             side["conversations"]}
    user, target = turns.get("human", turns.get("user")), turns.get("gpt", turns.get("assistant"))
    if not isinstance(user, str):
        raise ValueError(f"{where}: needs a human turn, got {sorted(turns)}.")
    text = user.split(DISC_EMB_TOKEN)[0].rstrip("\n")
    root = record.get("data_path")
    images = side.get("image") or []
    images = [
        os.path.join(root, image) if root else image
        for image in (images if isinstance(images, list) else [images])
        if image and Path(image).name not in placeholder_images
    ]
    video = side.get("video") or ""
    if isinstance(video, list):
        video = [os.path.join(root, frame) if root else frame for frame in video]
    elif video and root:
        video = os.path.join(root, video)
    return text, images, video, target if isinstance(target, str) else None


def load_ume_r1_sft_json(
    path: str | os.PathLike,
    *,
    placeholder_images: Sequence[str] = ("blank.jpg",),
):
    """Rows in this library's schema from UME-R1's SFT annotation file (``UME-sft-train.json``).

    That file holds a list of ``{"qry": side, "pos": side, "data_path": image folder?}`` records, each side
    ``{"conversations": [{"from": "human", "value": "<image>...\\n{text}\\n<disc_emb>\\n{instruction}"},
    {"from": "gpt", "value": "<think>...</think><answer>...<gen_emb>"}], "image": path (optional)}``. The user turn
    is cut at its ``<disc_emb>`` (the ``ume_r1`` prompt template adds it and the instruction back), ``<image>``
    placeholders are removed by the template, the gpt turn becomes the side's reasoning target as it is, and image
    paths join ``data_path`` when the record has one. A record's optional ``"neg"`` list of sides (what
    ``mm_embed_trl.mining`` writes; a gpt turn is optional there) becomes ``neg_text`` / ``neg_image_path``. Text-only
    sides carry a blank placeholder image in UME-R1
    (``images/blank.jpg``, 28x28 white): a path whose file name is in ``placeholder_images`` becomes "no image",
    and the ``ume_r1_blank_image`` template (the SFT default) gives such sides that same image back. A side's
    ``video`` (a file, a frame folder or a list of frames) goes to ``qry_video_path`` / ``pos_video_path``, and a
    list of several images stays a list (several images of one side).
    """
    import datasets

    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path}: expected a non-empty JSON list of {{'qry': ..., 'pos': ...}} records.")
    columns: dict[str, list] = {c: [] for c in (QUERY_TEXT, QUERY_IMAGE, QUERY_REASONING, QUERY_VIDEO, POS_TEXT,
                                                POS_IMAGE, POS_REASONING, POS_VIDEO)}
    names = {"qry": (QUERY_TEXT, QUERY_IMAGE, QUERY_REASONING, QUERY_VIDEO),
             "pos": (POS_TEXT, POS_IMAGE, POS_REASONING, POS_VIDEO)}
    with_negatives = any(isinstance(r, Mapping) and "neg" in r for r in records)
    if with_negatives:
        columns[NEG_TEXT], columns[NEG_IMAGE] = [], []
    for index, record in enumerate(records):
        for key, (text_col, image_col, target_col, video_col) in names.items():
            where = f"{path}: record {index}, side {key!r}"
            side = record.get(key) if isinstance(record, Mapping) else None
            text, images, video, target = _ume_r1_side(side, record, where, placeholder_images)
            if not isinstance(target, str):
                raise ValueError(f"{where}: needs a human and a gpt turn.")
            columns[text_col].append(text)
            columns[image_col].append(images)
            columns[video_col].append(video)
            columns[target_col].append(target)
        if with_negatives:  # mined negatives (mm_embed_trl.mining): sides without a reasoning target
            texts, images = [], []
            for j, side in enumerate(record.get("neg") or []):
                where = f"{path}: record {index}, negative {j}"
                text, side_images, video, _ = _ume_r1_side(side, record, where, placeholder_images)
                if video or len(side_images) > 1:
                    raise ValueError(f"{where}: a negative holds one image at most and no video (neg_image_path).")
                texts.append(text)
                images.append(side_images[0] if side_images else "")
            columns[NEG_TEXT].append(texts)
            columns[NEG_IMAGE].append(images)
    if not any(columns[QUERY_VIDEO] + columns[POS_VIDEO]):
        del columns[QUERY_VIDEO], columns[POS_VIDEO]
    for video_col in (QUERY_VIDEO, POS_VIDEO):  # one Arrow type per column: frame lists, or paths
        values = columns.get(video_col, [])
        lists = [i for i, v in enumerate(values) if isinstance(v, list)]
        paths = [i for i, v in enumerate(values) if isinstance(v, str) and v]
        if lists and paths:
            raise ValueError(
                f"{path}: {video_col!r} holds a list of frames (record {lists[0]}) and a video path (record "
                f"{paths[0]}); one file must use one form. Split the file by form, or turn the frame lists into "
                "frame folders."
            )
        if lists:
            columns[video_col] = [v if isinstance(v, list) else [] for v in values]
    for image_col in (QUERY_IMAGE, POS_IMAGE):  # one image per side everywhere: plain values, as before
        if all(len(images) <= 1 for images in columns[image_col]):
            columns[image_col] = [images[0] if images else "" for images in columns[image_col]]
    return datasets.Dataset.from_dict(columns)
