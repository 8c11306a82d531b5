"""Performance figures of UME-R1's reasoning SFT and generative encode (CPU).

    PYTHONPATH=src python benchmarks/bench_sft_reasoning.py [--width 256] [--inputs 64] [--repeats 3]

1. Generative encode: `MultimodalEmbeddingModel.encode(mode="generative")` (batched generation, then one batched
   prefill forward) against a per-example loop that mirrors UME-R1's published evaluation (`eval_twomode.py`:
   `generate(output_hidden_states=True, return_dict_in_generate=True)` one input at a time, the state read at the
   step that wrote `<gen_emb>`). Both generate the same completion (forced with `prefix_allowed_tokens_fn`, so every
   input writes a reasoning of the same length with `<gen_emb>`): the table also shows that the embeddings agree.
2. SFT step: `EmbeddingSFTTrainer.training_step` (both sides, two InfoNCE terms, two CE terms) against the
   irreducible work, two plain forward + backward passes of the backbone with labels (one per side, HF's own loss),
   on the same collated batch. Median step time over alternating runs.

Width 64 is the tiny test model (dispatch-bound); --width widens the same architecture (random weights).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))


def _model(width):
    import torch
    from bench_hardneg import _backbone_path

    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer, MultimodalEmbeddingModel

    os.environ["BENCH_WIDTH"] = str(width)
    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(_backbone_path(), encoder_kind="generative")
    EmbeddingSFTTrainer(model=model, args=EmbeddingSFTConfig(output_dir="/tmp/bench-sft", report_to="none"))
    return model.eval()


def _inputs(n):
    from PIL import Image

    colors = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown"]
    out = []
    for i in range(n):
        text = f"a {colors[i % 8]} shape number {i} on the {'left' if i % 2 else 'right'}"
        out.append({"text": text, "image": Image.new("RGB", (64, 64), colors[(i // 8) % 8])} if i % 4 == 0 else text)
    return out


def bench_generative_encode(model, n_inputs, repeats, batch_size):
    import torch
    import torch.nn.functional as F

    from mm_embed_trl.data.inputs import to_embedding_input
    from mm_embed_trl.data.reasoning import format_reasoning

    tok = model.processor.tokenizer
    target = tok(format_reasoning("the input shows a coloured shape", "a coloured shape"), add_special_tokens=False)
    forced = target["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    gen_id = tok.convert_tokens_to_ids("<gen_emb>")
    j = forced.index(gen_id)
    inputs = _inputs(n_inputs)
    collator = model.make_collator()

    def forcing(width):
        def allowed(batch_id, ids):
            step = ids.shape[-1] - width
            return [forced[step]] if step < len(forced) else [tok.eos_token_id]

        return allowed

    def batched():
        # encode builds the prompt batch itself; the forcing function needs its width, so wrap generation
        from mm_embed_trl.modeling.generative import generate_completions

        def generate_fn(prompt, kwargs):
            return generate_completions(model, prompt, {**kwargs, "prefix_allowed_tokens_fn": forcing(
                prompt["input_ids"].shape[1])})

        return model.encode(inputs, mode="generative", batch_size=batch_size, max_new_tokens=len(forced) + 1,
                            generate_fn=generate_fn, show_progress_bar=False)

    def per_example():  # UME-R1's eval_twomode.py, one input at a time
        out = []
        with torch.no_grad():
            for x in inputs:
                enc = collator.encode_inputs([to_embedding_input(x)])
                enc.pop("image_counts")
                result = model.backbone.generate(
                    **enc, max_new_tokens=len(forced) + 1, do_sample=False, output_hidden_states=True,
                    return_dict_in_generate=True, use_cache=True,
                    prefix_allowed_tokens_fn=forcing(enc["input_ids"].shape[1]),
                )
                out.append(F.normalize(result.hidden_states[j + 1][-1][0, -1].float(), dim=-1))
        return torch.stack(out)

    times = {"batched": [], "per_example": []}
    results = {}
    for _ in range(repeats):
        for name, fn in (("batched", batched), ("per_example", per_example)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    diff = float((results["batched"] - results["per_example"]).abs().max())
    b, p = statistics.median(times["batched"]), statistics.median(times["per_example"])
    print(f"\n1. Generative encode, {n_inputs} inputs (1 in 4 with an image), {len(forced)} new tokens each")
    print(f"{'path':<40}{'median s':>10}{'inputs/s':>10}")
    print(f"{'per-example generate + hidden states':<40}{p:>10.3f}{n_inputs / p:>10.1f}")
    print(f"{f'batched two-phase (batch {batch_size})':<40}{b:>10.3f}{n_inputs / b:>10.1f}")
    print(f"speed-up {p / b:.2f}x; max |embedding difference| {diff:.2e} (same completions, fp32)")


def bench_sft_step(model, batch_rows, repeats):
    import torch

    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer
    from mm_embed_trl.demo.generated import make_shapes_dataset

    data = make_shapes_dataset(num_train=batch_rows, num_eval=0, seed=3)
    config = EmbeddingSFTConfig(output_dir="/tmp/bench-sft", report_to="none", temperature=0.05,
                                image_root=str(data.image_root), per_device_train_batch_size=batch_rows)
    model.train()
    trainer = EmbeddingSFTTrainer(model=model, args=config)
    batch = trainer._prepare_inputs(trainer.data_collator([data["train"][i] for i in range(batch_rows)]))
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
    plain_sides = [{k: v for k, v in batch[s].items() if k not in ("image_counts", "completion_start")}
                   for s in ("query", "positive")]

    def ours():
        trainer.training_step(model, batch)

    def two_plain_passes():
        for enc in plain_sides:
            model.backbone(**enc).loss.backward()

    times = {"ours": [], "plain": []}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in (("ours", ours), ("plain", two_plain_passes)):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    o, p = statistics.median(times["ours"][1:]), statistics.median(times["plain"][1:])
    tokens = int(sum(enc["attention_mask"].sum() for enc in plain_sides))
    print(f"\n2. SFT step, batch {batch_rows} pairs ({tokens} tokens over both sides)")
    print(f"{'step':<44}{'median s':>10}{'tokens/s':>10}")
    print(f"{'two plain forward+backward (HF labels)':<44}{p:>10.3f}{tokens / p:>10.0f}")
    print(f"{'EmbeddingSFTTrainer.training_step':<44}{o:>10.3f}{tokens / o:>10.0f}")
    print(f"ratio {o / p:.3f}x")
    del torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--inputs", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--sft_batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="12")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model = _model(args.width)
    print(f"Qwen2-VL architecture at width {args.width}, {torch.get_num_threads()} threads, CPU")
    if "1" in args.sections:
        bench_generative_encode(model, args.inputs, args.repeats, args.batch_size)
    if "2" in args.sections:
        bench_sft_step(model, args.sft_batch, args.repeats)


if __name__ == "__main__":
    main()
