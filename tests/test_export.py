"""sentence-transformers export: SentenceTransformer(dir) (no remote code) embeds exactly like model.encode.

The reference is always `MultimodalEmbeddingModel.encode` of the same inputs and side; each test also checks that
the thing being reproduced actually matters (a wrong prompt / pooling gives different vectors), so an export that
ignored prompts could not pass.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from numerics import TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image

from mm_embed_trl.data.templates import PromptTemplate, get_template, register_template, strip_image_placeholders
from mm_embed_trl.demo.tiny import TINY_FAMILIES
from mm_embed_trl.export import export_sentence_transformers, save_model_for_inference
from mm_embed_trl.export.chat_template import build_embedding_chat_template
from mm_embed_trl.export.sentence_transformers import EXPORT_INFO_FILE, ST_SUBDIR
from mm_embed_trl.modeling import MultimodalEmbeddingModel

# Ours and sentence-transformers embed the same inputs in other batches (padding, kernel shapes): rounding only.
EXPORT_RTOL = rounding_rtol(**TINY_IMAGE_FORWARD)


def _image(color, size=64):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(color, (8, 8, size // 2, size // 2))
    return img


def _inputs(family: str) -> list:
    if family == "text":
        return ["a red circle on the left", "two blue squares", "<|image_1|> Represent   the given sentence"]
    return [
        "a red circle on the left",
        _image((255, 0, 0)),
        {"image": _image((0, 0, 255)), "text": "What colour is the shape?"},
        # MMEB-style placeholder + odd whitespace, a non-square image: stripping and resizing must match too
        {
            "text": "<|image_1|>\n  Represent the given image with the following question: what is it?",
            "image": _image((0, 200, 0), 48),
        },
    ]


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device="cpu")  # trust_remote_code defaults to False


def _assert_same(st, model, inputs, *, prompts_differ=False):
    for side, fn in (("query", st.encode_query), ("document", st.encode_document)):
        ours = model.encode(inputs, side=side)
        theirs = fn(inputs, convert_to_tensor=True, batch_size=3)
        assert_close(theirs.float(), ours.float(), rtol=EXPORT_RTOL)
    # plain encode (no task, no prompt) embeds as a query, like model.encode's default side
    assert_close(
        st.encode(inputs, convert_to_tensor=True).float(), model.encode(inputs), rtol=EXPORT_RTOL
    )
    if prompts_differ:
        q, d = model.encode(inputs, side="query"), model.encode(inputs, side="document")
        assert (q - d).abs().max() > 1e-3


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_export_reproduces_encode_on_every_family(family, tiny_backbone, export_dir):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone(family))
    out = export_sentence_transformers(model, export_dir / family)
    modules = json.loads((out / "modules.json").read_text())
    # stock modules only, nothing that would need trust_remote_code
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert all(m["type"].startswith("sentence_transformers.") for m in modules)
    assert not list(out.glob("*.py"))
    assert (out / "model.safetensors").is_file() and not list(out.rglob("*.bin"))
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "", "document": ""} and st_config["similarity_fn_name"] == "cosine"
    st = _st(out)
    assert st.get_embedding_dimension() == model.embedding_size
    inputs = _inputs(family)
    _assert_same(st, model, inputs)


def test_export_and_encode_agree_on_a_photo_stored_sideways(tiny_backbone, export_dir, tmp_path):
    """sentence-transformers applies the EXIF orientation of an image path; encode ignored it (cos 0.964)."""
    from test_images import _sideways_jpeg

    rotated, upright = _sideways_jpeg(tmp_path / "photo.jpg")
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    st = _st(export_sentence_transformers(model, export_dir / "exif"))
    ours = model.encode([{"image": str(rotated)}])  # encode reads a bare string as text, ST as an image path
    assert_close(st.encode([str(rotated)], convert_to_tensor=True).float(), ours, rtol=EXPORT_RTOL)
    assert torch.equal(ours, model.encode([{"image": str(upright)}]))


def test_stock_chat_template_would_not_match(tiny_backbone, export_dir):
    """The equality above is not vacuous: ST on the plain backbone (stock chat template, no prompt) differs."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    path = tiny_backbone("qwen2_vl")
    model = MultimodalEmbeddingModel.from_pretrained(path)
    transformer = Transformer(path, unpad_inputs=False)
    naive = SentenceTransformer(modules=[transformer, Pooling(64, pooling_mode="lasttoken"), Normalize()], device="cpu")
    inputs = _inputs("qwen2_vl")
    gap = (naive.encode(inputs, convert_to_tensor=True) - model.encode(inputs)).abs().amax(dim=1)
    assert (gap > 1e-3).all(), gap


def test_prompts_become_side_instructions(tiny_backbone, export_dir):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    prompts = {"query": "Find the picture that answers: ", "document": "Picture: ", "caption": "Caption this: "}
    out = export_sentence_transformers(model, export_dir / "prompts", prompts=prompts, default_prompt_name="caption")
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == prompts
    # The reference: the same model with a template whose side instructions are those prompts.
    unime = get_template("unime")
    fields = {k: getattr(unime, k) for k in ("text_format", "image_format", "image_text_format")}
    register_template(
        PromptTemplate(
            name="test_export_prompts",
            query_instruction=prompts["query"],
            document_instruction=prompts["document"],
            **fields,
        ),
        overwrite=True,
    )
    reference = MultimodalEmbeddingModel.from_pretrained(
        tiny_backbone("qwen2_vl"), prompt_template="test_export_prompts"
    )
    st = _st(out)
    inputs = _inputs("qwen2_vl")
    for side, fn in (("query", st.encode_query), ("document", st.encode_document)):
        assert_close(
            fn(inputs, convert_to_tensor=True), reference.encode(inputs, side=side), rtol=EXPORT_RTOL
        )
    # default_prompt_name="caption": plain encode uses that instruction (an ST prompt is the instruction)
    register_template(
        PromptTemplate(name="test_export_caption", query_instruction=prompts["caption"], **fields), overwrite=True
    )
    caption_ref = MultimodalEmbeddingModel.from_pretrained(
        tiny_backbone("qwen2_vl"), prompt_template="test_export_caption"
    )
    assert_close(st.encode(inputs, convert_to_tensor=True), caption_ref.encode(inputs), rtol=EXPORT_RTOL)
    assert_close(
        st.encode(inputs, prompt=prompts["caption"], convert_to_tensor=True),
        caption_ref.encode(inputs),
        rtol=EXPORT_RTOL,
    )
    q, d = st.encode_query(inputs, convert_to_tensor=True), st.encode_document(inputs, convert_to_tensor=True)
    assert (q - d).abs().amax(dim=1).min() > 1e-3  # the instructions change the vectors


def test_custom_template_system_prompt_text_first_and_instructions(tiny_backbone, export_dir):
    register_template(
        PromptTemplate(
            name="test_export_custom",
            text_format="Text: {text}",
            image_format="Describe the picture.",
            image_text_format="Question: {text}",
            query_instruction="Q> ",
            document_instruction="D> ",
            image_first=False,
            image_separator=" ",
            system_prompt="You turn inputs into vectors.",
        ),
        overwrite=True,
    )
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), prompt_template="test_export_custom")
    out = export_sentence_transformers(model, export_dir / "custom")
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"] == {
        "query": "Q> ",
        "document": "D> ",
    }
    _assert_same(_st(out), model, _inputs("qwen2_vl"), prompts_differ=True)


def test_mean_pooling_truncation_and_unnormalised(tiny_backbone, export_dir):
    path = tiny_backbone("qwen2_5_vl")
    inputs = _inputs("qwen2_5_vl")
    mean = MultimodalEmbeddingModel.from_pretrained(path, pooling="mean", embedding_dim=16)
    out = export_sentence_transformers(mean, export_dir / "mean16")
    types = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert types == ["Transformer", "Pooling", "Dense", "Normalize"]
    st = _st(out)
    assert st.get_embedding_dimension() == 16
    _assert_same(st, mean, inputs)
    # truncation happens before normalisation, as in the model (ST's truncate_dim would act after it)
    norms = st.encode(inputs, convert_to_tensor=True).norm(dim=-1)
    assert_close(norms, torch.ones(len(inputs)), rtol=rounding_rtol(terms=16))

    raw = MultimodalEmbeddingModel.from_pretrained(path, embedding_dim=16, normalize=False)
    out = export_sentence_transformers(raw, export_dir / "raw16")
    types = [m["type"].rsplit(".", 1)[-1] for m in json.loads((out / "modules.json").read_text())]
    assert types == ["Transformer", "Pooling", "Dense"]
    st = _st(out)
    _assert_same(st, raw, inputs)
    assert (st.encode(inputs, convert_to_tensor=True).norm(dim=-1) - 1).abs().max() > 1e-2


def _with_ume_tokens(model):
    tokenizer = model.processor.tokenizer
    tokenizer.add_tokens(["<disc_emb>", "<gen_emb>"], special_tokens=True)
    model.encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


def test_special_token_pooling_is_exact_without_remote_code(tiny_backbone, export_dir):
    """UME-R1 discriminative embedding: hidden state at <disc_emb>, which is followed by the instruction."""
    path = tiny_backbone("qwen2_vl")
    model = _with_ume_tokens(MultimodalEmbeddingModel.from_pretrained(path, prompt_template="ume_r1"))
    model.config.pooling, model.config.pooling_token = "special_token", "<disc_emb>"
    model.set_processor(model.processor)
    out = export_sentence_transformers(model, export_dir / "ume_r1")
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["pooling_token"] == "<disc_emb>"
    inputs = _inputs("qwen2_vl")
    _assert_same(_st(out), model, inputs)
    # ...and the position matters: the last prompt token gives another vector
    model.config.pooling = "last_token"
    last = model.encode(inputs)
    model.config.pooling = "special_token"
    assert ((model.encode(inputs) - last).abs().amax(dim=1) > 1e-3).all()


def test_a_text_only_image_template_is_recorded_and_reproduced_with_the_image_given(tiny_backbone, export_dir):
    """UME-R1's template embeds a text after a 28x28 white image, which sentence-transformers cannot add by itself:
    the export records it (export info, card) and, given that image, reproduces model.encode of the bare text."""
    path = tiny_backbone("qwen2_vl")
    model = _with_ume_tokens(MultimodalEmbeddingModel.from_pretrained(path, prompt_template="ume_r1_blank_image"))
    model.config.pooling, model.config.pooling_token = "special_token", "<disc_emb>"
    model.set_processor(model.processor)
    out = export_sentence_transformers(model, export_dir / "ume_r1_blank_image")
    assert json.loads((out / EXPORT_INFO_FILE).read_text())["text_only_image_size"] == 28
    assert 'Image.new("RGB", (28, 28), "white")' in (out / "README.md").read_text()
    texts = ["a red circle on the left", "two blue squares"]
    white = Image.new("RGB", (28, 28), "white")
    st = _st(out)
    given = st.encode_query([{"text": t, "image": white} for t in texts], convert_to_tensor=True)
    assert_close(given.float(), model.encode(texts), rtol=EXPORT_RTOL)
    bare = st.encode_query(texts, convert_to_tensor=True)
    assert (bare.float() - model.encode(texts)).abs().max() > 1e-3  # without the image: another input


def test_text_lm_without_chat_template(tiny_backbone, export_dir):
    """A text LM without chat template: the collator tokenises format_text as is; so does the export."""
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    model.processor.chat_template = None
    out = export_sentence_transformers(model, export_dir / "text_no_template")
    _assert_same(_st(out), model, _inputs("text"))


def _exported_model(case, tiny_backbone):
    """A model as an export starts from: UniME with a truncated dimension, UME-R1's <disc_emb>, a text LM with and
    without a chat template."""
    family = "text" if case.startswith("text") else "qwen2_vl"
    if case == "ume_r1":
        model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone(family), prompt_template="ume_r1")
        model = _with_ume_tokens(model)
        model.config.pooling, model.config.pooling_token = "special_token", "<disc_emb>"
        model.set_processor(model.processor)
        return model
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone(family), embedding_dim=48)
    if case == "text_no_template":
        model.processor.chat_template = None
    return model


@pytest.mark.parametrize("case", ["unime_dim48", "ume_r1", "text", "text_no_template"])
def test_from_pretrained_on_an_export_rebuilds_the_trained_model(case, tiny_backbone, export_dir):
    """Loaded as a plain backbone, an export (what examples/export.py writes and pushes) got a second prompt template
    on top of its own and last-token pooling instead of <disc_emb> (cos 0.976 / 0.987 to the trained model)."""
    model = _exported_model(case, tiny_backbone)
    out = export_sentence_transformers(model, export_dir / f"reload-{case}", prompts={"query": "Find: "})
    reloaded = MultimodalEmbeddingModel.from_pretrained(out)
    for option in ("pooling", "pooling_token", "pooling_token_id", "embedding_dim", "normalize", "prompt_template"):
        assert getattr(reloaded.config, option) == getattr(model.config, option), option
    assert reloaded.processor.chat_template == model.processor.chat_template  # the backbone's own, not the export's
    inputs = _inputs("text" if case.startswith("text") else "qwen2_vl")
    for side in ("query", "document"):  # the trained model's prompts (an export's prompts are the export's)
        assert_close(reloaded.encode(inputs, side=side), model.encode(inputs, side=side), rtol=EXPORT_RTOL)


def test_from_pretrained_on_a_generative_export_loads_the_model_inside(tiny_backbone, tmp_path):
    from mm_embed_trl.export.generative import export_generative_sentence_transformers
    from mm_embed_trl.trainers.sft_trainer import prepare_embedding_tokens

    model = MultimodalEmbeddingModel.from_pretrained(
        tiny_backbone("qwen2_vl"), encoder_kind="generative", prompt_template="ume_r1"
    )
    prepare_embedding_tokens(model, model.processor)
    out = export_generative_sentence_transformers(model, tmp_path / "generative")
    reloaded = MultimodalEmbeddingModel.from_pretrained(out)
    assert reloaded.config.generative_pooling_token == "<gen_emb>" and reloaded.lm_head is not None
    inputs = _inputs("qwen2_vl")
    assert torch.equal(reloaded.encode(inputs), model.encode(inputs))


def test_an_export_that_cannot_be_rebuilt_is_refused_with_the_fix(tiny_backbone, tmp_path):
    out = export_sentence_transformers(_exported_model("unime_dim48", tiny_backbone), tmp_path / "export")
    with pytest.raises(ValueError, match=r"no language-model head.*output_dir of the training run"):
        MultimodalEmbeddingModel.from_pretrained(out, encoder_kind="generative")
    template = out / "chat_template.jinja"
    template.write_text("{{ messages }}" + template.read_text())  # edited by hand
    with pytest.raises(ValueError, match=r"chat template.*edited.*output_dir of the training run"):
        MultimodalEmbeddingModel.from_pretrained(out)


def test_an_export_written_before_video_inputs_loads_back(tiny_backbone, tmp_path):
    """An export's chat template from the release before videos (its preamble rebuilt messages of one image; the
    fixture is that release's chat_template.jinja of the tiny qwen2_vl export) still loads into the model: the
    backbone's own template is recovered whatever the preamble's version, and one that is no such template (edited
    before its header) is still refused."""
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    out = export_sentence_transformers(model, tmp_path / "export")
    end = "{%- set add_generation_prompt = true %}\n"
    old = (Path(__file__).parent / "fixtures" / "export_chat_template_before_videos.jinja").read_text()
    current = (out / "chat_template.jinja").read_text()
    assert old.split(end)[0] != current.split(end)[0]  # the preambles differ
    (out / "chat_template.jinja").write_text(old.split(end)[0] + end + current.split(end, 1)[1])
    reloaded = MultimodalEmbeddingModel.from_pretrained(out)
    assert reloaded.processor.chat_template == model.processor.chat_template
    (out / "chat_template.jinja").write_text("{{ messages }}" + old.split(end)[0] + end + current.split(end, 1)[1])
    with pytest.raises(ValueError, match=r"chat template.*edited"):
        MultimodalEmbeddingModel.from_pretrained(out)


def _reload_inputs() -> list:
    """A text, an image and an image with a text; the images (224x224) are above a 64x64 pixel budget, so the budget
    decides how many image tokens they become."""
    big = _image((255, 0, 0), 224)
    return ["a red circle on the left", big, {"image": _image((0, 0, 255), 224), "text": "What colour is the shape?"}]


def test_from_pretrained_on_an_export_applies_no_preset(tiny_backbone, export_dir):
    """A run that added UME-R1's <disc_emb>/<gen_emb> (every UME-R1-style run does) was recognised by those tokens as
    the UME-R1 release when its export was loaded back: the preset's pixel budget replaced the trained one saved with
    the processor (max |diff| 0.25 on images), the model became generative with an LM head the export does not hold,
    and config.preset claimed the release. The export records what the model embeds with; it is rebuilt as such.

    Tolerance: the trained and the reloaded model run the same float32 forward of the tiny backbone on the same
    inputs (an image goes through the vision tower first: TINY_IMAGE_FORWARD), so they differ by rounding at most."""
    from mm_embed_trl.data.images import set_image_pixel_budget

    path = tiny_backbone("qwen2_vl")
    model = _with_ume_tokens(MultimodalEmbeddingModel.from_pretrained(path, prompt_template="ume_r1"))
    model.config.pooling, model.config.pooling_token = "special_token", "<disc_emb>"
    model.set_processor(model.processor)
    set_image_pixel_budget(model.processor, 64 * 64, min_pixels=28 * 28)
    trained_size = dict(model.processor.image_processor.size)
    out = export_sentence_transformers(model, export_dir / "reload-ume-tokens")
    reloaded = MultimodalEmbeddingModel.from_pretrained(out)
    assert reloaded.processor.image_processor.size == trained_size == {"longest_edge": 4096, "shortest_edge": 784}
    assert reloaded.config.encoder_kind == "base" and reloaded.lm_head is None
    assert reloaded.config.generative_pooling_token is None
    assert reloaded.config.preset is None
    for option in ("pooling", "pooling_token", "pooling_token_id", "normalize", "prompt_template"):
        assert getattr(reloaded.config, option) == getattr(model.config, option), option
    inputs = _reload_inputs()
    assert_close(reloaded.encode(inputs), model.encode(inputs), rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    # the caller's pixel budget still applies; a preset is not an option of an export
    assert MultimodalEmbeddingModel.from_pretrained(out, image_max_pixels=56 * 56).processor.image_processor.size == {
        "longest_edge": 56 * 56, "shortest_edge": 784
    }
    with pytest.raises(ValueError, match=r"sentence-transformers export.*not with a preset"):
        MultimodalEmbeddingModel.from_pretrained(out, preset="ume-r1")


def test_from_pretrained_on_an_export_restores_sequential_positions(tiny_backbone, export_dir):
    """GME-style sequential position ids are recorded in the export info (describe_export) and were dropped when the
    export was loaded back: images embedded with the backbone's M-RoPE positions (max |diff| 1e-3). Same tolerance
    as above (the same float32 forward twice)."""
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), sequential_positions=True)
    out = export_sentence_transformers(model, export_dir / "reload-sequential")
    info_file = out / EXPORT_INFO_FILE
    assert json.loads(info_file.read_text())["sequential_positions"] is True
    reloaded = MultimodalEmbeddingModel.from_pretrained(out)
    assert reloaded.config.sequential_positions is True
    inputs = _reload_inputs()
    expected = model.encode(inputs)
    assert_close(reloaded.encode(inputs), expected, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    reloaded.config.sequential_positions = False  # ...and the flag matters for the inputs with an image
    assert ((reloaded.encode(inputs) - expected).abs().amax(dim=1)[1:] > 1e-4).all()
    # an export written before the option was recorded was made without it
    info = json.loads(info_file.read_text())
    del info["sequential_positions"]
    info_file.write_text(json.dumps(info))
    assert MultimodalEmbeddingModel.from_pretrained(out).config.sequential_positions is False


def test_lora_export_merges_a_copy(tiny_backbone, export_dir):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)  # non-zero adapters, so merging changes the weights
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = _inputs("qwen2_vl")
    with_lora = model.encode(inputs)
    out = export_sentence_transformers(model, export_dir / "lora")
    assert model.has_lora and model.config.lora_config is not None  # the caller's model is untouched
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights)
    assert_close(_st(out).encode_query(inputs, convert_to_tensor=True), with_lora, rtol=EXPORT_RTOL)
    # the adapters matter
    base = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    assert (base.encode(inputs) - with_lora).abs().max() > 1e-3


def test_export_from_saved_checkpoint_and_save_model_for_inference(tiny_backbone, tmp_path):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    inputs = _inputs("qwen2_vl")
    expected = model.encode(inputs)
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text("{}")  # other files of a run are kept
    save_model_for_inference(model, run)
    assert (run / "trainer_state.json").is_file() and (run / "README.md").is_file()
    assert (run / ST_SUBDIR / "modules.json").is_file() and (run / ST_SUBDIR / "README.md").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no staging leftovers
    reloaded = MultimodalEmbeddingModel.from_pretrained(run)
    assert_close(reloaded.encode(inputs), expected, rtol=EXPORT_RTOL)
    assert_close(_st(run / ST_SUBDIR).encode(inputs, convert_to_tensor=True), expected, rtol=EXPORT_RTOL)
    # the root card's snippets load the subfolder export (and the model itself), and run
    root_card = (run / "README.md").read_text()
    assert f'model_dir = "{run}"' in root_card and f'subfolder="{ST_SUBDIR}"' in root_card
    for heading in ("sentence-transformers", "transformers", "mm-embed-trl"):
        scope: dict = {"print": lambda *a, **k: None}
        exec(_code_block(root_card, heading), scope)  # noqa: S102 - our own generated snippet
        assert_close(
            torch.as_tensor(scope["queries"])[0], model.encode("A red square."), rtol=EXPORT_RTOL
        )
    # a saved checkpoint directory exports too
    out = export_sentence_transformers(run, tmp_path / "from_dir")
    assert_close(_st(out).encode(inputs, convert_to_tensor=True), expected, rtol=EXPORT_RTOL)


def test_save_model_for_inference_can_merge_in_place(tiny_backbone, tmp_path):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    model.add_lora(r=2, lora_alpha=4, lora_dropout=0.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    inputs = _inputs("text")
    expected = model.encode(inputs)
    save_model_for_inference(model, tmp_path / "run", merge_lora=True)
    assert not model.has_lora  # merged in place: no second copy of the weights
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora_config"] is None
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "run")
    assert_close(reloaded.encode(inputs), expected, rtol=EXPORT_RTOL)
    st = _st(tmp_path / "run" / ST_SUBDIR)
    assert_close(st.encode(inputs, convert_to_tensor=True), expected, rtol=EXPORT_RTOL)


def _code_block(card: str, heading: str) -> str:
    section = card.split(f"### {heading}", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.parametrize("family", ["qwen2_vl", "text"])
def test_card_usage_snippets_run_and_agree(family, tiny_backbone, export_dir):
    """The README's sentence-transformers and plain-transformers snippets run and give the model's vectors."""
    model = MultimodalEmbeddingModel.from_pretrained(
        tiny_backbone(family), pooling="mean" if family == "text" else "last_token"
    )
    out = export_sentence_transformers(model, export_dir / f"card_{family}")
    card = (out / "README.md").read_text()
    scope: dict = {"print": lambda *a, **k: None}
    exec(_code_block(card, "transformers"), scope)  # noqa: S102 - our own generated snippet
    st_scope: dict = {"print": lambda *a, **k: None}
    exec(_code_block(card, "sentence-transformers"), st_scope)  # noqa: S102
    if family == "text":
        query, document = "A red square.", "Something red and square."
    else:
        query, document = "A red square.", Image.new("RGB", (64, 64), "red")
    assert_close(scope["queries"], model.encode([query]), rtol=EXPORT_RTOL)
    assert_close(scope["documents"], model.encode([document], side="document"), rtol=EXPORT_RTOL)
    assert st_scope["queries"].shape[1] == model.embedding_size


def test_placeholder_stripping_template_matches_python():
    """The Jinja re-implementation of strip_image_placeholders agrees with the regex version on random strings."""
    from transformers.utils.chat_template_utils import render_jinja_template

    chat_template = build_embedding_chat_template(
        get_template("plain"), "{{ messages[0]['content'] }}", multimodal=False
    )
    pieces = [
        "<|image_1|>",
        "<|image|>",
        "<image>",
        "<image_12>",
        "<|image_pad|>",
        "<|vision_start|>",
        "<|vision_end|>",
        " ",
        "\t",
        "\n",
        "\n",
        "a",
        "b c",
        "<|image_",
        "_3|>",
        "<image",
        ">",
        "|>",
        "_",
        "7",
        "\u0663",
        "\u00b2",
        "\r",
    ]  # an Arabic-Indic digit (\d) and a superscript two (not \d)
    rng = random.Random(0)
    checked = 0
    for _ in range(700):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        expected = strip_image_placeholders(text)
        if not expected:
            continue  # an input with nothing left is refused by both (tested below)
        rendered, _ = render_jinja_template(
            [[{"role": "user", "content": [{"type": "text", "text": text}]}]], chat_template=chat_template
        )
        assert rendered[0] == expected, text
        checked += 1
    assert checked > 500
    with pytest.raises(Exception, match="no image and its text is empty"):
        render_jinja_template([[{"role": "user", "content": "<|image_1|> "}]], chat_template=chat_template)
    with pytest.raises(Exception, match="private-use character U\\+E000"):
        render_jinja_template([[{"role": "user", "content": "a \ue000 b"}]], chat_template=chat_template)


def test_bad_messages_are_refused_clearly(tiny_backbone, export_dir):
    out = export_sentence_transformers(
        MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl")), export_dir / "bad"
    )
    st = _st(out)
    frames = [_image((1, 2, 3)), _image((3, 2, 1))]
    two_videos = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "video", "video": frames}]}]
    with pytest.raises(Exception, match="at most one text and one video"):
        st.encode([two_videos])
    with pytest.raises(Exception, match="only text, image and video content"):
        st.encode([[{"role": "user", "content": [{"type": "audio", "audio": np.zeros(16, dtype=np.float32)}]}]])
    with pytest.raises(Exception, match="one user message"):
        st.encode([[{"role": "assistant", "content": [{"type": "text", "text": "hi"}]}]])


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_checkpoints_are_clear_errors(tiny_backbone, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_sentence_transformers(tmp_path / "missing", tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a model")
    with pytest.raises(ValueError, match=r"not a trained model: it has no config\.json"):
        export_sentence_transformers(empty, tmp_path / "out")
    # a plain backbone is not a trained embedding model
    with pytest.raises(ValueError, match=r"model_type='qwen2_vl', expected 'mm_embedding'.*pass that model instance"):
        export_sentence_transformers(tiny_backbone("qwen2_vl"), tmp_path / "out")
    # a saved model whose processor files are missing
    saved = tmp_path / "saved"
    MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl")).save_pretrained(saved, save_processor=False)
    with pytest.raises(ValueError, match="no processor"):
        export_sentence_transformers(saved, tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(saved / "config.json", no_weights / "config.json")
    with pytest.raises(ValueError, match="no weights"):
        export_sentence_transformers(no_weights, tmp_path / "out")
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), load_processor=False)
    with pytest.raises(ValueError, match="no processor"):
        export_sentence_transformers(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written by failed exports
    with pytest.raises(TypeError, match="MultimodalEmbeddingModel or a directory"):
        export_sentence_transformers(42, tmp_path / "out")


def test_existing_output_dir_needs_overwrite(tiny_backbone, tmp_path):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_sentence_transformers(model, out)
    assert (out / "keep.txt").is_file()
    export_sentence_transformers(model, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "modules.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directories left behind
    with pytest.raises(ValueError, match="default_prompt_name='nope'"):
        export_sentence_transformers(model, tmp_path / "other", default_prompt_name="nope")


def _fake_run(tiny_backbone, run):
    """A training run's output_dir: the final model, a checkpoint, the Trainer's leftovers and the report."""
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("text"))
    model.save_pretrained(run)
    model.save_pretrained(run / "checkpoint-60")
    (run / "training_args.bin").write_bytes(b"args")
    (run / "retrieval_report.json").write_text("{}")
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.mark.parametrize(
    "source, target",
    [(".", "."), ("checkpoint-60", "."), (".", "st-export"), (".", "checkpoint-60")],
    ids=["is-the-source", "contains-the-source", "inside-the-source", "inside-the-source-checkpoint"],
)
def test_export_refuses_an_output_dir_that_overlaps_the_source(source, target, tiny_backbone, tmp_path):
    """Exporting a run into itself with overwrite=True used to delete the run (every checkpoint, the weights...)."""
    run = tmp_path / "run"
    before = _fake_run(tiny_backbone, run)
    with pytest.raises(ValueError, match="overlaps the checkpoint being exported"):
        export_sentence_transformers(run / source, run / target, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    # a symlinked spelling of the same folder is the same folder
    (tmp_path / "alias").symlink_to(run)
    with pytest.raises(ValueError, match="overlaps"):
        export_sentence_transformers(tmp_path / "alias" / source, run / target, overwrite=True)
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_export_cli_refuses_exporting_a_run_into_itself(tiny_backbone, tmp_path, monkeypatch, capsys):
    import runpy
    import sys
    from pathlib import Path

    run = tmp_path / "run"
    before = _fake_run(tiny_backbone, run)
    script = Path(__file__).resolve().parents[1] / "examples" / "export.py"
    for checkpoint in (run, run / "checkpoint-60"):
        argv = [str(script), "--checkpoint", str(checkpoint), "--output_dir", str(run), "--overwrite"]
        monkeypatch.setattr(sys, "argv", argv)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(script), run_name="__main__")
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "overlaps the checkpoint" in err[0], err
        assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before


def test_hub_kernels_stay_off_unless_asked(tiny_backbone, export_dir):
    """transformers >= 5.25 kernelizes every model it loads unless told not to (on CUDA, with layers fetched from the
    Hub). The wrapper, a saved model and the sentence-transformers export load with kernels off; use_kernels=True
    and the ST model_kwargs still switch them on."""
    from sentence_transformers import SentenceTransformer

    wrapped = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    assert wrapped.backbone.use_kernels is False
    out = export_sentence_transformers(wrapped, export_dir / "kernels")
    assert json.loads((out / "sentence_bert_config.json").read_text())["model_kwargs"] == {"use_kernels": False}
    assert SentenceTransformer(str(out), device="cpu")[0].model.use_kernels is False
    wrapped.save_pretrained(export_dir / "kernels-saved")
    saved = MultimodalEmbeddingModel.from_pretrained(export_dir / "kernels-saved")
    assert saved.use_kernels is False and saved.backbone.use_kernels is False
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.25"):
        return  # older releases have no Hub-kernel default to override
    assert MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), use_kernels=True).backbone.use_kernels
    asked = SentenceTransformer(str(out), device="cpu", model_kwargs={"use_kernels": True})
    assert asked[0].model.use_kernels is True


# Presets whose templates exercise each way of rendering a published model's prompt: no chat template (VLM2Vec),
# the instruction as system message with Qwen3's punctuation rule, GME's suffix (texts only: see below), UME-R1's
# <disc_emb> cut and blank image, LLaVA-OneVision's chat template.
PRESET_EXPORTS = {
    "vlm2vec-v2": (56, None),
    "qwen3-vl-embedding": (64, "Find an image that matches the given text"),
    "gme-qwen2vl": (56, "Find an image that matches the given text."),
    "ume-r1": (56, None),
    "unime-llava-ov": (56, None),
}


@pytest.mark.parametrize("preset", sorted(PRESET_EXPORTS))
def test_export_of_a_published_model_reproduces_its_preset(preset, preset_replica, export_dir):
    size, instruction = PRESET_EXPORTS[preset]
    model = MultimodalEmbeddingModel.from_pretrained(preset_replica(preset))
    prompts = {"task": instruction} if instruction else None
    out = export_sentence_transformers(model, export_dir / f"preset-{preset}", prompts=prompts)
    assert not list(out.glob("*.py"))  # stock modules: SentenceTransformer(out) needs no remote code
    info = json.loads((out / EXPORT_INFO_FILE).read_text())
    assert f"`{preset}`" in (out / "README.md").read_text()
    st = _st(out)
    white = Image.new("RGB", (28, 28), "white")
    texts = ["a red circle on the left", "two blue squares"]
    if preset == "ume-r1":  # the blank image UME-R1 puts before a text, given to sentence-transformers
        st_texts = [{"text": t, "image": white} for t in texts]
    else:
        st_texts = texts
    images = [_image((255, 0, 0), size), {"image": _image((0, 0, 255), size), "text": "What colour is the shape?"}]
    with_images = not info["sequential_positions"]  # GME's positions do not travel: texts only (the card says so)
    assert with_images == (preset != "gme-qwen2vl")
    inputs, st_inputs = (texts + images, st_texts + images) if with_images else (texts, st_texts)
    for side, fn in (("query", st.encode_query), ("document", st.encode_document)):
        theirs = fn(st_inputs, convert_to_tensor=True, batch_size=3).float()
        assert_close(theirs, model.encode(inputs, side=side), rtol=EXPORT_RTOL)
    if instruction:
        theirs = st.encode(st_inputs, prompt_name="task", convert_to_tensor=True).float()
        ours = model.encode(inputs, instruction=instruction)
        assert_close(theirs, ours, rtol=EXPORT_RTOL)
        assert (ours - model.encode(inputs)).abs().max() > 1e-3


def test_export_cli_exports_a_published_model_as_released(preset_replica, tmp_path, monkeypatch):
    """examples/export.py --checkpoint <a published model> (hub id or local copy): wrapped with its preset, exported,
    and the export embeds as the preset does; a plain backbone is still refused (it is not an embedding model)."""
    import runpy
    import sys
    from pathlib import Path

    source = preset_replica("unime-v2-qwen2vl")
    script = Path(__file__).resolve().parents[1] / "examples" / "export.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--checkpoint", source, "--output_dir", str(tmp_path / "st")])
    runpy.run_path(str(script), run_name="__main__")
    card = (tmp_path / "st" / "README.md").read_text()
    assert "as its authors released it" in card and "`unime-v2-qwen2vl`" in card
    texts = ["a red circle on the left", "two blue squares"]
    ours = MultimodalEmbeddingModel.from_pretrained(source).encode(texts)
    assert_close(torch.as_tensor(_st(tmp_path / "st").encode_query(texts)), ours, rtol=EXPORT_RTOL)
    with pytest.raises(ValueError, match="not a trained MultimodalEmbeddingModel"):
        export_sentence_transformers(preset_replica("unime-v2-qwen2vl", "plain-qwen2-vl"), tmp_path / "plain")
