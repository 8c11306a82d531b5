"""UME-R1 on a Qwen2-VL-2B-shaped model, without the hub: SFT and GRPO step time and peak memory, GradCache on/off,
rollout tokens/s, and generative encode against UME-R1's evaluation loop.

    python benchmarks/gpu_qwen2vl_2b.py [--out bench-out/gpu-2b]      # a CUDA GPU: 2B shapes, bf16 (minutes)
    python benchmarks/gpu_qwen2vl_2b.py --smoke                        # the CPU: tiny shapes, the same code paths

The backbone is Qwen2-VL-2B's architecture (28 layers of width 1536, 12 query / 2 key-value heads, vocabulary
151936; a 32-block, 1280-wide vision tower), built in code with random weights in bf16 directly on the device. The
tokenizer, chat template, image processor and special-token ids are those of the tiny offline demo backbone
(:mod:`mm_embed_trl.demo.tiny`: a Qwen-style byte-level BPE), so nothing is downloaded; the image processor is
given Qwen2-VL's patch size with a budget of ``--image_side`` squared pixels. Random weights never write EOS or
``<gen_emb>``, so every rollout and every generative encode is forced to its full length (``min_new_tokens``): the
times are those of maximal-length completions.

Measured, each after warm-up steps:

1. SFT (`EmbeddingSFTTrainer`, UME-R1's loss, gradient checkpointing, vision tower frozen as in UME-R1): median
   optimizer-step time and peak memory at ``--sft_batch`` pairs, plain and with GradCache (chunks of
   ``--grad_cache_chunk`` pairs), and their ratios.
2. GRPO (`EmbeddingGRPOTrainer`, G = ``--num_generations``, ``--grpo_pairs`` pairs per step, completions of
   ``--max_completion_length`` tokens, beta 0, full fine-tuning): median step time, peak memory, and rollout
   tokens/s (completion tokens over the time spent in generation).
3. Generative encode of ``--encode_inputs`` inputs (half with an image): `MultimodalEmbeddingModel.encode(mode=
   "generative")` (batched generation, then one prefill forward for the states) against a port of UME-R1's
   ``eval_twomode.py`` (generation with ``output_hidden_states=True`` for every layer and step, then a Python loop
   over the rows for the state at ``<gen_emb>``), the same batch size and new tokens: inputs/s and peak memory.

Prints a markdown table and writes ``<out>/gpu_qwen2vl_2b.json``. Differences from a UME-R1 run: one device (no
ZeRO-3), the optimizer state in the weights' bf16 (no fp32 master copy), beta 0 (no reference model).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Qwen2-VL-2B-Instruct's architecture (its config.json), on top of the tiny demo config's token ids.
QWEN2VL_2B_TEXT = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    vocab_size=151936, rms_norm_eps=1e-6, max_position_embeddings=32768, max_window_layers=28,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
)
QWEN2VL_2B_VISION = dict(depth=32, embed_dim=1280, hidden_size=1536, mlp_ratio=4, num_heads=16)
# Workloads: a real GPU run, and the CPU smoke run that checks the same code in seconds.
WORKLOADS = {
    "gpu": dict(image_side=448, sft_batch=8, grad_cache_chunk=2, sft_steps=5, reasoning_words=96,
                num_generations=8, grpo_pairs=2, max_completion_length=256, grpo_steps=3,
                encode_inputs=64, encode_batch=16, encode_new_tokens=256, warmup=2),
    "smoke": dict(image_side=56, sft_batch=2, grad_cache_chunk=1, sft_steps=1, reasoning_words=6,
                  num_generations=2, grpo_pairs=2, max_completion_length=6, grpo_steps=1,
                  encode_inputs=4, encode_batch=2, encode_new_tokens=4, warmup=1),
}


# ------------------------------------------------------------------------------------------------ device helpers
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device) -> float:
    """Peak allocated device memory since the last reset; on the CPU, the process's resident high-water mark."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------------------------------------ model and data
def build_model(smoke: bool, device, dtype, image_side: int):
    """A MultimodalEmbeddingModel around a random Qwen2-VL(-2B-shaped) backbone, the tiny demo's processor."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from mm_embed_trl import MultimodalEmbeddingModel
    from mm_embed_trl.demo.tiny import get_tiny_backbone

    tiny = get_tiny_backbone("qwen2_vl")
    config = AutoConfig.from_pretrained(tiny)
    if not smoke:
        config.text_config.update(QWEN2VL_2B_TEXT)
        config.vision_config.update(QWEN2VL_2B_VISION)
    processor = AutoProcessor.from_pretrained(tiny)
    pixels = image_side * image_side
    processor.image_processor.size = {"shortest_edge": min(3136, pixels), "longest_edge": pixels}
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: no 2B-parameter init on the host
        backbone = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model = MultimodalEmbeddingModel.from_backbone(backbone, processor=processor, encoder_kind="generative")
    params = sum(p.numel() for p in model.parameters())
    return model, params


def write_rows(folder: Path, n: int, image_side: int, reasoning_words: int) -> list[dict]:
    """UME-R1 rows: image -> caption for even rows, caption -> image for odd ones, noise images, long reasonings."""
    import numpy as np
    from PIL import Image

    from mm_embed_trl.data.reasoning import format_reasoning

    rng = np.random.default_rng(0)
    words = "the image shows a red circle on the left and a blue square at the top of a small scene".split()
    rows = []
    for i in range(n):
        path = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)).save(folder / path)
        caption = " ".join(words[(i + k) % len(words)] for k in range(8))
        think = " ".join(words[(i * 7 + k) % len(words)] for k in range(reasoning_words))
        image_side_reasoning = format_reasoning(think, caption)
        text_side_reasoning = format_reasoning(" ".join(reversed(think.split())), caption)
        if i % 2 == 0:
            rows.append({"qry": "<|image_1|>\nRepresent the given image.", "qry_image_path": path,
                         "pos_text": caption, "pos_image_path": "", "qry_reasoning": image_side_reasoning,
                         "pos_reasoning": text_side_reasoning})
        else:
            rows.append({"qry": f"Find an image that matches the given caption: {caption}", "qry_image_path": "",
                         "pos_text": "<|image_1|>\nRepresent the given image.", "pos_image_path": path,
                         "qry_reasoning": text_side_reasoning, "pos_reasoning": image_side_reasoning})
    return rows


class _StepTimer:
    """A TrainerCallback recording each optimizer step's wall time (device synchronised at both ends)."""

    def __init__(self, device):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                _sync(device)
                timer.start = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                _sync(device)
                timer.times.append(time.perf_counter() - timer.start)

        self.times: list[float] = []
        self.callback = Callback()


def _common(out: Path, smoke: bool, steps: int) -> dict:
    return dict(output_dir=str(out), max_steps=steps, report_to="none", save_strategy="no", logging_steps=10_000,
                disable_tqdm=True, bf16=not smoke, use_cpu=smoke, gradient_checkpointing=not smoke,
                dataloader_num_workers=0, seed=0)


# ------------------------------------------------------------------------------------------------ measurements
def bench_sft(model, rows, image_root: str, work: dict, out: Path, device, chunk: int | None) -> dict:
    from datasets import Dataset

    from mm_embed_trl import EmbeddingSFTConfig, EmbeddingSFTTrainer

    smoke = device.type != "cuda"
    steps = work["warmup"] + work["sft_steps"]
    args = EmbeddingSFTConfig(**_common(out / "sft", smoke, steps), per_device_train_batch_size=work["sft_batch"],
                              learning_rate=1e-6, image_root=image_root, gradient_cache_chunk_size=chunk,
                              max_new_tokens=work["encode_new_tokens"])
    data = Dataset.from_list(rows[: work["sft_batch"] * steps])
    timer = _StepTimer(device)
    trainer = EmbeddingSFTTrainer(model=model, args=args, train_dataset=data, callbacks=[timer.callback])
    _reset_peak(device)
    trainer.train()
    peak = _peak_gib(device)
    del trainer
    model.zero_grad(set_to_none=True)  # the next measurement starts without this one's gradients
    return {"step_s": statistics.median(timer.times[work["warmup"]:]), "peak_gib": peak,
            "pairs": work["sft_batch"], "grad_cache_chunk": chunk}


def bench_grpo(model, rows, image_root: str, work: dict, out: Path, device) -> dict:
    from datasets import Dataset

    from mm_embed_trl import EmbeddingGRPOConfig, EmbeddingGRPOTrainer

    smoke = device.type != "cuda"
    g, pairs, length = work["num_generations"], work["grpo_pairs"], work["max_completion_length"]
    steps = work["warmup"] + work["grpo_steps"]
    args = EmbeddingGRPOConfig(
        **_common(out / "grpo", smoke, steps), num_generations=g, per_device_train_batch_size=2 * g * pairs,
        steps_per_generation=1, max_completion_length=length, beta=0.0, loss_type="dr_grpo", temperature=1.0,
        learning_rate=1e-6, image_root=image_root, generation_kwargs={"min_new_tokens": length},
    )
    timer = _StepTimer(device)
    trainer = EmbeddingGRPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows[: pairs * steps]),
                                   callbacks=[timer.callback])
    generation = {"seconds": [], "tokens": []}
    generate = trainer._generate_single_turn

    def timed_generate(*args, **kwargs):  # the rollouts alone: TRL's generation call, timed per generation batch
        _sync(device)
        start = time.perf_counter()
        completion_ids, logprobs = generate(*args, **kwargs)
        _sync(device)
        generation["seconds"].append(time.perf_counter() - start)
        generation["tokens"].append(sum(len(c) for c in completion_ids))
        return completion_ids, logprobs

    trainer._generate_single_turn = timed_generate
    _reset_peak(device)
    trainer.train()
    peak = _peak_gib(device)
    del trainer
    model.zero_grad(set_to_none=True)
    measured = slice(work["warmup"], None)
    tokens, seconds = sum(generation["tokens"][measured]), sum(generation["seconds"][measured])
    return {"step_s": statistics.median(timer.times[measured]), "peak_gib": peak, "rollouts": 2 * g * pairs,
            "completion_tokens": length, "rollout_tokens_per_s": tokens / seconds,
            "generation_share": seconds / sum(timer.times[measured])}


def _gen_embedding_idx(generated_ids_trimmed, token_id):
    """UME-R1 eval_twomode.py `get_gen_embedding_idx`: the step whose state is <gen_emb>'s, -1 when absent."""
    embedding_idx = []
    for out_ids in generated_ids_trimmed:
        found = False
        for j in range(len(out_ids) - 1, -1, -1):
            if out_ids[j] == token_id:
                embedding_idx.append(-1 if j + 1 >= len(out_ids) - 1 else j + 1)
                found = True
                break
        if not found:
            embedding_idx.append(-1)
    return embedding_idx


def eval_twomode_encode(model, inputs, *, batch_size: int, max_new_tokens: int, device):
    """UME-R1's generative encode (eval_twomode.py `encode_embeddings`, mode "gen"), on this model's prompts."""
    import torch
    import torch.nn.functional as F

    from mm_embed_trl.data.inputs import to_embedding_input

    collator = model.make_collator()
    gen_id = model.processor.tokenizer.convert_tokens_to_ids("<gen_emb>")
    out = []
    with torch.no_grad():
        for start in range(0, len(inputs), batch_size):
            enc = collator.encode_inputs([to_embedding_input(x) for x in inputs[start:start + batch_size]])
            enc.pop("image_counts", None)
            enc = {k: v.to(device) for k, v in enc.items()}
            generated = model.backbone.generate(
                **enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                output_hidden_states=True, return_dict_in_generate=True, use_cache=True,
            )
            trimmed = [o[len(i):] for i, o in zip(enc["input_ids"], generated.sequences)]
            for i, idx in enumerate(_gen_embedding_idx(trimmed, gen_id)):  # one row at a time, as UME-R1 does
                out.append(F.normalize(generated.hidden_states[idx][-1][i].squeeze(0).float(), dim=-1))
    return torch.stack(out)


def bench_encode(model, rows, image_root: str, work: dict, device) -> dict:
    from mm_embed_trl.data.images import load_image

    inputs = []
    for row in rows[: work["encode_inputs"]]:
        path = row["qry_image_path"] or row["pos_image_path"]
        text = row["pos_text"] if row["qry_image_path"] else row["qry"]
        inputs.append(load_image(path, image_root) if len(inputs) % 2 == 0 else text)
    model.eval()
    batch, new = work["encode_batch"], work["encode_new_tokens"]

    def ours():
        return model.encode(inputs, mode="generative", batch_size=batch, max_new_tokens=new,
                            generation_kwargs={"min_new_tokens": new}, show_progress_bar=False)

    def theirs():
        return eval_twomode_encode(model, inputs, batch_size=batch, max_new_tokens=new, device=device)

    result = {"inputs": len(inputs), "batch_size": batch, "new_tokens": new}
    for name, fn in (("ours", ours), ("eval_twomode", theirs)):
        fn()  # warm-up
        _reset_peak(device)
        _sync(device)
        start = time.perf_counter()
        embeddings = fn()
        _sync(device)
        seconds = time.perf_counter() - start
        result[name] = {"inputs_per_s": len(inputs) / seconds, "peak_gib": _peak_gib(device),
                        "dim": int(embeddings.shape[-1])}
    return result


def table(report: dict) -> str:
    sft, cached, grpo, enc = report["sft"], report["sft_grad_cache"], report["grpo"], report["encode"]
    lines = [
        f"Qwen2-VL{'-2B-shaped' if not report['smoke'] else ' (tiny, smoke)'} random weights, "
        f"{report['parameters'] / 1e9:.2f}B parameters, {report['dtype']}, {report['device']}",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| SFT step, {sft['pairs']} pairs, no GradCache | {sft['step_s']:.3f} s, peak {sft['peak_gib']:.2f} GiB |",
        f"| SFT step, {cached['pairs']} pairs, GradCache chunks of {cached['grad_cache_chunk']} | "
        f"{cached['step_s']:.3f} s, peak {cached['peak_gib']:.2f} GiB |",
        f"| GradCache on/off | time x{cached['step_s'] / sft['step_s']:.2f}, "
        f"peak memory x{cached['peak_gib'] / sft['peak_gib']:.2f} |",
        f"| GRPO step, {grpo['rollouts']} rollouts x {grpo['completion_tokens']} tokens | {grpo['step_s']:.3f} s, "
        f"peak {grpo['peak_gib']:.2f} GiB, generation {100 * grpo['generation_share']:.0f}% of the step |",
        f"| rollout generation | {grpo['rollout_tokens_per_s']:.0f} tokens/s |",
        f"| generative encode, {enc['inputs']} inputs x {enc['new_tokens']} new tokens, batch {enc['batch_size']}: "
        f"`encode(mode='generative')` | {enc['ours']['inputs_per_s']:.2f} inputs/s, "
        f"peak {enc['ours']['peak_gib']:.2f} GiB |",
        f"| the same, UME-R1 eval_twomode.py loop | {enc['eval_twomode']['inputs_per_s']:.2f} inputs/s, "
        f"peak {enc['eval_twomode']['peak_gib']:.2f} GiB |",
        f"| encode speed-up over eval_twomode | "
        f"x{enc['ours']['inputs_per_s'] / enc['eval_twomode']['inputs_per_s']:.2f} |",
    ]
    if report["smoke"]:
        lines.append("\n(smoke run: tiny shapes on the CPU; peak memory is the process's resident high-water mark)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (a check that everything runs)")
    parser.add_argument("--out", default="bench-out/gpu-qwen2vl-2b")
    for key, value in WORKLOADS["gpu"].items():
        parser.add_argument(f"--{key}", type=int, default=None, help=f"default {value} ({WORKLOADS['smoke'][key]} "
                                                                       "with --smoke)")
    args = parser.parse_args(argv)
    import torch

    work = dict(WORKLOADS["smoke" if args.smoke else "gpu"])
    work.update({k: getattr(args, k) for k in work if getattr(args, k) is not None})
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --smoke on the CPU")
    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model, params = build_model(args.smoke, device, dtype, work["image_side"])
    with tempfile.TemporaryDirectory() as images:
        n = max(work["sft_batch"] * (work["warmup"] + work["sft_steps"]), work["encode_inputs"],
                work["grpo_pairs"] * (work["warmup"] + work["grpo_steps"]))
        rows = write_rows(Path(images), n, work["image_side"], work["reasoning_words"])
        report = {"smoke": args.smoke, "device": torch.cuda.get_device_name(device) if not args.smoke else "CPU",
                  "dtype": str(dtype).replace("torch.", ""), "parameters": params, "workload": work}
        report["sft"] = bench_sft(model, rows, images, work, out, device, chunk=None)
        report["sft_grad_cache"] = bench_sft(model, rows, images, work, out, device, chunk=work["grad_cache_chunk"])
        report["grpo"] = bench_grpo(model, rows, images, work, out, device)
        report["encode"] = bench_encode(model, rows, images, work, device)
    report["total_s"] = time.perf_counter() - start
    (out / "gpu_qwen2vl_2b.json").write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\n{report['total_s']:.0f} s in all; {out / 'gpu_qwen2vl_2b.json'}")
    return report


if __name__ == "__main__":
    main()
