"""Training on a stream (a `datasets.IterableDataset`): the row checks run as rows stream in (skip counted, raise
naming the row), ranks and data-loader workers each read their own rows, a streamed run equals the same run on the
map-style rows, and a stream resumed from a checkpoint equals the run never stopped."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader

from mm_embed_trl import (
    EmbeddingSFTConfig,
    EmbeddingSFTTrainer,
    HardNegContrastiveConfig,
    HardNegContrastiveTrainer,
    MultimodalEmbeddingModel,
)
from mm_embed_trl.data.validation import BadRowsError, check_training_rows


def _config(tmp_path, config_class=HardNegContrastiveConfig, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        save_sentence_transformers=False,
        max_steps=2,
        seed=3,
    )
    defaults.update(kw)
    return config_class(**defaults)


def _rows_with_a_bad_one(shapes_data, n=9, bad=2):
    rows = shapes_data["train"].select(range(n)).remove_columns(["neg_text", "neg_image_path"]).to_list()
    rows[bad] = {**rows[bad], "pos_text": "", "pos_image_path": ""}  # nothing to embed on the positive side
    return datasets.Dataset.from_list(rows)


def _model(tiny_backbone):
    torch.manual_seed(0)
    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))


# ------------------------------------------------------------------------------------------ (a) lazy row checks
def test_a_bad_row_of_a_stream_is_skipped_and_counted(tiny_backbone, shapes_data, tmp_path, caplog):
    stream = _rows_with_a_bad_one(shapes_data).to_iterable_dataset(num_shards=1)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), on_bad_row="skip", num_negatives=0)
    trainer = HardNegContrastiveTrainer(model=_model(tiny_backbone), args=config, train_dataset=stream)
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert trainer.state.global_step == 2  # 8 good rows of 9 = two batches of 4
    assert "Skipping stream row 2" in caplog.text and "an empty 'pos_text' and no image" in caplog.text
    assert "1 of the training stream" in caplog.text
    assert trainer._stream_skipped["train"] == 1


def test_a_bad_row_of_a_stream_raises_naming_it(tiny_backbone, shapes_data, tmp_path):
    stream = _rows_with_a_bad_one(shapes_data).to_iterable_dataset(num_shards=1)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), num_negatives=0)
    trainer = HardNegContrastiveTrainer(model=_model(tiny_backbone), args=config, train_dataset=stream)
    with pytest.raises(BadRowsError, match=r"(?s)stream row 2 \(qry .*\).*on_bad_row='skip'"):
        trainer.train()


def test_a_stream_needs_max_steps_before_the_model_loads(shapes_data, tmp_path):
    stream = _rows_with_a_bad_one(shapes_data).to_iterable_dataset()
    config = _config(tmp_path, max_steps=-1)
    with pytest.raises(ValueError, match=r"set max_steps \(--max_steps N\)"):
        HardNegContrastiveTrainer(model="no/such-model", args=config, train_dataset=stream)


def test_an_eval_stream_on_several_processes_is_refused_before_the_model_loads(shapes_data, tmp_path, monkeypatch):
    # 2 ranks crashed in accelerate's batch dispatch ("You can't use batches of different size ...")
    monkeypatch.setattr(HardNegContrastiveConfig, "world_size", property(lambda self: 2))
    stream = shapes_data["eval"].to_iterable_dataset(num_shards=2)
    with pytest.raises(ValueError, match=r"An eval dataset is a stream .* and 2 processes run: evaluate on a map"):
        HardNegContrastiveTrainer(model="no/such-model", args=_config(tmp_path), train_dataset=shapes_data["train"],
                                  eval_dataset={"held_out": stream})


def test_the_stream_checks_columns_at_once_and_rows_with_the_map_style_messages(shapes_data):
    renamed = _rows_with_a_bad_one(shapes_data).rename_column("pos_text", "pos_txt").to_iterable_dataset()
    with pytest.raises(ValueError, match="'pos_text' is missing but 'pos_txt' looks like it"):
        check_training_rows(renamed)
    map_style = _rows_with_a_bad_one(shapes_data)
    with pytest.raises(BadRowsError) as on_map:
        check_training_rows(map_style)
    with pytest.raises(BadRowsError) as on_stream:
        list(check_training_rows(map_style.to_iterable_dataset()))
    cause = "with an empty 'pos_text' and no image in 'pos_image_path'"
    assert cause in str(on_map.value) and cause in str(on_stream.value)


# -------------------------------------------------------------------------------------- (b) ranks and workers
def _text_stream(n, num_shards):
    rows = datasets.Dataset.from_dict({"qry": [f"q{i}" for i in range(n)], "pos_text": [f"p{i}" for i in range(n)]})
    return check_training_rows(rows.to_iterable_dataset(num_shards=num_shards), on_bad_row="skip")


def _queries(batches):
    return [q for batch in batches for q in batch]


def _collate(rows):
    return [row["qry"] for row in rows]


@pytest.mark.parametrize("num_shards", [4, 1])  # accelerate's shard() / its IterableDatasetShard fallback
@pytest.mark.parametrize("shuffled", [False, True])
def test_two_ranks_read_disjoint_rows_that_together_are_the_stream(num_shards, shuffled):
    """The trainer's path: accelerate's prepare_data_loader with dispatch_batches=False (what the trainer sets for a
    stream), as ranks 0 and 1 of 2 would call it."""
    stream = _text_stream(24, num_shards)
    if shuffled:
        stream = stream.shuffle(seed=5, buffer_size=8)
    seen = []
    for rank in (0, 1):
        loader = prepare_data_loader(
            DataLoader(stream, batch_size=3, collate_fn=_collate), num_processes=2, process_index=rank,
            put_on_device=False, dispatch_batches=False,
        )
        seen.append(_queries(loader))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(f"q{i}" for i in range(24))
    assert len(seen[0]) == len(seen[1]) == 12


@pytest.mark.parametrize("num_shards", [2, 1])
def test_each_row_comes_once_through_two_data_loader_workers(num_shards):
    loader = DataLoader(_text_stream(20, num_shards), batch_size=4, collate_fn=_collate, num_workers=2)
    assert sorted(_queries(loader)) == sorted(f"q{i}" for i in range(20))


def test_too_few_shards_for_the_readers_are_named_and_batches_are_not_dispatched(
    tiny_backbone, shapes_data, tmp_path, caplog
):
    stream = _rows_with_a_bad_one(shapes_data).to_iterable_dataset(num_shards=1)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), dataloader_num_workers=2, num_negatives=0)
    with caplog.at_level(logging.WARNING):
        HardNegContrastiveTrainer(model=_model(tiny_backbone), args=config, train_dataset=stream)
    assert "has 1 shard(s), fewer than 2 readers" in caplog.text
    assert config.accelerator_config.dispatch_batches is False


# -------------------------------------------------------------------------------- (c) stream == map-style run
def _final_weights(trainer):
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("method", ["hardneg", "sft"])
def test_a_streamed_run_equals_the_map_style_run_on_the_same_rows(method, tiny_backbone, shapes_data, tmp_path):
    """Same rows in the same order (sequential sampler / unshuffled stream), same seed: the same batches, so the
    same operations in the same order on one process, and bit-identical weights."""
    rows = shapes_data["train"].select(range(8))
    if method == "hardneg":
        trainer_class, extra = HardNegContrastiveTrainer, dict(num_negatives=2)
        model = _model
    else:
        trainer_class, extra = EmbeddingSFTTrainer, dict(config_class=EmbeddingSFTConfig)

        def model(backbone):
            torch.manual_seed(0)
            return MultimodalEmbeddingModel.from_pretrained(backbone("qwen2_vl"), encoder_kind="generative")

    weights = []
    for run, data in (("map", rows), ("stream", rows.to_iterable_dataset(num_shards=2))):
        config = _config(
            tmp_path / run, image_root=str(shapes_data.image_root), train_sampling_strategy="sequential", **extra
        )
        weights.append(_final_weights(trainer_class(model=model(tiny_backbone), args=config, train_dataset=data)))
    on_map, on_stream = weights
    assert on_map.keys() == on_stream.keys()
    changed = [n for n in on_map if not torch.equal(on_map[n], on_stream[n])]
    assert not changed, changed[:3]
    assert Path(tmp_path / "stream" / "out").exists()


# ---------------------------------------------------------------------------------------------- the examples
def test_the_example_streams_local_files_and_checks_once(shapes_data, tmp_path, caplog):
    from mm_embed_trl.scripts import EmbeddingScriptArguments, resolve_datasets

    path = tmp_path / "train.jsonl"
    _rows_with_a_bad_one(shapes_data).to_json(str(path))
    script_args = EmbeddingScriptArguments(dataset_name=str(path), streaming=True, shuffle_buffer_size=4)
    training_args = _config(tmp_path, image_root=str(shapes_data.image_root), on_bad_row="skip", num_negatives=0)
    train, _, _ = resolve_datasets(script_args, training_args)
    assert isinstance(train, datasets.IterableDataset)
    assert check_training_rows(train, on_bad_row="skip", **training_args.row_contract) is train  # the trainer's
    with caplog.at_level(logging.WARNING):
        rows = list(train)
    assert len(rows) == 8 and caplog.text.count("Skipping stream row") == 1
    again = [row["qry"] for row in train]
    assert [row["qry"] for row in rows] == again  # seeded: the same order each time at the same epoch


def test_grpo_and_distill_examples_refuse_a_stream():
    from mm_embed_trl.scripts import EmbeddingScriptArguments, refuse_stream_and_mixture

    with pytest.raises(ValueError, match="--streaming is not supported by EmbeddingGRPOTrainer: because"):
        refuse_stream_and_mixture(EmbeddingScriptArguments(streaming=True), "EmbeddingGRPOTrainer", "because")
    with pytest.raises(ValueError, match="--streaming does not apply to --dataset_mixture"):
        EmbeddingScriptArguments(streaming=True, dataset_mixture=[{"name_or_path": "generated"}])


def test_set_epoch_on_the_prepared_loader_reshuffles_the_stream_the_same_on_every_rank():
    """What Trainer does at each pass (train_dataloader.set_epoch(epoch)) reaches the stream's shuffle."""
    stream = _text_stream(24, 4).shuffle(seed=5, buffer_size=8)
    orders = {}
    for rank in (0, 1):
        loader = prepare_data_loader(
            DataLoader(stream, batch_size=3, collate_fn=_collate), num_processes=2, process_index=rank,
            put_on_device=False, dispatch_batches=False,
        )
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            orders[rank, epoch] = _queries(loader)
    for rank in (0, 1):
        assert orders[rank, 0] != orders[rank, 1] and sorted(orders[rank, 0]) == sorted(orders[rank, 1])
    assert not set(orders[0, 1]) & set(orders[1, 1])


# ------------------------------------------------------------------------------------------ (d) resuming a stream
def test_a_stream_resumed_mid_epoch_equals_the_uninterrupted_run(tiny_backbone, shapes_data, tmp_path):
    """12 shuffled rows in batches of 4: a checkpoint at step 2 is mid-way through the first pass, and step 4 runs in
    the second (reshuffled) pass. Resuming there replays the stream to the same row and trains to the same weights,
    bit for bit, as the run that was never stopped."""
    stream = shapes_data["train"].select(range(12)).to_iterable_dataset(num_shards=2).shuffle(seed=7, buffer_size=4)

    def trainer(run):
        config = _config(
            tmp_path / run, image_root=str(shapes_data.image_root), num_negatives=2, max_steps=4,
            save_strategy="steps", save_steps=2,
        )
        return HardNegContrastiveTrainer(model=_model(tiny_backbone), args=config, train_dataset=stream)

    whole = _final_weights(trainer("whole"))
    resumed = trainer("resumed")
    checkpoint = tmp_path / "whole" / "out" / "checkpoint-2"
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    changed = [n for n, p in resumed.model.named_parameters() if not torch.equal(p.detach(), whole[n])]
    assert not changed, changed[:3]


# ------------------------------------------------------------------------------------ from pass to pass
def _trained_batch_sizes(trainer, draws=None):
    """A spy on `trainer.training_step`: the list it returns fills with the rows of each micro-batch trained on;
    `draws` (a list) with a number drawn from torch's CPU generator at each, as CPU dropout would."""
    sizes, step = [], trainer.training_step

    def spy(model, inputs, num_items_in_batch=None):
        sizes.append(len(inputs["query"]["input_ids"]))
        if draws is not None:
            draws.append(torch.rand(()).item())
        return step(model, inputs, num_items_in_batch)

    trainer.training_step = spy
    return sizes


@pytest.mark.parametrize("checkpoint", [1, 2])
def test_a_stream_runs_on_from_pass_to_pass_and_resumes_at_the_exact_batch(
    checkpoint, tiny_backbone, shapes_data, tmp_path
):
    """10 shuffled rows in batches of 4 (4, 4, 2 a pass), 2 batches a step: every step takes 2 batches, the second
    and third across a pass's end, so no row is left out and no accumulation window is short (a short window on one
    rank while another began its next pass hung 2-process runs). Resumed from checkpoint-2, 4 batches in, the run
    goes on at the second pass's first batch: Trainer's own skip counted the first pass only (3 batches) and
    restarted the second from its start."""
    stream = shapes_data["train"].select(range(10)).to_iterable_dataset(num_shards=1).shuffle(seed=7, buffer_size=4)

    def trainer(run):
        config = _config(
            tmp_path / run, image_root=str(shapes_data.image_root), num_negatives=2, max_steps=3,
            gradient_accumulation_steps=2, save_strategy="steps", save_steps=1,
        )
        return HardNegContrastiveTrainer(model=_model(tiny_backbone), args=config, train_dataset=stream)

    whole, draws = trainer("whole"), []
    sizes = _trained_batch_sizes(whole, draws)
    weights = _final_weights(whole)
    assert sizes == [4, 4, 2, 4, 4, 2]
    resumed, resumed_draws = trainer("resumed"), []
    resumed_sizes = _trained_batch_sizes(resumed, resumed_draws)
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "out" / f"checkpoint-{checkpoint}"))
    assert resumed.state.global_step == 3 and resumed_sizes == sizes[2 * checkpoint:]
    # the random generator too (a pass begins in the step after checkpoint-1): starting the pass drew from it
    assert resumed_draws == draws[2 * checkpoint:]
    changed = [n for n, p in resumed.model.named_parameters() if not torch.equal(p.detach(), weights[n])]
    assert not changed, changed[:3]


def test_a_stream_smaller_than_one_step_trains_across_passes(tiny_backbone, shapes_data, tmp_path):
    # 4 rows, one batch a pass, 2 batches a step: each step spans two passes (Trainer alone looped forever here)
    stream = shapes_data["train"].select(range(4)).to_iterable_dataset(num_shards=1)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), num_negatives=2, gradient_accumulation_steps=2)
    trainer = HardNegContrastiveTrainer(model=_model(tiny_backbone), args=config, train_dataset=stream)
    sizes = _trained_batch_sizes(trainer)
    trainer.train()
    assert trainer.state.global_step == 2 and sizes == [4, 4, 4, 4]
