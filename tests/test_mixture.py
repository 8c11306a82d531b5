"""Dataset mixtures (`mm_embed_trl.data.mixture`): the spec and its errors, per-source image roots and instructions,
the seeded index plan (weights honoured, same-source global batches, the ranks' slices), and a three-source run that
resumes at the exact row (the kill -9 through the recipe is in test_resume_cli)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from mm_embed_trl.data.mixture import (
    MIXTURE_SOURCE_COLUMN,
    DatasetMixture,
    MixtureSampler,
    MixtureSource,
    _negative_texts,
    rows_per_epoch,
)


def _sampler(sizes, sources, **kw) -> MixtureSampler:
    row_sources = np.repeat(np.arange(len(sizes)), sizes)
    return MixtureSampler(row_sources, [MixtureSource(f"s{i}", **s) for i, s in enumerate(sources)], **kw)


# ------------------------------------------------------------------------------------------------ the plan
def test_weights_share_out_the_weighted_rows_and_num_samples_is_exact():
    sampler = _sampler([100, 50, 10, 30], [{"weight": 1}, {"weight": 1}, {"weight": 2}, {"num_samples": 7}], seed=0)
    # an epoch: the weighted sources' 160 rows shared 1:1:2, plus exactly 7 rows of the fixed source
    assert sampler.counts.tolist() == [40, 40, 80, 7] and len(sampler) == 167
    plan = sampler.plan()
    assert len(plan) == 167 and len(np.unique(plan)) < 167  # the 10-row source repeats its rows
    sources = np.repeat(np.arange(4), [100, 50, 10, 30])[plan]
    assert np.bincount(sources).tolist() == [40, 40, 80, 7]
    # a source drawn more often than it has rows goes through all of them before repeating one (8 x 10 rows)
    assert np.bincount(plan[sources == 2] - 150).tolist() == [8] * 10
    # one drawn less often draws distinct rows, a fresh subset each epoch
    first, second = plan[plan < 100], sampler.plan(epoch=1)
    assert len(np.unique(first)) == 40 and set(first) != set(second[second < 100])


def test_rows_interleave_by_weight_throughout_the_epoch():
    """Not one source after another: every stretch of the epoch holds the sources near their weights."""
    sampler = _sampler([600, 600, 600], [{"weight": 1}, {"weight": 2}, {"weight": 3}], seed=3)
    sources = np.repeat(np.arange(3), 600)[sampler.plan()]
    for part in np.array_split(sources, 6):  # 300 rows each: expected 50 / 100 / 150
        counts = np.bincount(part, minlength=3)
        # binomial sd of a 300-row window <= sqrt(300 * 0.5 * 0.5) ~ 8.7; 4 sd is never reached by chance here
        assert np.all(np.abs(counts - np.array([50, 100, 150])) <= 35), counts


def test_the_plan_is_a_function_of_seed_and_epoch():
    spec = dict(sizes=[40, 30, 20], sources=[{"weight": 1}, {"weight": 1}, {"num_samples": 16}])
    a, b, c = (_sampler(**spec, seed=s) for s in (0, 0, 1))
    assert np.array_equal(a.plan(), b.plan())
    assert not np.array_equal(a.plan(), c.plan())
    a.set_epoch(1)
    assert not np.array_equal(a.plan(), b.plan()) and np.array_equal(a.plan(), b.plan(epoch=1))
    assert list(a) == b.plan(epoch=1).tolist()


def test_same_source_blocks_are_whole_global_batches_on_every_rank():
    """Two processes, 4 rows each: accelerate deals the sampler's batches to the ranks in turn, so a block of 8 rows
    is one global batch from one source; the ranks' slices are disjoint and together the plan."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    sampler = _sampler([50, 30, 21], [{"weight": 1}, {"weight": 1}, {"weight": 2}], seed=0, block_size=8)
    assert all(c % 8 == 0 for c in sampler.counts) and len(sampler) == 96  # 101 rows -> 12 whole global batches
    row_sources = np.repeat(np.arange(3), [50, 30, 21])
    ranks = [list(BatchSamplerShard(BatchSampler(sampler, 4, drop_last=False), 2, rank)) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 12
    for step, (mine, theirs) in enumerate(zip(*ranks)):
        assert len(set(row_sources[mine + theirs])) == 1, step
    dealt = [i for step in zip(*ranks) for batch in step for i in batch]
    assert dealt == sampler.plan().tolist()


def test_rows_per_epoch_names_a_source_that_gets_none():
    sources = [MixtureSource("big.jsonl", weight=100.0), MixtureSource("small.jsonl", weight=0.1)]
    with pytest.raises(ValueError, match=r"\['small.jsonl'\] get no rows per epoch in same-source batches of 16"):
        rows_per_epoch([1000, 10], sources, block_size=16)
    with pytest.raises(ValueError, match=r"\['small.jsonl'\] get no rows.*num_samples of at least one batch"):
        rows_per_epoch([100, 10], [sources[0], MixtureSource("small.jsonl", num_samples=8)], block_size=16)


# ------------------------------------------------------------------------------------------------ the spec
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name_or_path": "a.jsonl", "wieght": 2}, r"'a.jsonl' has unknown key\(s\) 'wieght' \(did you mean 'weight'"),
        ({"name_or_path": "a.jsonl", "weight": 0}, r"'a.jsonl' has weight=0: weights are positive.*remove the source"),
        ({"name_or_path": "a.jsonl", "weight": -1.5}, r"'a.jsonl' has weight=-1.5"),
        ({"name_or_path": "a.jsonl", "num_samples": 0}, r"'a.jsonl' has num_samples=0: give a positive whole"),
        ({"name_or_path": "a.jsonl", "num_samples": 2.5}, r"num_samples=2.5"),
        ({"name_or_path": "a.jsonl", "weight": 1, "num_samples": 5}, r"sets both weight \(1\) and num_samples \(5\)"),
        ({"config": "ImageNet_1K"}, r"Mixture source #1 .* has no name_or_path"),
        ("a.jsonl", r"Mixture source #1 is 'a.jsonl'; each source is a mapping"),
    ],
)
def test_a_bad_source_is_named_with_the_fix(entry, message):
    with pytest.raises(ValueError, match=message):
        DatasetMixture.from_config([{"name_or_path": "ok.jsonl"}, entry])


def test_a_bad_mixture_is_named_with_the_fix():
    with pytest.raises(ValueError, match=r"non-empty list of sources"):
        DatasetMixture.from_config([])
    with pytest.raises(ValueError, match=r"unknown key\(s\) 'homogeneous'.*'sources', 'same_source_batches'"):
        DatasetMixture.from_config({"sources": [{"name_or_path": "a"}], "homogeneous": True})
    with pytest.raises(ValueError, match=r"\['a'\] appear more than once: give each a distinct `name`"):
        DatasetMixture.from_config([{"name_or_path": "a"}, {"name_or_path": "a", "weight": 2}])
    mixture = DatasetMixture.from_config([{"name_or_path": "a"}, {"name_or_path": "a", "name": "a again"}])
    assert [s.weight for s in mixture.sources] == [1.0, 1.0]


def test_a_missing_source_is_named_when_the_mixture_loads(tmp_path):
    mixture = DatasetMixture.from_config([{"name_or_path": str(tmp_path / "nowhere.jsonl"), "name": "extra"}])
    with pytest.raises(Exception, match=r"Mixture source 'extra' \(name_or_path=.*nowhere.jsonl.*could not be loaded"):
        mixture.load()


def test_negatives_get_the_target_instruction_where_a_negative_exists():
    assert _negative_texts(["a", ""], ["", "x.png"], "T: ") == ["T: a", "T: "]
    assert _negative_texts(["a", ""], ["", ""], "T: ") == ["T: a", ""]  # the second pair holds nothing: no negative
    assert _negative_texts("", ["x.png", "y.png"], "T: ") == "T: "  # one text for every image negative
    assert _negative_texts("", "", "T: ") == "" and _negative_texts(None, None, "T: ") is None  # no negatives


def test_an_empty_side_gets_no_instruction_so_the_row_check_still_names_it():
    """A source's instruction goes in front of a side that holds something (a text, an image, a video); a side with
    nothing stays empty and the row check refuses it (with the bare instruction in front it trained on that)."""
    import datasets

    from mm_embed_trl.data.validation import BadRowsError, check_training_rows

    rows = datasets.Dataset.from_dict({
        "qry": ["", "", "a query", ""], "qry_image_path": ["", "x.png", "", ""],
        "qry_video_path": ["", "", "", "clip.mp4"], "pos_text": ["p0", "p1", "p2", "p3"], "pos_image_path": [""] * 4,
    })
    mixture = DatasetMixture.from_config([{"name_or_path": "a", "query_instruction": "Q: "}])
    loaded = mixture.load(loader=lambda source, split: rows)
    assert loaded["qry"] == ["", "Q: ", "Q: a query", "Q: "]
    with pytest.raises(BadRowsError, match=r"empty 'qry' .*\(rows 0\)"):
        check_training_rows(loaded, num_negatives=0)


# ------------------------------------------------------------------------------------------------ loading
@pytest.fixture(scope="module")
def three_sources(_session_cache):
    """Three generated datasets of different sizes, each in its own folder (its own image root)."""
    from mm_embed_trl.demo.generated import make_shapes_dataset

    return [make_shapes_dataset(num_train=n, num_eval=8, seed=s) for s, n in ((1, 24), (2, 16), (3, 16))]


def _mixture(three_sources, **kw) -> DatasetMixture:
    sources = [
        {"name_or_path": os.path.join(data.image_root, "train.parquet"), "image_root": data.image_root,
         "weight": weight, "name": f"shapes-{i}"}
        for i, (data, weight) in enumerate(zip(three_sources, (1.0, 1.0, 2.0)))
    ]
    sources[2].update(query_instruction="Q: ", target_instruction="T: ")
    return DatasetMixture.from_config({"sources": sources, **kw})


def test_each_source_resolves_its_images_under_its_own_root_and_gets_its_instructions(three_sources, tmp_path,
                                                                                      monkeypatch):
    from mm_embed_trl.data.schema import POS_IMAGE, POS_TEXT, QUERY_IMAGE, QUERY_TEXT

    monkeypatch.chdir(tmp_path)  # no fallback to the working directory
    data = _mixture(three_sources).load()
    assert len(data) == 56 and np.bincount(data[MIXTURE_SOURCE_COLUMN]).tolist() == [24, 16, 16]
    for row in data:
        source = three_sources[row[MIXTURE_SOURCE_COLUMN]]
        for column in (QUERY_IMAGE, POS_IMAGE):
            if row[column]:
                assert row[column].startswith(str(source.image_root) + os.sep) and os.path.isfile(row[column])
        instructed = row[MIXTURE_SOURCE_COLUMN] == 2
        assert row[QUERY_TEXT].startswith("Q: ") == instructed and row[POS_TEXT].startswith("T: ") == instructed


# ------------------------------------------------------------------------------------------------ training
def _train(three_sources, tiny_backbone, output_dir, seen: list, **kw):
    """A HardNegContrastiveTrainer on the three-source mixture (same-source batches of 8), recording the dataset
    rows of every batch the loss sees."""
    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
    from mm_embed_trl.data.schema import ROW_INDEX_COLUMN

    class Recording(HardNegContrastiveTrainer):
        extra_columns = (ROW_INDEX_COLUMN,)  # handed through by the collator

        def compute_loss(self, model, inputs, *args, **kwargs):
            seen.append(inputs[ROW_INDEX_COLUMN].tolist())
            return super().compute_loss(model, inputs, *args, **kwargs)

    mixture = _mixture(three_sources, same_source_batches=True)
    config = HardNegContrastiveConfig(
        output_dir=str(output_dir), per_device_train_batch_size=8, report_to="none", use_cpu=True,
        logging_steps=1, temperature=0.05, num_hard_negatives=3, learning_rate=1e-3, lr_scheduler_type="constant",
        save_strategy="steps", save_steps=4, seed=0, **kw,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    trainer = Recording(model=model, args=config, train_dataset=mixture.load(), dataset_mixture=mixture)
    return trainer


def test_a_three_source_run_resumes_at_the_exact_row(three_sources, tiny_backbone, tmp_path):
    """An epoch is 7 global batches of 8 (56 rows shared 1:1:2 in blocks: 2, 2 and 3 batches). A run stopped at
    step 8 (one batch into its second epoch) and resumed from checkpoint-8 to step 10 sees the same batches, and
    ends with the same weights, as a run of 10 steps: the same float32 operations in the same order, so equal bit
    for bit (a resume that restarted the epoch, or the plan, would differ in rows at once)."""
    full_rows: list = []
    full = _train(three_sources, tiny_backbone, tmp_path / "full", full_rows, max_steps=10)
    full.train()
    assert full.state.global_step == 10 and len(full_rows) == 10
    data = full.train_dataset
    sources = np.asarray(data[MIXTURE_SOURCE_COLUMN])
    per_step = [set(sources[rows].tolist()) for rows in full_rows]
    assert all(len(s) == 1 for s in per_step)  # every batch from one source
    assert [s.pop() for s in per_step[:7]].count(2) == 3  # the weight-2 source gives 3 of the epoch's 7 batches

    head_rows: list = []
    _train(three_sources, tiny_backbone, tmp_path / "run", head_rows, max_steps=8).train()
    tail_rows: list = []
    resumed = _train(three_sources, tiny_backbone, tmp_path / "run", tail_rows, max_steps=10)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-8"))
    assert head_rows + tail_rows == full_rows

    done, again = full.model.state_dict(), resumed.model.state_dict()
    assert done.keys() == again.keys()
    for name in done:
        assert torch.equal(done[name], again[name]), name


def test_the_examples_take_a_mixture_from_a_recipe_json_or_a_yaml_file(tmp_path):
    from trl import TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments, refuse_stream_and_mixture

    parser = TrlParser((EmbeddingScriptArguments,))
    listed = '[{"name_or_path": "a.jsonl", "num_samples": 5}, {"name_or_path": "b.jsonl", "image_root": "imgs"}]'
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("dataset_mixture:\n  same_source_batches: true\n  sources:\n    - {name_or_path: a.jsonl}\n")
    mixture_file = tmp_path / "mixture.yaml"
    mixture_file.write_text("- {name_or_path: a.jsonl, weight: 3}\n")
    for args, names, same_source in (
        (["--dataset_mixture", listed], ["a.jsonl", "b.jsonl"], False),
        (["--config", str(recipe)], ["a.jsonl"], True),
        (["--dataset_mixture", str(mixture_file)], ["a.jsonl"], False),
    ):
        (script_args,) = parser.parse_args_and_config(args)
        mixture = script_args.dataset_mixture
        assert isinstance(mixture, DatasetMixture) and [s.name for s in mixture.sources] == names
        assert mixture.same_source_batches is same_source
    with pytest.raises(ValueError, match=r"Both --dataset_name \('x'\) and --dataset_mixture are set"):
        parser.parse_args_and_config(["--dataset_name", "x", "--dataset_mixture", listed])
    with pytest.raises(ValueError, match=r"--dataset_mixture is not supported by EmbeddingGRPOTrainer"):
        refuse_stream_and_mixture(script_args, "EmbeddingGRPOTrainer", "unused")  # the last one parsed holds a mixture
