"""Does the data pipeline keep the model busy? Rows/s of the training data pipeline alone against the trainer's step.

    PYTHONPATH=src python benchmarks/data_pipeline.py [--widths 64 512] [--workers 0 2] [--batch 32] [--batches 6]

The pipeline is `HardNegContrastiveTrainer.get_train_dataloader()` as training iterates it: rows of the generated
shapes data with images on disk (``--image_size`` pixels a side) and ``--negatives`` hard negatives each, every image
decoded and every prompt tokenized and processed by the collator, in ``--workers`` DataLoader worker processes (0: in
the training loop). The step is `trainer.training_step` on one of those batches (forward and backward of the
hard-negative InfoNCE over query, positive and negative embeddings), on the tiny Qwen2-VL (width 64) and the same
architecture widened (``--widths``; benchmarks/bench_hardneg.py builds it). Both are reported as rows per second,
median of ``--repeats`` runs, beside the measured loop (each batch fetched, then stepped). The pipeline keeps up when
its rate exceeds the step's: with workers it runs beside the step (on the same cores, on a CPU), with none it adds to
it (the loop then runs at about 1 / (1 / pipeline + 1 / step)).
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


def _trainer(data, batch: int, negatives: int, workers: int):
    import torch
    from bench_hardneg import _backbone_path

    from mm_embed_trl import HardNegContrastiveConfig, HardNegContrastiveTrainer, MultimodalEmbeddingModel

    torch.manual_seed(0)
    model = MultimodalEmbeddingModel.from_pretrained(_backbone_path())
    config = HardNegContrastiveConfig(
        output_dir="/tmp/mm-embed-bench-pipeline", per_device_train_batch_size=batch, num_hard_negatives=negatives,
        dataloader_num_workers=workers, use_cpu=True, report_to="none", save_strategy="no", max_steps=1,
        save_sentence_transformers=False, disable_tqdm=True, image_root=str(data.image_root),
    )
    return HardNegContrastiveTrainer(model=model, args=config, train_dataset=data["train"])


def pipeline_rate(trainer, batch: int, batches: int) -> float:
    """Rows/s of the training dataloader alone, after its first batch (workers started, caches warm)."""
    iterator = iter(trainer.get_train_dataloader())
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batch * batches / (time.perf_counter() - start)


def step_rate(trainer, batch: int, steps: int) -> float:
    """Rows/s of `training_step` on one batch of the pipeline (median step time)."""
    inputs = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step is driven directly here
    trainer.training_step(model, inputs)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.training_step(model, inputs)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def loop_rate(trainer, batch: int, batches: int) -> float:
    """Rows/s of the training loop itself: each batch from the dataloader, then `training_step` on it."""
    model = trainer.model
    model.train()
    trainer.create_optimizer_and_scheduler(num_training_steps=100)
    trainer.current_gradient_accumulation_steps = 1
    iterator = iter(trainer.get_train_dataloader())
    trainer.training_step(model, next(iterator))  # warm-up: workers started
    start = time.perf_counter()
    for _ in range(batches):
        trainer.training_step(model, next(iterator))
    return batch * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--negatives", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=6, help="batches timed per pipeline run")
    parser.add_argument("--steps", type=int, default=3, help="steps timed per step run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from mm_embed_trl.demo.generated import make_shapes_dataset

    rows = args.batch * (args.batches + 2) * args.repeats
    start = time.perf_counter()
    data = make_shapes_dataset(num_train=rows, num_eval=8, seed=0, image_size=args.image_size,
                               num_negatives=args.negatives)
    print(f"# generated {rows}+8 rows in {time.perf_counter() - start:.1f} s")
    print(f"# {rows} rows, {args.negatives} hard negatives each, {args.image_size}px images, batch {args.batch}, "
          f"{os.cpu_count()} CPUs; rows/s, median of {args.repeats}")
    print("| text width | workers | pipeline rows/s | step rows/s | pipeline / step | loop rows/s |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        os.environ["BENCH_WIDTH"] = str(width)
        step = statistics.median(step_rate(_trainer(data, args.batch, args.negatives, 0), args.batch, args.steps)
                                 for _ in range(args.repeats))
        for workers in args.workers:
            trainer = _trainer(data, args.batch, args.negatives, workers)
            pipe = statistics.median(pipeline_rate(trainer, args.batch, args.batches) for _ in range(args.repeats))
            loop = statistics.median(loop_rate(trainer, args.batch, args.batches) for _ in range(args.repeats))
            print(f"| {width} | {workers} | {pipe:.1f} | {step:.1f} | {pipe / step:.2f} | {loop:.1f} |", flush=True)


if __name__ == "__main__":
    main()
