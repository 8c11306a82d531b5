"""Does UME-R1 learn on the built-in CPU demo? Runs both stages' examples and tabulates held-out retrieval.

    PYTHONPATH=src python benchmarks/ume_r1_learning.py [--out bench-out/ume-r1] [--grpo_args "--max_steps 120 ..."]

1. `examples/train_sft_reasoning.py` with its tiny CPU defaults (random tiny Qwen2-VL, generated shapes data with
   reasoning targets), unless `<out>/sft` already holds a finished run;
2. `examples/train_grpo.py` from that output, with its tiny CPU defaults plus `--grpo_args`.

Each example evaluates the held-out rows before and after its stage (`retrieval_report.json`): discriminative,
generative and oracle recall@1, the format rate (UME-R1's regex on greedy generations), and for RL the mean
retrieval and format rewards over the first and last quarter of its logged steps. The figures go to docs/FIGURES.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("heldout_disc_recall@1", "heldout_gen_recall@1", "heldout_oracle_recall@1", "heldout_format_rate")


def run_example(script: str, args: list[str], log: Path) -> float:
    """Run `examples/<script>` with `args`, its output into `log`; the seconds it took (exits on failure)."""
    # One thread unless told otherwise: on a shared CPU torch's second thread mostly waits at OpenMP barriers (an
    # SFT demo step took 5x longer with two threads than with one while other jobs ran).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    start = time.perf_counter()
    with open(log, "w") as handle:
        proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env, stdout=handle,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{script} failed (exit {proc.returncode}); see {log}")
    return time.perf_counter() - start


def training_logs(log: Path) -> list[dict[str, float]]:
    """The `{'loss': ...}` dicts the Trainer printed, numeric values only (transformers 5 prints them as strings)."""
    rows = []
    for match in re.finditer(r"\{'loss'.*?\}", log.read_text()):
        row = {}
        for key, value in ast.literal_eval(match.group(0)).items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                pass
        rows.append(row)
    return rows


def _logged_rewards(log: Path) -> list[dict[str, float]]:
    """The mean rewards of each logged step."""
    return [{k: v for k, v in row.items() if k.startswith("rewards/") and k.endswith("/mean")}
            for row in training_logs(log)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/ume-r1")
    parser.add_argument("--grpo_args", default="", help="extra arguments for examples/train_grpo.py")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    sft = out / "sft"
    if not (sft / "retrieval_report.json").is_file():
        seconds = run_example("train_sft_reasoning.py", ["--output_dir", str(sft), "--overwrite_output_dir", "true"],
                       out / "sft.log")
        print(f"SFT: {seconds / 60:.1f} min")
    grpo = out / "grpo"
    seconds = run_example("train_grpo.py", ["--sft_output_dir", str(sft), "--output_dir", str(grpo),
                                     "--overwrite_output_dir", "true", *shlex.split(args.grpo_args)], out / "grpo.log")
    print(f"GRPO: {seconds / 60:.1f} min ({args.grpo_args or 'tiny defaults'})")

    sft_report = json.loads((sft / "retrieval_report.json").read_text())
    grpo_report = json.loads((grpo / "retrieval_report.json").read_text())
    print(f"\n{'held-out metric':<28}{'untrained':>10}{'SFT':>10}{'+GRPO':>10}")
    for key in METRICS:
        row = [sft_report["before"].get(key), sft_report["after"].get(key), grpo_report["after"].get(key)]
        print(f"{key:<28}" + "".join(f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in row))
    rewards = _logged_rewards(out / "grpo.log")
    if rewards:
        # One logged value averages only `logging_steps` micro-steps: compare the first and last quarter of the run.
        window = max(1, len(rewards) // 4)
        print(f"\nGRPO mean rewards, first {window} vs last {window} of {len(rewards)} logged values:")
        for key in rewards[0]:
            first = sum(row[key] for row in rewards[:window]) / window
            last = sum(row[key] for row in rewards[-window:]) / window
            print(f"  {key}: {first:.4f} -> {last:.4f}")


if __name__ == "__main__":
    main()
