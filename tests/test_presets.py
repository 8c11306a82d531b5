"""Published embedding models by hub id: each preset reproduces its authors' encode path on a tiny random replica of
the published checkpoint (tests/preset_replicas.py) against an independent port of that code
(tests/reference_encoders.py), for every input kind the model takes; presets are found, overridable, saved, listed,
and loading errors name their fix.

Tolerance: ours and the port run the same float32 model on the same tokens; the batches differ (one processor call
for all inputs here, one per input or other padding there), so only the order of sums differs: a forward through the
tiny vision tower and language model, ``rounding_rtol(**TINY_IMAGE_FORWARD)``.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import pytest
import reference_encoders as ref
import torch
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image
from preset_replicas import ADAPTER_PRESETS

from mm_embed_trl import MultimodalEmbeddingModel
from mm_embed_trl.presets import CheckpointFacts, available_presets, find_preset, get_preset
from mm_embed_trl.presets import loading as preset_loading

RTOL = rounding_rtol(**TINY_IMAGE_FORWARD)
INSTRUCTION = "Find an image that matches the given text"  # no final punctuation: Qwen3-VL-Embedding adds a "."


def _image(seed: int, width: int, height: int) -> Image.Image:
    """Random pixels, at a size every resize on the way leaves as it is (a multiple of the backbone's 28 or 32 px
    cell inside each budget), so the authors' PIL resizes and the processor's resize agree."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _inputs(preset: str, kinds: tuple[str, ...]) -> list[dict]:
    width, height = (64, 96) if preset == "qwen3-vl-embedding" else (56, 84)
    every = {
        "text": {"text": "A red circle at the top left and a blue square.", "image": None},
        "image": {"text": None, "image": _image(0, width, height)},
        "image+text": {"text": "Represent the given image with the following question: what is it?",
                       "image": _image(1, width, height)},
    }
    return [every[kind] for kind in kinds]


def _ours(model, inputs, **encode_kwargs):
    items = [x["text"] if x["image"] is None else x["image"] if x["text"] is None else x for x in inputs]
    return model.encode(items, **encode_kwargs)


ALL_KINDS = ("text", "image", "image+text")
# preset -> (port, input kinds the authors' code takes)
REFERENCES = {
    "vlm2vec-qwen2vl": (ref.vlm2vec_encode, ALL_KINDS),
    "vlm2vec-v2": (ref.vlm2vec_encode, ALL_KINDS),
    "unime-llava-ov": (ref.unime_llava_ov_encode, ("text", "image")),  # the card shows no image + text prompt
    "unime-v2-qwen2vl": (ref.unime_v2_qwen2vl_encode, ALL_KINDS),
    "unime-v2-llava-ov": (ref.unime_v2_llava_ov_encode, ("text", "image+text")),  # its images come with a text
    "gme-qwen2vl": (ref.gme_encode, ALL_KINDS),
    "qwen3-vl-embedding": (ref.qwen3_vl_embedding_encode, ALL_KINDS),
    "ume-r1": (ref.ume_r1_disc_encode, ALL_KINDS),
}


def test_every_verified_preset_has_a_reference_and_a_replica():
    from preset_replicas import REPLICAS

    names = {p.name for p in available_presets()}
    assert set(REPLICAS) == names
    assert set(REFERENCES) == {p.name for p in available_presets() if p.verified}


@pytest.mark.parametrize("preset", sorted(REFERENCES))
def test_preset_reproduces_the_authors_encode_on_a_replica(preset, preset_replica):
    path = preset_replica(preset)
    port, kinds = REFERENCES[preset]
    inputs = _inputs(preset, kinds)
    model = MultimodalEmbeddingModel.from_pretrained(path, dtype=torch.float32)
    assert model.config.preset == preset  # found by the repository's name, as a local copy of the Hub repo
    expected = port(path, inputs)
    for side in ("query", "document"):  # these models embed both sides alike unless given an instruction
        assert_close(_ours(model, inputs, side=side), expected, rtol=RTOL)
    # not vacuous: the same checkpoint wrapped without its preset embeds otherwise; an adapter release's base
    # with the preset but without the adapter too (the adapter was applied)
    if preset in ADAPTER_PRESETS:
        base = json.loads((pathlib.Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
        plain = MultimodalEmbeddingModel.from_pretrained(base, preset=preset, dtype=torch.float32)
    else:
        plain = MultimodalEmbeddingModel.from_pretrained(path, preset=None, dtype=torch.float32)
        assert plain.config.preset is None
    assert (_ours(plain, inputs) - expected).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("preset", ["gme-qwen2vl", "qwen3-vl-embedding"])
def test_query_instruction_goes_where_the_authors_put_it(preset, preset_replica):
    """GME and Qwen3-VL-Embedding put a query's task instruction in the system message (Qwen3 adds a '.'); GME's
    documents always get the default one."""
    path = preset_replica(preset)
    port, kinds = REFERENCES[preset]
    inputs = _inputs(preset, kinds)
    model = MultimodalEmbeddingModel.from_pretrained(path, dtype=torch.float32)
    expected = port(path, inputs, instruction=INSTRUCTION)
    assert_close(_ours(model, inputs, instruction=INSTRUCTION), expected, rtol=RTOL)
    assert (expected - port(path, inputs)).abs().max() > 1e-3  # the instruction matters
    if preset == "gme-qwen2vl":
        assert_close(_ours(model, inputs, side="document"), port(path, inputs, is_query=False), rtol=RTOL)
        # GME runs its language model without position ids: with Qwen2-VL's own image positions, image inputs
        # (not texts, whose positions are sequential either way) embed otherwise
        mrope = MultimodalEmbeddingModel.from_pretrained(path, sequential_positions=False, dtype=torch.float32)
        gap = (_ours(mrope, inputs, instruction=INSTRUCTION) - expected).abs().amax(dim=-1)
        assert gap[0] < 1e-5 and (gap[1:] > 1e-3).all(), gap


class _ForcedCompletion:
    """A logits processor that makes generate write ``tokens`` (then stop), the same for every row: the port and
    encode then read <gen_emb> off identical completions, whatever the random replica would write."""

    def __init__(self, tokens: list[int]):
        self.tokens, self.start = tokens, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = min(input_ids.shape[1] - self.start, len(self.tokens) - 1)
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def test_ume_r1_generative_embedding_matches_its_generate_path(preset_replica):
    from transformers import LogitsProcessorList

    path = preset_replica("ume-r1")
    inputs = _inputs("ume-r1", ALL_KINDS)
    model = MultimodalEmbeddingModel.from_pretrained(path, dtype=torch.float32)
    tokenizer = model.processor.tokenizer
    tokens = tokenizer.convert_tokens_to_ids(["<think>", "</think>", "<answer>", "<gen_emb>", "<|im_end|>"])

    def forced():
        return {"logits_processor": LogitsProcessorList([_ForcedCompletion(tokens)]), "max_new_tokens": 8}

    expected = ref.ume_r1_gen_encode(path, inputs, **forced())
    ours = _ours(model, inputs, mode="generative", generation_kwargs=forced())
    assert_close(ours, expected, rtol=RTOL)
    assert (ours - ref.ume_r1_disc_encode(path, inputs)).abs().max() > 1e-3  # another token, another vector


# ---------------------------------------------------------------------------------------------------- finding
def test_presets_are_found_by_hub_id_repository_name_and_fingerprint(preset_replica):
    for preset in available_presets():
        for hub_id in preset.hub_ids:
            found, how = find_preset(CheckpointFacts(name=hub_id))
            assert found is preset and "hub id" in how
            assert find_preset(CheckpointFacts(name=f"/models/{hub_id.split('/')[-1]}"))[0] is preset
    # forks and renamed copies: UME-R1's own tokens, GME's own encoder file
    for preset, folder in (("ume-r1", "my-ume-fork"), ("gme-qwen2vl", "gme-copy")):
        facts = CheckpointFacts.read(preset_replica(preset, folder))
        found, how = find_preset(facts)
        assert found is not None and found.name == preset and "fingerprint" in how
        assert MultimodalEmbeddingModel.from_pretrained(preset_replica(preset, folder)).config.preset == preset
    # a plain backbone of the same family matches nothing
    assert find_preset(CheckpointFacts.read(preset_replica("unime-v2-qwen2vl", "plain-qwen2-vl")))[0] is None


def test_a_backbone_without_preset_loads_with_a_warning_naming_what_was_assumed(tiny_backbone, caplog):
    with caplog.at_level(logging.WARNING, logger="mm_embed_trl.presets.loading"):
        model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), pooling="mean")
    assert model.config.preset is None
    (record,) = [r for r in caplog.records if "No preset" in r.getMessage()]
    message = record.getMessage()
    assert "prompt_template='unime'" in message and "normalize=True" in message
    assert "pooling" not in message.split("with")[1].split("(")[0]  # given, so not assumed


def test_explicit_options_override_the_preset_and_everything_is_saved(preset_replica, tmp_path):
    path = preset_replica("qwen3-vl-embedding")
    model = MultimodalEmbeddingModel.from_pretrained(
        path, embedding_dim=32, image_max_pixels=64 * 64 * 4, dtype=torch.float32
    )
    assert model.config.preset == "qwen3-vl-embedding" and model.config.prompt_template == "qwen3_vl_embedding"
    assert model.config.embedding_dim == 32  # Matryoshka: the first 32 features, normalised
    assert model.processor.image_processor.size["longest_edge"] == 64 * 64 * 4
    assert model.processor.image_processor.size["shortest_edge"] == get_preset("qwen3-vl-embedding").image_min_pixels
    inputs = _inputs("qwen3-vl-embedding", ALL_KINDS)
    full = MultimodalEmbeddingModel.from_pretrained(path, dtype=torch.float32)
    expected = torch.nn.functional.normalize(_ours(full, inputs)[:, :32] * 1.0, dim=-1)
    # the full vector was normalised before the slice: compare directions of the first 32 features
    assert_close(_ours(model, inputs), expected, rtol=RTOL)
    model.save_pretrained(tmp_path / "saved")
    again = MultimodalEmbeddingModel.from_pretrained(tmp_path / "saved")
    assert again.config.preset == "qwen3-vl-embedding" and again.config.embedding_dim == 32
    assert again.processor.image_processor.size["longest_edge"] == 64 * 64 * 4
    assert torch.equal(_ours(again, inputs), _ours(model, inputs))
    gme = MultimodalEmbeddingModel.from_pretrained(preset_replica("gme-qwen2vl"))
    gme.save_pretrained(tmp_path / "gme")
    assert MultimodalEmbeddingModel.from_pretrained(tmp_path / "gme").config.sequential_positions is True


def test_a_preset_is_chosen_by_name_or_refused_with_the_reason(preset_replica, tiny_backbone):
    path = preset_replica("unime-v2-qwen2vl", "some-qwen2-vl-model")
    model = MultimodalEmbeddingModel.from_pretrained(path, preset="gme-qwen2vl")
    assert model.config.preset == "gme-qwen2vl" and model.config.prompt_template == "gme"
    with pytest.raises(ValueError, match="is for qwen3_vl checkpoints"):
        MultimodalEmbeddingModel.from_pretrained(path, preset="qwen3-vl-embedding")
    with pytest.raises(ValueError, match=r"lacks \['<disc_emb>', '<gen_emb>'\]"):
        MultimodalEmbeddingModel.from_pretrained(path, preset="ume-r1")
    with pytest.raises(ValueError, match="Unknown preset 'nope'.*ume-r1"):
        MultimodalEmbeddingModel.from_pretrained(path, preset="nope")
    saved = tiny_backbone("qwen2_vl")
    with pytest.raises(ValueError, match="is a saved MultimodalEmbeddingModel"):
        m = MultimodalEmbeddingModel.from_pretrained(saved)
        m.save_pretrained(path + "-wrapped")
        MultimodalEmbeddingModel.from_pretrained(path + "-wrapped", preset="gme-qwen2vl")


def test_remote_code_and_missing_backbone_families_are_errors_that_name_the_fix(monkeypatch):
    with pytest.raises(ValueError, match=r"needs trust_remote_code=True: its Phi-3.5-V backbone"):
        MultimodalEmbeddingModel.from_pretrained("TIGER-Lab/VLM2Vec-Full")
    monkeypatch.setattr(preset_loading, "_family_installed", lambda model_type: model_type != "qwen3_vl")
    with pytest.raises(ValueError, match=r"'qwen3_vl' backbone family.*added in transformers 4\.57\.0"):
        MultimodalEmbeddingModel.from_pretrained("Qwen/Qwen3-VL-Embedding-8B")  # offline: its config cannot load


def test_presets_cli_lists_shows_and_detects(preset_replica, capsys):
    from mm_embed_trl.presets.__main__ import main

    main(["--list"])
    listed = capsys.readouterr().out
    for preset in available_presets():
        assert preset.name in listed and all(hub_id in listed for hub_id in preset.hub_ids)
    main(["--show", "zhibinlan/UME-R1-7B"])
    assert "pooling_token: '<disc_emb>'" in capsys.readouterr().out
    main(["--detect", preset_replica("ume-r1", "my-ume-fork")])
    assert "preset 'ume-r1'" in capsys.readouterr().out


def test_retrieval_evaluation_of_a_published_model_uses_its_query_instruction(preset_replica, shapes_data):
    """The evaluator encodes queries with the task instruction where the model takes it (the system message of
    Qwen3-VL-Embedding) and the corpus with its default: the same vectors as encode's."""
    from mm_embed_trl.evaluation import RetrievalEvaluator

    model = MultimodalEmbeddingModel.from_pretrained(preset_replica("qwen3-vl-embedding"), dtype=torch.float32)
    rows = shapes_data["eval"].select(range(8))
    evaluator = RetrievalEvaluator.from_rows(rows, shapes_data.image_root, query_instruction=INSTRUCTION)
    seen = []
    original = model.encode

    def spy(inputs, **kwargs):
        seen.append((kwargs.get("side"), kwargs.get("instruction")))
        return original(inputs, **kwargs)

    model.encode = spy
    metrics = evaluator(model)
    assert {"recall@1", "mrr"} <= set(metrics)
    assert set(seen) == {("query", INSTRUCTION), ("document", None)}
