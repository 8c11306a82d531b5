"""How often does a multi-process test abort at exit? Runs every multi-process test N times under CPU load and counts.

    python benchmarks/exit_aborts.py [--runs 30] [--load 2] [--root CHECKOUT] [--out bench-out/exit-aborts] [-k EXPR]

The abort: a rank finishes its work, then dies with SIGABRT ("terminate called without an active exception") while
the interpreter shuts down with its gloo process group alive (see `mm_embed_trl.distributed.process_group`). It
depends on thread timing, so the tests run with `--load` busy processes competing for the cores, as on a loaded CI
machine. Each repetition is one pytest run of the multi-process tests (`-m slow` in the files that launch several
processes) with a JUnit report; a failure whose text carries the abort's signs counts as an abort, any other
failure as "other". When the checkout has the launch harness (tests/launching.py), every launch is also logged
(`MM_EMBED_TRL_LAUNCH_LOG`), which counts aborted launches, including ones a test expected to fail.

`--root` points at another checkout (e.g. a `git worktree` of an older commit) to measure it with the same packages:
its own `src` and `tests` are used. The run resumes: repetitions already in `--out` are kept. Prints and writes
`summary.md` / `summary.json`.

30 repetitions of every multi-process test take 10-15 hours of a 2-core machine, more than one working session, so
the count is kept across sessions: `--record FILE` appends one JSON line per finished repetition (commit, date, load,
each test's outcome and launches) and `--summarise-record FILE` adds them up. Repetitions count together only when
they ran the same exit path: the same `EXIT_PATH` files (the handler, the launch harness, the test scripts that
launch) and the same locked packages, which the record keys by a hash of those files.

    python benchmarks/exit_aborts.py --runs 4 --load 2 --record benchmarks/results/exit_aborts.jsonl
    python benchmarks/exit_aborts.py --summarise-record benchmarks/results/exit_aborts.jsonl
"""

from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The files whose slow tests launch 2 or more processes: every test file that uses the launch harness
# (tests/launching.py), found in the checkout measured; older checkouts without it name theirs here.
LEGACY_MULTI_PROCESS_FILES = (
    "tests/test_process_group.py",
    "tests/test_gather.py",
    "tests/test_distill_trainer.py",
    "tests/test_hardneg_trainer.py",
    "tests/test_sft_trainer.py",
    "tests/test_grpo_trainer.py",
    "tests/test_sharded.py",
    "tests/test_examples.py",
    "tests/test_resume_cli.py",
)
USES_LAUNCHER = re.compile(r"^\s*(import launching|from launching import)", re.MULTILINE)


def multi_process_files(root: Path) -> list[str]:
    if not (root / "tests" / "launching.py").is_file():
        return [f for f in LEGACY_MULTI_PROCESS_FILES if (root / f).is_file()]
    return [
        str(path.relative_to(root))
        for path in sorted((root / "tests").glob("test_*.py"))
        if USES_LAUNCHER.search(path.read_text(encoding="utf-8"))
    ]


# Single-process slow tests in those files: not multi-process, left out.
DEFAULT_DESELECT = "not test_example_runs_end_to_end and not test_it_learns_on_held_out_data"
ABORT_SIGNS = re.compile(
    r"terminate called without an active exception|exitcode\s*:\s*-6\b|Signal 6 \(SIGABRT\)|ABORTED \(SIGABRT"
)


# What decides whether an exit aborts: the handler, the package's import-time registration of it, the harness that
# launches, the scripts the tests launch, and the packages (torch's gloo, DeepSpeed, accelerate) the lock pins.
EXIT_PATH = (
    "src/mm_embed_trl/distributed/process_group.py",
    "src/mm_embed_trl/__init__.py",
    "tests/launching.py",
    "tests/dist_scripts",
    "constraints.txt",
)


def exit_path_key(root: Path) -> str:
    """A short hash of the `EXIT_PATH` files' contents in `root` (directories: every file in them, sorted)."""
    digest = hashlib.sha256()
    for name in EXIT_PATH:
        path = root / name
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
        else:
            files = [path] if path.is_file() else []
        for file in files:
            digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def _commit(root: Path) -> str:
    found = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def _busy_processes(count: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def _repetition(root: Path, out: Path, index: int, expression: str, timeout: float) -> float:
    report = out / f"rep-{index:03d}.xml"
    env = {
        **os.environ,
        "PYTHONPATH": str(root / "src"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MM_EMBED_TRL_LAUNCH_LOG": str(out / f"rep-{index:03d}.launches.jsonl"),
        "MM_EMBED_TRL_CACHE": str(out / "cache"),
    }
    files = multi_process_files(root)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow", "-k", expression,
           f"--junitxml={report}.part", *files]
    start = time.monotonic()
    with open(out / f"rep-{index:03d}.log", "w") as log:
        subprocess.run(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    os.replace(f"{report}.part", report)  # a repetition counts only once its report is complete
    return time.monotonic() - start


def _report_outcomes(report: Path) -> dict[str, str]:
    """Each test case of one JUnit report: passed, skipped, aborted (a failure with the abort's signs) or other."""
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if case.find("skipped") is not None:
            outcomes[name] = "skipped"
        elif failure is None:
            outcomes[name] = "passed"
        else:
            text = (failure.get("message") or "") + (failure.text or "")
            outcomes[name] = "aborted" if ABORT_SIGNS.search(text) else "other failure"
    return outcomes


def _outcomes(out: Path) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for report in sorted(out.glob("rep-*.xml")):
        for name, outcome in _report_outcomes(report).items():
            counts[name][outcome] += 1
            counts[name]["runs"] += 1
    return counts


def _launch_counts(lines) -> dict[str, collections.Counter]:
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines:
        record = json.loads(line)
        if record["processes"] < 2:
            continue
        name = record["test"].split("/")[-1].replace(".py::", "::", 1)
        counts[name]["launches"] += 1
        counts[name]["aborted launches"] += bool(record["aborted_at_exit"])
    return counts


def _launches(out: Path) -> dict[str, collections.Counter]:
    # one log per repetition (rep-NNN.launches.jsonl); launches.jsonl is the shared log of earlier versions
    logs = sorted(out.glob("*launches.jsonl"))
    return _launch_counts([line for path in logs for line in path.read_text().splitlines()])


def record_repetition(record: Path, root: Path, report: Path, launch_lines: list[str], load: int, seconds: float,
                      beside: str) -> None:
    """Append one finished repetition to the cross-session record: one JSON line."""
    entry = {
        "exit_path": exit_path_key(root), "commit": _commit(root),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load": load, "beside": beside, "seconds": round(seconds),
        "tests": _report_outcomes(report),
        "launches": {name: [c["launches"], c["aborted launches"]] for name, c in _launch_counts(launch_lines).items()},
    }
    record.parent.mkdir(parents=True, exist_ok=True)
    with open(record, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def summarise_record(record: Path, root: Path, exit_path: str | None = None) -> str:
    """The record's repetitions of one exit path (default: `root`'s), added up per test; the other keys listed."""
    entries = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    key = exit_path or exit_path_key(root)
    other = collections.Counter(e["exit_path"] for e in entries if e["exit_path"] != key)
    entries = [e for e in entries if e["exit_path"] == key]
    tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    launches: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for entry in entries:
        for name, outcome in entry["tests"].items():
            tests[name][outcome] += 1
            tests[name]["runs"] += 1
        for name, (count, aborted) in entry["launches"].items():
            launches[name]["launches"] += count
            launches[name]["aborted launches"] += aborted
    commits = sorted({e["commit"] for e in entries})
    loads = sorted({f"{e['load']} busy + {e['beside'] or 'nothing'}" for e in entries})
    header = [
        f"Exit path {key}: {len(entries)} repetition(s) from {record} (commits {', '.join(commits) or '-'}; "
        f"load: {'; '.join(loads) or '-'}).",
    ]
    if other:
        header.append("Left out, other exit paths: " + ", ".join(f"{k} ({n})" for k, n in sorted(other.items())) + ".")
    fewest = min((t["runs"] for t in tests.values()), default=0)
    header.append(f"Fewest runs of a test: {fewest}.")
    return "\n".join(header) + "\n\n" + _table(tests, launches)


def _table(tests, launches) -> str:
    lines = [
        "| test | runs | passed | aborted at exit | other failure | 2-process launches | aborted launches |",
        "|---|---|---|---|---|---|---|",
    ]
    totals = collections.Counter()
    for name in sorted(tests):
        t, launched = tests[name], launches.get(name, collections.Counter())
        row = [t["runs"], t["passed"], t["aborted"], t["other failure"], launched["launches"],
               launched["aborted launches"]]
        totals.update(dict(zip(["runs", "passed", "aborted", "other", "launches", "aborted launches"], row)))
        lines.append(f"| {name} | " + " | ".join(map(str, row)) + " |")
    lines.append(
        f"| **all** | {totals['runs']} | {totals['passed']} | {totals['aborted']} | {totals['other']} | "
        f"{totals['launches']} | {totals['aborted launches']} |"
    )
    return "\n".join(lines)


def summarise(out: Path, load: int) -> str:
    tests, launches = _outcomes(out), _launches(out)
    reps = len(list(out.glob("rep-*.xml")))
    text = f"Multi-process tests under {load} busy process(es), {reps} repetition(s) ({out}).\n\n" + _table(
        tests, launches)
    (out / "summary.json").write_text(json.dumps({"tests": tests, "launches": launches, "load": load}, indent=1))
    (out / "summary.md").write_text(text + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30, help="Repetitions of the multi-process tests.")
    parser.add_argument("--load", type=int, default=os.cpu_count() or 2, help="Busy processes running meanwhile.")
    parser.add_argument("--root", type=Path, default=ROOT, help="The checkout to measure (default: this one).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-out" / "exit-aborts")
    parser.add_argument("-k", dest="expression", default=DEFAULT_DESELECT, help="pytest -k selection.")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="Seconds allowed for one repetition.")
    parser.add_argument("--record", type=Path, help="Append each finished repetition to this cross-session record.")
    parser.add_argument("--beside", default="", help="What else loaded the machine, for the record.")
    parser.add_argument("--summarise-record", type=Path, metavar="RECORD",
                        help="Only add up RECORD's repetitions of --root's exit path, and print them.")
    args = parser.parse_args()
    if args.summarise_record:
        print(summarise_record(args.summarise_record, args.root.resolve()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    busy = _busy_processes(args.load)
    try:
        for index in range(args.runs):
            if (args.out / f"rep-{index:03d}.xml").is_file():
                continue
            seconds = _repetition(args.root.resolve(), args.out, index, args.expression, args.timeout)
            print(f"repetition {index + 1}/{args.runs}: {seconds:.0f} s", flush=True)
            if args.record:
                launches = args.out / f"rep-{index:03d}.launches.jsonl"
                record_repetition(args.record, args.root.resolve(), args.out / f"rep-{index:03d}.xml",
                                  launches.read_text().splitlines() if launches.is_file() else [], args.load, seconds,
                                  args.beside)
    finally:
        for process in busy:
            process.kill()
    print(summarise(args.out, args.load))


if __name__ == "__main__":
    main()
