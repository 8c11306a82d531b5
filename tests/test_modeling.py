"""MultimodalEmbeddingModel: wrapping every tiny family, exact save/load round trip, pooling, LoRA, bad backbones."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from numerics import TINY_BACKWARD, TINY_IMAGE_BACKWARD, TINY_IMAGE_FORWARD, assert_close, rounding_rtol
from PIL import Image

from mm_embed_trl.demo.tiny import TINY_FAMILIES
from mm_embed_trl.modeling import MultimodalEmbeddingConfig, MultimodalEmbeddingModel
from mm_embed_trl.modeling.modeling import VISION_MODULE_NAMES
from mm_embed_trl.modeling.pooling import finalize_embeddings, last_token_indices, pool, special_token_indices

VLM_FAMILIES = [f for f in TINY_FAMILIES if f != "text"]


def _image(color=(255, 0, 0), size=64):
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(color, (8, 8, size // 2, size // 2))
    return img


def _mixed_inputs(family):
    if family == "text":
        return ["a red circle on the left", "two blue squares", "hello"]
    return ["a red circle on the left", _image(), (_image((0, 0, 255)), "What colour is the shape?"),
            {"text": "Find the picture", "image": _image((0, 255, 0))}]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_wrap_save_reload_bit_identical(family, tiny_backbone, tmp_path):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone(family))
    assert model.processor is not None
    inputs = _mixed_inputs(family)
    emb = model.encode(inputs, batch_size=2)
    assert emb.shape == (len(inputs), model.config.hidden_size)
    assert_close(emb.norm(dim=-1), torch.ones(len(inputs)), rtol=rounding_rtol(terms=64))  # float32 norms
    model.save_pretrained(tmp_path / "saved")
    config = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert config["model_type"] == "mm_embedding"
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "saved").iterdir())
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.encode(inputs, batch_size=2), emb)
    # also through the Auto classes
    from transformers import AutoModel

    auto = AutoModel.from_pretrained(tmp_path / "saved")
    assert isinstance(auto, MultimodalEmbeddingModel)


def test_encode_is_batch_independent(qwen2_vl_model):
    """Padding (left) and batch composition must not change an input's embedding."""
    inputs = _mixed_inputs("qwen2_vl")
    together = qwen2_vl_model.encode(inputs, batch_size=len(inputs))
    alone = torch.stack([qwen2_vl_model.encode([x])[0] for x in inputs])
    # other padding and batch shapes change the kernels' summation order: rounding only
    assert_close(together, alone, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_last_token_pooling_under_left_and_right_padding():
    hidden = torch.randn(2, 5, 3)
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_token_indices(left).tolist() == [4, 4]
    assert last_token_indices(right).tolist() == [2, 4]
    assert torch.equal(pool(hidden, right, mode="last_token"), torch.stack([hidden[0, 2], hidden[1, 4]]))


def test_right_padded_forward_matches_left_padded(qwen2_vl_model):
    collator = qwen2_vl_model.make_collator()
    from mm_embed_trl.data.schema import EmbeddingInput

    enc = collator.encode_inputs([EmbeddingInput(text="a short one"), EmbeddingInput(text="a much longer text " * 3)])
    left = qwen2_vl_model(**enc).embeddings
    # re-pad on the right by rolling each row's padding to its end
    pad = (enc["attention_mask"] == 0).sum(-1)
    right = {k: v.clone() for k, v in enc.items() if torch.is_tensor(v)}
    for i, n in enumerate(pad.tolist()):
        for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
            if key in right:
                right[key][i] = torch.roll(enc[key][i], -n)
    assert_close(qwen2_vl_model(**right).embeddings, left, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_special_token_and_mean_pooling():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float).view(2, 4, 2)
    ids = torch.tensor([[5, 9, 5, 1], [1, 2, 3, 4]])
    mask = torch.ones_like(ids)
    idx, found = special_token_indices(ids, 5, mask)
    assert idx.tolist() == [2, 3] and found.tolist() == [True, False]  # last occurrence; fallback = last token
    out = pool(hidden, mask, mode="special_token", input_ids=ids, token_id=5)
    assert torch.equal(out, torch.stack([hidden[0, 2], hidden[1, 3]]))
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    mean = torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)])
    assert_close(pool(hidden, mask, mode="mean"), mean, rtol=rounding_rtol(terms=4))
    with pytest.raises(ValueError, match="Unknown pooling"):
        pool(hidden, mask, mode="max")


def test_truncation_then_normalisation():
    x = torch.tensor([[3.0, 4.0, 12.0]])
    assert_close(finalize_embeddings(x, dim=2), torch.tensor([[0.6, 0.8]]), rtol=rounding_rtol(terms=2))
    with pytest.raises(ValueError, match="exceeds"):
        finalize_embeddings(x, dim=4)


def test_wrapper_options_from_pretrained(tiny_backbone):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), embedding_dim=16, pooling="mean")
    assert model.encode(["hello"]).shape == (1, 16)
    assert model.config.pooling == "mean"


def test_special_token_pooling_needs_token_in_vocab(tiny_backbone):
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        MultimodalEmbeddingModel.from_pretrained(
            tiny_backbone("qwen2_vl"), pooling="special_token", pooling_token="<definitely_not_a_token>"
        )


def test_lora_language_model_only_roundtrip_and_merge(tiny_backbone, tmp_path):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("visual" in n for n in trainable), "LoRA must stay out of the vision tower by default"
    # make the adapters non-trivial
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    inputs = _mixed_inputs("qwen2_vl")
    with_lora = model.encode(inputs)
    model.save_pretrained(tmp_path / "ckpt")
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "ckpt")
    assert reloaded.has_lora
    assert_close(reloaded.encode(inputs), with_lora, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    model.merge_lora()
    assert not model.has_lora and model.config.lora_config is None
    assert not any("lora_" in n for n, _ in model.named_parameters())
    # merged W + BA against W x + B(A x): one more rounding per adapted projection
    assert_close(model.encode(inputs), with_lora, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_lora_generative_model_with_tied_embeddings_roundtrips(tiny_backbone, tmp_path):
    """A generative backbone whose lm_head is its input embedding (Qwen2-VL-2B's, the tiny one's), with adapters: saved
    (one copy of the tied matrix) and reloaded with the tie and every weight intact. Reloading used to fail inside
    transformers' tie_weights ("Qwen2VLForConditionalGeneration has no attribute `language_model`"), since PEFT's
    wrapper forwards the attribute lookups transformers names ties by."""
    from safetensors.torch import load_file

    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    backbone = model.backbone
    assert backbone.lm_head.weight is backbone.model.language_model.embed_tokens.weight  # the case under test
    model.add_lora(r=4, lora_alpha=8, lora_dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "ckpt")
    saved = load_file(tmp_path / "ckpt" / "model.safetensors")
    assert sum("embed_tokens" in k or "lm_head" in k for k in saved) == 1
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "ckpt")
    assert reloaded.has_lora
    inner = reloaded.backbone
    assert inner.lm_head.weight is inner.model.language_model.embed_tokens.weight
    want, got = model.state_dict(), reloaded.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)  # bit-identical: a file round trip, no arithmetic
    reloaded.merge_lora()
    tie = {"encoder.lm_head.weight": "encoder.model.language_model.embed_tokens.weight"}
    assert reloaded.all_tied_weights_keys == tie
    reloaded.save_pretrained(tmp_path / "merged")  # the merged model saves and loads as a plain one
    merged = MultimodalEmbeddingModel.from_pretrained(tmp_path / "merged")
    assert not merged.has_lora
    assert merged.backbone.lm_head.weight is merged.backbone.model.language_model.embed_tokens.weight


def test_lora_all_targets_reach_vision(tiny_backbone):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.add_lora(target="all", r=2)
    assert any("visual" in n for n, p in model.named_parameters() if p.requires_grad)


def test_activation_checkpointing_same_gradients(tiny_backbone):
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.train()
    collator = model.make_collator()
    from mm_embed_trl.data.schema import EmbeddingInput

    enc = collator.encode_inputs([EmbeddingInput(text="red circle", image=_image()), EmbeddingInput(text="blue")])

    def grads():
        model.zero_grad()
        model(**enc).embeddings[:, :5].sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert_close(checkpointed[name], plain[name], rtol=rounding_rtol(**TINY_IMAGE_BACKWARD), msg=name)


def test_unwrappable_backbone_is_a_clear_error(tmp_path):
    from transformers import ResNetConfig, ResNetModel

    ResNetModel(ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1])).save_pretrained(tmp_path / "resnet")
    with pytest.raises(ValueError, match="Cannot wrap .*resnet"):
        MultimodalEmbeddingModel.from_pretrained(tmp_path / "resnet")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"model_type": "no_such_model_type"}))
    with pytest.raises(OSError, match="neither a saved MultimodalEmbeddingModel nor a backbone"):
        MultimodalEmbeddingModel.from_pretrained(tmp_path / "weird")


def test_encode_without_processor_is_a_clear_error(tiny_backbone):
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), load_processor=False)
    with pytest.raises(ValueError, match="no processor attached"):
        model.encode(["hello"])


def test_config_validation():
    with pytest.raises(ValueError, match="pooling"):
        MultimodalEmbeddingConfig(pooling="max")
    with pytest.raises(ValueError, match="pooling_token"):
        MultimodalEmbeddingConfig(pooling="special_token")


@pytest.mark.parametrize("batch_size", [0, -1, 2.5, True, "8"])
def test_encode_refuses_a_batch_size_that_is_not_a_positive_whole_number(batch_size, qwen2_vl_model):
    """batch_size=-1 returned an empty tensor, 0 failed inside range(); each is refused naming the option."""
    with pytest.raises((TypeError, ValueError), match=rf"batch_size={batch_size!r}.*positive whole number"):
        qwen2_vl_model.encode(["a red circle", "a blue square"], batch_size=batch_size)


@pytest.mark.parametrize("embedding_dim", [0, -5, 65, 2.5, True])
def test_embedding_dim_is_validated_wherever_it_is_set(embedding_dim, tiny_backbone, tmp_path):
    """embedding_dim=0 gave 0-dimensional vectors and -5 failed deep inside encode; the tiny hidden size is 64.
    Refused by the config, by from_pretrained on a backbone and on a saved model, and by the export."""
    from transformers import AutoConfig

    match = rf"embedding_dim={embedding_dim!r}.*\[1, 64\]"
    backbone_config = AutoConfig.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises((TypeError, ValueError), match=match):
        MultimodalEmbeddingConfig(encoder_config=backbone_config, embedding_dim=embedding_dim)
    with pytest.raises((TypeError, ValueError), match=match):
        MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), embedding_dim=embedding_dim)
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    model.save_pretrained(tmp_path / "saved")
    with pytest.raises((TypeError, ValueError), match=match):
        MultimodalEmbeddingModel.from_pretrained(tmp_path / "saved", embedding_dim=embedding_dim)
    from mm_embed_trl.export import export_sentence_transformers

    model.config.embedding_dim = embedding_dim  # set by hand, past every door but the export's
    with pytest.raises((TypeError, ValueError), match=match):
        export_sentence_transformers(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()


class _RecordBackward(torch.autograd.Function):
    """Identity that notes when a gradient reaches a module output, as ZeRO-3's pre-backward hook does."""

    @staticmethod
    def forward(ctx, tensor, note):
        ctx.note = note
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        ctx.note()
        return grad, None


def _module_call_order(model, inputs):
    """Order of module forwards and of gradients reaching module outputs (each output tensor, any output type):
    what ZeRO-3 and FSDP gather collectively, in that order. Also returns which parameters got a gradient."""
    order, handles = [], []

    def wrap(value, note):
        if torch.is_tensor(value) and value.requires_grad:
            return _RecordBackward.apply(value, note)
        if isinstance(value, dict):  # ModelOutput included: replace its tensors in place
            for key in list(value.keys()):
                value[key] = wrap(value[key], note)
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(wrap(v, note) for v in value)
        return value

    for name, module in model.named_modules():
        if name:
            note = lambda name=name: order.append(("backward", name))  # noqa: E731
            handles.append(module.register_forward_pre_hook(lambda m, a, name=name: order.append(("forward", name))))
            handles.append(module.register_forward_hook(lambda m, a, out, note=note: wrap(out, note)))
    try:
        model.zero_grad(set_to_none=True)
        model(**inputs).embeddings.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    return order, with_grad


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_vision_tower_in_every_forward(family, tiny_backbone):
    """Sharded training needs every rank to run the same modules in the same order (forward and backward): with
    the option on, a text-only batch runs the vision tower on a blank image exactly where an image batch runs
    it, its embeddings are unchanged, and the same parameters get a gradient (zero for the vision tower)."""
    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone(family))
    processor = model.processor
    texts = ["a red circle on the left", "two blue squares"]
    text_batch = dict(processor.tokenizer(texts, return_tensors="pt", padding=True))
    image_batch = dict(processor(text=[f"{processor.image_token} a picture"], images=[_image()], return_tensors="pt"))
    reference = model(**text_batch).embeddings.detach()
    image_reference = model(**image_batch).embeddings.detach()
    plain_order, _ = _module_call_order(model, text_batch)

    model.run_vision_tower_in_every_forward()
    torch.testing.assert_close(model(**text_batch).embeddings, reference, atol=0, rtol=0)
    text_order, text_grads = _module_call_order(model, text_batch)
    vision = [n for n in text_grads if any(k in n for k in VISION_MODULE_NAMES)]
    assert vision and all(not model.get_parameter(n).grad.any() for n in vision)
    torch.testing.assert_close(model(**image_batch).embeddings, image_reference, atol=0, rtol=0)
    image_order, image_grads = _module_call_order(model, image_batch)
    assert text_order == image_order
    assert text_grads == image_grads
    assert plain_order != text_order  # the recorder sees the difference the option removes


def test_lm_loss_on_labels_equals_the_backbones_own_and_chunks_do_not_change_it(tiny_backbone, monkeypatch):
    """labels= gives the backbone's HF cross-entropy (sum / count), in token chunks with the same gradients."""
    import mm_embed_trl.modeling.modeling as modeling_module

    model = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")
    tok = model.processor.tokenizer
    enc = dict(tok(["hello world this is", "a b"], return_tensors="pt", padding=True, padding_side="left"))
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    labels[:, :2] = -100
    out = model(**enc, labels=labels)
    reference = model.backbone(**enc, labels=labels)
    # the same float32 cross-entropy over a 1.3k vocabulary, summed in another order
    assert_close(out.loss, reference.loss, rtol=rounding_rtol(terms=1400, depth=2))
    assert int(out.lm_num_tokens) == int((labels[:, 1:] != -100).sum())
    reference.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(modeling_module, "LM_LOSS_CHUNK_TOKENS", 2)  # checkpointed chunks of 2 tokens
    model(**enc, labels=labels).loss.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for name in want:
        assert_close(got[name], want[name], rtol=rounding_rtol(**TINY_BACKWARD), msg=name)
    base = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))  # no LM head
    with pytest.raises(ValueError, match="encoder_kind='generative'"):
        base(**enc, labels=labels)


def test_named_token_pooling_reads_the_last_occurrence_inside_its_region(qwen2_vl_model):
    """A token in both the prompt and the completion: 'completion' pools the completion's copy, 'prompt' the
    prompt's, 'all' the last; a row without it in the region falls back and is flagged, under left padding."""
    from mm_embed_trl.modeling.pooling import TokenPooling

    tok = qwen2_vl_model.processor.tokenizer
    mark = tok.convert_tokens_to_ids("<|vision_end|>")
    ids = torch.tensor([[0, 0, 5, mark, 6, 7, mark, 8], [0, 9, 5, mark, 6, 7, 8, 9]])
    mask = (torch.arange(8) >= torch.tensor([[2], [1]])).long()
    out = qwen2_vl_model(
        input_ids=ids,
        attention_mask=mask,
        output_hidden_states=True,
        completion_start=5,
        pool_tokens={"c": TokenPooling(mark, "completion"), "p": TokenPooling(mark, "prompt"), "a": mark},
    )
    hidden = out.last_hidden_state
    expect = {"c": [6, 7], "p": [3, 3], "a": [6, 3]}  # row 1 has no completion copy: its last position
    for name, positions in expect.items():
        rows = torch.stack([hidden[0, positions[0]], hidden[1, positions[1]]])
        assert torch.equal(out.named_embeddings[name], F.normalize(rows, dim=-1)), name
    assert out.named_token_found["c"].tolist() == [True, False] and out.named_token_found["p"].tolist() == [True, True]
