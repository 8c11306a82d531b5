"""The fast test suite against the newest releases setup.py's ranges allow, resolved fresh (not from the lock).

    python3 .ci/newest_releases.py [--venv .venv-newest] [--lock constraints.txt] [--strict] [-- PYTEST_ARGS...]

`make test` runs the suite on the locked set (constraints.txt); this catches the next upstream release early:
1. a fresh virtual environment gets torch from TORCH_SPEC (the platform: CUDA wheels are several GB) and everything
   else at the newest version the ranges in setup.py admit;
2. the packages whose versions differ from the lock are listed; if none differ, the locked suite already covers it;
3. otherwise the fast suite runs; for each failure, each differing package is put back to its locked version
   (alone) and the failed tests re-run: a package whose rollback makes them pass is named as the one that broke.
It prints a report and writes it to `<venv>/newest-report.md`. The exit code is 0 unless `--strict` is given and
the newest set fails: an upstream release should not fail an unrelated change's CI run; the report says what to do
(narrow the range in setup.py, or fix the code and `make lock`).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pin_map(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            pins[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return pins


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(map(shlex.quote, map(str, cmd))), flush=True)
    return subprocess.run(cmd, check=False, **kwargs)


def _failed_tests(report: Path) -> list[str]:
    if not report.is_file():
        return []
    failed = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            module = case.get("classname", "").replace(".", "/")
            failed.append(f"{module}.py::{case.get('name')}")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=ROOT / ".venv-newest")
    parser.add_argument("--lock", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--pip-version", default="26.3")
    parser.add_argument("--torch-spec", default=os.environ.get("TORCH_SPEC", "torch==2.14.1 torchvision==0.29.1"))
    parser.add_argument("--strict", action="store_true", help="Exit non-zero when the newest set fails.")
    parser.add_argument("pytest_args", nargs="*", default=["-q", "-m", "not slow"])
    args = parser.parse_args()

    venv = args.venv if args.venv.is_absolute() else ROOT / args.venv
    shutil.rmtree(venv, ignore_errors=True)
    if _run([args.python, "-m", "venv", str(venv)]).returncode:
        return 1
    python = str(venv / "bin" / "python")
    report_lines = ["# The fast suite on the newest releases the ranges allow", ""]

    def finish(code: int) -> int:
        text = "\n".join(report_lines)
        print("\n" + text)
        (venv / "newest-report.md").write_text(text + "\n")
        return code if args.strict else 0

    steps = [
        [python, "-m", "pip", "install", "-q", f"pip=={args.pip_version}"],
        [python, "-m", "pip", "install", "-q", *shlex.split(args.torch_spec)],
        [python, "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"],
    ]
    for step in steps:
        if _run(step, cwd=ROOT).returncode:
            report_lines.append(f"**Could not install the newest set**: `{' '.join(step)}` failed (see above).")
            return finish(1)

    locked = _pin_map(args.lock.read_text().splitlines())
    freeze = _run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True).stdout
    newest = _pin_map(freeze.splitlines())
    changed = {name: (locked.get(name), version) for name, version in newest.items() if locked.get(name) != version}
    if not changed:
        report_lines.append("The newest set equals the lock: `make test` already ran it. Nothing to do.")
        return finish(0)
    report_lines.append("Packages newer than (or absent from) the lock:")
    report_lines += [f"- {name}: {old or '(not locked)'} -> {new}" for name, (old, new) in sorted(changed.items())]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}
    junit = venv / "newest-junit.xml"
    result = _run([python, "-m", "pytest", f"--junitxml={junit}", *args.pytest_args], cwd=ROOT, env=env)
    failed = _failed_tests(junit)
    if result.returncode == 0:
        report_lines += ["", "**The fast suite passes on the newest set.** Run `make lock` to make it the tested set."]
        return finish(0)
    if not failed:
        report_lines += ["", f"**pytest exited {result.returncode} without a failed test** (collection error?)."]
        return finish(1)
    report_lines += ["", f"**{len(failed)} test(s) fail on the newest set:**", *[f"- {t}" for t in failed], ""]
    culprits = []
    for name, (old, new) in sorted(changed.items()):
        if old is None:
            continue
        _run([python, "-m", "pip", "install", "-q", "--no-deps", f"{name}=={old}"])
        rerun = _run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *failed], cwd=ROOT, env=env,
                     capture_output=True, text=True)
        _run([python, "-m", "pip", "install", "-q", "--no-deps", f"{name}=={new}"])
        if rerun.returncode == 0:
            culprits.append(name)
            report_lines.append(f"- **{name} {new} breaks them**: they pass with {name} {old} (the locked version).")
    if not culprits:
        report_lines.append("- No single package's rollback fixes them: more than one release interacts.")
    report_lines += ["", "Fix the code for the new release(s) and `make lock`, or bound the range in setup.py."]
    return finish(1)


if __name__ == "__main__":
    sys.exit(main())
