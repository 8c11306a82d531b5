"""The CI scripts' own logic: the newest-releases report (.ci/newest_releases.py)."""

from __future__ import annotations

from pathlib import Path

from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _newest_module():
    return load_script(".ci/newest_releases.py")


def test_pins_are_read_with_normalised_names_and_comments_ignored():
    newest = _newest_module()
    pins = newest._pin_map(["# a comment", "Sentence_Transformers==6.3.0", "torch==2.14.1 ; python_version>'3'",
                            "-e file:///x", "", "PyYAML==6.0.4  # why"])
    assert pins == {"sentence-transformers": "6.3.0", "torch": "2.14.1", "pyyaml": "6.0.4"}


def test_failed_tests_are_read_back_as_node_ids(tmp_path):
    newest = _newest_module()
    report = tmp_path / "junit.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" />'
        '<testcase classname="tests.test_a" name="test_bad[x]"><failure message="boom" /></testcase>'
        '<testcase classname="tests.test_b" name="test_err"><error message="setup" /></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped /></testcase>'
        "</testsuite></testsuites>"
    )
    assert newest._failed_tests(report) == ["tests/test_a.py::test_bad[x]", "tests/test_b.py::test_err"]
    assert newest._failed_tests(tmp_path / "missing.xml") == []
