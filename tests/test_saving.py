"""Nothing lost, nothing silently wrong when saving: the final save is old-or-new, a reused output_dir is refused,
`resume_from_checkpoint` resumes, "good" checkpoints are healthy, files follow the umask, a full disk is one clear
error."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel


class Killed(BaseException):
    """Stands for the process dying at this point (raised where a kill -9 could land)."""


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, report_to="none", use_cpu=True,
        save_strategy="no", logging_steps=1, temperature=0.05, num_hard_negatives=3, num_negatives=0,
    )
    defaults.update(kw)
    return HardNegContrastiveConfig(**defaults)


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (relative path -> sha256): two folders hold the same things iff equal."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _trainer(tiny_backbone, shapes_data, config, *, perturb: float | None = None):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    if perturb is not None:  # a different model than the previous run's
        with torch.no_grad():
            for p in model.parameters():
                p.add_(perturb)
    train = shapes_data["train"].select(range(16))
    config.image_root = config.image_root or str(shapes_data.image_root)  # the row check looks for the images
    return HardNegContrastiveTrainer(model=model, args=config, train_dataset=train)


def _kill_after(monkeypatch, target, name, *, call: int = 1):
    """Let `target.name` run, then 'kill' the process after its `call`-th call returns."""
    original = getattr(target, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == call:
            raise Killed(f"killed after {name}")
        return result

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("kill_point", ["weights", "sentence_transformers", "card"])
def test_final_save_into_a_reused_output_dir_leaves_the_old_or_the_new_model(
    kill_point, tiny_backbone, shapes_data, tmp_path, monkeypatch
):
    import transformers.modeling_utils
    from sentence_transformers import SentenceTransformer

    import mm_embed_trl.export.model_card as model_card

    config = _config(tmp_path)
    out = Path(config.output_dir)
    _trainer(tiny_backbone, shapes_data, config).save_for_inference()  # the previous run's complete model
    (out / "retrieval_report.json").write_text("{}")  # and its other files
    old = _tree(out)

    trainer = _trainer(tiny_backbone, shapes_data, config, perturb=0.01)
    card = {"dataset_name": "the new run's data"}
    with monkeypatch.context() as patch:
        if kill_point == "weights":
            _kill_after(patch, transformers.modeling_utils, "safe_save_file")
        elif kill_point == "sentence_transformers":
            _kill_after(patch, SentenceTransformer, "save")
        else:  # the root card is the last thing written (the export's own card comes first)
            _kill_after(patch, model_card, "render_model_card", call=2)
        with pytest.raises(Killed):
            trainer.save_for_inference(model_card_data=card)
    assert _tree(out) == old  # the previous model, whole

    trainer.save_for_inference(model_card_data=card)
    new = _tree(out)
    assert new["retrieval_report.json"] == old["retrieval_report.json"]  # the run's other files are kept
    for name in ("model.safetensors", "README.md", "sentence_transformers/model.safetensors"):
        assert new[name] != old[name], name
    texts = ["a red circle on the left", "two blue squares"]
    expected = trainer.model.encode(texts)
    torch.testing.assert_close(MultimodalEmbeddingModel.from_pretrained(out).encode(texts), expected)
    st = SentenceTransformer(str(out / "sentence_transformers"), device="cpu")
    torch.testing.assert_close(torch.as_tensor(st.encode_query(texts)), expected, atol=1e-5, rtol=0)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging leftovers


# ------------------------------------------------------------------------------------------- healthy checkpoints
def _usable(embeddings: torch.Tensor) -> bool:
    return bool(torch.isfinite(embeddings).all() and (embeddings.norm(dim=-1) > 0.5).all())  # normalised: 1


def test_nan_stop_names_only_a_checkpoint_with_usable_weights(tiny_backbone, shapes_data, tmp_path):
    """lr=1e6: the loss stays finite for a step while the weights reach ~1e6 and every embedding becomes a zero
    vector; that checkpoint used to be named "last good"."""
    import re

    from mm_embed_trl.trainers import NonFiniteLossError

    config = _config(  # warm-up: step 1 runs at lr 0 (as in the example's demo defaults), step 2 at 1e6
        tmp_path, learning_rate=1e6, warmup_steps=1, save_strategy="steps", save_steps=1, max_steps=6,
        image_root=str(shapes_data.image_root),
    )
    trainer = _trainer(tiny_backbone, shapes_data, config)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.train()
    message = str(info.value)
    texts = ["a yellow triangle at the top", "three green circles"]
    usable = {
        ckpt.name: _usable(MultimodalEmbeddingModel.from_pretrained(ckpt).encode(texts))
        for ckpt in sorted(Path(config.output_dir).glob("checkpoint-*"))
    }
    assert not all(usable.values()), usable  # the run did write a diverged checkpoint before the NaN
    named = re.search(r"Last good checkpoint: (\S+) ", message)
    assert named and usable[Path(named.group(1)).name], (message, usable)
    # no usable checkpoint is newer than the one named, and the diverged ones are listed as such
    newer = [name for name in usable if int(name.split("-")[1]) > int(Path(named.group(1)).name.split("-")[1])]
    assert newer and not any(usable[name] for name in newer) and all(name in message for name in newer), message


def test_encode_warns_about_zero_and_nan_vectors(tiny_backbone, caplog):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    texts = ["one", "two", "three"]
    with caplog.at_level("WARNING", logger="mm_embed_trl"):
        model.encode(texts)
    assert "zero or non-finite" not in caplog.text
    with torch.no_grad():
        model.backbone.get_input_embeddings().weight.fill_(float("nan"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="mm_embed_trl"):
        out = model.encode(texts, batch_size=2)  # two batches: still one warning for the call
    assert torch.isnan(out).any()
    warnings = [r for r in caplog.records if "zero or non-finite" in r.getMessage()]
    assert len(warnings) == 1 and "3 of 3 embeddings" in warnings[0].getMessage()


# ------------------------------------------------------------------------------------------------- file modes
def test_every_file_written_follows_the_umask(tiny_backbone, shapes_data, tmp_path, monkeypatch):
    """Weights were written 0600 (safetensors goes through a private temporary file) while every other file
    followed the umask: a group sharing a run, an export or a cache could read the card but not the weights."""
    from mm_embed_trl.demo.generated import make_shapes_dataset
    from mm_embed_trl.demo.tiny import get_tiny_backbone
    from mm_embed_trl.export import export_sentence_transformers

    previous = os.umask(0o027)
    try:
        config = _config(
            tmp_path, save_strategy="steps", save_steps=1, max_steps=1, image_root=str(shapes_data.image_root)
        )
        trainer = _trainer(tiny_backbone, shapes_data, config)
        trainer.train()
        trainer.save_for_inference()
        export_sentence_transformers(config.output_dir, tmp_path / "export")
        get_tiny_backbone("text", cache_dir=str(tmp_path / "cache"))
        make_shapes_dataset(tmp_path / "shapes", num_train=4, num_eval=2)
    finally:
        os.umask(previous)
    wrong = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for p in tmp_path.rglob("*")
        if (p.stat().st_mode & 0o777) != (0o750 if p.is_dir() else 0o640)
    }
    assert not wrong, wrong


# ------------------------------------------------------------------------------------------------- full disk
def _disk_full(monkeypatch):
    """shutil.disk_usage reports a full device (what follows a failed write on one)."""
    import collections
    import shutil

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_leaves_nothing(
    tiny_backbone, shapes_data, tmp_path, monkeypatch
):
    from mm_embed_trl._files import DiskFullError

    config = _config(tmp_path, save_strategy="steps", save_steps=1, max_steps=2, image_root=str(shapes_data.image_root))
    trainer = _trainer(tiny_backbone, shapes_data, config)
    original = trainer._save_optimizer_and_scheduler

    def optimizer_save_on_a_full_disk(output_dir):
        if trainer.state.global_step == 2:
            _disk_full(monkeypatch)
            raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save says on ENOSPC
        return original(output_dir)

    monkeypatch.setattr(trainer, "_save_optimizer_and_scheduler", optimizer_save_on_a_full_disk)
    with pytest.raises(DiskFullError, match=r"No space left on device at .*checkpoint-2.* while writing checkpoint-2"):
        trainer.train()
    out = Path(config.output_dir)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1"]  # no .staging, no partial checkpoint-2


@pytest.mark.parametrize("what", ["final save", "export"])
def test_a_full_disk_during_the_final_save_or_an_export_is_a_clear_error(
    what, tiny_backbone, shapes_data, tmp_path, monkeypatch
):
    import transformers.modeling_utils
    from sentence_transformers import SentenceTransformer

    from mm_embed_trl._files import DiskFullError
    from mm_embed_trl.export import export_sentence_transformers

    config = _config(tmp_path)
    trainer = _trainer(tiny_backbone, shapes_data, config)
    if what == "export":
        trainer.save_for_inference()
    before = sorted(p.name for p in tmp_path.rglob("*"))

    def full(*args, **kwargs):
        _disk_full(monkeypatch)
        raise OSError(28, "No space left on device")

    if what == "final save":
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
        with pytest.raises(DiskFullError, match=r"No space left on device at .*out.* while writing the final model"):
            trainer.save_for_inference()
    else:
        monkeypatch.setattr(SentenceTransformer, "save", full)
        with pytest.raises(DiskFullError, match=r"at .*export.* while writing the sentence-transformers export"):
            export_sentence_transformers(config.output_dir, tmp_path / "export")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no staging folder anywhere


# ------------------------------------------------------------------------------------- reused output_dir, resume
def test_a_fresh_run_into_another_runs_output_dir_is_refused_or_replaces_it(tiny_backbone, shapes_data, tmp_path):
    config = _config(tmp_path, save_strategy="steps", save_steps=2, max_steps=4, image_root=str(shapes_data.image_root))
    first = _trainer(tiny_backbone, shapes_data, config)
    first.train()
    first.save_for_inference()
    out = Path(config.output_dir)
    old = _tree(out)
    again = _trainer(tiny_backbone, shapes_data, config)
    with pytest.raises(FileExistsError, match=r"holds another run \(checkpoint-2, checkpoint-4, a final model.*"
                       r"--resume_from_checkpoint last.*--overwrite_output_dir"):
        again.train()
    assert _tree(out) == old  # untouched

    config = _config(tmp_path, save_strategy="steps", save_steps=3, max_steps=3, overwrite_output_dir=True,
                     image_root=str(shapes_data.image_root))
    replacing = _trainer(tiny_backbone, shapes_data, config)
    replacing.train()
    # the old run's checkpoints are gone (rotation and "last" would have picked checkpoint-4 of the old run)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]


@pytest.mark.parametrize("save_strategy", ["steps", "epoch"])
def test_resuming_a_run_complete_at_its_last_checkpoint_only_finishes_its_final_save(
    save_strategy, tiny_backbone, shapes_data, tmp_path
):
    """A run killed during its final save left checkpoint-3 at max_steps=3 (mid-epoch: 2 steps per epoch). Resuming it
    must train nothing (Trainer took one step more before its step-end check stopped it) and save checkpoint-3's
    weights as the final model (and, saving every epoch, not rewrite checkpoint-3 at the end of the epoch it stops
    in)."""
    from safetensors.torch import load_file

    config = _config(
        tmp_path, save_strategy=save_strategy, save_steps=3, max_steps=3, image_root=str(shapes_data.image_root)
    )
    _trainer(tiny_backbone, shapes_data, config).train()  # ... and killed before save_for_inference published
    out = Path(config.output_dir)
    checkpoint = out / "checkpoint-3"
    before = _tree(out)

    resumed = _trainer(tiny_backbone, shapes_data, config)
    resumed.train(resume_from_checkpoint="last")
    assert resumed.state.global_step == 3
    assert _tree(out) == before  # no step, no checkpoint rewritten
    resumed.save_for_inference()
    final, last = load_file(out / "model.safetensors"), load_file(checkpoint / "model.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in last)


def test_resume_last_picks_the_newest_complete_checkpoint_or_says_there_is_none(
    tiny_backbone, shapes_data, tmp_path
):
    config = _config(tmp_path, save_strategy="steps", save_steps=1, max_steps=2, image_root=str(shapes_data.image_root))
    trainer = _trainer(tiny_backbone, shapes_data, config)
    with pytest.raises(FileNotFoundError, match=r"'last' found no complete checkpoint in output_dir .*out"):
        trainer.train(resume_from_checkpoint="last")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "nope"))
    trainer.train()
    out = Path(config.output_dir)
    (out / "checkpoint-7").mkdir()  # copied by hand, incomplete: no trainer_state.json, no weights
    (out / "checkpoint-7" / "optimizer.pt").write_bytes(b"partial")
    assert trainer.resolve_resume_checkpoint("last") == str(out / "checkpoint-2")
    assert trainer.resolve_resume_checkpoint(True) == str(out / "checkpoint-2")


def test_the_backbones_generation_config_survives_every_save(
    tiny_backbone, instruct_generation_config, generation_settings, tmp_path
):
    """The backbone's generation config (Qwen's EOS list, its sampling defaults) is saved beside the model and
    restored on loading: by save_pretrained, the staged file-by-file save of the final model (LoRA merged) and the
    model inside the generative sentence-transformers export. Dropping it made a reloaded model stop on one EOS."""
    from peft import LoraConfig

    from mm_embed_trl.export.final_save import save_model_files
    from mm_embed_trl.export.generative import export_generative_sentence_transformers
    from mm_embed_trl.trainers.sft_trainer import prepare_embedding_tokens

    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    prepare_embedding_tokens(model, model.processor)
    model.backbone.generation_config = instruct_generation_config(model.processor.tokenizer)
    expected = generation_settings(model)
    assert expected["eos_token_id"] == [model.processor.tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                        model.processor.tokenizer.pad_token_id]
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "generation_config.json").is_file()
    assert generation_settings(MultimodalEmbeddingModel.from_pretrained(tmp_path / "plain")) == expected
    model.add_lora(LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0))
    model.merge_lora()
    save_model_files(model, tmp_path / "final")
    assert generation_settings(MultimodalEmbeddingModel.from_pretrained(tmp_path / "final")) == expected
    export = export_generative_sentence_transformers(model, tmp_path / "st_gen", generation={"max_new_tokens": 4})
    assert generation_settings(MultimodalEmbeddingModel.from_pretrained(export / "mm_embedding")) == expected
