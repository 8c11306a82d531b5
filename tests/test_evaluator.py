"""Evaluators with a fake encoder of known vectors, the MMEB-eval loader, and the Trainer callback."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import TrainerControl, TrainerState

from mm_embed_trl.evaluation import (
    EmbeddingEvalCallback,
    MMEBEvaluator,
    RetrievalEvaluator,
    load_mmeb_eval,
    retrieval_metrics,
)

DIM = 8


def _color_image(color: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (8, 8), color)


def _key(item):
    """Identity of an encode input: the text, the image's colour, or both."""
    if isinstance(item, str):
        return item
    if isinstance(item, Image.Image):
        return item.getpixel((0, 0))
    assert isinstance(item, dict) and set(item) == {"text", "image"}, item
    assert isinstance(item["image"], Image.Image), "evaluator must hand loaded PIL images to encode"
    return (item["text"], item["image"].getpixel((0, 0)))


class FakeEncoder(torch.nn.Module):
    """``encode`` returns a fixed (deliberately unnormalised) vector per input and records how it was called."""

    def __init__(self, table: dict):
        super().__init__()
        self.proj = torch.nn.Linear(2, 2)  # a parameter so train()/eval() mean something
        self.table = {k: torch.as_tensor(v, dtype=torch.float32) for k, v in table.items()}
        self.calls = []

    def encode(self, inputs, *, side="query", batch_size=16, show_progress_bar=None):
        self.calls.append(
            {
                "side": side,
                "n": len(inputs),
                "batch_size": batch_size,
                "progress": show_progress_bar,
                "training": self.training,
                "grad": torch.is_grad_enabled(),
            }
        )
        return torch.stack([self.table[_key(x)] for x in inputs]) * 3.0


def _vectors(n, seed=0):
    return F.normalize(torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ---- RetrievalEvaluator -----------------------------------------------------------------------------------------


def _text_setup(num_queries=12, num_docs=20, seed=0):
    qv, dv = _vectors(num_queries, seed), _vectors(num_docs, seed + 1)
    queries = [f"query {i}" for i in range(num_queries)]
    corpus = [f"doc {j}" for j in range(num_docs)]
    relevant = [{i % num_docs, (3 * i + 1) % num_docs} for i in range(num_queries)]
    table = {**dict(zip(queries, qv)), **dict(zip(corpus, dv))}
    return queries, corpus, relevant, qv, dv, FakeEncoder(table)


def test_retrieval_evaluator_uses_encode_and_matches_metrics():
    queries, corpus, relevant, qv, dv, model = _text_setup()
    ev = RetrievalEvaluator(queries, corpus, relevant, name="toy", k_values=(1, 3), batch_size=5, encode_block_size=7)
    out = ev(model)
    expected = retrieval_metrics(qv, dv, relevant, k_values=(1, 3))
    assert out == pytest.approx({f"toy_{k}": v for k, v in expected.items()})
    assert ev.primary_metric == "toy_recall@1" and ev.primary_metric in out
    # queries then corpus, each in blocks of at most 7, with the configured sides and batch size
    assert [(c["side"], c["n"]) for c in model.calls] == [
        ("query", 7), ("query", 5), ("document", 7), ("document", 7), ("document", 6)
    ]
    assert all(c["batch_size"] == 5 for c in model.calls)


def test_retrieval_evaluator_perfect_and_hand_checked_scores():
    v = torch.eye(4)
    model = FakeEncoder({"a": v[0], "b": v[1], "c": v[2], "A": v[0], "B": v[1], "C": v[3]})
    ev = RetrievalEvaluator(["a", "b", "c"], ["A", "B", "C"], [{0}, {1}, {2}], k_values=(1,), main_metric="mrr")
    out = ev(model)
    # "c" is orthogonal to all three docs: all tie at 0, doc 2 ranks third.
    assert out["recall@1"] == pytest.approx(2 / 3)
    assert out["mrr"] == pytest.approx((1 + 1 + 1 / 3) / 3)
    assert ev.primary_metric == "mrr"


def test_retrieval_evaluator_mixed_modalities_and_sides():
    red, blue = _color_image((255, 0, 0)), _color_image((0, 0, 255))
    v = _vectors(4, seed=3)
    model = FakeEncoder({"cat": v[0], ("a photo", (255, 0, 0)): v[1], (0, 0, 255): v[2], "dog": v[3]})
    ev = RetrievalEvaluator(
        queries=["cat", (red, "a photo")],
        corpus=[blue, {"text": "dog", "image": None}, {"text": "a photo", "image": red}],
        relevant=[{1}, {2}],
        query_side="document",
        corpus_side="query",
        show_progress_bar=False,
    )
    out = ev(model)
    expected = retrieval_metrics(v[:2], v[[2, 3, 1]], [{1}, {2}])
    assert out == pytest.approx(expected)
    assert [c["side"] for c in model.calls] == ["document", "query"]
    assert all(c["progress"] is False for c in model.calls)


def test_retrieval_evaluator_argument_errors():
    with pytest.raises(ValueError, match="one set of corpus indices per query"):
        RetrievalEvaluator(["a", "b"], ["x"], [{0}])
    with pytest.raises(ValueError, match=r"relevant\[1\] holds corpus indices \[5\]"):
        RetrievalEvaluator(["a", "b"], ["x"], [{0}, {5}])
    with pytest.raises(ValueError, match="main_metric 'recall@3'"):
        RetrievalEvaluator(["a"], ["x"], [{0}], k_values=(1,), main_metric="recall@3")
    with pytest.raises(ValueError, match="query #1 has neither a text, an image nor a video"):
        RetrievalEvaluator(["a", {"text": "", "image": None}], ["x"], [{0}, {0}])
    with pytest.raises(TypeError, match="corpus document #0 has unsupported type int"):
        RetrievalEvaluator(["a"], [3], [{0}])


def test_encode_output_shape_is_checked():
    class Broken:
        def encode(self, inputs, **kwargs):
            return torch.zeros(len(inputs) + 1, DIM)

    with pytest.raises(ValueError, match=r"returned shape \(3, 8\) for 2 queries"):
        RetrievalEvaluator(["a", "b"], ["x"], [{0}, {0}])(Broken())


# ---- from_rows / from_mmeb_eval ----------------------------------------------------------------------------------


def _write_png(folder, name, color):
    os.makedirs(folder, exist_ok=True)
    _color_image(color).save(os.path.join(folder, name))
    return name


def test_from_rows_dedupes_targets_and_merges_repeated_queries(tmp_path):
    root = str(tmp_path / "imgs")
    cat = _write_png(root, "cat.png", (10, 0, 0))
    dog = _write_png(root, "dog.png", (20, 0, 0))
    rows = [
        {"qry": "<|image_1|> what animal?", "qry_image_path": cat, "pos_text": "cat", "pos_image_path": ""},
        {"qry": "<|image_1|> what animal?", "qry_image_path": dog, "pos_text": "dog", "pos_image_path": None},
        {"qry": "kitten", "qry_image_path": "", "pos_text": "cat", "pos_image_path": ""},  # shared positive
        {"qry": "kitten", "qry_image_path": "", "pos_text": "", "pos_image_path": cat},  # repeated query
        {"qry": "puppy", "qry_image_path": None, "pos_text": "dog", "pos_image_path": "",
         "neg_text": ["cat", "bird"], "neg_image_path": ["", dog]},
    ]
    ev = RetrievalEvaluator.from_rows(rows, image_root=root, name="animals", k_values=(1, 2))
    assert len(ev.queries) == 4 and len(ev.corpus) == 3  # "cat", "dog", image cat
    assert ev.relevant == [{0}, {1}, {0, 2}, {1}]
    with_negs = RetrievalEvaluator.from_rows(rows, image_root=root, include_negatives=True)
    assert len(with_negs.corpus) == 4 and with_negs.relevant == ev.relevant  # + ("bird", dog image)
    # a negative is named by its place in the row's lists, empty pairs before it counted
    sparse = RetrievalEvaluator.from_rows(
        [{"qry": "puppy", "qry_image_path": "", "pos_text": "dog", "pos_image_path": "",
          "neg_text": ["", "bird"], "neg_image_path": ["", ""]}], include_negatives=True)
    assert sparse._corpus_labels[1] == "row 0 negative 1 (neg_text/neg_image_path)"

    v = _vectors(7, seed=5)
    model = FakeEncoder(
        {
            ("<|image_1|> what animal?", (10, 0, 0)): v[0],
            ("<|image_1|> what animal?", (20, 0, 0)): v[1],
            "kitten": v[2],
            "puppy": v[3],
            "cat": v[4],
            "dog": v[5],
            (10, 0, 0): v[6],
        }
    )
    out = ev(model)
    expected = retrieval_metrics(v[:4], v[4:7], [{0}, {1}, {0, 2}, {1}], k_values=(1, 2))
    assert out == pytest.approx({f"animals_{k}": val for k, val in expected.items()})


def test_from_rows_reports_missing_columns_and_bad_images(tmp_path):
    with pytest.raises(ValueError, match="row 1 lacks column 'pos_text'"):
        RetrievalEvaluator.from_rows([{"qry": "a", "qry_image_path": "", "pos_text": "b", "pos_image_path": ""},
                                      {"qry": "a", "qry_image_path": "", "pos_image_path": ""}])
    with pytest.raises(ValueError, match=r"row 0 positive \(pos_text/pos_image_path\) has neither"):
        RetrievalEvaluator.from_rows([{"qry": "a", "qry_image_path": "", "pos_text": "", "pos_image_path": ""}])
    ev = RetrievalEvaluator.from_rows(
        [{"qry": "a", "qry_image_path": "missing.png", "pos_text": "b", "pos_image_path": ""}], image_root=str(tmp_path)
    )
    with pytest.raises(ValueError, match=r"row 0 query.*missing.png|missing.png.*row 0 query"):
        ev(FakeEncoder({}))


def _eval_rows():
    return [
        {"qry_text": "q0", "qry_img_path": "", "tgt_text": ["t0", "t1", "t2"], "tgt_img_path": ["", "", ""]},
        {"qry_text": "q1", "qry_img_path": "", "tgt_text": ["t1", "t0", "t3"], "tgt_img_path": ["", "", ""]},
        {"qry_text": "q2", "qry_img_path": "", "tgt_text": ["t2", "t3"], "tgt_img_path": ["", None]},
        {"qry_text": "q3", "qry_img_path": "", "tgt_text": ["t3", "t0", "t1", "t2"], "tgt_img_path": [""] * 4},
    ]


def test_from_mmeb_eval_pools_candidates():
    ev = RetrievalEvaluator.from_mmeb_eval(_eval_rows(), "toyset", k_values=(1,))
    assert ev.name == "toyset" and len(ev.corpus) == 4
    assert [ev.corpus[next(iter(r))][0] for r in ev.relevant] == ["t0", "t1", "t2", "t3"]


# ---- MMEBEvaluator ----------------------------------------------------------------------------------------------


def test_mmeb_evaluator_matches_naive_argmax_loop():
    rows = _eval_rows()
    g = torch.Generator().manual_seed(0)
    table = {name: F.normalize(torch.randn(DIM, generator=g), dim=0) for name in ["q0", "q1", "q2", "q3"]}
    for j in range(4):
        table[f"t{j}"] = F.normalize(torch.randn(DIM, generator=g), dim=0)
    table["t1"] = table["q1"].clone()  # q1 surely right
    model = FakeEncoder(table)
    ev = MMEBEvaluator(rows, name="toy", k_values=(1, 2), chunk_size=3)
    assert len(ev.candidates) == 4 and len(ev.queries) == 4  # candidates encoded once each
    out = ev(model)

    hits, rr = [], []
    for row in rows:  # VLM2Vec: pred = np.argmax(scores); correct iff pred == 0
        scores = np.array([float(table[t] @ table[row["qry_text"]]) for t in row["tgt_text"]])
        hits.append(int(np.argmax(scores) == 0))
        rr.append(1 / (1 + int((scores > scores[0]).sum())))
    assert out["toy_precision@1"] == pytest.approx(np.mean(hits))
    assert out["toy_recall@1"] == pytest.approx(np.mean(hits))
    assert out["toy_mrr"] == pytest.approx(np.mean(rr))
    assert ev.primary_metric == "toy_precision@1"
    assert sorted(c["n"] for c in model.calls) == [4, 4]


def test_mmeb_evaluator_duplicate_correct_candidate_counts_as_hit():
    rows = [{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b", "a"], "tgt_img_path": ["", "", ""]}]
    e = torch.eye(DIM)
    model = FakeEncoder({"q": e[0], "a": e[0] * 0.5 + e[1], "b": e[1]})
    assert MMEBEvaluator(rows)(model) == {"precision@1": 1.0}


# ---- loader -----------------------------------------------------------------------------------------------------


def test_load_mmeb_eval_sources_agree(tmp_path):
    import datasets

    rows = _eval_rows()
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved_dict"))
    hub_like = tmp_path / "hub" / "toyset"
    hub_like.mkdir(parents=True)
    ds.to_parquet(str(hub_like / "test-00000-of-00001.parquet"))

    expected = load_mmeb_eval(rows)
    assert expected[2]["tgt_img_path"] == ["", ""]  # None normalised to ""
    for source, subset in [
        (str(jsonl), None),
        (str(tmp_path / "rows.parquet"), None),
        (str(tmp_path / "saved"), None),
        (str(tmp_path / "saved_dict"), None),
        (str(tmp_path / "hub"), "toyset"),
        (ds, None),
    ]:
        got = load_mmeb_eval(source, subset)
        assert [{k: r[k] for k in expected[0]} for r in got] == expected, source
    assert len(load_mmeb_eval(ds, max_queries=2)) == 2
    ev = MMEBEvaluator.load(str(tmp_path / "hub"), "toyset", max_queries=3)
    assert ev.name == "toyset" and len(ev) == 3


def test_load_mmeb_eval_resolves_image_root(tmp_path):
    rows = [{"qry_text": "", "qry_img_path": "a.png", "tgt_text": ["x", ""], "tgt_img_path": ["", "/abs/b.png"]}]
    got = load_mmeb_eval(rows, image_root=str(tmp_path))
    assert got[0]["qry_img_path"] == os.path.join(str(tmp_path), "a.png")
    assert got[0]["tgt_img_path"] == ["", "/abs/b.png"]


@pytest.mark.parametrize(
    "row, message",
    [
        ({"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"]}, r"row 1 lacks column\(s\) \['tgt_img_path'\]"),
        ({"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": [""]},
         r"row 1 has 2 'tgt_text' but 1 'tgt_img_path'"),
        ({"qry_text": "q", "qry_img_path": "", "tgt_text": "a", "tgt_img_path": [""]},
         r"row 1 column 'tgt_text' must be a list"),
        ({"qry_text": "q", "qry_img_path": "", "tgt_text": [], "tgt_img_path": []}, r"row 1 has an empty candidate"),
        ({"qry_text": "", "qry_img_path": None, "tgt_text": ["a"], "tgt_img_path": [""]},
         r"row 1 has neither 'qry_text' nor 'qry_img_path'"),
        ({"qry_text": "q", "qry_img_path": "", "tgt_text": ["a", ""], "tgt_img_path": ["", ""]},
         r"row 1 candidate 1 has neither"),
    ],
)
def test_load_mmeb_eval_validation_errors(row, message):
    good = _eval_rows()[0]
    with pytest.raises(ValueError, match=message):
        load_mmeb_eval([good, row])


def test_load_mmeb_eval_source_errors(tmp_path):
    import datasets

    with pytest.raises(ValueError, match=r"lacks column\(s\) \['tgt_img_path'\]"):
        load_mmeb_eval(datasets.Dataset.from_list([{"qry_text": "q", "qry_img_path": "", "tgt_text": ["a"]}]))
    with pytest.raises(ValueError, match="not 'test'"):
        load_mmeb_eval(datasets.DatasetDict({"train": datasets.Dataset.from_list(_eval_rows())}))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mmeb_eval(str(tmp_path / "nothing.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no dataset"):
        load_mmeb_eval(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="max_queries"):
        load_mmeb_eval(_eval_rows(), max_queries=0)


# ---- callback ---------------------------------------------------------------------------------------------------


class Wrapper(torch.nn.Module):  # stands in for DDP: the encoder sits under .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def _callback_setup(**kwargs):
    queries, corpus, relevant, qv, dv, model = _text_setup(num_queries=6, num_docs=9)
    ev = RetrievalEvaluator(queries, corpus, relevant, name="toy", k_values=(1,))
    expected = {f"eval_toy_{k}": v for k, v in retrieval_metrics(qv, dv, relevant, k_values=(1,)).items()}
    return EmbeddingEvalCallback(ev, **kwargs), model, expected


def test_callback_on_evaluate_merges_logs_and_restores_train_mode():
    cb, model, expected = _callback_setup()
    state, control = TrainerState(global_step=10, epoch=0.5), TrainerControl()
    model.train()
    trainer_metrics = {"eval_loss": 1.0}
    cb.on_evaluate(None, state, control, model=Wrapper(model), metrics=trainer_metrics)
    assert trainer_metrics == pytest.approx({"eval_loss": 1.0, **expected})  # usable by metric_for_best_model
    assert all(not c["training"] and not c["grad"] for c in model.calls)  # eval mode, no grad while encoding
    assert model.training  # restored
    assert state.log_history == [pytest.approx({**expected, "epoch": 0.5, "step": 10})]
    assert cb.history == [pytest.approx({"event": "evaluate", "step": 10, "epoch": 0.5, **expected})]

    # A second on_evaluate at the same step (one per eval dataset) reuses the result: no re-encode, no re-log.
    n_calls, again = len(model.calls), {}
    cb.on_evaluate(None, state, control, model=Wrapper(model), metrics=again)
    assert again == pytest.approx(expected) and len(model.calls) == n_calls and len(state.log_history) == 1

    model.eval()
    state.global_step = 20
    cb.on_evaluate(None, state, control, model=model, metrics={})
    assert not model.training and len(cb.history) == 2


def test_callback_train_begin_end_steps_and_trainer_log():
    logged = []
    trainer = SimpleNamespace(log=lambda logs: logged.append(logs), add_callback=lambda cb: logged.append(cb))
    cb, model, expected = _callback_setup(
        eval_steps=5, evaluate_on_train_begin=True, evaluate_on_train_end=True, evaluate_on_evaluate=False
    )
    assert cb.attach(trainer) is cb and logged.pop() is cb
    state, control = TrainerState(global_step=0), TrainerControl()
    cb.on_train_begin(None, state, control, model=model)
    for step in range(1, 11):
        state.global_step = step
        cb.on_step_end(None, state, control, model=model)
    cb.on_evaluate(None, state, control, model=model, metrics={})  # disabled
    cb.on_train_end(None, state, control, model=model)  # step 10 already evaluated: reused
    state.global_step = 12
    cb.on_train_end(None, state, control, model=model)
    assert [(h["event"], h["step"]) for h in cb.history] == [
        ("train_begin", 0), ("step", 5), ("step", 10), ("train_end", 12)
    ]
    assert logged == [pytest.approx(expected)] * 4
    assert state.log_history == []  # logging went through trainer.log


@pytest.mark.parametrize("evaluate_on_train_end", [True, False])
def test_callback_drops_its_cache_when_the_best_checkpoint_is_loaded_at_train_end(evaluate_on_train_end):
    """load_best_model_at_end: the Trainer loads the best checkpoint, then calls on_train_end at the same
    global_step. The metrics cached for that step are the final weights': evaluate again, unless the best checkpoint
    is that very step (the weights evaluated are the ones loaded)."""
    cb, model, _ = _callback_setup(evaluate_on_train_end=evaluate_on_train_end)
    control = TrainerControl()
    args = SimpleNamespace(load_best_model_at_end=True)
    state = TrainerState(global_step=2)
    cb.on_evaluate(args, state, control, model=model, metrics={})
    n_calls = len(model.calls)

    state.best_model_checkpoint = os.path.join("out", "checkpoint-2")  # the last step is the best: reuse
    cb.on_train_end(args, state, control, model=model)
    assert len(model.calls) == n_calls and [h["event"] for h in cb.history] == ["evaluate"]

    state.best_model_checkpoint = os.path.join("out", "checkpoint-1") + os.sep  # an earlier one: weights replaced
    cb.on_train_end(args, state, control, model=model)
    events = ["evaluate", "train_end"] if evaluate_on_train_end else ["evaluate"]
    assert [(h["event"], h["step"]) for h in cb.history] == [(e, 2) for e in events]
    assert (len(model.calls) > n_calls) == evaluate_on_train_end
    # A later evaluation at this step (trainer.evaluate() after training) sees the loaded weights, not the cache.
    n_calls = len(model.calls)
    cb.on_evaluate(args, state, control, model=model, metrics={})
    assert (len(model.calls) > n_calls) == (not evaluate_on_train_end)

    cb.on_train_end(SimpleNamespace(load_best_model_at_end=False), state, control, model=model)  # not loaded: reuse
    assert len(cb.history) == 2


def test_callback_runs_only_on_main_process_and_checks_model():
    cb, model, _ = _callback_setup()
    state = TrainerState(global_step=3)
    state.is_world_process_zero = False
    metrics = {}
    cb.on_evaluate(None, state, TrainerControl(), model=model, metrics=metrics)
    assert model.calls == [] and metrics == {} and cb.history == []
    with pytest.raises(TypeError, match="needs a model with an `encode"):
        cb.on_evaluate(None, TrainerState(global_step=4), TrainerControl(), model=torch.nn.Linear(2, 2), metrics={})


def test_callback_with_sharded_weights_runs_on_every_rank_and_logs_on_main_only():
    """ZeRO-3 / FSDP gather weights collectively in every forward: a rank that skipped the evaluation would hang
    the others, so every rank evaluates (the same rows) and only the main process logs."""
    logged = []
    trainer = SimpleNamespace(log=logged.append, add_callback=lambda cb: None, shards_weights=True)
    cb, model, expected = _callback_setup(trainer=trainer)
    state = TrainerState(global_step=3)
    state.is_world_process_zero = False
    metrics = {}
    cb.on_evaluate(None, state, TrainerControl(), model=model, metrics=metrics)
    assert model.calls != [] and metrics == pytest.approx(expected)
    assert logged == [] and cb.history == []
    trainer.shards_weights = False  # DDP: a non-main rank skips it
    model.calls.clear()
    state.global_step = 4
    cb.on_evaluate(None, state, TrainerControl(), model=model, metrics={})
    assert model.calls == []


@pytest.mark.parametrize("main", [True, False])
@pytest.mark.parametrize("sharded", [True, False])
def test_evaluate_outside_training_follows_the_callback_rule(main, sharded):
    from mm_embed_trl.evaluation.callback import evaluate_outside_training

    embedding_model = object()  # what the trainer embeds with (EmbeddingTrainerMixin.inference_model)
    trainer = SimpleNamespace(
        model=object(),
        shards_weights=sharded,
        zero_stage=None,  # FSDP-like: not wrapped before training
        is_world_process_zero=lambda: main,
        inference_model=lambda: embedding_model,
    )
    seen = []
    evaluator = lambda m: seen.append(m) or {"score": 1.0}  # noqa: E731
    before = evaluate_outside_training(trainer, evaluator, before_training=True)
    assert (before is not None) == main and seen == ([embedding_model] if main else [])
    seen.clear()
    after = evaluate_outside_training(trainer, evaluator, before_training=False)
    runs = main or sharded
    assert (after is not None) == runs
    assert seen == ([embedding_model] if runs else [])


def test_callback_with_named_evaluators_dict():
    queries, corpus, relevant, *_ , model = _text_setup(num_queries=4, num_docs=5)
    ev = RetrievalEvaluator(queries, corpus, relevant, k_values=(1,))
    cb = EmbeddingEvalCallback({"a": ev, "b": ev}, metric_key_prefix="")
    out = cb.evaluate(model)
    assert set(out) == {f"{n}_{m}@1" for n in "ab" for m in
                        ("accuracy", "precision", "recall", "mrr", "ndcg", "map")} | {"a_mrr", "b_mrr"}


class _TwoModeModel:
    """encode() stand-in with planted disc / gen embeddings (mode="both"), and k samples per query."""

    def __init__(self, disc, gen, samples=None):
        self.disc, self.gen, self.samples = disc, gen, samples

    def encode(self, inputs, side="query", mode="discriminative", num_samples=1, do_sample=False, **kwargs):
        index = [int(str(x).split()[-1]) for x in inputs]
        table = {"query": 0, "document": 1}[side]
        if num_samples > 1:
            return self.samples[index]
        disc, gen = self.disc[table][index], self.gen[table][index]
        return {"discriminative": disc, "generative": gen} if mode == "both" else gen


def test_generative_modes_report_disc_gen_oracle_and_pass_at_k():
    """4 queries, 4 documents (query i's relevant document is i). disc gets queries 0, 1 right, gen 1, 2: the
    per-query oracle gets 0, 1, 2 (3/4 at recall@1); sampling query 3 three times, one sample finds document 3."""
    eye = torch.eye(4)
    docs = eye
    disc_q = torch.stack([eye[0], eye[1], eye[3], eye[0]])  # right: 0, 1
    gen_q = torch.stack([eye[2], eye[1], eye[2], eye[0]])  # right: 1, 2
    queries, corpus = [f"query {i}" for i in range(4)], [f"document {i}" for i in range(4)]
    model = _TwoModeModel((disc_q, docs), (gen_q, docs))
    evaluator = RetrievalEvaluator(queries, corpus, [{i} for i in range(4)], name="toy", k_values=(1,),
                                   encode_kwargs={"mode": "both"})
    out = evaluator(model)
    assert out["toy_disc_recall@1"] == pytest.approx(0.5)
    assert out["toy_gen_recall@1"] == pytest.approx(0.5)
    assert out["toy_oracle_recall@1"] == pytest.approx(0.75)
    assert evaluator.primary_metric == "toy_gen_recall@1"
    samples = torch.stack([gen_q, gen_q, gen_q], dim=1).clone()  # (4, 3, 4)
    samples[3, 2] = eye[3]  # the third sample of query 3 is right
    sampled = _TwoModeModel((disc_q, docs), (gen_q, docs), samples=samples)
    pass_k = RetrievalEvaluator(queries, corpus, [{i} for i in range(4)], name="toy", k_values=(1,),
                                encode_kwargs={"mode": "generative", "do_sample": True, "num_samples": 3})
    out = pass_k(sampled)
    assert out["toy_gen_recall@1"] == pytest.approx(0.5)  # sample 0 alone
    assert out["toy_pass@3_recall@1"] == pytest.approx(0.75)
    # mode="generative" alone: one (N, D) tensor per side, still reported (and headlined) as gen_*
    gen_only = RetrievalEvaluator(queries, corpus, [{i} for i in range(4)], name="toy", k_values=(1,),
                                  encode_kwargs={"mode": "generative"})
    out = gen_only(model)
    assert out[gen_only.primary_metric] == out["toy_gen_recall@1"] == pytest.approx(0.5)
