"""ATTN_PROBE_REQUIRE_EXTRAS=1 (set by .ci/run) turns skips for a missing or broken optional
dependency into failures; without it they stay skips. Checked on a tiny test directory that uses
this suite's own rule (extras_rule.py), with a ``lightning`` package that is broken on import and an
``accelerate`` that is missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

TESTS = Path(__file__).resolve().parent

TINY_TESTS = '''
import sys
import pytest
from extras_rule import extra

def test_needs_broken_lightning():
    extra("lightning")

def test_needs_missing_accelerate():
    sys.modules["accelerate"] = None  # as if not installed
    extra("accelerate")

def test_skips_for_another_reason():
    pytest.skip("CUDA is not available")

def test_plain():
    pass
'''

MODULE_LEVEL = '''
import pytest
from extras_rule import extra
extra("lightning")

def test_never_collected():
    pass
'''


def run_pytest(folder: Path, require: str | None) -> tuple[int, dict[str, str], str]:
    """Exit status, test name -> outcome (passed, skipped, failure, error) and the output of a
    pytest run in ``folder``, read from its JUnit XML report."""
    env = {k: v for k, v in os.environ.items() if k != "ATTN_PROBE_REQUIRE_EXTRAS"}
    if require is not None:
        env["ATTN_PROBE_REQUIRE_EXTRAS"] = require
    report = folder / f"report-{require}.xml"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W",
         "ignore::pytest.PytestDeprecationWarning", "--continue-on-collection-errors",
         f"--junitxml={report}", str(folder)],
        cwd=folder, env=env, capture_output=True, text=True, timeout=120,
    )
    outcomes = {}
    for case in ElementTree.parse(report).iter("testcase"):
        tags = [child.tag for child in case if child.tag in ("skipped", "failure", "error")]
        outcomes[case.get("name")] = tags[0] if tags else "passed"
    return done.returncode, outcomes, done.stdout


def test_missing_or_broken_extras_fail_only_when_required(tmp_path):
    shutil.copy(TESTS / "extras_rule.py", tmp_path / "extras_rule.py")
    (tmp_path / "conftest.py").write_text(
        "from extras_rule import pytest_make_collect_report, pytest_runtest_makereport\n")
    (tmp_path / "lightning").mkdir()
    (tmp_path / "lightning" / "__init__.py").write_text('raise ImportError("broken on purpose")\n')
    (tmp_path / "test_tiny.py").write_text(TINY_TESTS)
    (tmp_path / "test_module_level.py").write_text(MODULE_LEVEL)

    status, outcomes, out = run_pytest(tmp_path, None)
    assert status == 0, out
    assert outcomes == {
        "test_plain": "passed", "test_needs_broken_lightning": "skipped",
        "test_needs_missing_accelerate": "skipped", "test_skips_for_another_reason": "skipped",
        "test_module_level": "skipped",
    }, out

    status, outcomes, out = run_pytest(tmp_path, "1")
    assert status == 1, out
    assert outcomes == {
        "test_plain": "passed", "test_needs_broken_lightning": "failure",
        "test_needs_missing_accelerate": "failure", "test_skips_for_another_reason": "skipped",
        "test_module_level": "error",
    }, out
    assert "ATTN_PROBE_REQUIRE_EXTRAS=1: an optional dependency is missing or broken" in out
    assert "broken on purpose" in out
