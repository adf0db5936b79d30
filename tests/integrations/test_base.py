"""The callbacks' shared half: the package imports without the frameworks and says what to
install; stop_on is checked when a callback is made and decided from each closed step's
alerts."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
from extras_rule import extra

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


# --------------------------------------------------------------------------- stop_on


def test_stop_on_is_checked_when_the_callback_is_made():
    from attn_probe.alerts import AlertRules
    from attn_probe.integrations.base import ProbeCallback

    assert ProbeCallback().stop_on == ()
    assert ProbeCallback(stop_on=None).stop_on == ()
    assert ProbeCallback(stop_on="logit").stop_on == ("logit",)
    assert ProbeCallback(stop_on=["entropy", "logit", "entropy"]).stop_on == ("entropy", "logit")
    assert ProbeCallback(stop_on={"lazy"}).stop_on == ("lazy",)
    for bad, says in [
        (("logits",), "'logits' is not a kind of alert; the kinds are 'logit', 'entropy', "
                      "'uniform', 'lazy', 'sink'"),
        (("logit", "Entropy"), "'Entropy' is not a kind of alert"),
        ((None,), "None is not a kind of alert"),
        (3, "stop_on must be kinds of alert ('logit', 'entropy', 'uniform', 'lazy', 'sink'), "
            "got 3"),
    ]:
        with pytest.raises(ValueError) as error:
            ProbeCallback(stop_on=bad)
        assert says in str(error.value)
    # a kind turned off could never stop training
    with pytest.raises(ValueError, match=r"'logit' alerts are turned off \(alerts=AlertRules\("
                                         r"logit=None\)\)"):
        ProbeCallback(stop_on="logit", alerts=AlertRules(logit=None))
    assert ProbeCallback(stop_on="entropy", alerts=AlertRules(logit=None)).stop_on == (
        "entropy",)


@pytest.mark.parametrize("framework", ["huggingface", "lightning"])
def test_framework_callbacks_check_stop_on(framework):
    extra("transformers" if framework == "huggingface" else "lightning")
    module = importlib.import_module(f"attn_probe.integrations.{framework}")
    with pytest.raises(ValueError, match="'nan' is not a kind of alert"):
        module.AttentionProbeCallback(stop_on=("logit", "nan"))
    assert module.AttentionProbeCallback(stop_on=("logit",)).stop_on == ("logit",)


def alert(kind: str, step: int, layer: str = "m.0.attn"):
    from attn_probe.snapshot import Alert

    return Alert(kind, layer, "L00", (0,), step, "logit_spread", "max", "above", 1.0, 0.5, step,
                 1.0, f"{kind} at step {step}")


def test_the_first_stop_on_alert_of_a_closed_step_stops_and_on_alert_stays_the_users(tmp_path):
    """Closing a step hands the callback that step's alerts (which every process decides from
    the reduced figures): the first of a stop_on kind is kept and said once, later ones change
    nothing; the user's on_alert is the probe's own, untouched."""
    from attn_probe.integrations.base import ProbeCallback
    from attn_probe.models.gpt import GPT, GPTConfig
    from attn_probe.snapshot import Snapshot

    callback = ProbeCallback(stop_on=("logit", "entropy"), on_alert=print)
    model = GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2, n_embd=8))
    callback._make_probe(model, lambda: str(tmp_path), lambda: 1)
    assert callback.probe.on_alert is print
    steps = {1: [alert("sink", 1)], 2: [alert("lazy", 2)],
             3: [alert("logit", 3), alert("entropy", 3)], 4: [alert("logit", 4, "m.1.attn")]}
    callback.probe.close_step = lambda step: Snapshot(step, 0.9, (), alerts=tuple(steps[step]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in steps:
            callback._open = step
            assert callback._close(step) is (step >= 3)
    assert callback.stopped_by is steps[3][0]
    (line,) = [str(w.message) for w in caught]
    assert line.startswith("attn_probe: stopping training after step 3 on a 'logit' alert "
                           "(stop_on=('logit', 'entropy')): logit at step 3")
    # a new run (a new probe) starts without a stop
    callback._make_probe(model, lambda: str(tmp_path), lambda: 1)
    assert callback.stopped_by is None
