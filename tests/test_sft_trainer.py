"""EmbeddingSFTTrainer (UME-R1 stage 1): tokens, loss and gradients against a hand-written reference, GradCache,
1 vs 2 processes, teacher forcing equals generation, generative encode, bad input."""

from __future__ import annotations

from pathlib import Path

import launching
import pytest
import torch
import torch.nn.functional as F
from numerics import TINY_IMAGE_BACKWARD, TINY_IMAGE_FORWARD, assert_close, assert_loss_close, rounding_rtol
from scripts import load_script

from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel
from mm_embed_trl.data.reasoning import ReasoningCollator, format_reasoning
from mm_embed_trl.data.templates import DISC_EMB_TOKEN, GEN_EMB_TOKEN
from mm_embed_trl.modeling import add_embedding_tokens

ROOT = Path(__file__).resolve().parents[1]
TAU = 0.05


def _config(tmp_path, **kw):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=6,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        temperature=TAU,
        disable_tqdm=True,
        save_sentence_transformers=False,
    )
    defaults.update(kw)
    return EmbeddingSFTConfig(**defaults)


def _model(tiny_backbone):
    torch.manual_seed(0)
    return MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"), encoder_kind="generative")


# ---------------------------------------------------------------------------------------------------- tokens
def test_embedding_tokens_are_ordinary_idempotent_initialised_and_saved(tiny_backbone, tmp_path):
    model = _model(tiny_backbone)
    tok = model.processor.tokenizer
    before = len(tok)
    rows_before = model.get_input_embeddings().weight.detach().clone()
    ids = add_embedding_tokens(model, model.processor)
    assert sorted(ids.values()) == [before, before + 1]  # new and contiguous
    weight = model.get_input_embeddings().weight.detach()
    # the tiny vocabulary has no <|object_ref_*|> source rows: both start at the mean of the old rows
    for token_id in ids.values():
        assert_close(weight[token_id], rows_before.mean(dim=0), rtol=rounding_rtol(terms=before))
    assert torch.equal(weight[:before], rows_before)
    text = f"x {DISC_EMB_TOKEN} y {GEN_EMB_TOKEN}"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text  # decoding keeps them
    snapshot = model.get_input_embeddings().weight.detach().clone()
    assert add_embedding_tokens(model, model.processor) == ids  # a second call changes nothing
    assert len(tok) == before + 2 and torch.equal(model.get_input_embeddings().weight, snapshot)
    model.save_pretrained(tmp_path / "saved")
    reloaded = MultimodalEmbeddingModel.from_pretrained(tmp_path / "saved")
    assert reloaded.processor.tokenizer.convert_tokens_to_ids([DISC_EMB_TOKEN, GEN_EMB_TOKEN]) == list(ids.values())
    assert torch.equal(reloaded.get_input_embeddings().weight, snapshot)


def test_embedding_tokens_start_from_ume_r1s_source_rows(tiny_backbone):
    model = _model(tiny_backbone)
    tok = model.processor.tokenizer
    sources = {DISC_EMB_TOKEN: "<|vision_start|>", GEN_EMB_TOKEN: "<|vision_end|>"}
    ids = add_embedding_tokens(model, model.processor, init_from=sources)
    weight = model.get_input_embeddings().weight
    for token, source in sources.items():
        assert torch.equal(weight[ids[token]], weight[tok.convert_tokens_to_ids(source)])


# ------------------------------------------------------------------------------------------------------ loss
def _rows(shapes_data, n=6):
    return [shapes_data["train"][i] for i in range(n)]


def _reference_loss(model, batch, tau):
    """UME-R1's objective by hand: per side one forward through the HF backbone with labels (its own CE), the
    states at the prompt's <disc_emb> and the completion's last <gen_emb> read by Python loops, symmetric
    cross-entropy on (q @ t.T) / tau for each embedding; the sum of the four terms."""
    tok = model.processor.tokenizer
    disc_id, gen_id = tok.convert_tokens_to_ids([DISC_EMB_TOKEN, GEN_EMB_TOKEN])
    embeddings, ce = {}, {}
    for side in ("query", "positive"):
        enc = {k: v for k, v in batch[side].items() if k not in ("image_counts", "completion_start")}
        out = model.backbone(**enc, output_hidden_states=True)
        ce[side] = out.loss
        hidden = out.hidden_states[-1]
        start = int(batch[side]["completion_start"][0])
        disc, gen = [], []
        for i, ids in enumerate(enc["input_ids"].tolist()):
            disc.append(hidden[i, max(j for j, t in enumerate(ids[:start]) if t == disc_id)])
            gen.append(hidden[i, max(j for j, t in enumerate(ids) if t == gen_id and j >= start)])
        embeddings[side] = (F.normalize(torch.stack(disc), dim=-1), F.normalize(torch.stack(gen), dim=-1))
    labels = torch.arange(len(batch["positive_ids"]))

    def clip(q, t):
        logits = q @ t.T / tau
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    (qd, qg), (td, tg) = embeddings["query"], embeddings["positive"]
    return clip(qg, tg) + clip(qd, td) + ce["query"] + ce["positive"]


def test_loss_and_gradients_match_a_hand_written_reference(tiny_backbone, shapes_data, tmp_path):
    model = _model(tiny_backbone)
    trainer = EmbeddingSFTTrainer(model=model, args=_config(tmp_path, image_root=str(shapes_data.image_root)))
    batch = trainer._prepare_inputs(trainer.data_collator(_rows(shapes_data)))
    assert len(set(batch["positive_ids"].tolist())) == 6  # no duplicate targets: the plain objective applies
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    model.zero_grad(set_to_none=True)
    reference = _reference_loss(model, batch, TAU)
    reference.backward()
    # same function, other summation order: InfoNCE at 1/tau over image + text forwards
    assert_loss_close(loss, reference, rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / TAU))
    grad_rtol = rounding_rtol(**TINY_IMAGE_BACKWARD, gain=1 / TAU)
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert_close(got[name], param.grad, rtol=grad_rtol, msg=name)
    assert set(logged) >= {"disc_contrastive_loss", "gen_contrastive_loss", "query_lm_loss", "target_lm_loss",
                           "disc_accuracy", "gen_accuracy", "gen_emb_found_rate"}
    assert float(logged["gen_emb_found_rate"]) == 1.0
    parts = sum(float(logged[k]) for k in ("disc_contrastive_loss", "gen_contrastive_loss", "query_lm_loss",
                                           "target_lm_loss"))
    assert_loss_close(parts, loss, rtol=rounding_rtol(terms=4))  # the logged parts add up to the loss (weights 1)
    # the vision encoder is frozen, its merger trains (UME-R1's --tune_mm_vision False --tune_mm_mlp True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("merger" in n for n in trainable) and not any("visual.blocks" in n for n in trainable)


@pytest.mark.parametrize("variant", ["plain", "alignment"])
def test_grad_cache_gives_the_same_loss_and_gradients(variant, tiny_backbone, shapes_data, tmp_path):
    extra = {"disc_gen_alignment_weight": 0.5} if variant == "alignment" else {}
    results = []
    for chunk in (None, 2):
        model = _model(tiny_backbone)
        config = _config(tmp_path, image_root=str(shapes_data.image_root), gradient_cache_chunk_size=chunk, **extra)
        trainer = EmbeddingSFTTrainer(model=model, args=config)
        model.train()
        biggest = []

        def record(module, args, kwargs, biggest=biggest):  # rows of every forward run with a graph
            if torch.is_grad_enabled():
                biggest.extend(enc["input_ids"].shape[0] for enc in kwargs.get("batches") or [kwargs])

        model.register_forward_pre_hook(record, with_kwargs=True)
        loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator(_rows(shapes_data))))
        trainer.accelerator.backward(loss)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.item(), grads, max(biggest)))
    (loss_plain, plain, _), (loss_cached, cached, biggest_cached) = results
    assert biggest_cached <= 2, "GradCache ran a forward with graph on more rows than the chunk"
    assert_loss_close(loss_cached, loss_plain, rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / TAU))
    assert plain.keys() == cached.keys() and plain
    for name in plain:
        assert_close(cached[name], plain[name], rtol=rounding_rtol(**TINY_IMAGE_BACKWARD, gain=1 / TAU), msg=name)


@pytest.mark.parametrize("chunk", [None, 2])
def test_contrastive_groups_train_like_accumulated_micro_batches(chunk, tiny_backbone, shapes_data, tmp_path):
    """contrastive_group_size=3 on a 6-pair batch (with and without GradCache) gives the loss and gradients of two
    accumulated 3-pair micro-batches, each its own InfoNCE: UME-R1's 256-pair losses under GA 4, in one 1024-pair
    GradCache step. (The CE terms are off: their token mean spans what one forward sees, in either layout.)"""
    weights = dict(query_lm_weight=0.0, target_lm_weight=0.0, image_root=str(shapes_data.image_root))
    rows = _rows(shapes_data)

    def step(model, config, batches):
        trainer = EmbeddingSFTTrainer(model=model, args=config)
        model.train()
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in batches:  # accumulated as the Trainer does: each micro-batch's loss over their count
            loss = trainer.compute_loss(model, trainer._prepare_inputs(trainer.data_collator(part))) / len(batches)
            trainer.accelerator.backward(loss)
            total += loss.item()
        return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model = _model(tiny_backbone)
    grouped, grouped_grads = step(model, _config(tmp_path, contrastive_group_size=3, gradient_cache_chunk_size=chunk,
                                                 **weights), [rows])
    accumulated, accumulated_grads = step(model, _config(tmp_path, **weights), [rows[:3], rows[3:]])
    whole, _ = step(model, _config(tmp_path, **weights), [rows])
    assert_loss_close(grouped, accumulated, rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / TAU))
    assert abs(whole - accumulated) > 0.05  # one 6-pair InfoNCE is another objective
    assert grouped_grads.keys() == accumulated_grads.keys() and grouped_grads
    for name in grouped_grads:
        assert_close(grouped_grads[name], accumulated_grads[name],
                     rtol=rounding_rtol(**TINY_IMAGE_BACKWARD, gain=1 / TAU), msg=name)
    with pytest.raises(ValueError, match="contrastive_group_size"):
        _config(tmp_path, contrastive_group_size=1)


_STEP_SCRIPT = """
import sys, torch
from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel
from mm_embed_trl.demo.generated import make_shapes_dataset
from mm_embed_trl.demo.tiny import get_tiny_backbone

out, chunk = sys.argv[1], (int(sys.argv[2]) if len(sys.argv) > 2 else None)
data = make_shapes_dataset(num_train=16, num_eval=0, seed=4)
rows = [data["train"][i] for i in range(8)]
torch.manual_seed(0)
model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")), encoder_kind="generative")
config = EmbeddingSFTConfig(output_dir=out + ".trainer", temperature=0.05, gradient_cache_chunk_size=chunk,
                            image_root=str(data.image_root), report_to="none", use_cpu=True)
trainer = EmbeddingSFTTrainer(model=model, args=config)
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
    """2 processes x (3 + 5) rows == 1 process x 8 rows: loss (contrastive over the gathered batch, CE the token mean
    of the global batch) and every gradient, on DDP/gloo, with and without GradCache."""
    script = tmp_path / "sft_step.py"
    script.write_text(_STEP_SCRIPT)
    outputs = {}
    for name, processes, extra in (("single", 1, ()), ("ddp", 2, ()), ("ddp_gradcache", 2, ("2",))):
        launching.run(script, tmp_path / f"{name}.pt", *extra, processes=processes)
        outputs[name] = torch.load(tmp_path / f"{name}.pt")
    ref = outputs["single"]
    assert ref["world"] == 1 and outputs["ddp"]["world"] == 2
    for name in ("ddp", "ddp_gradcache"):
        got = outputs[name]
        assert_loss_close(got["loss"], ref["loss"], rtol=rounding_rtol(**TINY_IMAGE_FORWARD, gain=1 / 0.05))
        assert got["grads"].keys() == ref["grads"].keys() and ref["grads"]
        for key in ref["grads"]:
            assert_close(got["grads"][key], ref["grads"][key], rtol=rounding_rtol(**TINY_IMAGE_BACKWARD, gain=20))


# ---------------------------------------------------------------------------------------- generation vs training
def test_teacher_forced_gen_state_equals_the_state_after_generate(tiny_backbone, shapes_data, tmp_path):
    """One target, three ways: the trainer's teacher-forced forward, encode(mode='generative') (generate, then one
    prefill forward) and the hidden state generate() itself returns at the step that wrote <gen_emb>."""
    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))  # adds the tokens, sets the generative pooling
    model.eval()
    tok = model.processor.tokenizer
    target = format_reasoning("a red circle", "red circle")
    forced = tok(target, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    row = {"qry": "a red circle on the left", "qry_image_path": "", "pos_text": "x", "pos_image_path": "",
           "qry_reasoning": target, "pos_reasoning": target}
    batch = ReasoningCollator(model.processor, template=model.config.prompt_template)([row])["query"]
    start = int(batch["completion_start"][0])

    def force(batch_id, ids):  # generate exactly `forced`
        step = ids.shape[-1] - start
        return [forced[step]] if step < len(forced) else [tok.eos_token_id]

    from mm_embed_trl.modeling.pooling import TokenPooling

    gen_id = tok.convert_tokens_to_ids(GEN_EMB_TOKEN)
    with torch.no_grad():
        teacher_forced = model(**batch, pool_tokens={"gen": TokenPooling(gen_id, "completion")}).named_embeddings["gen"]
        embedding, (text,) = model.encode([row["qry"]], mode="generative", return_reasoning=True, max_new_tokens=40,
                                          generation_kwargs={"prefix_allowed_tokens_fn": force})
        prompt = {k: v for k, v in batch.items() if k not in ("labels", "completion_start", "image_counts")}
        prompt = {k: (v[:, :start] if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
                  for k, v in prompt.items()}
        generated = model.backbone.generate(**prompt, max_new_tokens=40, do_sample=False,
                                            prefix_allowed_tokens_fn=force, output_hidden_states=True,
                                            return_dict_in_generate=True)
    j = forced.index(gen_id)  # completion token j is fed at step j + 1; its last-layer state is that step's output
    at_generate = F.normalize(generated.hidden_states[j + 1][-1][:, -1], dim=-1)
    assert text == target  # the generated reasoning, <gen_emb> kept by decoding
    fp32 = rounding_rtol(**TINY_IMAGE_FORWARD)
    assert_close(embedding[0], teacher_forced[0], rtol=fp32)
    assert_close(at_generate[0], teacher_forced[0], rtol=fp32)


def test_generative_encode_modes_samples_and_the_missing_token_policy(tiny_backbone, tmp_path, caplog):
    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    texts = ["a red circle", "two blue stars", "a green cross on the right"]
    disc = model.encode(texts)
    both = model.encode(texts, mode="both", max_new_tokens=6, batch_size=2)
    assert_close(both["discriminative"], disc, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))  # disc is causal: same
    with caplog.at_level("WARNING"):
        gen = model.encode(texts, mode="generative", max_new_tokens=6)
    assert "3 of 3 generated completions never wrote <gen_emb>" in caplog.text  # an untrained model never does
    assert_close(gen, both["generative"], rtol=rounding_rtol(**TINY_IMAGE_FORWARD))  # greedy: deterministic
    as_disc = model.encode(texts, mode="generative", max_new_tokens=6, missing_token="discriminative")
    assert_close(as_disc, disc, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    with pytest.raises(ValueError, match="never wrote the generative token"):
        model.encode(texts, mode="generative", max_new_tokens=6, missing_token="error")
    torch.manual_seed(0)
    samples, reasoning = model.encode(texts, mode="generative", max_new_tokens=6, do_sample=True, num_samples=3,
                                      return_reasoning=True)
    assert samples.shape == (3, 3, 64) and len(reasoning) == 3 and all(len(r) == 3 for r in reasoning)
    with pytest.raises(ValueError, match="needs do_sample=True"):
        model.encode(texts, mode="generative", num_samples=2)
    plain = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises(ValueError, match="encoder_kind='generative'"):
        plain.encode(texts, mode="generative")


def test_sampling_samples_whatever_the_backbones_generation_config_says(tiny_backbone, instruct_generation_config,
                                                                       tmp_path):
    """pass@k draws k different completions even from a backbone whose generation_config is Qwen2-VL-Instruct's
    (top_k=1, top_p=0.001, temperature=0.01): generate() fills every sampling field left unset from it, which made
    the k samples one greedy completion k times. Greedy stays greedy, and the sampling knobs passed are obeyed."""
    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    texts = ["a red circle", "two blue stars"]
    plain_greedy = model.encode(texts, mode="generative", max_new_tokens=8)
    model.backbone.generation_config = instruct_generation_config(model.processor.tokenizer)
    torch.manual_seed(0)
    _, samples = model.encode(texts, mode="generative", max_new_tokens=8, do_sample=True, num_samples=4,
                              return_reasoning=True)
    # 8 tokens drawn from the tiny model's ~1.4k-token vocabulary at temperature 1: equal samples mean no sampling
    assert all(len(set(per_input)) == 4 for per_input in samples), samples
    greedy = model.encode(texts, mode="generative", max_new_tokens=8)
    assert_close(greedy, plain_greedy, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))
    torch.manual_seed(0)
    _, narrow = model.encode(texts, mode="generative", max_new_tokens=8, do_sample=True, num_samples=3, top_k=1,
                             return_reasoning=True)
    assert all(len(set(per_input)) == 1 for per_input in narrow)  # top_k=1 asked for: one completion
    model.backbone.generation_config.top_h = 0.5  # a warper generate() cannot switch off per call
    with pytest.raises(ValueError, match="top_h"):
        model.encode(texts, mode="generative", max_new_tokens=2, do_sample=True, num_samples=2)


def test_reasonings_cut_short_are_counted_and_the_default_lengths_are_ume_r1s(tiny_backbone, tmp_path, caplog):
    """A reasoning that reaches max_new_tokens before its end is cut short (its <gen_emb> never comes, the
    embedding falls back): every such completion is counted in a warning. The default length is UME-R1's evaluation
    length (8192) in encode, the SFT config's evaluation and the generative export."""
    import inspect
    import json

    from mm_embed_trl.evaluation import ReasoningFormatEvaluator
    from mm_embed_trl.export.generative import export_generative_sentence_transformers

    assert inspect.signature(MultimodalEmbeddingModel.encode).parameters["max_new_tokens"].default == 8192
    assert EmbeddingSFTConfig(output_dir=str(tmp_path), use_cpu=True).max_new_tokens == 8192
    assert inspect.signature(ReasoningFormatEvaluator).parameters["max_new_tokens"].default == 8192
    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    export = export_generative_sentence_transformers(model, tmp_path / "gen")
    assert json.loads((export / "mm_embed_generative_config.json").read_text())["generation"]["max_new_tokens"] == 8192
    tok = model.processor.tokenizer
    ended = tok(format_reasoning("a", "b"), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    cut = tok("<think>a long reasoning", add_special_tokens=False)["input_ids"][:4]

    def generate(prompt, kwargs):  # row 1 stopped by the length limit, rows 0 and 2 by their end of turn
        return [ended, cut, ended[:3] + [tok.eos_token_id]]

    with caplog.at_level("WARNING"):
        model.encode(["x", "y", "z"], mode="generative", max_new_tokens=len(cut), generate_fn=generate)
    assert "1 of 3 generated completions reached max_new_tokens=4 before ending" in caplog.text
    assert "2 of 3 generated completions never wrote <gen_emb>" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        model.encode(["x", "y", "z"], mode="generative", max_new_tokens=len(ended), generate_fn=generate)
    assert "reached max_new_tokens" not in caplog.text  # short completions without an end are not cut short


def test_generation_never_writes_an_image_placeholder(tiny_backbone, shapes_data, tmp_path):
    """A completion holding <|image_pad|> would make the prefill forward expand image features it does not have
    (transformers: "Image features and image tokens do not match"): generation suppresses the placeholder ids, here
    against a logits processor that makes the model want it most, and an external generate_fn that returns one gets
    an error naming the row."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from mm_embed_trl.modeling.generative import placeholder_ids

    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    config = model.backbone.config
    assert placeholder_ids(model) == sorted({config.image_token_id, config.video_token_id})

    class PreferPlaceholders(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:, placeholder_ids(model)] += 1e4
            return scores

    path = next(p for p in shapes_data["train"]["qry_image_path"] if p)
    image = str(Path(shapes_data.image_root) / path)
    wants = {"generation_kwargs": {"logits_processor": LogitsProcessorList([PreferPlaceholders()])}}
    torch.manual_seed(0)
    samples, texts = model.encode([image, (image, "the shapes")], side="document", mode="generative",
                                  max_new_tokens=4, do_sample=True, num_samples=3, return_reasoning=True, **wants)
    assert samples.shape == (2, 3, 64) and torch.isfinite(samples).all()
    _, completions = model.encode([image], side="document", mode="generative", max_new_tokens=4,
                                  generate_fn=lambda prompt, kwargs: [[5, 6]], return_reasoning=True)
    assert completions == [model.processor.tokenizer.decode([5, 6], skip_special_tokens=True)]
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] hold an image/video placeholder.*suppress"):
        model.encode([image, image], side="document", mode="generative",
                     generate_fn=lambda prompt, kwargs: [[5], [5, config.image_token_id]])


# ----------------------------------------------------------------------------------------------------- options
def test_batches_follow_the_file_order_by_default(tiny_backbone, shapes_data, tmp_path):
    """UME-R1 trains on its JSON in file order (`--data_group True`: task-grouped batches, a SequentialSampler):
    so does the SFT config by default; train_sampling_strategy="random" shuffles."""
    model = _model(tiny_backbone)
    train = shapes_data["train"].select(range(24))
    in_order = EmbeddingSFTTrainer(model=model, args=_config(tmp_path, image_root=str(shapes_data.image_root)),
                                   train_dataset=train)
    assert in_order.args.train_sampling_strategy == "sequential"
    assert list(in_order._get_train_sampler()) == list(range(len(train)))
    first = next(iter(in_order.get_train_dataloader()))
    assert torch.equal(first["positive_ids"], in_order.data_collator(list(train.select(range(6))))["positive_ids"])
    args = _config(tmp_path, image_root=str(shapes_data.image_root), train_sampling_strategy="random")
    shuffled = EmbeddingSFTTrainer(model=model, args=args, train_dataset=train)
    assert sorted(shuffled._get_train_sampler()) == list(range(len(train)))
    assert list(shuffled._get_train_sampler()) != list(range(len(train)))


def test_text_only_sides_get_ume_r1s_blank_image_in_training_and_encoding(tiny_backbone, shapes_data, tmp_path):
    """With UME-R1's template (the SFT default) every text-only input is embedded as UME-R1 embeds it, after a 28x28
    white image: in the SFT batches and in encode (hence evaluation and the generative export), exactly as if the
    input carried that image under the plain "ume_r1" template. The tiny demo's "ume_r1" keeps text alone."""
    from PIL import Image

    from mm_embed_trl.data.schema import EmbeddingInput

    model = _model(tiny_backbone)
    trainer = EmbeddingSFTTrainer(model=model, args=_config(tmp_path, image_root=str(shapes_data.image_root)))
    assert trainer.args.prompt_template == model.config.prompt_template == "ume_r1_blank_image"
    white = Image.new("RGB", (28, 28), (255, 255, 255))
    texts = ["a red circle", "two blue stars on the left"]
    blank = model.make_collator().encode_inputs([EmbeddingInput(t) for t in texts])
    explicit = model.make_collator(template="ume_r1").encode_inputs([EmbeddingInput(t, white) for t in texts])
    assert blank.keys() == explicit.keys() and "pixel_values" in blank
    for key in blank:
        assert torch.equal(blank[key], explicit[key]), key
    batch = trainer.data_collator(_rows(shapes_data))
    text_sides = [i for i, r in enumerate(_rows(shapes_data)) if not r["pos_image_path"]]
    assert text_sides and batch["positive"]["image_counts"].tolist() == [1] * len(_rows(shapes_data))
    rtol = rounding_rtol(**TINY_IMAGE_FORWARD)
    assert_close(model.encode(texts), model.encode([(white, t) for t in texts]), rtol=rtol)
    model.config.prompt_template = "ume_r1"
    assert "pixel_values" not in model.make_collator().encode_inputs([EmbeddingInput(t) for t in texts])


def test_input_texts_are_not_cut_by_default(tiny_backbone, tmp_path):
    """UME-R1 never cuts an input text on its own (only the whole row, at model_max_length): the SFT collator keeps a
    text longer than the 1024 tokens the other trainers cut at, unless max_length asks for a cut."""
    model = _model(tiny_backbone)
    long_text = " ".join(["red circle"] * 700)
    row = {"qry": long_text, "qry_image_path": "", "pos_text": "a red circle", "pos_image_path": "",
           "qry_reasoning": format_reasoning("a", "b"), "pos_reasoning": format_reasoning("c", "d")}
    text_tokens = len(model.processor.tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert text_tokens > 1024
    trainer = EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    assert trainer.args.max_length is None
    whole = trainer.data_collator([row])["query"]
    assert int(whole["completion_start"][0]) > text_tokens and trainer.data_collator.num_truncated == 0
    cut = EmbeddingSFTTrainer(model=model, args=_config(tmp_path, max_length=1024)).data_collator
    assert int(cut([row])["query"]["completion_start"][0]) < text_tokens and cut.num_truncated == 1



def test_discriminative_only_needs_no_reasoning(tiny_backbone, shapes_data, tmp_path):
    """UME-R1's DUME variant: plain embedding rows, <disc_emb> pooled, one contrastive term."""
    model = _model(tiny_backbone)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), discriminative_only=True)
    assert (config.gen_contrastive_weight, config.query_lm_weight, config.target_lm_weight) == (0.0, 0.0, 0.0)
    trainer = EmbeddingSFTTrainer(model=model, args=config)
    rows = [{k: v for k, v in r.items() if "reasoning" not in k} for r in _rows(shapes_data)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    assert "labels" not in batch["query"]
    model.train()
    loss = trainer.compute_loss(model, batch)
    assert torch.equal(loss.detach(), trainer._metrics["train"]["disc_contrastive_loss"][-1])


def test_lora_run_ends_with_a_merged_model_that_reloads(
    tiny_backbone, shapes_data, instruct_generation_config, generation_settings, tmp_path
):
    """SFT with LoRA on a generative backbone whose lm_head is its input embedding (Qwen2-VL-2B's case): the end of
    the run reloads the adapters it saved, merges them and publishes a plain model with the tie intact, which
    encodes as the trained model does (reloading such adapters failed inside transformers' tie_weights), and keeps
    the backbone's generation config (Qwen's EOS list)."""
    from peft import LoraConfig

    model = _model(tiny_backbone)
    model.backbone.generation_config = instruct_generation_config(model.processor.tokenizer)
    expected = generation_settings(model)
    config = _config(tmp_path, image_root=str(shapes_data.image_root), max_steps=2, learning_rate=1e-2)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)
    train = shapes_data["train"].select(range(12))
    trainer = EmbeddingSFTTrainer(model=model, args=config, train_dataset=train, peft_config=lora)
    trainer.train()
    saved = MultimodalEmbeddingModel.from_pretrained(trainer.save_for_inference())
    assert not saved.has_lora and saved.config.lora_config is None
    assert saved.backbone.lm_head.weight is saved.backbone.model.language_model.embed_tokens.weight
    assert generation_settings(saved) == expected
    texts = ["a red circle on the left", "two blue squares"]
    model.eval()
    with_adapters = model.encode(texts)
    # merged W + BA against W x + B(A x): one more rounding per adapted projection
    assert_close(saved.encode(texts), with_adapters, rtol=rounding_rtol(**TINY_IMAGE_FORWARD))


def test_config_validation_and_a_model_without_lm_head(tiny_backbone, tmp_path):
    for bad, match in [
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(query_lm_weight=-1.0), "must be >= 0"),
        (dict(gen_contrastive_weight=0.0, disc_contrastive_weight=0.0), "At least one"),
    ]:
        with pytest.raises(ValueError, match=match):
            _config(tmp_path, **bad)
    base = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises(ValueError, match="encoder_kind='generative'"):
        EmbeddingSFTTrainer(model=base, args=_config(tmp_path))


# ------------------------------------------------------------------------------------------- export and evaluation
def test_generative_export_loads_with_remote_code_and_reproduces_encode(tiny_backbone, tmp_path):
    from PIL import Image
    from sentence_transformers import SentenceTransformer

    from mm_embed_trl.export.generative import export_generative_sentence_transformers

    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    out = export_generative_sentence_transformers(model, tmp_path / "gen", generation={"max_new_tokens": 6})
    inputs = ["a red circle", Image.new("RGB", (64, 64), "red"), {"image": Image.new("RGB", (64, 48)), "text": "x?"}]
    with pytest.raises(ValueError, match="trust_remote_code"):
        SentenceTransformer(str(out))  # custom code is never run without consent
    st = SentenceTransformer(str(out), trust_remote_code=True)
    rtol = rounding_rtol(**TINY_IMAGE_FORWARD)
    assert_close(torch.as_tensor(st.encode_query(inputs)), model.encode(inputs, mode="generative", max_new_tokens=6),
                 rtol=rtol)
    assert_close(torch.as_tensor(st.encode_document(inputs)),
                 model.encode(inputs, side="document", mode="generative", max_new_tokens=6), rtol=rtol)
    plain = MultimodalEmbeddingModel.from_pretrained(tiny_backbone("qwen2_vl"))
    with pytest.raises(ValueError, match="no generative embedding"):
        export_generative_sentence_transformers(plain, tmp_path / "nope")
    # exporting a saved run into itself (or inside it) would replace the run: refused, nothing touched
    model.save_pretrained(tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    for target in (tmp_path / "run", tmp_path / "run" / "gen"):
        with pytest.raises(ValueError, match="overlaps the checkpoint"):
            export_generative_sentence_transformers(tmp_path / "run", target, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_reasoning_format_evaluator_counts_what_the_model_writes(tiny_backbone, tmp_path):
    from mm_embed_trl.evaluation import ReasoningFormatEvaluator

    model = _model(tiny_backbone)
    EmbeddingSFTTrainer(model=model, args=_config(tmp_path))
    tok = model.processor.tokenizer
    good = tok(format_reasoning("a", "b"), add_special_tokens=False)["input_ids"]
    bad = tok("<think>a</think> no tag", add_special_tokens=False)["input_ids"]

    def fake_generate(prompt, kwargs):  # rows 0 and 2 follow the format
        return [good if i % 2 == 0 else bad for i in range(prompt["input_ids"].shape[0])]

    evaluator = ReasoningFormatEvaluator(["x", "y", "z"], name="toy")
    original = model.encode
    model.encode = lambda *a, **k: original(*a, **{**k, "generate_fn": fake_generate})
    assert evaluator(model) == {"toy_format_rate": pytest.approx(2 / 3), "toy_gen_emb_rate": pytest.approx(2 / 3)}


def test_recipes_parse_with_trl_parser_and_keep_ume_r1s_settings(tmp_path):
    """The 2B/7B recipes train UME-R1's objective: 256 pairs per InfoNCE (its 4 per GPU x 64 GPUs, one forward) and
    1024 per optimizer step (GA 4), on the processes of the accelerate config their launch line names; the tiny
    recipe is the example's no-argument default."""
    import re

    import yaml
    from trl import ModelConfig, TrlParser

    from mm_embed_trl.scripts import EmbeddingScriptArguments

    recipes = sorted((ROOT / "recipes").glob("sft_reasoning_*.yaml"))
    assert len(recipes) == 3
    for recipe in recipes:
        parser = TrlParser((EmbeddingScriptArguments, EmbeddingSFTConfig, ModelConfig))
        _, args, model = parser.parse_args_and_config(
            ["--config", str(recipe), "--output_dir", str(tmp_path), "--bf16", "false"]
        )
        assert args.output_dir == str(tmp_path)  # the command line overrides the recipe
        if "tiny" not in recipe.name:
            assert model.model_name_or_path.startswith("Qwen/Qwen2-VL-")
            assert (args.learning_rate, args.temperature, args.warmup_ratio, args.max_steps) == (5e-5, 0.02, 0.03, 5000)
            assert (args.train_sampling_strategy, args.max_length, args.max_new_tokens) == ("sequential", None, 8192)
            assert args.prompt_template == "ume_r1_blank_image"
            launch = re.search(r"--config_file (\S+)", recipe.read_text()).group(1)
            processes = yaml.safe_load((ROOT / launch).read_text())["num_processes"]
            global_batch = args.per_device_train_batch_size * processes
            pairs_per_infonce = args.contrastive_group_size or global_batch
            assert (pairs_per_infonce, global_batch * args.gradient_accumulation_steps) == (4 * 64, 4 * 64 * 4)
    example = load_script("examples/train_sft_reasoning.py")
    recipe = yaml.safe_load((ROOT / "recipes" / "sft_reasoning_tiny_cpu.yaml").read_text())
    assert {k: recipe[k] for k in example.TINY_DEFAULTS} == example.TINY_DEFAULTS
