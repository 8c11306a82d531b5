"""Performance figures of HardNegContrastiveTrainer (issue: trainer overhead, GradCache memory/time, vs ST).

    PYTHONPATH=src python benchmarks/bench_hardneg.py [--quick]

Prints three tables, all on the tiny built-in Qwen2-VL with text-only MMEB-style rows (CPU):
1. trainer overhead: `trainer.training_step` vs a hand-written PyTorch loop computing the same loss (same model,
   batch, optimizer) — median step time;
2. GradCache: peak RSS growth and step time for batch 64..512 at a fixed chunk, against the non-cached step;
3. against sentence-transformers' `CachedMultipleNegativesRankingLoss` on the same backbone, batch and mini-batch.
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


def _peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _trainer(batch, chunk=None, num_hard_negatives=0, filt=False):
    import torch

    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel
    from mm_embed_trl.tiny import get_tiny_backbone

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(str(get_tiny_backbone("qwen2_vl")))
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


def run_st(batch, chunk, steps):
    """sentence-transformers' CachedMultipleNegativesRankingLoss on the same backbone, batch and mini-batch."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    from mm_embed_trl.tiny import get_tiny_backbone

    torch.manual_seed(0)
    path = str(get_tiny_backbone("qwen2_vl"))
    transformer = Transformer(path)
    st = SentenceTransformer(modules=[transformer, Pooling(64, pooling_mode="lasttoken"), Normalize()], device="cpu")
    loss_fn = CachedMultipleNegativesRankingLoss(st, scale=50.0, mini_batch_size=chunk or batch)
    opt = torch.optim.AdamW(st.parameters(), lr=1e-4)
    rows = _rows(batch)
    q = st.preprocess([r["qry"] for r in rows])
    p = st.preprocess([r["pos_text"] for r in rows])
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--_worker", nargs=4)
    args = parser.parse_args()
    if args._worker:
        kind, batch, chunk, steps = args._worker
        fn = {"trainer": lambda: run_trainer(int(batch), int(chunk) or None, int(steps)),
              "manual": lambda: run_manual(int(batch), int(steps)),
              "st": lambda: run_st(int(batch), int(chunk) or None, int(steps))}[kind]
        print(json.dumps(fn()))
        return
    steps = 4 if args.quick else 8

    print("## 1. Trainer overhead (batch 32, no GradCache; best of 3 alternating runs of the median step)")
    # ~50 ms steps on a shared 2-core box are noisy: alternate the two and keep each one's best median.
    manual, trainer = [], []
    for _ in range(3):
        manual.append(_subprocess("manual", 32, 0, 5 * steps)["median_s"])
        trainer.append(_subprocess("trainer", 32, 0, 5 * steps)["median_s"])
    m, t = min(manual), min(trainer)
    print(f"hand-written loop: {m*1000:.1f} ms | HardNegContrastiveTrainer: {t*1000:.1f} ms | ratio {t/m:.3f}")

    for chunk in (16, 64):
        print(f"\n## 2. GradCache at chunk {chunk} (peak RSS growth, median step)")
        print(f"{'batch':>6} {'cached MB':>10} {'cached s':>9} {'plain MB':>9} {'plain s':>8} {'time ratio':>10}")
        for batch in (64, 128, 256, 512):
            if batch <= chunk:
                continue
            c = _subprocess("trainer", batch, chunk, max(3, steps // 2))
            p = _subprocess("trainer", batch, 0, max(3, steps // 2))
            ratio = c["median_s"] / p["median_s"] if "median_s" in p else float("nan")
            print(f"{batch:>6} {c['peak_mb']:>10.1f} {c['median_s']:>9.3f} {p.get('peak_mb', float('nan')):>9.1f} "
                  f"{p.get('median_s', float('nan')):>8.3f} {ratio:>10.3f}")

    print("\n## 3. vs sentence-transformers CachedMultipleNegativesRankingLoss (batch 128, mini-batch 16)")
    ours = _subprocess("trainer", 128, 16, max(2, steps // 2))
    st = _subprocess("st", 128, 16, max(2, steps // 2))
    if "error" in st:
        print(f"sentence-transformers run failed: {st['error']}")
    else:
        print(f"ours: {ours['median_s']:.3f} s, {ours['peak_mb']:.1f} MB | ST: {st['median_s']:.3f} s, "
              f"{st['peak_mb']:.1f} MB | time ratio {ours['median_s']/st['median_s']:.3f}")


if __name__ == "__main__":
    main()
