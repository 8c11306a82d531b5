"""Does UME-R1's RL stage raise held-out generative retrieval on real data? SFT then GRPO, over seeds.

    PYTHONPATH=src python benchmarks/ume_r1_real_data.py [--out bench-out/ume-r1-real] [--datasets digits shapes] \
        [--seeds 0 1 2] [--settings default no_format ...] [--setting name="--grpo args"] [--shared_sft]

Datasets: ``digits`` (real handwritten digits of scikit-learn with captions and reasoning targets,
:mod:`mm_embed_trl.demo.digits`), ``digits_split`` (the same scans, SFT on one half of the training pairs and RL on
the other, so RL's pairs are as new to the model as the held-out ones) and ``shapes`` (the examples' generated demo).
For each seed, the two examples run with their tiny CPU defaults: `examples/train_sft_reasoning.py` (``--seed s``;
with ``--shared_sft`` one SFT model, seed 0, is the start of every RL seed), then `examples/train_grpo.py` from that
model with each setting's arguments (``--seed s``). Every run is kept under ``<out>/<dataset>/...`` and skipped when
rerun, so a benchmark can be extended by more seeds or settings.

Reported per dataset and setting, before RL (the SFT model) and after, as mean +- standard error over seeds:

* held-out greedy retrieval: discriminative, generative and oracle recall@1 of each direction (image -> text and
  text -> image, each its own corpus, as MMEB scores each task) and their mean; the examples' own report (both
  directions pooled in one corpus) and its format rate beside them;
* a rollout probe on held-out pairs, sampled as the setting's RL samples (its G, temperature and top-k; pools of
  16 pairs as the examples' generation batch): the rollouts' format rate, UME-R1 retrieval reward (rank x gap),
  the fraction of advantage groups whose reward has zero spread (no gradient) and why (identical completions, or
  distinct completions that earn the same reward), the share of sampled answers that state the exact caption and
  the share of groups with at least one (pass@G), and whether the reward ranks exact answers first;
* the training logs' zero-spread fraction and rewards over the first and last quarter of the run;
* generative R@1 (mean over directions) on a fixed sample of 256 of the pairs RL trains on: whether RL learns its own
  pairs, beside whether that carries over to held-out ones.

RL "learns" when the mean paired change of held-out generative R@1 (the mean over directions) exceeds twice its
standard error while the discriminative one does not fall by more than that (twice the generative change's
error). Writes
``<out>/results.json`` and ``<out>/results.md`` (``--results_name``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # the probe's forwards, before torch is imported (see run_example)
sys.path.insert(0, os.path.dirname(__file__))
from ume_r1_learning import run_example, training_logs  # noqa: E402

HELDOUT = ("disc_recall@1", "gen_recall@1", "oracle_recall@1", "format_rate")  # the examples' pooled report
TABLE = ("i2t_gen_recall@1", "t2i_gen_recall@1", "macro_gen_recall@1", "macro_disc_recall@1", "macro_oracle_recall@1",
         "gen_recall@1", "format_rate", "rl_train_macro_gen_recall@1")
DELTAS = ("macro_gen_recall@1", "macro_disc_recall@1", "gen_recall@1", "rl_train_macro_gen_recall@1")
TABLE_NAMES = {"i2t_gen_recall@1": "i2t gen R@1", "t2i_gen_recall@1": "t2i gen R@1",
               "macro_gen_recall@1": "gen R@1", "macro_disc_recall@1": "disc R@1",
               "macro_oracle_recall@1": "oracle R@1", "gen_recall@1": "pooled gen R@1", "format_rate": "format",
               "rl_train_macro_gen_recall@1": "gen R@1 on RL's pairs"}
# The examples' tiny GRPO defaults that the probe must sample with (examples/train_grpo.py TINY_DEFAULTS).
PROBE_DEFAULTS = {"num_generations": 4, "temperature": 0.7, "top_k": 0, "max_completion_length": 48,
                  "format_reward_weight": 1.0, "retrieval_reward_weight": 1.0, "retrieval_reward": "ume_r1"}
# Named GRPO settings (extra arguments of examples/train_grpo.py on top of its tiny defaults): the ablation of
# docs/FIGURES.md.
SETTINGS = {
    "default": "",  # the example's tiny defaults: temperature 0.7, G 4, beta 0, 200 steps, lr 5e-5
    "t1_topk50": "--temperature 1.0 --top_k 50",  # UME-R1's sampling
    "dapo2": "--dynamic_sampling_rounds 2",  # DAPO's dynamic sampling at the default temperature
    "t1_topk50_dapo2": "--temperature 1.0 --top_k 50 --dynamic_sampling_rounds 2",  # + DAPO's dynamic sampling
    # UME-R1's sampling and objective: KL to the SFT model (plain beta x k3), the learning rate decaying linearly
    "ume_r1_parity": "--temperature 1.0 --top_k 50 --beta 0.04 --use_bias_correction_kl false "
                     "--lr_scheduler_type linear",
    "g8": "--num_generations 8 --per_device_train_batch_size 64",  # twice the rollouts, same pairs per step
    "steps400": "--max_steps 400",  # twice the steps (half an epoch of the digits pairs -> one)
}
POOL_PAIRS = 16  # the examples' generation batch: 16 pairs compete in the retrieval reward
PROBE_VERSION = 4  # bump when the probe measures something new: cached probes of older versions are redone


def _quarters(rows: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    """Mean of each key over the first and the last quarter of the logged values (one value averages only
    `logging_steps` steps)."""
    out = {}
    window = max(1, len(rows) // 4)
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if values:
            out[f"first_{key}"] = sum(values[:window]) / len(values[:window])
            out[f"last_{key}"] = sum(values[-window:]) / len(values[-window:])
    return out


def _setting_options(args: str) -> dict:
    """The probe-relevant options a setting's GRPO arguments set (the rest keep PROBE_DEFAULTS)."""
    options = dict(PROBE_DEFAULTS)
    words = shlex.split(args)
    for i, word in enumerate(words):
        key = word.lstrip("-")
        if word.startswith("--") and key in options and i + 1 < len(words):
            options[key] = type(options[key])(words[i + 1])
    return options


def dataset_spec(name: str):
    """(SFT's example arguments that select the data, GRPO's, held-out rows, rows RL trains on, image_root)."""
    if name in ("digits", "digits_split"):
        from mm_embed_trl.demo.digits import make_digits_dataset

        data = make_digits_dataset()
        args = ["--dataset_name", data.image_root, "--dataset_eval_split", "eval", "--image_root", data.image_root]
        if name == "digits":
            return args, args, data["eval"], _sample(data["train"]), data.image_root
        # SFT on one half of the training scans, RL on the other: RL's pairs are as new to the model as held-out ones
        halves = {"sft": data["train"].select(range(0, len(data["train"]), 2)),
                  "rl": data["train"].select(range(1, len(data["train"]), 2)), "eval": data["eval"]}
        folder = Path(data.image_root).parent / (Path(data.image_root).name + "-sft-rl-halves")
        if not (folder / "dataset_dict.json").is_file():
            import datasets

            datasets.DatasetDict(halves).save_to_disk(str(folder))
        stage = ["--dataset_name", str(folder), "--dataset_eval_split", "eval", "--image_root", data.image_root]
        return ([*stage, "--dataset_train_split", "sft"], [*stage, "--dataset_train_split", "rl"], data["eval"],
                _sample(halves["rl"]), data.image_root)
    if name == "shapes":  # the examples' built-in demo data, as scripts.resolve_datasets builds it
        from mm_embed_trl.demo.generated import make_shapes_dataset

        data = make_shapes_dataset(num_train=1024, num_eval=96, seed=0, num_negatives=0)
        return [], [], data["eval"], _sample(data["train"]), data.image_root
    raise ValueError(f"Unknown dataset {name!r}: digits, digits_split or shapes.")


def _sample(rows, size: int = 256):
    """A fixed sample of the rows RL trains on: retrieval there says whether RL learns its own pairs."""
    import numpy as np

    picked = np.random.default_rng(0).permutation(len(rows))[: min(size, len(rows))]
    return rows.select(sorted(picked.tolist()))


def probe_rollouts(model_dir: str, rows, image_root: str, options: dict, *, pairs: int, seed: int) -> dict:
    """Sample G rollouts of both sides of `pairs` held-out pairs and score them as the RL stage does."""
    import torch

    from mm_embed_trl import MultimodalEmbeddingModel
    from mm_embed_trl.data.reasoning import follows_format
    from mm_embed_trl.data.samplers import flatten_pairs
    from mm_embed_trl.evaluation.inputs import materialize, row_input
    from mm_embed_trl.rewards import RETRIEVAL_REWARDS

    g = options["num_generations"]
    pairs = min(pairs, len(rows)) // POOL_PAIRS * POOL_PAIRS
    rows = rows.select(range(pairs))
    flat = flatten_pairs(rows)
    model = MultimodalEmbeddingModel.from_pretrained(model_dir, encoder_kind="generative")
    generation = {"top_k": options["top_k"]}  # explicit, as TRL passes it (0: the whole vocabulary)
    torch.manual_seed(seed)
    sides = {}
    for side, encode_side in (("query", "query"), ("target", "document")):
        chosen = [r for r in flat if r["side"] == side]
        items = [materialize(row_input(r["text"], r["image"] or None, f"pair {r['pair_id']} {side}"), image_root,
                             f"pair {r['pair_id']} {side}") for r in chosen]
        emb, texts = model.encode(items, side=encode_side, mode="generative", do_sample=True, num_samples=g,
                                  temperature=options["temperature"], max_new_tokens=options["max_completion_length"],
                                  batch_size=16, return_reasoning=True, generation_kwargs=generation,
                                  show_progress_bar=False)
        greedy_emb, greedy = model.encode(items, side=encode_side, mode="generative", max_new_tokens=options[
            "max_completion_length"], batch_size=16, return_reasoning=True, show_progress_bar=False)
        sides[side] = (emb, texts, [r["content_id"] for r in chosen], greedy, [bool(r["image"]) for r in chosen],
                       greedy_emb)
    # rollouts in the trainer's layout: [q0 x G, t0 x G, q1 x G, ...]
    emb = torch.stack([sides["query"][0], sides["target"][0]], dim=1).reshape(pairs * 2 * g, -1)
    texts = [t for p in range(pairs) for s in ("query", "target") for t in sides[s][1][p]]
    content = torch.tensor([c for p in range(pairs) for s in ("query", "target") for c in [sides[s][2][p]] * g])
    side = torch.tensor([0] * g + [1] * g).repeat(pairs)
    pair_id = torch.arange(pairs).repeat_interleave(2 * g)
    score = RETRIEVAL_REWARDS[options["retrieval_reward"]]
    out = score(emb, side, pair_id, g, pool_id=pair_id // POOL_PAIRS, content_ids=content)
    formats = torch.tensor([float(follows_format(t)) for t in texts])
    reward = options["format_reward_weight"] * formats + options["retrieval_reward_weight"] * out.reward.float()
    grouped = reward.view(-1, g)
    std = grouped.std(dim=1)
    zero = torch.isclose(std, torch.zeros_like(std))  # TRL's test for frac_reward_zero_std
    identical = torch.tensor([len(set(texts[i * g:(i + 1) * g])) == 1 for i in range(len(texts) // g)])
    captions = [c for c in rows["caption"]] if "caption" in rows.column_names else None
    result = {
        "sample_format_rate": formats.mean().item(),
        "retrieval_reward": out.reward.mean().item(),
        "rank": out.rank.mean().item(),
        "zero_spread_fraction": zero.float().mean().item(),
        "zero_spread_identical_fraction": (zero & identical).float().mean().item(),
        "zero_spread_distinct_fraction": (zero & ~identical).float().mean().item(),
        "query_zero_spread_fraction": zero.view(pairs, 2)[:, 0].float().mean().item(),
    }
    # how much of the spread the format reward makes, in groups with a spread (1: the advantage is the format's)
    format_var = (options["format_reward_weight"] * formats).view(-1, g).var(dim=1)
    retrieval_var = (options["retrieval_reward_weight"] * out.reward.float()).view(-1, g).var(dim=1)
    share = format_var / (format_var + retrieval_var)
    result["format_share_of_spread"] = share[~zero].mean().item() if (~zero).any() else float("nan")
    if captions is not None:
        def states_caption(text: str, caption: str) -> bool:
            answer = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
            return answer is not None and answer.group(1).strip() == caption

        exact = torch.tensor([states_caption(t, captions[i // (2 * g)]) for i, t in enumerate(texts)]).view(-1, g)
        greedy = torch.tensor([states_caption(sides[s][3][p], captions[p]) for p in range(pairs)
                               for s in ("query", "target")])
        # the side that shows the image has to read it; the caption side copies its text
        image = torch.tensor([sides[s][4][p] for p in range(pairs) for s in ("query", "target")])
        result.update(
            image_greedy_exact_rate=greedy[image].float().mean().item(),
            image_sample_exact_rate=exact[image].float().mean().item(),
            image_pass_at_g_exact_rate=exact[image].any(dim=1).float().mean().item(),
            # where RL can move the greedy answer: it is wrong, and a sample states the caption
            image_greedy_wrong_sample_right=(~greedy[image] & exact[image].any(dim=1)).float().mean().item(),
            # the caption side only has to copy its caption; RL rewards it for agreeing with the image side
            text_greedy_exact_rate=greedy[~image].float().mean().item(),
            text_sample_exact_rate=exact[~image].float().mean().item(),
        )
        # Greedy retrieval in the probe's pool: does each image side's embedding find a caption side of its own
        # caption first? RL only chooses the text; a miss after an exact answer is the embedding's, out of its reach.
        embeddings = torch.stack([sides[s][5][p] for p in range(pairs) for s in ("query", "target")])
        texts_of = [captions[p] for p in range(pairs) for _ in ("query", "target")]
        nearest = (embeddings[image] @ embeddings[~image].T).argmax(dim=1)
        caption_rows = [texts_of[i] for i in (~image).nonzero().flatten().tolist()]
        hits = torch.tensor([caption_rows[j] == texts_of[i] for i, j in
                             zip(image.nonzero().flatten().tolist(), nearest.tolist())])
        result.update(
            image_greedy_pool_r1=hits.float().mean().item(),
            image_miss_after_exact_answer=(~hits & greedy[image]).float().mean().item(),
            image_miss_after_wrong_answer=(~hits & ~greedy[image]).float().mean().item(),
        )
        advantage = (grouped - grouped.mean(dim=1, keepdim=True)) / (std[:, None] + 1e-4)
        mixed = exact.any(dim=1) & ~exact.all(dim=1) & ~zero
        result.update(
            sample_exact_rate=exact.float().mean().item(),
            pass_at_g_exact_rate=exact.any(dim=1).float().mean().item(),
            mixed_group_fraction=mixed.float().mean().item(),
            # in groups with exact and wrong answers: the advantage of exact answers minus that of wrong ones
            exact_advantage_margin=(
                ((advantage * exact).sum(1) / exact.sum(1) - (advantage * ~exact).sum(1) / (~exact).sum(1))[mixed]
                .mean().item() if mixed.any() else float("nan")),
        )
    return result


def heldout_by_direction(model_dir: str, rows, image_root: str, max_new_tokens: int) -> dict[str, float]:
    """Held-out disc / gen / oracle recall@1 of each direction on its own (MMEB scores each task apart) and their
    mean. The examples' evaluator pools both directions in one corpus, where an image query also competes with the
    t2i rows' images: with shared captions (digits) an image whose answer matches another image's scores a miss."""
    from mm_embed_trl import MultimodalEmbeddingModel
    from mm_embed_trl.evaluation import RetrievalEvaluator

    model = MultimodalEmbeddingModel.from_pretrained(model_dir, encoder_kind="generative")
    result = {}
    tasks = sorted(set(rows["task"]))
    for task in tasks:
        subset = rows.select([i for i, t in enumerate(rows["task"]) if t == task])
        evaluator = RetrievalEvaluator.from_rows(subset, image_root, name=task, batch_size=32,
                                                 encode_kwargs={"mode": "both", "max_new_tokens": max_new_tokens})
        result.update({k: v for k, v in evaluator(model).items() if k.endswith("recall@1")})
    for kind in ("disc", "gen", "oracle"):
        result[f"macro_{kind}_recall@1"] = sum(result[f"{t}_{kind}_recall@1"] for t in tasks) / len(tasks)
    return result


def _cached_by_direction(model_dir: Path, rows, image_root, options, *, tag: str = "heldout") -> dict[str, float]:
    """:func:`heldout_by_direction` on ``rows`` (cached in the model's folder); keys prefixed ``<tag>_`` but for the
    held-out rows."""
    path = model_dir / f"{tag}-by-direction-{options['max_completion_length']}.json"
    if path.is_file():
        result = json.loads(path.read_text())
    else:
        result = heldout_by_direction(str(model_dir), rows, image_root, options["max_completion_length"])
        path.write_text(json.dumps(result, indent=2))
    return result if tag == "heldout" else {f"{tag}_{key}": value for key, value in result.items()}


def mean_se(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def _fmt(values: list[float]) -> str:
    mean, se = mean_se(values)
    return "-" if math.isnan(mean) else f"{mean:.3f}" + ("" if math.isnan(se) else f" ± {se:.3f}")


def run_dataset(name: str, args, settings: dict[str, str]) -> list[dict]:
    sft_data_args, grpo_data_args, heldout, trained, image_root = dataset_spec(name)
    base = Path(args.out) / name
    base.mkdir(parents=True, exist_ok=True)
    records = []
    for seed in args.seeds:
        sft_seed = 0 if args.shared_sft else seed
        sft = base / f"sft-seed{sft_seed}"
        if not (sft / "retrieval_report.json").is_file():
            sft_args = [*sft_data_args, "--output_dir", str(sft), "--overwrite_output_dir", "true", "--seed",
                        str(sft_seed), "--evaluate_before_training", "false", *shlex.split(args.sft_args)]
            seconds = run_example("train_sft_reasoning.py", sft_args, base / f"{sft.name}.log")
            print(f"[{name}] SFT seed {sft_seed}: {seconds / 60:.1f} min", flush=True)
        before = json.loads((sft / "retrieval_report.json").read_text())["after"]
        before = {k: before.get(f"heldout_{k}") for k in HELDOUT}
        before |= _cached_by_direction(sft, heldout, image_root, PROBE_DEFAULTS)
        before |= _cached_by_direction(sft, trained, image_root, PROBE_DEFAULTS, tag="rl_train")
        for setting, extra in settings.items():
            options = _setting_options(extra)
            # one probe per model, sampling options and seed (the probe's own sampling varies with the seed)
            probe_key = "probe-" + "-".join(f"{k}{options[k]}" for k in sorted(PROBE_DEFAULTS)) + f"-s{seed}.json"
            probe_before = _cached_probe(sft, probe_key, heldout, image_root, options, args, seed)
            run = base / setting / f"seed{seed}"
            report = run / "retrieval_report.json"
            seconds = None
            if not report.is_file():
                run.parent.mkdir(parents=True, exist_ok=True)
                # the probe's options are passed explicitly, so training samples as the probe does whatever the
                # example's defaults become
                pinned = [w for k in sorted(PROBE_DEFAULTS) for w in (f"--{k}", str(options[k]))]
                grpo_args = [*grpo_data_args, *pinned, *_rl_start(sft, args.sft_args), "--output_dir", str(run),
                             "--overwrite_output_dir", "true", "--seed", str(seed),
                             "--evaluate_before_training", "false",
                             *shlex.split(args.grpo_args), *shlex.split(extra)]
                seconds = run_example("train_grpo.py", grpo_args, run.parent / f"seed{seed}.log")
                print(f"[{name}] {setting} seed {seed}: {seconds / 60:.1f} min", flush=True)
            after = json.loads(report.read_text())["after"]
            after = {k: after.get(f"heldout_{k}") for k in HELDOUT}
            after |= _cached_by_direction(run, heldout, image_root, PROBE_DEFAULTS)
            after |= _cached_by_direction(run, trained, image_root, PROBE_DEFAULTS, tag="rl_train")
            probe_after = _cached_probe(run, probe_key, heldout, image_root, options, args, seed)
            logs = _quarters(training_logs(run.parent / f"seed{seed}.log"),
                             ("frac_reward_zero_std", "reward", "rewards/ume_r1_format_reward/mean",
                              "rewards/retrieval_ume_r1/mean", "rewards/retrieval_reciprocal_rank/mean"))
            records.append({
                "dataset": name, "setting": setting, "grpo_args": extra, "seed": seed, "sft_seed": sft_seed,
                "before": before | {"probe": probe_before}, "after": after | {"probe": probe_after},
                "training_log": logs, "grpo_seconds": seconds,
            })
    return records


def _cached_probe(model_dir: Path, key: str, heldout, image_root, options, args, seed) -> dict:
    path = model_dir / key
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("probe_version") == PROBE_VERSION and cached.get("pairs") == args.probe_pairs:
            return cached
    result = probe_rollouts(str(model_dir), heldout, image_root, options, pairs=args.probe_pairs, seed=seed)
    result.update(probe_version=PROBE_VERSION, pairs=args.probe_pairs)
    path.write_text(json.dumps(result, indent=2))
    return result


PROBE_COLUMNS = ("sample_format_rate", "retrieval_reward", "zero_spread_fraction", "zero_spread_identical_fraction",
                 "query_zero_spread_fraction", "format_share_of_spread", "sample_exact_rate", "pass_at_g_exact_rate",
                 "exact_advantage_margin", "image_greedy_exact_rate", "image_sample_exact_rate",
                 "image_pass_at_g_exact_rate", "image_greedy_wrong_sample_right", "text_greedy_exact_rate",
                 "text_sample_exact_rate", "image_greedy_pool_r1", "image_miss_after_exact_answer",
                 "image_miss_after_wrong_answer")


def summarize(records: list[dict]) -> tuple[list[dict], str]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], r["setting"]), []).append(r)
    summary, lines = [], []
    header = ["dataset", "setting", "seeds"] + [f"{TABLE_NAMES[k]} before → after" for k in TABLE] + [
        f"Δ {TABLE_NAMES[k]}" for k in DELTAS] + ["learns"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    probe_lines = ["| dataset | setting | probe metric | before | after |", "|---|---|---|---|---|"]
    for (dataset, setting), runs in groups.items():
        entry = {"dataset": dataset, "setting": setting, "seeds": [r["seed"] for r in runs],
                 "grpo_args": runs[0]["grpo_args"]}
        cells = [dataset, setting, str(len(runs))]
        for key in dict.fromkeys(HELDOUT + TABLE):
            b, a = [r["before"][key] for r in runs], [r["after"][key] for r in runs]
            entry[key] = {"before": mean_se(b), "after": mean_se(a)}
        for key in TABLE:
            b, a = [r["before"][key] for r in runs], [r["after"][key] for r in runs]
            cells.append(f"{_fmt(b)} → {_fmt(a)}")
        deltas = {}
        for key in DELTAS:
            d = [r["after"][key] - r["before"][key] for r in runs]
            deltas[key] = mean_se(d)
            entry[f"delta_{key}"] = deltas[key]
            cells.append(_fmt(d))
        # the verdict reads the per-direction scores (the pooled ones are shown beside them)
        (dg, sg), dd = deltas["macro_gen_recall@1"], deltas["macro_disc_recall@1"][0]
        # issue 21: gen R@1 rises by more than twice its standard error, disc R@1 falls by no more than that
        learns = (not math.isnan(sg)) and dg > 2 * sg and dd > -2 * sg
        entry["learns"] = learns
        cells.append("yes" if learns else "no")
        lines.append("| " + " | ".join(cells) + " |")
        for key in PROBE_COLUMNS:
            b = [r["before"]["probe"].get(key) for r in runs]
            a = [r["after"]["probe"].get(key) for r in runs]
            entry[f"probe_{key}"] = {"before": mean_se(b), "after": mean_se(a)}
            if not math.isnan(mean_se(b)[0]):
                probe_lines.append(f"| {dataset} | {setting} | {key} | {_fmt(b)} | {_fmt(a)} |")
        for key in ("frac_reward_zero_std", "rewards/retrieval_ume_r1/mean", "rewards/ume_r1_format_reward/mean"):
            first = [r["training_log"].get(f"first_{key}") for r in runs]
            last = [r["training_log"].get(f"last_{key}") for r in runs]
            entry[f"train_{key}"] = {"first_quarter": mean_se(first), "last_quarter": mean_se(last)}
            if not math.isnan(mean_se(first)[0]):
                probe_lines.append(f"| {dataset} | {setting} | training log {key} (first → last quarter) | "
                                   f"{_fmt(first)} | {_fmt(last)} |")
        summary.append(entry)
    text = "\n".join(lines) + "\n\nRollout probe (held-out pairs, sampled as in RL) and training logs:\n\n"
    return summary, text + "\n".join(probe_lines) + "\n"


def _rl_start(sft: Path, sft_args: str) -> list[str]:
    """train_grpo's arguments that start RL from the SFT model `sft`. After a tiny SFT run it is the example's tiny
    start (`--sft_output_dir`, the tiny GRPO defaults); after SFT of a named backbone (`--sft_args` holds
    `--model_name_or_path`, or a `--config` recipe that sets it) it is named too, so RL takes the config's defaults
    (and `--grpo_args`' `--config`) rather than the tiny CPU ones."""
    import yaml

    words = shlex.split(sft_args)
    named = any(w.split("=")[0] == "--model_name_or_path" for w in words)
    for i, word in enumerate(words):  # a --config recipe may name it too
        path = word.split("=", 1)[1] if word.startswith("--config=") else (
            words[i + 1] if word == "--config" and i + 1 < len(words) else None)
        if path is not None:
            named |= bool((yaml.safe_load(Path(path).read_text()) or {}).get("model_name_or_path"))
    return ["--model_name_or_path" if named else "--sft_output_dir", str(sft)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out/ume-r1-real")
    parser.add_argument("--datasets", nargs="+", default=["digits", "shapes"],
                        choices=["digits", "digits_split", "shapes"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--settings", nargs="*", default=["default"], help=f"named settings: {sorted(SETTINGS)}")
    parser.add_argument("--setting", action="append", default=[], metavar='NAME="ARGS"',
                        help="an extra setting: its name and its examples/train_grpo.py arguments")
    parser.add_argument("--shared_sft", action="store_true", help="one SFT model (seed 0) starts every RL seed")
    parser.add_argument("--sft_args", default="", help="extra arguments for examples/train_sft_reasoning.py")
    parser.add_argument("--grpo_args", default="", help="extra arguments for every examples/train_grpo.py run")
    parser.add_argument("--probe_pairs", type=int, default=64, help="held-out pairs in the rollout probe")
    parser.add_argument("--results_name", default="results", help="<out>/<name>.json and .md")
    args = parser.parse_args()
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; named ones are {sorted(SETTINGS)}, or pass --setting NAME=ARGS")
    settings = {name: SETTINGS[name] for name in args.settings}
    for item in args.setting:
        name, _, extra = item.partition("=")
        settings[name.strip()] = extra
    records = []
    for dataset in args.datasets:
        records += run_dataset(dataset, args, settings)
    summary, table = summarize(records)
    out = Path(args.out)
    (out / f"{args.results_name}.json").write_text(json.dumps({"runs": records, "summary": summary}, indent=2))
    (out / f"{args.results_name}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
