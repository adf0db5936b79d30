"""How the probe speaks: one message per alert, at the user's own line; information is logged,
not warned; with ``on_alert`` the user decides what is printed.

Two attention modules with fixed queries and keys make the alerts certain at step 0: one whose
top scores stand 2,000 above the rest (a ``critical`` logit alert), one that gives the first key
about 60 % of every query's attention (an attention sink: ``info``).
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import attn_probe
from attn_probe.notices import AttentionWarning

T, D = 16, 8


class Fixed(nn.Module):
    """Self-attention over fixed scores: key 0 scores ``first``, key 1 ``second``, the others
    0, for every query (through q and k, so the probe sees them as SDPA got them)."""

    def __init__(self, first: float, second: float = 0.0) -> None:
        super().__init__()
        q = torch.zeros(T, D)
        q[:, 0] = 1.0
        k = torch.zeros(T, D)
        k[0, 0], k[1, 0] = first, second
        self.register_buffer("q", q)
        self.register_buffer("k", k)

    def forward(self, x):
        q = self.q.expand(x.shape[0], 1, T, D)
        k = self.k.expand(x.shape[0], 1, T, D)
        return F.scaled_dot_product_attention(q, k, x[:, None], is_causal=True, scale=1.0)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.exploding = Fixed(first=0.0, second=2000.0)  # spread ~2000: critical
        self.sinking = Fixed(first=3.0)  # e^3 / (e^3 + i) on key 0: ~60 %

    def forward(self, x):
        return self.exploding(x) + self.sinking(x)


def one_step(**options) -> tuple[list, list]:
    """One sampled step; the alerts and the warnings it gave."""
    model = Model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(model, every=1, **options) as probe:
            model(torch.randn(2, T, D))
            probe.step()  # the line warnings point at
    return probe.alerts, [w for w in caught if issubclass(w.category, AttentionWarning)]


STEP_LINE = one_step.__code__.co_firstlineno + 7


def test_each_warning_alert_once_at_the_users_line(caplog):
    with caplog.at_level(logging.INFO, logger="attn_probe"):
        alerts, caught = one_step()
    kinds = {(a.kind, a.severity, a.tag) for a in alerts}
    # one key per query in both layers: rank 1, one column (lazy, information); the first
    # layer's logits exploded and its entropy with them; the second's first key is a sink
    assert kinds == {("logit", "critical", "L00"), ("entropy", "critical", "L00"),
                     ("lazy", "info", "L00"), ("lazy", "info", "L01"),
                     ("sink", "info", "L01")}, kinds
    warned = [a for a in alerts if a.severity != "info"]
    assert [str(w.message) for w in caught] == [
        f"attn_probe: {a.severity}: {a.message} ({a.cause})" if a.cause else
        f"attn_probe: {a.severity}: {a.message}" for a in warned]
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, STEP_LINE)}
    records = [r for r in caplog.records if r.name == "attn_probe"]
    assert len(records) == len(alerts) and {r.levelno for r in records} == {logging.INFO}
    assert any("attention sink" in r.getMessage() for r in records)


def test_with_on_alert_the_user_decides_what_is_printed():
    seen = []
    alerts, caught = one_step(on_alert=lambda alert, snapshot: seen.append(alert))
    assert caught == [] and seen == alerts and len(alerts) == 5


def forward_with_a_failing_measurement() -> list:
    """A sampled forward pass whose measurement fails inside the hook (a matrix budget of one
    byte); the warnings it gave."""
    model = Model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attn_probe.AttentionProbe(
                model, every=1, capture=attn_probe.CaptureOptions(matrix_budget=1)) as probe:
            model(torch.randn(2, T, D))
            probe.step()
    return [w for w in caught if issubclass(w.category, AttentionWarning)]


#: The user's line that called the attention modules: ``Model.forward``'s.
FORWARD_LINE = Model.forward.__code__.co_firstlineno + 1


def test_a_warning_raised_inside_a_hook_points_at_the_users_forward_call():
    """The hook runs inside torch's Module.__call__: the warning points past torch's frames and
    the package's, at the user's own line that called the attention module."""
    caught = [w for w in forward_with_a_failing_measurement()
              if "could not measure" in str(w.message)]
    assert caught, "the measurement did not fail"
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, FORWARD_LINE)}
