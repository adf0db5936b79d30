"""The thread budget of the probe's CPU work (attn_probe.metrics.threads).

Inside the budget torch runs with at most that many intra-op threads; after it, torch's own
count is back, whether the block returned or raised. The probe's and ``capture()``'s figures are
computed inside the budget ``CaptureOptions.threads`` (seen by a ``TorchFunctionMode`` that reads
torch's thread count at each ``eigvalsh`` the figures call), and are the same without it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

import attn_probe
from attn_probe import CaptureOptions
from attn_probe.metrics.threads import on_cpu, thread_budget
from toy_models import small_gpt, tokens


@pytest.fixture
def two_threads():
    """torch at two intra-op threads for the test (a budget of one then has work to do)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


class ThreadsAtEigvalsh(TorchFunctionMode):
    """Records torch's intra-op thread count at every ``torch.linalg.eigvalsh`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.linalg.eigvalsh:
            self.seen.append(torch.get_num_threads())
        return func(*args, **(kwargs or {}))


def test_budget_inside_and_restored_after_success(two_threads):
    with thread_budget(1, torch.zeros(2)):
        inside = torch.get_num_threads()
    assert (inside, torch.get_num_threads()) == (1, 2)


def test_budget_restored_after_an_exception(two_threads):
    with pytest.raises(ZeroDivisionError):
        with thread_budget(1):
            assert torch.get_num_threads() == 1
            1 / 0
    assert torch.get_num_threads() == 2


def test_none_a_larger_budget_and_other_devices_leave_torch_alone(two_threads):
    for threads, value in [(None, torch.zeros(1)), (3, torch.zeros(1)),
                           (1, torch.zeros(1, device="meta"))]:
        with thread_budget(threads, value):
            assert torch.get_num_threads() == 2, (threads, value.device)
    assert torch.get_num_threads() == 2


def test_on_cpu_reads_the_first_tensor_of_what_is_measured():
    from attn_probe.attention import AttentionScores

    meta = torch.zeros(1, 1, 2, 2, device="meta")
    assert on_cpu(torch.zeros(1)) and not on_cpu(meta)
    assert not on_cpu(AttentionScores(scores=meta, probs=meta))
    assert on_cpu(AttentionScores(scores=torch.zeros(1, 1, 2, 2), probs=torch.zeros(1, 1, 2, 2)))
    assert on_cpu(object())  # nothing to go by: the CPU


def probe_figures(model, x, threads):
    probe = attn_probe.AttentionProbe(model, every=1,
                                      capture=CaptureOptions(crop=12, threads=threads))
    mode = ThreadsAtEigvalsh()
    with probe, mode, torch.no_grad():
        model(x)
        snapshot = probe.step()
    return snapshot, mode.seen


def test_probe_measures_under_the_budget_and_the_figures_do_not_change(two_threads):
    model, x = small_gpt(vocab_size=100), tokens(b=2, t=12)
    assert CaptureOptions().threads == 1
    budgeted, seen = probe_figures(model, x, 1)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    free, seen_free = probe_figures(model, x, None)
    assert seen_free and set(seen_free) == {2}
    for ours, theirs in zip(budgeted.layers, free.layers, strict=True):
        assert ours.heads.keys() == theirs.heads.keys()
        for name in ours.heads:
            np.testing.assert_allclose(ours.heads[name], theirs.heads[name], rtol=1e-12,
                                       atol=0, err_msg=name)


def test_capture_metrics_under_the_budget(two_threads):
    model, x = small_gpt(vocab_size=100), tokens(b=2, t=12)
    figures = {}
    for threads in (1, None):
        with attn_probe.capture(model, CaptureOptions(threads=threads)) as cap, torch.no_grad():
            model(x)
        mode = ThreadsAtEigvalsh()
        with mode:
            figures[threads] = cap.metrics()
        assert mode.seen and set(mode.seen) == {threads or 2}
        assert torch.get_num_threads() == 2
    figures, unbudgeted = figures[1], figures[None]
    for name, values in figures.items():
        for figure, value in values.items():
            torch.testing.assert_close(value, unbudgeted[name][figure], rtol=1e-12, atol=0,
                                       equal_nan=True, msg=f"{name} {figure}")
