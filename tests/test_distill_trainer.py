"""DistillEmbedTrainer (UniME stage 1): loss vs a hand-written reference, text-only LM training with the vision tower
bit-identical, save/load round trip, clear errors on bad data, learning on held-out texts, recipes."""

from __future__ import annotations

import glob
import math
from pathlib import Path

import datasets
import launching
import numpy as np
import pytest
import torch
from numerics import TINY_BACKWARD, TINY_FORWARD, assert_close, assert_loss_close, rounding_rtol
from scripts import load_script

from mm_embed_trl import DistillEmbedConfig, DistillEmbedTrainer, MultimodalEmbeddingModel
from mm_embed_trl.data.collators import EmbeddingCollator
from mm_embed_trl.data.schema import EmbeddingInput
from mm_embed_trl.data.templates import UNIME_TEXT_SUMMARY
from mm_embed_trl.demo.text_corpus import make_text_corpus
from mm_embed_trl.evaluation import TeacherAgreementEvaluator
from mm_embed_trl.trainers.distill_trainer import TextDistillCollator

ROOT = Path(__file__).resolve().parents[1]
VISION = ("visual", "vision_tower", "multi_modal_projector")


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        save_sentence_transformers=False,
    )
    defaults.update(kw)
    return DistillEmbedConfig(**defaults)


def _random_teacher_data(n=24, dim=24, seed=0):
    """Texts with random 'teacher' vectors of a dimension unlike the student's (64)."""
    texts = make_text_corpus(n, 0, seed=seed)["train"]["text"][:]
    vectors = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return datasets.Dataset.from_dict({"text": texts, "teacher_embedding": vectors.tolist()})


def _model(tiny_backbone):
    torch.manual_seed(0)
    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template="unime")


@pytest.fixture
def one_thread():
    """Train on one intra-op thread: on a shared 2-core machine, a second spinning OpenMP thread can make these tiny
    steps 10-40x slower; one thread keeps the test's time predictable."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --------------------------------------------------------------------------------------------- config / collator
def test_config_defaults_and_validation(tmp_path):
    args = DistillEmbedConfig(output_dir=str(tmp_path))
    assert (args.temperature, args.kl_direction, args.learning_rate, args.num_train_epochs) == (
        0.02, "teacher_student", 5e-4, 2.0
    )
    assert args.freeze_vision_tower and args.mask_diagonal and not args.remove_unused_columns
    assert (args.text_column, args.teacher_column) == ("text", "teacher_embedding")
    for bad, match in [
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(teacher_temperature=-1.0), "teacher_temperature"),
        (dict(kl_direction="forward"), "kl_direction must be one of"),
        (dict(loss_reduction="batchmean"), "loss_reduction"),
        (dict(teacher_column="text"), "must differ"),
    ]:
        with pytest.raises(ValueError, match=match):
            DistillEmbedConfig(output_dir=str(tmp_path), **bad)


def test_collator_uses_the_unime_text_prompt_and_carries_teacher_vectors(qwen2_vl_model):
    data = _random_teacher_data(4, dim=5)
    rows = [data[i] for i in range(4)]
    batch = TextDistillCollator(qwen2_vl_model.processor, "unime")(rows)
    enc = batch["text"]
    assert "pixel_values" not in enc  # the vision tower cannot run
    decoded = qwen2_vl_model.processor.tokenizer.decode(enc["input_ids"][0], skip_special_tokens=False)
    assert f"{rows[0]['text']}\n{UNIME_TEXT_SUMMARY}" in decoded
    # exactly what inference (model.encode) feeds the model for the same texts
    reference = EmbeddingCollator(qwen2_vl_model.processor, "unime").encode_inputs(
        [EmbeddingInput(text=r["text"]) for r in rows], side="query"
    )
    assert torch.equal(enc["input_ids"], reference["input_ids"])
    np.testing.assert_array_equal(batch["teacher_embeddings"].numpy(), np.array([r["teacher_embedding"] for r in rows]))
    assert batch["teacher_embeddings"].dtype == torch.float32


def test_generated_corpus_is_deterministic_unique_and_split_disjoint():
    a, b = make_text_corpus(400, 80, seed=2), make_text_corpus(400, 80, seed=2)
    assert a["train"]["text"][:] == b["train"]["text"][:] and a["eval"]["text"][:] == b["eval"]["text"][:]
    train, held_out = [t.lower() for t in a["train"]["text"]], [t.lower() for t in a["eval"]["text"]]
    assert len(set(train)) == 400 and len(set(held_out)) == 80 and not set(train) & set(held_out)
    assert all(t.strip() and "  " not in t for t in train + held_out)
    domains = a["train"]["domain"][:]
    assert len(set(domains)) == 8 and max(map(domains.count, set(domains))) - min(map(domains.count, set(domains))) <= 1
    assert make_text_corpus(50, 5, seed=3)["train"]["text"][:] != a["train"]["text"][:50]


# ------------------------------------------------------------------------------------------------------ the loss
def _reference_loss(student, teacher, tau, direction, mask_diagonal, reduction):
    """Hand-written KL between in-batch similarity distributions, with Python loops in float64."""
    s = [np.asarray(v, float) / np.linalg.norm(v) for v in student]
    t = [np.asarray(v, float) / np.linalg.norm(v) for v in teacher]
    n, rows = len(s), []
    for i in range(n):
        js = [j for j in range(n) if not (mask_diagonal and j == i)]
        ls = [float(s[i] @ s[j]) / tau for j in js]
        lt = [float(t[i] @ t[j]) / tau for j in js]
        zs, zt = math.log(sum(math.exp(x) for x in ls)), math.log(sum(math.exp(x) for x in lt))
        log_ps, log_pt = [x - zs for x in ls], [x - zt for x in lt]
        if direction == "teacher_student":
            rows.append(sum(math.exp(b) * (b - a) for a, b in zip(log_ps, log_pt)))
        else:
            rows.append(sum(math.exp(a) * (a - b) for a, b in zip(log_ps, log_pt)))
    return sum(rows) if reduction == "sum" else sum(rows) / n


@pytest.mark.parametrize(
    "direction, mask_diagonal, reduction, tau",
    [
        ("teacher_student", True, "mean", 0.05),
        ("teacher_student", False, "sum", 0.1),
        ("student_teacher", True, "sum", 0.2),
    ],
)
def test_loss_matches_a_hand_written_reference(direction, mask_diagonal, reduction, tau, tiny_backbone, tmp_path):
    data = _random_teacher_data(6, dim=24)
    model = _model(tiny_backbone)
    config = _config(
        tmp_path, temperature=tau, kl_direction=direction, mask_diagonal=mask_diagonal, loss_reduction=reduction
    )
    trainer = DistillEmbedTrainer(model=model, args=config, train_dataset=data)
    batch = trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(6)]))
    model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, batch)
        student = model(**batch["text"]).embeddings  # the student's last-token embeddings, computed separately
    # The reference runs in float64 on the same float32 embeddings: only the trainer's float32 loss rounds. Its
    # longest reductions are the 64-dim similarities and the 6-term softmax sums; logits are scaled by 1/tau.
    expected = _reference_loss(student.tolist(), data["teacher_embedding"][:], tau, direction, mask_diagonal, reduction)
    assert_loss_close(loss.item(), expected, rtol=rounding_rtol(terms=64, depth=3, gain=1 / tau))
    # The logged agreement metric against numpy in float64 on the same embeddings. Pearson correlates similarities
    # that an untrained model packs close together, so the rounding of each similarity (a 64-term dot product) is
    # amplified by max|sim| / std(sim), the metric's condition number measured on these very values; the metric
    # computes in float64 for that reason (in float32 it drifts in the 5th digit).
    s = student.double().numpy() / np.linalg.norm(student.double().numpy(), axis=1, keepdims=True)
    t = np.asarray(data["teacher_embedding"][:]) / np.linalg.norm(data["teacher_embedding"][:], axis=1, keepdims=True)
    iu = np.triu_indices(6, 1)
    sims = (s @ s.T)[iu]
    pearson = np.corrcoef(sims, (t @ t.T)[iu])[0, 1]
    tol = rounding_rtol(terms=64, depth=2, gain=np.abs(sims).max() / sims.std(), dtype=torch.float64)
    assert float(trainer._metrics["eval"]["sim_pearson"][-1]) == pytest.approx(pearson, abs=tol)


def test_grad_cache_gives_the_same_loss_and_gradients(tiny_backbone, tmp_path):
    data = _random_teacher_data(8)
    results = []
    for chunk in (None, 3):
        model = _model(tiny_backbone)
        trainer = DistillEmbedTrainer(
            model=model, args=_config(tmp_path, gradient_cache_chunk_size=chunk, temperature=0.1), train_dataset=data
        )
        model.train()
        loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(8)])))
        trainer.accelerator.backward(loss)
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    # Same function, chunks of 3 instead of one batch of 8: rounding only. The loss sees the forward's rounding
    # through logits scaled by 1/tau; gradients go back through the same softmax and the whole backbone.
    assert_loss_close(loss_a, loss_b, rtol=rounding_rtol(**TINY_FORWARD, gain=1 / 0.1))
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert_close(grads_a[name], grads_b[name], rtol=rounding_rtol(**TINY_BACKWARD, gain=1 / 0.1), msg=name)


def test_a_single_text_batch_contributes_nothing(tiny_backbone, tmp_path):
    data = _random_teacher_data(3)
    model = _model(tiny_backbone)
    trainer = DistillEmbedTrainer(model=model, args=_config(tmp_path), train_dataset=data)
    model.train()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator([data[0]])))
    assert loss.item() == 0.0 and loss.requires_grad


def test_rows_marked_as_repeats_stay_out_of_the_loss(tiny_backbone, tmp_path):
    """A batch accelerate completed with repeated rows (marked as its data loader yields it; a 2-process run is in
    test_hardneg_trainer) contributes its real rows only: the loss of 8 rows marked "5 real" is the loss of the 5."""
    from mm_embed_trl.trainers.base import REAL_ROWS_KEY

    data = _random_teacher_data(8)
    model = _model(tiny_backbone)
    trainer = DistillEmbedTrainer(model=model, args=_config(tmp_path, temperature=0.1), train_dataset=data)
    model.eval()
    def batch(n):
        return trainer._prepare_inputs(trainer.data_collator([data[i] for i in range(n)]))

    with torch.no_grad():
        loss = trainer.compute_loss(model, {**batch(8), REAL_ROWS_KEY: 5})
        unique, whole = trainer.compute_loss(model, batch(5)), trainer.compute_loss(model, batch(8))
    # the 5 rows embed in a batch of 8 or of 5: padding changes the reduction order only
    assert_loss_close(loss.item(), unique.item(), rtol=rounding_rtol(**TINY_FORWARD, gain=1 / 0.1))
    assert abs(whole.item() - unique.item()) > 0.01  # the repeats would have changed it


_STEP_SCRIPT = """
import sys, numpy as np, torch, datasets
from mm_embed_trl import DistillEmbedConfig, DistillEmbedTrainer, MultimodalEmbeddingModel
from mm_embed_trl.demo.text_corpus import make_text_corpus
from mm_embed_trl.demo.tiny import get_tiny_backbone

out, chunk = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
texts = make_text_corpus(8, 0, seed=5)["train"]["text"][:]
vectors = np.random.default_rng(5).standard_normal((8, 24)).astype(np.float32).tolist()
rows = [{"text": t, "teacher_embedding": v} for t, v in zip(texts, vectors)]
torch.manual_seed(0)
model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
config = DistillEmbedConfig(output_dir=out + ".trainer", temperature=0.1, gradient_cache_chunk_size=chunk,
                            report_to="none", use_cpu=True)
trainer = DistillEmbedTrainer(model=model, args=config)
acc = trainer.accelerator
bounds = [0, 8] if acc.num_processes == 1 else [0, 3, 8]  # uneven per-rank batches: 3 + 5
batch = trainer.data_collator(rows[bounds[acc.process_index]: bounds[acc.process_index + 1]])
wrapped = acc.prepare_model(trainer.model)
wrapped.train()
loss = trainer.compute_loss(wrapped, trainer._prepare_inputs(batch))
acc.backward(loss)
if acc.process_index == 0:
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    torch.save({"loss": loss.item(), "grads": grads, "world": acc.num_processes}, out)
acc.wait_for_everyone()
"""


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """2 processes x (3 + 5) texts == 1 process x 8 texts: loss and every gradient (DDP on gloo), with and without
    GradCache. The distributions span the global batch (student gathered with grad, teacher without)."""
    script = tmp_path / "distill_step.py"
    script.write_text(_STEP_SCRIPT)
    outputs = {}
    for name, processes, extra in (("single", 1, ()), ("ddp", 2, ()), ("ddp_gradcache", 2, ("2",))):
        launching.run(script, tmp_path / f"{name}.pt", *extra, processes=processes)
        outputs[name] = torch.load(tmp_path / f"{name}.pt")
    ref = outputs["single"]
    assert ref["world"] == 1 and outputs["ddp"]["world"] == 2
    # Same function on the same 8 texts, split over ranks (and chunks): rounding only, as in the GradCache test.
    for name in ("ddp", "ddp_gradcache"):
        got = outputs[name]
        assert_loss_close(got["loss"], ref["loss"], rtol=rounding_rtol(**TINY_FORWARD, gain=1 / 0.1))
        assert got["grads"].keys() == ref["grads"].keys() and ref["grads"]
        for key in ref["grads"]:
            assert_close(got["grads"][key], ref["grads"][key], rtol=rounding_rtol(**TINY_BACKWARD, gain=1 / 0.1))


# ------------------------------------------------------------------- training: LM only, vision intact, round trip
def test_trains_the_language_model_only_and_saves_the_full_model(tiny_backbone, tmp_path, monkeypatch, one_thread):
    data = _random_teacher_data(32)
    model = _model(tiny_backbone)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    vision_calls = []
    model.backbone.visual.register_forward_hook(lambda *a: vision_calls.append(1))

    # The teacher must never be loaded while the student trains.
    import sentence_transformers

    from mm_embed_trl import teacher as teacher_mod

    def forbidden(*a, **k):
        raise AssertionError("the teacher was loaded during student training")

    monkeypatch.setattr(teacher_mod, "load_teacher", forbidden)
    monkeypatch.setattr(sentence_transformers.SentenceTransformer, "__init__", forbidden)

    config = _config(tmp_path, max_steps=4, learning_rate=1e-3, temperature=0.1, save_sentence_transformers=True)
    trainer = DistillEmbedTrainer(model=model, args=config, train_dataset=data)
    trainer.train()
    monkeypatch.undo()

    assert not vision_calls, "text-only batches must never run the vision tower"
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    assert any("language_model" in n for n in changed)
    vision = [n for n in initial if any(v in n for v in VISION)]
    assert vision and not any(model.get_parameter(n).requires_grad for n in vision)
    assert not changed & set(vision)

    out = trainer.save_for_inference()
    reloaded = MultimodalEmbeddingModel.from_pretrained(out)
    saved = dict(reloaded.named_parameters())
    for name in vision:  # bit-identical vision tower and projector in the saved full multimodal model
        assert torch.equal(saved[name], initial[name]), name
    for name in changed:
        assert torch.equal(saved[name], model.get_parameter(name)), name

    texts = data["text"][:6]
    expected = model.encode(texts)
    # the same weights and inputs: only the thread/kernel choice of this process can differ
    assert_close(reloaded.encode(texts), expected, rtol=rounding_rtol(**TINY_FORWARD))
    from PIL import Image

    assert reloaded.encode(Image.new("RGB", (64, 64), "red")).shape == (64,)  # still a multimodal model
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(Path(out) / "sentence_transformers"), local_files_only=True)
    assert_close(torch.as_tensor(st.encode_query(texts)), expected, rtol=rounding_rtol(**TINY_FORWARD))


# ------------------------------------------------------------------------------------------------------ bad data
def test_dataset_without_teacher_embeddings_says_how_to_compute_them(qwen2_vl_model, tmp_path):
    data = datasets.Dataset.from_dict({"text": ["a red circle", "a blue square"]})
    with pytest.raises(KeyError, match=r"no teacher embedding column 'teacher_embedding'(.|\n)*embed_with_teacher"
                                       r"(.|\n)*python -m mm_embed_trl.teacher"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=data)


def test_inconsistent_teacher_dimensions_are_refused(qwen2_vl_model, tmp_path):
    vectors = [[0.1] * 8, [0.2] * 8, [0.3] * 9, [0.4] * 8]
    data = datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "teacher_embedding": vectors})
    with pytest.raises(ValueError, match=r"inconsistent dimensions: 8 \(3 rows\), 9 \(1 rows\).*\(8\): 2\b"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=data)
    holey = datasets.Dataset.from_dict({"text": ["a", "b"], "teacher_embedding": [[0.1] * 8, None]})
    with pytest.raises(ValueError, match=r"1 row\(s\).*no teacher embedding.*\(rows 1\)"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=holey)
    # streamed data is checked batch by batch, across batches too
    collator = TextDistillCollator(qwen2_vl_model.processor, "unime")
    collator([{"text": "a", "teacher_embedding": [0.1] * 8}])
    with pytest.raises(ValueError, match=r"expected 8.*batch row 1 \(text='c'\) has 9"):
        collator([{"text": "b", "teacher_embedding": [0.1] * 8}, {"text": "c", "teacher_embedding": [0.1] * 9}])
    with pytest.raises(ValueError, match="Non-finite"):
        collator([{"text": "b", "teacher_embedding": [float("nan")] * 8}])
    eval_data = datasets.Dataset.from_dict({"text": ["x", "y"], "teacher_embedding": [[0.5] * 5, [1.0] * 5]})
    train = datasets.Dataset.from_dict({"text": ["x", "y"], "teacher_embedding": [[0.5] * 4, [1.0] * 4]})
    with pytest.raises(ValueError, match="eval dataset's teacher embeddings have dimension 5"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=train, eval_dataset=eval_data)


def test_image_rows_are_refused_in_the_text_only_stage(qwen2_vl_model, tmp_path):
    base = {"text": ["a", "b", "c"], "teacher_embedding": [[0.1, 0.2]] * 3}
    # MMEB-style empty image fields are fine ...
    mmeb_style = datasets.Dataset.from_dict({**base, "qry_image_path": ["", "", None]})
    DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=mmeb_style)
    # ... an actual image is not
    with_image = datasets.Dataset.from_dict({**base, "image": [None, None, "images/cat.png"]})
    with pytest.raises(ValueError, match=r"1 row\(s\).*image in column 'image' \(rows 2\).*text only"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=with_image)
    from PIL import Image

    pil = datasets.Dataset.from_dict({**base, "image": [None, Image.new("RGB", (4, 4)), None]}).cast_column(
        "image", datasets.Image()
    )
    with pytest.raises(ValueError, match=r"rows 1\)"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=pil)
    collator = TextDistillCollator(qwen2_vl_model.processor, "unime")
    with pytest.raises(ValueError, match=r"batch row 0 \(text='a'\) carries an image in column 'image'"):
        collator([{"text": "a", "teacher_embedding": [0.1], "image": Image.new("RGB", (4, 4))}])


def test_empty_texts_are_refused(qwen2_vl_model, tmp_path):
    data = datasets.Dataset.from_dict({"text": ["a red circle", "   ", "ok"], "teacher_embedding": [[0.1, 0.2]] * 3})
    with pytest.raises(ValueError, match=r"empty or missing 'text' \(rows 1\)"):
        DistillEmbedTrainer(model=qwen2_vl_model, args=_config(tmp_path), train_dataset=data)
    collator = TextDistillCollator(qwen2_vl_model.processor, "unime")
    with pytest.raises(ValueError, match=r"batch row 1 has an empty or missing 'text' \(''\)"):
        collator([{"text": "ok", "teacher_embedding": [0.1]}, {"text": "", "teacher_embedding": [0.1]}])


# -------------------------------------------------------------------------------------------------------- learning
@pytest.fixture(scope="module")
def minilm_corpus(_session_cache):
    """The generated corpus with the real offline all-MiniLM-L6-v2 teacher's embeddings."""
    from mm_embed_trl.teacher import embed_with_teacher

    return embed_with_teacher(make_text_corpus(384, 96, seed=1), batch_size=128)


def test_it_learns_the_teachers_similarity_structure_on_held_out_texts(
    minilm_corpus, tiny_backbone, tmp_path, one_thread
):
    evaluator = TeacherAgreementEvaluator.from_dataset(minilm_corpus["eval"], batch_size=96)
    model = _model(tiny_backbone)
    before = evaluator(model)
    config = _config(
        tmp_path, per_device_train_batch_size=32, num_train_epochs=4, learning_rate=2e-3, temperature=0.1,
        lr_scheduler_type="cosine", weight_decay=0.0, seed=0, logging_steps=100, dataloader_drop_last=True,
    )
    DistillEmbedTrainer(model=model, args=config, train_dataset=minilm_corpus["train"]).train()
    after = evaluator(model)
    assert after["heldout_spearman"] > before["heldout_spearman"] + 0.2, (before, after)
    assert after["heldout_spearman"] > 0.35, (before, after)


# ---------------------------------------------------------------------------------------------- recipes / example
def _example_module():
    return load_script("examples/train_distill.py")


def test_recipes_parse_with_trl_parser():
    from trl import ModelConfig, TrlParser

    example = _example_module()
    recipes = sorted(glob.glob(str(ROOT / "recipes" / "distill_*.yaml")))
    assert len(recipes) == 3
    for recipe in recipes:
        parser = TrlParser((example.DistillScriptArguments, DistillEmbedConfig, ModelConfig))
        script, args, model = parser.parse_args_and_config(
            ["--config", recipe, "--output_dir", "/tmp/x", "--bf16", "false"]
        )
        assert args.output_dir == "/tmp/x" and args.prompt_template == "unime"  # the command line overrides
        if "tiny" in recipe:
            for key, value in example.TINY_DEFAULTS.items():  # the recipe documents the script's defaults
                if key not in ("output_dir", "report_to"):  # report_to "none" is normalised to []
                    assert getattr(args, key) == value, (key, getattr(args, key), value)
        else:
            assert model.model_name_or_path and model.use_peft and model.lora_r == 32
            assert args.learning_rate == 5e-4 and args.num_train_epochs == 2 and args.temperature == 0.02
            assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 768
            assert args.freeze_vision_tower and args.lora_target == "language_model"
            assert args.kl_direction == "teacher_student"


@pytest.mark.slow
def test_example_runs_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = launching.run(
        ROOT / "examples" / "train_distill.py", "--output_dir", out, "--generated_train_size", 256,
        "--generated_eval_size", 64, "--num_train_epochs", 2,
    )
    assert "built-in tiny random qwen2_vl backbone" in result.stdout
    assert "built-in generated text corpus (256 train / 64 held-out" in result.stdout
    assert "heldout_spearman" in result.stdout
    import json

    report = json.loads((out / "retrieval_report.json").read_text())
    assert report["after"]["heldout_spearman"] > report["before"]["heldout_spearman"]
    assert (out / "model.safetensors").exists() and (out / "sentence_transformers" / "modules.json").exists()
