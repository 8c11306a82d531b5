"""HardNegContrastiveTrainer: same gradients across 1/N processes and with GradCache, learning, bad input."""

from __future__ import annotations

import glob
import sys
from pathlib import Path

import launching
import pytest
import torch
from numerics import (
    TINY_FORWARD,
    TINY_IMAGE_BACKWARD,
    TINY_IMAGE_FORWARD,
    assert_close,
    assert_loss_close,
    rounding_rtol,
)
from scripts import load_script

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
from mm_embed_trl.trainers import NonFiniteLossError

ROOT = Path(__file__).resolve().parents[1]
STEP_SCRIPT = ROOT / "tests" / "dist_scripts" / "hardneg_trainer_step.py"
PADDED_BATCH_SCRIPT = ROOT / "tests" / "dist_scripts" / "padded_last_batch.py"


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        temperature=0.05,
        num_hard_negatives=3,
    )
    defaults.update(kw)
    return HardNegContrastiveConfig(**defaults)


# The same step computed another way (chunks, ranks) differs by rounding only: image + text batches through the tiny
# backbone, then logits scaled by 1 / temperature (0.05, the _config default).
LOSS_RTOL = rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / 0.05)
GRAD_RTOL = rounding_rtol(**TINY_IMAGE_BACKWARD, gain=1 / 0.05)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step_grads(model_path, rows, config):
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(model_path)
    trainer = HardNegContrastiveTrainer(model=model, args=config)
    model.train()
    loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator(rows)))
    trainer.accelerator.backward(loss)
    return loss.item(), _grads(model), trainer


@pytest.mark.parametrize("variant", ["plain", "lora+checkpointing"])
def test_grad_cache_gives_the_same_gradients(variant, tiny_backbone, shapes_data, tmp_path):
    rows = [shapes_data["train"][i] for i in range(8)]
    extra = {}
    if variant != "plain":
        extra = dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    results = []
    for chunk in (None, 3):
        config = _config(tmp_path, image_root=str(shapes_data.image_root), gradient_cache_chunk_size=chunk, **extra)
        torch.manual_seed(0)
        model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
        peft = None
        if variant != "plain":
            from peft import LoraConfig

            peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
        trainer = HardNegContrastiveTrainer(model=model, args=config, peft_config=peft)
        if extra:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.model.train()
        # record the largest batch that ran WITH a graph: GradCache must keep it to the chunk size
        biggest = []

        def record(module, args, kwargs, biggest=biggest):
            if torch.is_grad_enabled() and "input_ids" in kwargs:
                biggest.append(kwargs["input_ids"].shape[0])

        handle = trainer.model.register_forward_pre_hook(record, with_kwargs=True)
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows)))
        trainer.accelerator.backward(loss)
        handle.remove()
        results.append((loss.item(), _grads(trainer.model), max(biggest) if biggest else 0))
    (loss_plain, g_plain, _), (loss_cached, g_cached, biggest_cached) = results
    assert biggest_cached <= 3, "GradCache ran a forward with graph on more rows than the chunk"
    assert_loss_close(loss_cached, loss_plain, rtol=LOSS_RTOL)
    assert g_plain.keys() == g_cached.keys() and len(g_plain) > 0
    if variant != "plain":
        assert all("lora_" in k for k in g_plain)
    for name in g_plain:
        assert_close(g_cached[name], g_plain[name], rtol=GRAD_RTOL, msg=name)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    """N processes x B rows == 1 process x N*B rows: loss and every parameter gradient (DDP on gloo), with and
    without GradCache, with explicit negatives and a planted duplicate target."""
    outputs = {}
    for name, processes, extra in (("single", 1, ()), ("ddp", 2, ()), ("ddp_gradcache", 2, ("--chunk", "2"))):
        out = tmp_path / f"{name}.pt"
        launching.run(STEP_SCRIPT, out, "--negatives", "1", *extra, processes=processes)
        outputs[name] = torch.load(out)
    ref = outputs["single"]
    assert ref["world"] == 1 and outputs["ddp"]["world"] == 2
    for name in ("ddp", "ddp_gradcache"):
        got = outputs[name]
        assert_loss_close(got["loss"], ref["loss"], rtol=LOSS_RTOL)
        assert got["grads"].keys() == ref["grads"].keys()
        for key in ref["grads"]:
            assert_close(got["grads"][key], ref["grads"][key], rtol=GRAD_RTOL, msg=key)


@pytest.mark.slow
def test_rows_repeated_to_even_out_the_last_batch_across_processes_stay_out_of_the_loss(tmp_path):
    """12 rows, a global batch of 8 on 2 processes: accelerate completes the epoch's last batch (4 rows) with 4 rows
    from the start of the epoch (`even_batches`), which then weighed in the softmax as extra negatives. The step must
    equal one process's step on the 4 unique rows (loss and gradients, to rounding)."""
    outputs = {}
    for name, processes in (("single", 1), ("ddp", 2)):
        out = tmp_path / f"{name}.pt"
        launching.run(PADDED_BATCH_SCRIPT, out, processes=processes)
        outputs[name] = torch.load(out)
    one, two = outputs["single"], outputs["ddp"]
    assert one["world"] == 1 and two["world"] == 2
    assert one["ids"].numel() == 4 and two["ids"].numel() == 8  # the 2-process batch was padded ...
    assert torch.equal(two["ids"][:4], one["ids"])  # ... after the same 4 rows
    assert_loss_close(two["loss"], one["loss"], rtol=LOSS_RTOL)
    assert two["grads"].keys() == one["grads"].keys()
    for key in one["grads"]:
        assert_close(two["grads"][key], one["grads"][key], rtol=GRAD_RTOL, msg=key)


def test_repeats_a_trainer_cannot_leave_out_are_reported_with_their_count(tiny_backbone, shapes_data, tmp_path, caplog):
    """Without gather_across_devices each rank's loss sees only its own rows, so the repeats cannot be cut from the
    global batch: a warning names them instead of training on them silently."""
    from mm_embed_trl.trainers.base import REAL_ROWS_KEY

    rows = [shapes_data["train"][i] for i in range(8)]
    config = _config(tmp_path, image_root=str(shapes_data.image_root), gather_across_devices=False, num_negatives=0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(model=model, args=config)
    model.train()
    batch = {**trainer.data_collator(rows), REAL_ROWS_KEY: 3}
    with caplog.at_level("WARNING", logger="mm_embed_trl.trainers.base"):
        trainer.compute_loss(model, trainer._prepare_inputs(batch))
        trainer.compute_loss(model, trainer._prepare_inputs(batch))
    warnings = [r.getMessage() for r in caplog.records if "even_batches" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once per run
    assert "holds 3 rows for 1 processes" in warnings[0] and "with 5 rows repeated" in warnings[0]


def test_logs_loss_diagnostics(tiny_backbone, shapes_data, tmp_path):
    rows = [shapes_data["train"][i] for i in range(8)]
    config = _config(tmp_path, image_root=str(shapes_data.image_root))
    _, _, trainer = _one_step_grads(tiny_backbone("qwen2_vl"), rows, config)
    logged = {}
    trainer.callback_handler.on_log = lambda args, state, control, logs: logged.update(logs) or control
    trainer.log({"loss": 1.0})
    for key in ("filtered_fraction", "mean_pos_sim", "mean_neg_sim", "accuracy"):
        assert key in logged, key


def test_batch_of_one_without_negatives_is_a_clear_error(tiny_backbone, shapes_data, tmp_path):
    rows = [shapes_data["train"][0]]
    config = _config(tmp_path, image_root=str(shapes_data.image_root), num_negatives=0)
    with pytest.raises(ValueError, match="no negatives to contrast"):
        _one_step_grads(tiny_backbone("qwen2_vl"), rows, config)


def test_every_candidate_filtered_is_a_clear_error(tiny_backbone, shapes_data, tmp_path):
    rows = [shapes_data["train"][i] for i in range(4)]
    # a margin of -5 drops every candidate (cosines lie in [-1, 1])
    config = _config(tmp_path, image_root=str(shapes_data.image_root), false_negative_margin=-5.0, num_negatives=0)
    with pytest.raises(ValueError, match="every candidate of every query was excluded"):
        _one_step_grads(tiny_backbone("qwen2_vl"), rows, config)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tiny_backbone, shapes_data, tmp_path):
    from transformers import TrainerCallback

    class PoisonAfter(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step == 2:  # after checkpoint-2 was written, before step 3
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if "embed_tokens" in n).fill_(float("nan"))

    train = shapes_data["train"].select(range(32))
    config = _config(
        tmp_path, image_root=str(shapes_data.image_root), save_strategy="steps", save_steps=2, max_steps=4,
        per_device_train_batch_size=8, num_negatives=0,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=train, callbacks=[PoisonAfter()])
    with pytest.raises(NonFiniteLossError, match=r"step 3.*Last good checkpoint: .*checkpoint-2"):
        trainer.train()
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    assert not (out / ".staging").exists()
    reloaded = MultimodalEmbeddingModel.from_pretrained(out / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in reloaded.parameters())


def test_checkpoints_are_complete_and_atomic(tiny_backbone, shapes_data, tmp_path, monkeypatch):
    train = shapes_data["train"].select(range(16))
    config = _config(
        tmp_path, image_root=str(shapes_data.image_root), save_strategy="steps", save_steps=1, max_steps=2,
        num_negatives=0, save_total_limit=1,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=train)
    # a crash while the checkpoint is being written must not leave a checkpoint-N folder behind
    original = trainer._save_optimizer_and_scheduler
    calls = {"n": 0}

    def crash_on_second(output_dir):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]
    assert (out / "checkpoint-1" / "model.safetensors").exists()
    assert (out / "checkpoint-1" / "optimizer.pt").exists()


def test_recipes_parse_with_trl_parser():
    from trl import ModelConfig, TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments

    for recipe in sorted(glob.glob(str(ROOT / "recipes" / "hardneg_*.yaml"))):
        parser = TrlParser((EmbeddingScriptArguments, HardNegContrastiveConfig, ModelConfig))
        script, args, model = parser.parse_args_and_config(
            ["--config", recipe, "--output_dir", "/tmp/x", "--bf16", "false"]
        )
        assert args.temperature > 0 and args.output_dir == "/tmp/x"  # the command line overrides the recipe
        if "tiny" not in recipe:
            assert model.model_name_or_path and model.use_peft and args.num_hard_negatives == 8
            assert args.false_negative_margin == 0.1 and args.temperature == 0.02


@pytest.mark.slow
def test_it_learns_on_held_out_data(tiny_backbone, tmp_path):
    """A short run on generated data raises retrieval on held-out compositions far above the untrained model."""
    from mm_embed_trl.demo.generated import make_shapes_dataset
    from mm_embed_trl.evaluation import RetrievalEvaluator

    data = make_shapes_dataset(num_train=384, num_eval=64, seed=1)
    evaluator = RetrievalEvaluator.from_rows(data["eval"], str(data.image_root), k_values=(1, 10), batch_size=64)
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    before = evaluator(model)
    config = _config(
        tmp_path, image_root=str(data.image_root), per_device_train_batch_size=32, num_train_epochs=5,
        learning_rate=5e-4, num_hard_negatives=16, lr_scheduler_type="cosine", logging_steps=50, seed=0,
    )
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=data["train"])
    trainer.train()
    after = evaluator(model)
    # a short CPU run: the effect is modest but far outside noise (the full example reaches MRR ~0.15-0.18)
    assert after["mrr"] > 2 * before["mrr"] and after["mrr"] > before["mrr"] + 0.03, (before, after)
    assert after["recall@10"] > before["recall@10"], (before, after)


def test_demo_defaults_apply_only_to_the_tiny_run(monkeypatch):
    from trl import ModelConfig, TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments, parse_args

    example = load_script("examples/train_hardneg.py")

    def parse(argv):
        monkeypatch.setattr(sys, "argv", ["train_hardneg.py", *argv])
        parser = TrlParser((EmbeddingScriptArguments, HardNegContrastiveConfig, ModelConfig))
        return parse_args(parser, example.TINY_DEFAULTS)

    _, tiny, _ = parse([])
    assert tiny.learning_rate == 5e-4 and tiny.num_hard_negatives == 32 and tiny.report_to == []
    _, real, _ = parse(["--model_name_or_path", "Qwen/Qwen2-VL-2B-Instruct", "--output_dir", "/tmp/r"])
    assert real.learning_rate == 1e-4 and real.num_hard_negatives == 8 and real.temperature == 0.02
    _, override, _ = parse(["--learning_rate", "3e-4"])  # the command line still wins over the demo defaults
    assert override.learning_rate == 3e-4 and override.num_hard_negatives == 32


def test_lora_run_saves_merged_weights_loadable_both_ways(tiny_backbone, shapes_data, tmp_path):
    from peft import LoraConfig
    from sentence_transformers import SentenceTransformer

    train = shapes_data["train"].select(range(16))
    config = _config(tmp_path, image_root=str(shapes_data.image_root), max_steps=2, num_negatives=0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=train, peft_config=peft)
    trainer.train()
    texts = ["a red circle on the left", "two blue squares"]
    trained = trainer.model.encode(texts)  # with live adapters
    out = Path(trainer.save_for_inference())
    saved = MultimodalEmbeddingModel.from_pretrained(out)
    assert not saved.has_lora and saved.config.lora_config is None
    assert not any("lora_" in n for n, _ in saved.named_parameters())
    # merged weights W + BA against live adapters (W x + B(A x)): one extra rounding per adapted projection
    assert_close(saved.encode(texts), trained, rtol=rounding_rtol(**TINY_FORWARD))
    st = SentenceTransformer(str(out / "sentence_transformers"))
    assert_close(torch.as_tensor(st.encode_query(texts)), trained, rtol=rounding_rtol(**TINY_FORWARD))


def test_lora_runs_with_the_same_seed_are_bit_identical(tiny_backbone, shapes_data, tmp_path):
    """LoRA draws its initial A matrices from the global RNG: they must come from `seed`, not from whatever state the
    process was in (before the fix the adapters were added before the Trainer seeded, so two runs differed)."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    train = shapes_data["train"].select(range(16))
    checkpoints = []
    for run, process_state in (("a", 1), ("b", 2)):
        torch.manual_seed(process_state)  # what a fresh process holds before anything seeds it
        config = _config(
            tmp_path / run, image_root=str(shapes_data.image_root), max_steps=2, num_negatives=0, seed=7,
            save_strategy="steps", save_steps=2,
        )
        model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
        HardNegContrastiveTrainer(
            model=model, args=config, train_dataset=train, peft_config=LoraConfig(r=4, lora_alpha=8)
        ).train()
        checkpoints.append(load_file(Path(config.output_dir) / "checkpoint-2" / "model.safetensors"))
    a, b = checkpoints
    assert any("lora_A" in k for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def test_best_checkpoint_paths_point_at_final_folders(tiny_backbone, shapes_data, tmp_path):
    import json

    train = shapes_data["train"].select(range(16))
    config = _config(
        tmp_path, image_root=str(shapes_data.image_root), max_steps=2, num_negatives=0, save_strategy="steps",
        save_steps=1, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
        metric_for_best_model="loss", greater_is_better=False,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=shapes_data["eval"].select(range(8))
    )
    trainer.train()
    out = Path(config.output_dir)
    best = trainer.state.best_model_checkpoint
    assert best and Path(best).parent == out and Path(best).is_dir(), best
    for ckpt in out.glob("checkpoint-*"):
        recorded = json.loads((ckpt / "trainer_state.json").read_text())["best_model_checkpoint"]
        assert ".staging" not in recorded and Path(recorded).is_dir(), recorded


def test_frozen_vision_with_lora_everywhere_is_a_clear_error(tiny_backbone, tmp_path):
    from peft import LoraConfig

    config = _config(tmp_path, freeze_vision_tower=True, lora_target="all")
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises(ValueError, match="contradicts lora_target='all'"):
        HardNegContrastiveTrainer(model=model, args=config, peft_config=LoraConfig(r=2))


def test_image_pixel_budget_is_applied_and_saved(tiny_backbone, tmp_path):
    from PIL import Image

    from mm_embed_trl.data.schema import EmbeddingInput

    big = [EmbeddingInput(text="a scene", image=Image.new("RGB", (200, 200), (255, 0, 0)))]
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    before = model.make_collator().encode_inputs(big)["image_grid_thw"]
    config = _config(tmp_path, image_max_pixels=56 * 56, num_negatives=0)
    trainer = HardNegContrastiveTrainer(model=model, args=config)
    after = trainer.data_collator.encode_inputs(big)["image_grid_thw"]
    assert int(after.prod(-1)) < int(before.prod(-1))  # fewer patches for the same image
    model.save_pretrained(tmp_path / "saved")
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "saved")
    assert reloaded.processor.image_processor.size["longest_edge"] == 56 * 56
    assert torch.equal(reloaded.make_collator().encode_inputs(big)["image_grid_thw"], after)  # inference alike
    with pytest.raises(ValueError, match="below the processor's minimum"):
        HardNegContrastiveTrainer(model=model, args=_config(tmp_path, image_max_pixels=100))
    llava = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("llava_onevision"))
    with pytest.raises(ValueError, match="fixed input resolution"):
        HardNegContrastiveTrainer(model=llava, args=config)


def test_evaluators_are_logged_at_each_evaluation(tiny_backbone, shapes_data, tmp_path):
    from mm_embed_trl.evaluation import RetrievalEvaluator

    evaluator = RetrievalEvaluator.from_rows(
        shapes_data["eval"].select(range(16)), str(shapes_data.image_root), name="heldout", k_values=(1,)
    )
    config = _config(
        tmp_path, image_root=str(shapes_data.image_root), max_steps=2, num_negatives=0, eval_strategy="steps",
        eval_steps=1,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = HardNegContrastiveTrainer(
        model=model, args=config, train_dataset=shapes_data["train"].select(range(16)),
        eval_dataset=shapes_data["eval"].select(range(8)), evaluators=[evaluator],
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if any("heldout_recall@1" in k for k in entry)]
    assert len(logged) == 2, trainer.state.log_history  # one per evaluation
    assert any("eval_loss" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("use_lora", [False, True])
def test_resume_from_checkpoint_reproduces_the_uninterrupted_run(use_lora, tiny_backbone, shapes_data, tmp_path):
    from peft import LoraConfig

    train = shapes_data["train"].select(range(32))

    def run(out, max_steps, resume=None):
        config = _config(
            tmp_path, output_dir=str(tmp_path / out), image_root=str(shapes_data.image_root), max_steps=4,
            num_negatives=0, save_strategy="steps", save_steps=2, seed=0, data_seed=0,
        )
        torch.manual_seed(0)
        model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
        peft = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False) if use_lora else None
        trainer = HardNegContrastiveTrainer(model=model, args=config, train_dataset=train, peft_config=peft)
        if resume is None and max_steps < 4:
            # stop after max_steps as if the run had been interrupted (checkpoint-2 is on disk)
            from transformers import TrainerCallback

            class Stop(TrainerCallback):
                def on_step_end(self, args, state, control, **kw):
                    if state.global_step >= max_steps:
                        control.should_training_stop = True

            trainer.add_callback(Stop())
        trainer.train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}

    full = run("full", 4)
    run("interrupted", 2)
    resumed = run("interrupted", 4, resume=str(tmp_path / "interrupted" / "checkpoint-2"))
    assert full.keys() == resumed.keys()
    for name in full:
        # the same computations in the same order (weights, optimizer, scheduler, RNG and data order restored)
        assert torch.equal(resumed[name], full[name]), name


@pytest.mark.slow
def test_ddp_timeout_applies_to_cpu_process_groups(tmp_path):
    """--ddp_timeout reached the process group only on accelerator backends: on the CPU (gloo) a stopped rank hung
    its peer for the 30-minute default whatever the option said."""
    import re

    script = ROOT / "tests" / "dist_scripts" / "ddp_timeout.py"
    finished = launching.run(script, 3, tmp_path / "out", processes=2, timeout=90, check=False)
    log = finished.output
    assert not finished.timed_out, f"rank 0 still waits for its stopped peer after 90 s (ddp_timeout=3):\n{log[-3000:]}"
    gave_up = re.search(r"rank 0 gave up after ([\d.]+)s", log)
    assert gave_up, log[-3000:]
    assert 2.0 < float(gave_up.group(1)) < 30, log[-3000:]  # ~3 s (gloo's own overhead aside), not 1800 s
