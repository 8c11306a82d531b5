"""Performance figures of HardNegContrastiveTrainer (issue: trainer overhead, GradCache memory/time, vs ST).

    PYTHONPATH=src python benchmarks/bench_hardneg.py [--quick] [--width 512] [--repeats 3] [--sections 123]

Prints three tables, on the tiny built-in Qwen2-VL (or the same architecture widened with --width) with text-only
MMEB-style rows (CPU):
1. trainer overhead: `trainer.training_step` vs a hand-written PyTorch loop computing the same loss (same model,
   batch, optimizer) — median step time;
2. GradCache: peak RSS growth and step time for batch 64..512 at a fixed chunk, against the non-cached step;
3. against sentence-transformers' `CachedMultipleNegativesRankingLoss` on the same backbone, batch, mini-batch and
   token ids (our collator's prompts).
Peak memory is the process's peak RSS growth during the measured steps (ru_maxrss after minus before), run in a
fresh subprocess per configuration so peaks do not leak between rows.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _rows(n):
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "pink", "brown"]
    shapes = ["circle", "square", "triangle", "star", "cross"]
    rows = []
    for i in range(n):
        c, s, c2 = colors[i % 8], shapes[(i // 8) % 5], colors[(i // 40) % 8]
        rows.append(
            {
                "qry": f"Find a caption for: a {c} {s} next to a {c2} shape number {i}",
                "qry_image_path": "",
                "pos_text": f"a {c} {s} beside a {c2} shape, item {i}",
                "pos_image_path": "",
            }
        )
    return rows


def _backbone_path():
    """The tiny Qwen2-VL (width 64), or the same architecture widened to BENCH_WIDTH (random weights, built once):
    at width 64 a forward costs little more than Python dispatch, so chunking overheads there overstate what a
    real (compute-bound) model pays."""
    from mm_embed_trl.demo.tiny import get_tiny_backbone

    tiny = get_tiny_backbone("qwen2_vl")
    width = int(os.environ.get("BENCH_WIDTH", "64"))
    if width == 64:
        return str(tiny)
    out = f"/tmp/mm-embed-bench-qwen2vl-w{width}"
    if not os.path.isdir(out):
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(tiny)
        heads = width // 16  # head_dim 16 keeps the tiny M-RoPE sections valid
        config.text_config.update(
            {
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "num_attention_heads": heads,
                "num_key_value_heads": heads,
            }
        )
        config.vision_config.hidden_size = width
        torch.manual_seed(0)
        AutoModelForImageTextToText.from_config(config).save_pretrained(out)
        AutoProcessor.from_pretrained(tiny).save_pretrained(out)
    return out


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer(batch, chunk=None, num_hard_negatives=0, filt=False):
    import torch

    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(_backbone_path())
    args = HardNegContrastiveConfig(
        output_dir="/tmp/bench-hardneg",
        per_device_train_batch_size=batch,
        gradient_cache_chunk_size=chunk,
        num_hard_negatives=num_hard_negatives,
        false_negative_filter=filt,
        report_to="none",
        use_cpu=True,
        learning_rate=1e-4,
        max_grad_norm=0.0,
    )
    trainer = HardNegContrastiveTrainer(model=model, args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); we drive training_step directly
    return trainer


def run_trainer(batch, chunk, steps):
    trainer = _trainer(batch, chunk)
    inputs = trainer._prepare_inputs(trainer.data_collator(_rows(batch)))
    model = trainer.model
    model.train()
    times = []
    base = _peak_mb()
    for _ in range(steps):
        t = time.perf_counter()
        trainer.training_step(model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times[1:] or times), "peak_mb": _peak_mb() - base}


def run_manual(batch, steps):
    """The same loss in a hand-written loop: forward both sides, InfoNCE (plain), backward, AdamW step."""
    import torch
    import torch.nn.functional as F

    trainer = _trainer(batch)
    inputs = trainer._prepare_inputs(trainer.data_collator(_rows(batch)))
    model, opt = trainer.model, trainer.optimizer
    model.train()
    times = []
    base = _peak_mb()
    for _ in range(steps):
        t = time.perf_counter()
        q = model(**inputs["query"]).embeddings
        p = model(**inputs["positive"]).embeddings
        loss = F.cross_entropy(q @ p.T / 0.02, torch.arange(batch))
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times[1:] or times), "peak_mb": _peak_mb() - base}


def _collated_sides(batch):
    """Our collator's token ids (chat template + instruction), so ST embeds exactly the same sequences."""
    from transformers import AutoProcessor

    from mm_embed_trl.data.collators import EmbeddingCollator

    enc = EmbeddingCollator(AutoProcessor.from_pretrained(_backbone_path()), template="unime")(_rows(batch))
    return [{k: enc[side][k] for k in ("input_ids", "attention_mask")} for side in ("query", "positive")]


def run_st(batch, chunk, steps):
    """sentence-transformers' CachedMultipleNegativesRankingLoss on the same backbone, batch and mini-batch."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.sentence_transformer.modules import Pooling

    torch.manual_seed(0)
    transformer = Transformer(_backbone_path())
    width = transformer.get_embedding_dimension()
    st = SentenceTransformer(modules=[transformer, Pooling(width, pooling_mode="lasttoken"), Normalize()], device="cpu")
    loss_fn = CachedMultipleNegativesRankingLoss(st, scale=50.0, mini_batch_size=chunk or batch)
    opt = torch.optim.AdamW(st.parameters(), lr=1e-4, fused=True)  # what the Trainer uses (adamw_torch_fused)
    q, p = _collated_sides(batch)
    st.train()
    times = []
    base = _peak_mb()
    for _ in range(steps):
        t = time.perf_counter()
        loss = loss_fn([q, p], None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times[1:] or times), "peak_mb": _peak_mb() - base}


def _subprocess(kind, batch, chunk, steps):
    cmd = [sys.executable, __file__, "--_worker", kind, str(batch), str(chunk or 0), str(steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "src"})
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _best_of(repeats, *runs):
    """Alternate the given (kind, batch, chunk, steps) runs `repeats` times; per run, the best median step time
    and the median peak-RSS growth (a shared 2-core box makes single medians swing by +-20%)."""
    results = [[] for _ in runs]
    for _ in range(repeats):
        for slot, run in zip(results, runs):
            slot.append(_subprocess(*run))
    best = []
    for slot in results:
        ok = [r for r in slot if "median_s" in r]
        if not ok:
            best.append(slot[0])
            continue
        best.append(
            {"median_s": min(r["median_s"] for r in ok), "peak_mb": statistics.median(r["peak_mb"] for r in ok)}
        )
    return best


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--width", type=int, default=64, help="text hidden size: 64 is the tiny model; wider ones "
                        "(e.g. 512) are compute-bound like real models, where chunking overheads are amortised")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sections", default="123")
    parser.add_argument("--_worker", nargs=4)
    args = parser.parse_args()
    if args._worker:
        kind, batch, chunk, steps = args._worker
        fn = {"trainer": lambda: run_trainer(int(batch), int(chunk) or None, int(steps)),
              "manual": lambda: run_manual(int(batch), int(steps)),
              "st": lambda: run_st(int(batch), int(chunk) or None, int(steps))}[kind]
        print(json.dumps(fn()))
        return
    os.environ["BENCH_WIDTH"] = str(args.width)
    steps = 4 if args.quick else 8
    wide = args.width > 64
    print(f"# text width {args.width}, best of {args.repeats} alternating runs")

    if "1" in args.sections:
        print("\n## 1. Trainer overhead (batch 32, no GradCache; best median step)")
        m, t = _best_of(args.repeats, ("manual", 32, 0, 5 * steps), ("trainer", 32, 0, 5 * steps))
        print(f"hand-written loop: {m['median_s']*1000:.1f} ms | "
              f"HardNegContrastiveTrainer: {t['median_s']*1000:.1f} ms "
              f"| ratio {t['median_s']/m['median_s']:.3f}")

    if "2" in args.sections:
        for chunk in (16,) if wide else (16, 64):
            print(f"\n## 2. GradCache at chunk {chunk} (peak RSS growth, best median step)")
            print(f"{'batch':>6} {'cached MB':>10} {'cached s':>9} {'plain MB':>9} {'plain s':>8} {'time ratio':>10}")
            for batch in (64, 128, 256) if wide else (64, 128, 256, 512):
                if batch <= chunk:
                    continue
                n = max(3, steps // 2)
                c, p = _best_of(args.repeats, ("trainer", batch, chunk, n), ("trainer", batch, 0, n))
                ratio = c["median_s"] / p["median_s"] if "median_s" in p else float("nan")
                print(f"{batch:>6} {c['peak_mb']:>10.1f} {c['median_s']:>9.3f} {p.get('peak_mb', float('nan')):>9.1f} "
                      f"{p.get('median_s', float('nan')):>8.3f} {ratio:>10.3f}")

    if "3" in args.sections:
        print("\n## 3. vs sentence-transformers CachedMultipleNegativesRankingLoss "
              "(batch 128, mini-batch 16, same tokens)")
        n = max(3, steps // 2)
        ours, st = _best_of(args.repeats, ("trainer", 128, 16, n), ("st", 128, 16, n))
        if "error" in st:
            print(f"sentence-transformers run failed: {st['error']}")
        else:
            print(f"ours: {ours['median_s']:.3f} s, {ours['peak_mb']:.1f} MB | ST: {st['median_s']:.3f} s, "
                  f"{st['peak_mb']:.1f} MB | time ratio {ours['median_s']/st['median_s']:.3f}, "
                  f"memory ratio {ours['peak_mb']/st['peak_mb']:.3f}")


if __name__ == "__main__":
    main()
