"""The rule that CI may not skip the optional dependencies' tests (a pytest plugin, its hooks
imported by conftest.py).

The Hugging Face, Lightning, torchtitan, llama2.c and notebook tests skip where their framework cannot be
imported (:func:`extra`), so that the core can be tested without them. On CI that
would hide a broken dependency: every one of those tests would skip and the run pass. With
``ATTN_PROBE_REQUIRE_EXTRAS=1`` (set by ``.ci/run``) a test skipped for a reason that names one of
the optional dependencies (:data:`EXTRAS`) fails instead, saying why; other skips (no CUDA, a
missing fixture file) stay skips.
"""

import os
import re

import pytest

#: The optional dependencies of the ``dev`` extra whose absence may not pass unnoticed.
EXTRAS = ("transformers", "accelerate", "lightning", "tokenizers", "ipywidgets", "nbclient",
          "nbformat", "ipykernel", "torchtitan", "triton", "wandb", "mlflow", "mkdocs",
          "mkdocstrings")
REQUIRE_EXTRAS = "ATTN_PROBE_REQUIRE_EXTRAS"
_NAMES_AN_EXTRA = re.compile(r"\b(%s)\b" % "|".join(map(re.escape, EXTRAS)))


def extra(name: str, reason: str | None = None):
    """The optional dependency ``name``, or a skip when it is missing *or broken* (an
    ``ImportError`` of any kind: from pytest 9 on, a bare ``pytest.importorskip`` skips only for
    a missing module and lets a broken one fail the test, where older versions skipped both)."""
    return pytest.importorskip(name, reason=reason, exc_type=ImportError)


def _extras_required() -> bool:
    return os.environ.get(REQUIRE_EXTRAS, "") not in ("", "0")


def _fail_skip_of_an_extra(report) -> None:
    """Turn ``report`` (a skip) into a failure when it was skipped for lack of an extra."""
    if not report.skipped or hasattr(report, "wasxfail") or not _extras_required():
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    if _NAMES_AN_EXTRA.search(reason):
        report.outcome = "failed"
        report.longrepr = (
            f"{REQUIRE_EXTRAS}=1: an optional dependency is missing or broken, and this test "
            f"may not skip for it: {reason}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    _fail_skip_of_an_extra(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):
    report = yield
    _fail_skip_of_an_extra(report)  # a module-level importorskip
    return report
