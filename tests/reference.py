"""Independent references and read-back helpers shared by the tests.

The float64 reference is the notebook's procedure, one matrix at a time: singular values with
``torch.linalg.svdvals`` (or sorted squared column masses), cumulative sum,
``searchsorted(cumsum, tau * total) + 1``. Nothing here imports attn_probe.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import torch

TAU = 0.9

#: The trained llama2.c model beside the repository (``../shared``); tests skip where absent.
FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "stories260K.bin"
FIXTURE_MISSING = (
    "../shared/fixtures/stories260K.bin not found; tests that need the trained fixture model "
    "run where ../shared is present"
)


def tau_count(energies: torch.Tensor, tau: float = TAU) -> tuple[int, float]:
    """Smallest k whose descending ``energies`` prefix reaches tau of the total, and how far
    (relative to the total) that decision is from the threshold."""
    c = energies.cumsum(0)
    threshold = tau * c[-1]
    k = int(torch.searchsorted(c, threshold)) + 1
    gap = float((c[k - 1] - threshold).abs())
    if k >= 2:
        gap = min(gap, float((threshold - c[k - 2]).abs()))
    return k, gap / float(c[-1])


def reference_rank(a: torch.Tensor, tau: float = TAU) -> int:
    """rank@tau of one matrix: fewest singular values carrying tau of the energy."""
    return tau_count(torch.linalg.svdvals(a.double()) ** 2, tau)[0]


def reference_columns(a: torch.Tensor, tau: float = TAU) -> int:
    """columns@tau of one matrix: fewest columns carrying tau of the squared mass."""
    return tau_count((a.double() ** 2).sum(-2).sort(descending=True).values, tau)[0]


def reference_counts(
    attention: torch.Tensor, tau: float = TAU
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, H, T, S) -> rank@tau and columns@tau per sequence and head (float64 tensors), and the
    smallest relative distance of any decision from the threshold."""
    b, h = attention.shape[:2]
    rank = torch.zeros(b, h, dtype=torch.float64)
    columns = torch.zeros(b, h, dtype=torch.float64)
    closest = math.inf
    for i in range(b):
        for j in range(h):
            a = attention[i, j].double()
            rank[i, j], gap_r = tau_count(torch.linalg.svdvals(a) ** 2, tau)
            columns[i, j], gap_c = tau_count((a**2).sum(-2).sort(descending=True).values, tau)
            closest = min(closest, gap_r, gap_c)
    return rank, columns, closest


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file under ``log_dir``: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    for path in files:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return scalars


def no_hooks_left(model: torch.nn.Module) -> bool:
    """No hook, no wrapped forward and no torch function mode left behind."""
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and "forward" not in m.__dict__
        for m in model.modules()
    ) and torch._C._len_torch_function_stack() == 0


def process_state() -> dict:
    """What a probe must leave as it found it: the compiler stance, grad mode, autocast, the
    default dtype, the torch function mode stack and the global module hooks."""
    from torch._dynamo import eval_frame
    from torch.nn.modules import module

    return {
        "stance": dataclasses.replace(eval_frame._stance),
        "eval_frame_callback": torch._C._dynamo.eval_frame.get_eval_frame_callback(),
        "grad": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autocast": (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")),
        "default_dtype": torch.get_default_dtype(),
        "function_modes": torch._C._len_torch_function_stack(),
        "global_hooks": bool(module._has_any_global_hook()),
    }


def hooks_on(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` that carry a hook or an instance forward."""
    return [
        name for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
    ]


def assert_logged(scalars: dict, want: dict, step: int, layers: int, tol: float) -> float:
    """Every logged rank/columns figure (max, mean, min over heads and per head) of each layer at
    ``step`` equals the reference ``want[layer][metric]`` (per-head values); returns the worst
    absolute difference."""
    worst = 0.0
    for layer in range(layers):
        tag = f"L{layer:02d}"
        for metric, prefix in (("rank", "rank90"), ("columns", "columns90")):
            values = want[layer][metric]
            pairs = [(f"{prefix}/{how}/{tag}", float(getattr(values, how)()))
                     for how in ("max", "mean", "min")]
            pairs += [(f"{prefix}/head/{tag}/H{h:02d}", float(values[h]))
                      for h in range(len(values))]
            for name, value in pairs:
                got = scalars[name][step]
                worst = max(worst, abs(got - value))
                assert abs(got - value) <= tol, (name, step, got, value)
    return worst


@torch.no_grad()
def mean_next_token_loss(model: torch.nn.Module, tokens: torch.Tensor) -> float:
    """Mean cross-entropy (nats) of a Hugging Face causal LM predicting ``tokens[:, 1:]`` from
    ``tokens[:, :-1]``: tells a correctly loaded model (low loss on its own samples) apart."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (batch, length >= 2), got {tuple(tokens.shape)}")
    logits = model(input_ids=tokens[:, :-1].long(), use_cache=False).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1).long())
    return float(loss)
