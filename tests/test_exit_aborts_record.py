"""benchmarks/exit_aborts.py's cross-session record: repetitions add up per test only when they ran the same exit
path, and an abort is counted where it happened."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_a" name="test_one" time="1.0"/>
<testcase classname="tests.test_b" name="test_two[ddp]" time="2.0">{failure}</testcase>
</testsuite></testsuites>"""
ABORT = '<failure message="launch failed">terminate called without an active exception</failure>'
OTHER = '<failure message="AssertionError: weights differ">assert 1 == 2</failure>'


@pytest.fixture(scope="module")
def bench():
    return load_script("benchmarks/exit_aborts.py")


@pytest.fixture
def checkout(tmp_path, bench):
    """A checkout holding copies of the exit-path files."""
    root = tmp_path / "checkout"
    for name in bench.EXIT_PATH:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, root / name)
    return root


def _launch(test: str, aborted: bool, processes: int = 2) -> str:
    return json.dumps({"test": f"tests/{test} (call)".rsplit(" (", 1)[0], "launcher": "accelerate",
                       "processes": processes, "returncode": -6 if aborted else 0, "aborted_at_exit": aborted,
                       "timed_out": False, "seconds": 9.0})


def test_repetitions_add_up_per_test_and_abort_signs_count_as_aborts(bench, checkout, tmp_path):
    record = tmp_path / "record.jsonl"
    for index, failure in enumerate(["", ABORT, OTHER]):
        report = tmp_path / f"rep-{index}.xml"
        report.write_text(JUNIT.format(failure=failure))
        launches = [_launch("test_b.py::test_two[ddp]", aborted=failure == ABORT),
                    *[_launch("test_a.py::test_one", aborted=False)] * 2,
                    _launch("test_a.py::test_one", aborted=False, processes=1)]
        bench.record_repetition(record, checkout, report, launches, load=2, seconds=60.0, beside="make test")
    text = bench.summarise_record(record, checkout)
    assert "3 repetition(s)" in text and "Fewest runs of a test: 3." in text
    assert "| test_a::test_one | 3 | 3 | 0 | 0 | 6 | 0 |" in text  # 1-process launches are not counted
    assert "| test_b::test_two[ddp] | 3 | 1 | 1 | 1 | 3 | 1 |" in text
    assert "| **all** | 6 | 4 | 1 | 1 | 9 | 1 |" in text


def test_a_changed_exit_path_starts_a_new_count(bench, checkout, tmp_path):
    record, report = tmp_path / "record.jsonl", tmp_path / "rep.xml"
    report.write_text(JUNIT.format(failure=""))
    bench.record_repetition(record, checkout, report, [], load=2, seconds=60.0, beside="")
    before = bench.exit_path_key(checkout)
    handler = checkout / "src" / "mm_embed_trl" / "distributed" / "process_group.py"
    handler.write_text(handler.read_text() + "\n# changed\n")
    assert bench.exit_path_key(checkout) != before
    text = bench.summarise_record(record, checkout)
    assert "0 repetition(s)" in text and f"{before} (1)" in text  # the old repetition is listed, not counted
    assert "1 repetition(s)" in bench.summarise_record(record, checkout, exit_path=before)
