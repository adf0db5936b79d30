"""The callbacks' package imports without the frameworks and says what to install."""

from __future__ import annotations

import subprocess
import sys

from reference import REPO, repo_env

_WITHOUT_FRAMEWORKS = r"""
import sys
import attn_probe.integrations as integrations
assert "transformers" not in sys.modules and "lightning" not in sys.modules, "imported early"
for name in ("transformers", "lightning", "lightning.pytorch"):
    sys.modules[name] = None  # as if not installed
for name, extra in (("HuggingFaceCallback", "hf"), ("LightningCallback", "lightning")):
    try:
        getattr(integrations, name)
    except ImportError as error:
        assert f'pip install "attn_probe[{extra}]"' in str(error), str(error)
    else:
        raise AssertionError(f"{name} available without its framework")
from attn_probe.integrations import huggingface, lightning  # the modules still import
for module, extra in ((huggingface, "hf"), (lightning, "lightning")):
    try:
        from_module = module.AttentionProbeCallback
    except ImportError as error:
        assert f'pip install "attn_probe[{extra}]"' in str(error), str(error)
    else:
        raise AssertionError(module.__name__)
print("ok")
"""


def test_integrations_import_without_frameworks():
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_FRAMEWORKS], capture_output=True, text=True,
        cwd=str(REPO), env=repo_env(), timeout=120,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
