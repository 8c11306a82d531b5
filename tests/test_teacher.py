"""Offline teacher embeddings: values equal the teacher's own encode, caching, resume after interruption, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from numerics import assert_close, rounding_rtol

from mm_embed_trl import teacher as teacher_mod
from mm_embed_trl.teacher import default_teacher_path, embed_with_teacher, teacher_fingerprint


class FakeTeacher:
    """A deterministic stand-in teacher that records what it embeds and can crash on a chosen call."""

    def __init__(self, dim: int = 6, crash_on_call: int | None = None):
        self.dim, self.crash_on_call = dim, crash_on_call
        self.calls: list[list[str]] = []

    def get_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, *, batch_size, convert_to_numpy, show_progress_bar, normalize_embeddings):
        self.calls.append(list(texts))
        if self.crash_on_call is not None and len(self.calls) == self.crash_on_call:
            raise KeyboardInterrupt("simulated interruption")
        # a pure function of each text: (length, spaces, first/last char codes, digit sum, 1, 1, ...)
        feats = [[len(t), t.count(" "), ord(t[0]), ord(t[-1]), sum(int(c) for c in t if c.isdigit())] for t in texts]
        out = np.array([(f + [1] * self.dim)[: self.dim] for f in feats], dtype=float)
        if normalize_embeddings:
            out = out / np.linalg.norm(out, axis=1, keepdims=True)
        return out


def _fake_loader(monkeypatch, fake):
    loads = []

    def load(spec, device=None, **kwargs):
        loads.append(spec)
        return fake

    monkeypatch.setattr(teacher_mod, "load_teacher", load)
    return loads


def _texts(n):
    return [f"sentence number {i} about a {'red' if i % 2 else 'blue'} circle" for i in range(n)]


def test_default_teacher_is_the_packaged_minilm():
    path = Path(default_teacher_path())
    assert (path / "modules.json").is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "bert"


def test_values_equal_the_teacher_encode_in_dataset_order(tmp_path):
    """Real MiniLM teacher: the stored vectors are exactly SentenceTransformer.encode's, row for row, even on a
    shuffled dataset and across shard boundaries; other columns are untouched."""
    from sentence_transformers import SentenceTransformer

    ds = datasets.Dataset.from_dict({"text": _texts(23), "id": list(range(23))}).shuffle(seed=3)
    out = embed_with_teacher(ds, text_column="text", batch_size=8, shard_size=10, cache_dir=tmp_path)
    assert out.column_names == ["text", "id", "teacher_embedding"]
    assert out["id"][:] == ds["id"][:] and out["text"][:] == ds["text"][:]
    assert out.features["teacher_embedding"] == datasets.List(datasets.Value("float32"), length=384)
    model = SentenceTransformer(default_teacher_path(), local_files_only=True)
    reference = model.encode(ds["text"][:])
    reference = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    # MiniLM (6 layers of width 384, MLP 1536) in other batches than the reference's: rounding only
    minilm = rounding_rtol(terms=1536, depth=6 * 8 + 2)
    assert_close(torch.as_tensor(np.asarray(out["teacher_embedding"][:])), torch.as_tensor(reference), rtol=minilm)
    # an already loaded teacher works the same (and is left loaded for its owner)
    from_instance = embed_with_teacher(ds, model, batch_size=8, cache_dir=tmp_path / "instance")
    stored = torch.as_tensor(np.asarray(from_instance["teacher_embedding"][:]))
    assert_close(stored, torch.as_tensor(reference), rtol=minilm)


def test_rerun_is_free_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    ds = datasets.Dataset.from_dict({"text": _texts(25)})
    kwargs = dict(teacher="org/some-teacher", batch_size=5, shard_size=10, cache_dir=tmp_path)

    # 1st run dies in the 3rd encode call = the 2nd shard's first batch: shard 1 (rows 0-9) is complete on disk
    crashing = FakeTeacher(crash_on_call=3)
    _fake_loader(monkeypatch, crashing)
    with pytest.raises(KeyboardInterrupt):
        embed_with_teacher(ds, **kwargs)
    assert len(list(tmp_path.glob("teacher-*.arrow"))) == 1

    # 2nd run: only rows 10-24 are embedded again
    fresh = FakeTeacher()
    loads = _fake_loader(monkeypatch, fresh)
    out = embed_with_teacher(ds, **kwargs)
    assert loads == ["org/some-teacher"]
    assert [t for call in fresh.calls for t in call] == ds["text"][10:]
    expected = FakeTeacher().encode(
        ds["text"][:10], batch_size=5, convert_to_numpy=True, show_progress_bar=False, normalize_embeddings=True
    )
    # stored as float32: exactly the computed values rounded to float32
    np.testing.assert_array_equal(np.asarray(out["teacher_embedding"][:10]), expected.astype(np.float32))

    # 3rd run: everything cached, the teacher is not even loaded
    loads = _fake_loader(monkeypatch, None)
    again = embed_with_teacher(ds, **kwargs)
    assert loads == []
    np.testing.assert_array_equal(np.asarray(again["teacher_embedding"][:]), np.asarray(out["teacher_embedding"][:]))

    # changed options or texts recompute exactly what they affect
    other = FakeTeacher()
    _fake_loader(monkeypatch, other)
    embed_with_teacher(ds, normalize_embeddings=False, **kwargs)
    assert sum(len(c) for c in other.calls) == 25
    edited = ds.map(lambda r, i: {"text": r["text"] + "!" if i == 12 else r["text"]}, with_indices=True)
    other.calls.clear()
    embed_with_teacher(edited, **kwargs)
    assert [t for call in other.calls for t in call] == edited["text"][10:20]


def test_dataset_dict_and_fixed_dimension(tmp_path, monkeypatch):
    _fake_loader(monkeypatch, FakeTeacher(dim=5))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": _texts(7)}),
                               "eval": datasets.Dataset.from_dict({"text": _texts(3)})})
    out = embed_with_teacher(dd, "org/t", cache_dir=tmp_path, output_path=tmp_path / "saved")
    assert {k: len(v) for k, v in out.items()} == {"train": 7, "eval": 3}
    assert np.asarray(out["eval"]["teacher_embedding"][:]).shape == (3, 5)
    assert datasets.load_from_disk(str(tmp_path / "saved"))["train"].column_names == ["text", "teacher_embedding"]


def test_fingerprint_tracks_the_teacher_directory(tmp_path):
    d = tmp_path / "teacher"
    d.mkdir()
    (d / "config.json").write_text('{"a": 1}')
    first = teacher_fingerprint(str(d))
    assert teacher_fingerprint(str(d)) == first
    (d / "config.json").write_text('{"a": 2}')
    assert teacher_fingerprint(str(d)) != first
    assert teacher_fingerprint("org/x") != teacher_fingerprint("org/y")
    assert teacher_fingerprint("org/x", prompt="q") != teacher_fingerprint("org/x")


@pytest.mark.parametrize(
    "texts, match",
    [
        (["fine", "  ", "also fine"], r"1 row\(s\).*empty or missing 'text' \(rows 1\).*filter"),
        (["fine", None], r"rows 1"),
    ],
)
def test_empty_texts_are_refused_with_their_rows(texts, match, tmp_path, monkeypatch):
    loads = _fake_loader(monkeypatch, FakeTeacher())
    with pytest.raises(ValueError, match=match):
        embed_with_teacher(datasets.Dataset.from_dict({"text": texts}), "org/t", cache_dir=tmp_path)
    assert loads == []  # refused before the teacher is loaded


def test_bad_columns(tmp_path, monkeypatch):
    _fake_loader(monkeypatch, FakeTeacher())
    with pytest.raises(KeyError, match=r"no text column 'sentence'.*\['text'\].*rename_column"):
        embed_with_teacher(
            datasets.Dataset.from_dict({"text": ["a"]}), "org/t", text_column="sentence", cache_dir=tmp_path
        )
    with pytest.raises(TypeError, match="not strings"):
        embed_with_teacher(datasets.Dataset.from_dict({"text": [1, 2]}), "org/t", cache_dir=tmp_path)
    done = datasets.Dataset.from_dict({"text": ["a"], "teacher_embedding": [[1.0]]})
    with pytest.raises(ValueError, match="already has a column 'teacher_embedding'"):
        embed_with_teacher(done, "org/t", cache_dir=tmp_path)


def test_cli_writes_a_loadable_dataset(tmp_path, capsys):
    """`python -m mm_embed_trl.teacher` on the built-in corpus with the real offline teacher."""
    out = tmp_path / "with_teacher"
    teacher_mod.main(
        ["--dataset", "generated", "--generated_train_size", "6", "--generated_eval_size", "3",
         "--output_dir", str(out), "--cache_dir", str(tmp_path / "cache"), "--batch_size", "4"]
    )
    saved = datasets.load_from_disk(str(out))
    assert {k: len(v) for k, v in saved.items()} == {"train": 6, "eval": 3}
    vectors = np.asarray(saved["train"]["teacher_embedding"][:])
    assert vectors.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=rounding_rtol(terms=384))  # float32 norms
    assert "Wrote" in capsys.readouterr().out
