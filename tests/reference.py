"""The tests' one independent reference, and the helpers that read results back.

* the float64 reference count of the notebook, one matrix at a time: singular values with
  ``torch.linalg.svdvals`` (or sorted squared column masses), cumulative sum,
  ``k = searchsorted(cumsum, tau * total) + 1`` (:func:`tau_count` and the functions on it);
* the float64 attention of the demo-style GPT (``attn_probe.models.gpt.GPT``), rebuilt from each
  block's own ``c_attn`` weights in forward pre-hooks (:class:`GPTAttention`);
* the one reader of TensorBoard event files (:func:`read_scalars` and friends).

Nothing here imports attn_probe: models are passed in, and every figure is computed from
scratch, so the tests compare the package with something it did not produce.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

TAU = 0.9

#: The repository root (the checkout under test).
REPO = Path(__file__).resolve().parents[1]

#: The trained llama2.c model the project keeps for its tests (licence and provenance in
#: ``tests/data/README.md``).
FIXTURE = Path(__file__).resolve().parent / "data" / "stories260K.bin"


def repo_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must import this checkout's attn_probe (not an
    installed copy): the repository root first on ``PYTHONPATH``."""
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


# --------------------------------------------------------------------------- reference count


def tau_count(energies: torch.Tensor, tau: float = TAU) -> tuple[int, float]:
    """Smallest k whose descending ``energies`` prefix reaches tau of the total
    (``searchsorted(cumsum, tau * total) + 1``), and how far (relative to the total) that
    decision is from the threshold."""
    c = energies.detach().double().cumsum(0)
    if not c[-1] > 0:
        raise ValueError("the reference count needs a positive total energy")
    threshold = tau * c[-1]
    k = int(torch.searchsorted(c, threshold)) + 1
    gap = float((c[k - 1] - threshold).abs())
    if k >= 2:
        gap = min(gap, float((threshold - c[k - 2]).abs()))
    return k, gap / float(c[-1])


def singular_energies(a: torch.Tensor) -> torch.Tensor:
    """Squared singular values of one matrix, float64, descending."""
    return torch.linalg.svdvals(a.detach().double()) ** 2


def column_masses(a: torch.Tensor) -> torch.Tensor:
    """Squared column masses of one matrix, float64, descending."""
    return (a.detach().double() ** 2).sum(-2).sort(descending=True).values


def reference_rank(a: torch.Tensor, tau: float = TAU) -> int:
    """rank@tau of one matrix: fewest singular values carrying tau of the energy."""
    return tau_count(singular_energies(a), tau)[0]


def reference_columns(a: torch.Tensor, tau: float = TAU) -> int:
    """columns@tau of one matrix: fewest columns carrying tau of the squared mass."""
    return tau_count(column_masses(a), tau)[0]


def reference_counts(
    attention: torch.Tensor, tau: float = TAU
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(..., T, S) -> rank@tau and columns@tau of every matrix (float64 tensors of the batch
    shape ``attention.shape[:-2]``), and the smallest relative distance of any decision from
    the threshold."""
    batch = attention.shape[:-2]
    flat = attention.reshape(-1, *attention.shape[-2:])
    rank = torch.zeros(len(flat), dtype=torch.float64)
    columns = torch.zeros(len(flat), dtype=torch.float64)
    closest = math.inf
    for i, a in enumerate(flat):
        rank[i], gap_r = tau_count(singular_energies(a), tau)
        columns[i], gap_c = tau_count(column_masses(a), tau)
        closest = min(closest, gap_r, gap_c)
    return rank.reshape(batch), columns.reshape(batch), closest


def reference_entropy_sink(a: torch.Tensor) -> tuple[float, float]:
    """Mean row entropy (nats, ``0 log 0 = 0``) and mean attention to key 0 of one matrix, over
    the rows that hold a distribution (positive sum); (0, 0) when no row does."""
    a = a.detach().double()
    entropies, sinks = [], []
    for row in a:
        if row.sum() > 0:
            p = row[row > 0]
            entropies.append(float(-(p * p.log()).sum()))
            sinks.append(float(row[0]))
    if not entropies:
        return 0.0, 0.0
    return sum(entropies) / len(entropies), sum(sinks) / len(sinks)


def reference_layer_means(
    attentions: Sequence[torch.Tensor], tau: float = TAU
) -> tuple[list[dict[str, torch.Tensor]], float]:
    """For each layer's (B, H, T, S) attention: per-head means over the B sequences of the
    reference rank@tau and columns@tau (``{"rank", "columns"}``, (H,) float64), and the closest
    distance of any decision from its threshold."""
    out, closest = [], math.inf
    for attention in attentions:
        rank, columns, gap = reference_counts(attention, tau)
        closest = min(closest, gap)
        out.append({"rank": rank.mean(0), "columns": columns.mean(0)})
    return out, closest


# ------------------------------------------------------------------------ flex_attention


def flex_scores(q: torch.Tensor, k: torch.Tensor, *, scale: float, modify=None,
                allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The float64 scores (B, H, L, S) the softmax of a ``flex_attention`` call sees, written
    out: ``q·kᵀ·scale`` (query head h reads key head ``h // (H // H_kv)``), then
    ``modify(scores, b, h, q_idx, kv_idx)`` on broadcast index grids, then ``-inf`` where
    ``allowed`` (broadcastable to (B, H, L, S), bool) is False."""
    q, k = q.detach().double(), k.detach().double()
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = q @ k.mT * scale
    if modify is not None:
        b, h, length, keys = scores.shape
        scores = modify(scores, torch.arange(b).view(-1, 1, 1, 1),
                        torch.arange(h).view(1, -1, 1, 1), torch.arange(length).view(1, 1, -1, 1),
                        torch.arange(keys).view(1, 1, 1, -1)).double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, -math.inf)
    return scores


def score_figures(scores: torch.Tensor, tau: float = TAU) -> dict[str, torch.Tensor]:
    """Per (sequence, head) figures of float64 scores (B, H, L, S) with ``-inf`` at the keys a
    query may not see, over the rows that see some key: mean entropy, mean attention on key 0,
    largest score, largest (top − mean allowed score) of a row, the columns holding ``tau`` of
    the squared column mass, and the rows measured."""
    out: dict[str, list] = {n: [] for n in ("entropy", "sink", "max_logit", "logit_spread",
                                            "columns", "tokens")}
    for per_sequence in scores.double():
        for s in per_sequence:
            rows = torch.isfinite(s).any(dim=-1)
            s = s[rows]
            a = torch.softmax(s, dim=-1)
            finite = torch.isfinite(s)
            mean = torch.where(finite, s, 0.0).sum(dim=-1) / finite.sum(dim=-1)
            out["entropy"].append(float(-torch.xlogy(a, a).sum(dim=-1).mean()))
            out["sink"].append(float(a[:, 0].mean()))
            out["max_logit"].append(float(s.max()))
            out["logit_spread"].append(float((s.amax(dim=-1) - mean).max()))
            out["columns"].append(tau_count(column_masses(a), tau)[0])
            out["tokens"].append(int(rows.sum()))
    b, h = scores.shape[:2]
    return {name: torch.tensor(values, dtype=torch.int64 if name in ("columns", "tokens")
                               else torch.float64).view(b, h) for name, values in out.items()}


# ------------------------------------------------------------------------ GPT attention


def causal_attention(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(d)) with a causal mask, in float64: (..., T, D) -> (..., T, T)."""
    q, k = q.detach().double(), k.detach().double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, -math.inf).softmax(-1)


class GPTAttention:
    """Float64 attention of every block of a demo-style GPT (``model.transformer.h[i].attn``
    with a ``c_attn`` Linear producing q, k, v and ``n_head`` heads; causal).

    A forward pre-hook on each block's ``attn`` takes the input the module is given and its own
    ``c_attn`` weights, and computes A with an explicit masked softmax in float64 (independent of
    attn_probe's capture code). :attr:`calls` holds one entry per forward pass of the model (a
    pass starts at block 0): layer index -> (B, H, T, T). ``batch_rows`` / ``crop``
    keep the first sequences and tokens, as the probe does. Use as a context manager, or call
    :meth:`remove`.
    """

    def __init__(self, model: torch.nn.Module, batch_rows: int | None = None,
                 crop: int | None = None):
        self.calls: list[dict[int, torch.Tensor]] = []
        self._current: dict[int, torch.Tensor] | None = None
        self.handles = [
            block.attn.register_forward_pre_hook(self._hook(i, batch_rows, crop))
            for i, block in enumerate(model.transformer.h)
        ]

    def _hook(self, index: int, n: int | None, t: int | None):
        def hook(module, args):
            x = args[0][:n, :t].detach().double()
            b, length, c = x.shape
            heads = module.n_head
            w = module.c_attn.weight.detach().double()
            bias = module.c_attn.bias
            if bias is None:
                bias = torch.zeros(3 * c, dtype=torch.float64)
            bias = bias.detach().double()
            shape = (b, length, heads, c // heads)
            q = (x @ w[:c].T + bias[:c]).view(shape).transpose(1, 2)  # c_attn makes q, k, v
            k = (x @ w[c:2 * c].T + bias[c:2 * c]).view(shape).transpose(1, 2)
            a = causal_attention(q, k)
            if index == 0:
                self._current = {}
                self.calls.append(self._current)
            self._current[index] = a
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def __enter__(self) -> "GPTAttention":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def gpt_attention(model: torch.nn.Module, tokens: torch.Tensor, batch_rows: int | None = None,
                  crop: int | None = None) -> list[torch.Tensor]:
    """Each block's float64 (B, H, T, T) attention in one forward pass of ``model`` on
    ``tokens`` (see :class:`GPTAttention`)."""
    with GPTAttention(model, batch_rows, crop) as ref, torch.no_grad():
        model(tokens)
    (call,) = ref.calls
    return [call[i] for i in range(len(call))]


# --------------------------------------------------------------------------- event files


def _event_files(log_dir: Path) -> list[Path]:
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    return files


def _accumulators(log_dir: Path, kind: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for path in _event_files(log_dir):
        acc = EventAccumulator(str(path), size_guidance={kind: 0})
        acc.Reload()
        yield acc


def scalar_events(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of every event file under ``log_dir``: tag -> [(step, value), ...] in the
    order written (a value written twice at one step appears twice)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for acc in _accumulators(log_dir, "scalars"):
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def read_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file under ``log_dir``: tag -> step -> value."""
    return {tag: dict(events) for tag, events in scalar_events(log_dir).items()}


class LoggedImage(NamedTuple):
    step: int
    png: bytes  #: the encoded image
    width: int
    height: int


def read_images(log_dir: Path) -> dict[str, list[LoggedImage]]:
    """Every image of every event file under ``log_dir``: tag -> images in the order written."""
    out: dict[str, list[LoggedImage]] = {}
    for acc in _accumulators(log_dir, "images"):
        for tag in acc.Tags()["images"]:
            out.setdefault(tag, []).extend(
                LoggedImage(e.step, e.encoded_image_string, e.width, e.height)
                for e in acc.Images(tag))
    return out


def read_texts(log_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """Every text summary under ``log_dir``: tag (``alerts/text_summary`` for
    ``add_text("alerts", ...)``) -> [(step, text), ...] in the order written."""
    out: dict[str, list[tuple[int, str]]] = {}
    for event in read_events(log_dir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "text":
                text = b"\n".join(value.tensor.string_val).decode()
                out.setdefault(value.tag, []).append((event.step, text))
    return out


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` as header -> cell (``\\|`` in a cell is
    a ``|``, ``\\\\`` a backslash)."""
    def cells(line: str) -> list[str]:
        out, cell, chars = [], "", iter(line.strip()[1:-1])
        for char in chars:
            if char == "\\":
                cell += next(chars, "")
            elif char == "|":
                out.append(cell.strip())
                cell = ""
            else:
                cell += char
        return out + [cell.strip()]

    lines = [line for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return []
    header = cells(lines[0])
    return [dict(zip(header, cells(line))) for line in lines[2:]]


def logged_alerts(log_dir: Path) -> list[dict[str, str]]:
    """Every row of the alert tables written under ``log_dir`` (the text tag ``alerts``)."""
    return [row for _, text in read_texts(log_dir).get("alerts/text_summary", [])
            for row in markdown_rows(text)]


def assert_alert_logged(log_dir: Path, alert) -> None:
    """``alert`` is in the event files: one row of the alert table at its step with its kind,
    layer, heads and value, and the count of its kind goes up at its step."""
    heads = ", ".join(map(str, alert.heads))
    rows = [row for row in logged_alerts(log_dir)
            if (row["kind"], row["layer"], int(row["step"]), row["heads"]) == (
                alert.kind, alert.tag, alert.step, heads)]  # sinks: one alert a head
    assert len(rows) == 1, (alert, logged_alerts(log_dir))
    (row,) = rows
    assert row["module"] == alert.layer and row["severity"] == alert.severity
    assert math.isclose(float(row["value"]), alert.value, rel_tol=1e-6)
    assert math.isclose(float(row["threshold"]), alert.threshold, rel_tol=1e-6)
    assert (row["figure"], row["reduction"], row["condition"], int(row["since"])) == (
        alert.figure, alert.reduction, alert.condition, alert.since)
    assert math.isclose(float(row["since_value"]), alert.since_value, rel_tol=1e-6)
    counts = read_scalars(log_dir)[f"alert/{alert.kind}"]
    assert counts[alert.step] > max((v for s, v in counts.items() if s < alert.step), default=0)


class HTMLPage(NamedTuple):
    text: str  #: the text of the page, tags left out
    tables: list[list[list[str]]]  #: every table: its rows, each a list of cell texts
    elements: list[tuple[str, dict[str, str]]]  #: every start tag and its attributes


def read_html(path: Path) -> HTMLPage:
    """A page parsed back with the standard library's ``html.parser``."""
    from html.parser import HTMLParser

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.text, self.tables, self.elements = [], [], []
            self.cell: list[str] | None = None
            self.hidden = False

        def handle_starttag(self, tag, attrs):
            self.elements.append((tag, {k: v or "" for k, v in attrs}))
            self.hidden = tag in ("style", "script")
            if tag == "table":
                self.tables.append([])
            elif tag == "tr" and self.tables:
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = []

        def handle_endtag(self, tag):
            self.hidden = False
            if tag in ("td", "th") and self.cell is not None and self.tables:
                self.tables[-1][-1].append(" ".join("".join(self.cell).split()))
                self.cell = None

        def handle_data(self, data):
            if self.hidden:
                return  # a style sheet or script: not text of the page
            self.text.append(data)
            if self.cell is not None:
                self.cell.append(data)

    parser = Parser()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    parser.close()
    return HTMLPage(" ".join(" ".join(parser.text).split()), parser.tables, parser.elements)


def shown_number(cell: str, value: float) -> bool:
    """Whether a number written in a page (``1,497``, ``0.0192``, ``nan``) is ``value`` as far as
    it shows: to the unit from 100 up, else to three significant digits."""
    shown = float(cell.replace(",", ""))
    if math.isnan(value):
        return math.isnan(shown)
    return abs(shown - value) <= (0.5 if abs(value) >= 100 else 5e-3 * abs(value))


def check_report(page: Path, alerts: Sequence = (), runs: dict | None = None) -> HTMLPage:
    """What every report must be: self-contained (no ``http``, every ``src`` a ``data:`` URI
    of a PNG that decodes, no script, stylesheet link or frame), with each of ``alerts`` (run
    name -> alerts in ``runs``, or the one run's ``alerts``) a row of its alert table giving
    step, layer, kind, heads, severity, the figure and its condition, value, threshold, the
    window's start and cause. Returns the parsed page."""
    import base64
    import io

    from PIL import Image

    html = Path(page).read_text(encoding="utf-8")
    parsed = read_html(page)
    # no address anywhere (base64 may spell "http" by chance: the pictures are left out)
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", html)
    assert "http" not in outside.lower() and "//" not in outside
    assert not [tag for tag, _ in parsed.elements if tag in ("script", "link", "iframe", "object",
                                                           "embed")]
    sources = [attrs["src"] for _, attrs in parsed.elements if "src" in attrs]
    hrefs = [attrs["href"] for _, attrs in parsed.elements if "href" in attrs]
    assert hrefs == [] and sources and html.count("src=") == len(sources)
    for src in sources:
        assert src.startswith("data:image/png;base64,"), src[:40]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as picture:
            picture.load()
            assert picture.format == "PNG" and min(picture.size) > 50
    tables = [t for t in parsed.tables if t and t[0][:3] == ["run", "step", "layer"]]
    rows = [dict(zip(tables[0][0], row)) for row in tables[0][1:]] if tables else []
    wanted = [(name, alert) for name, found in (runs or {"": alerts}).items() for alert in found]
    assert len(rows) == len(wanted), (rows, wanted)
    for name, alert in wanted:
        (row,) = [row for row in rows
                  if (row["step"], row["layer"], row["kind"], row["heads"]) == (
                      str(alert.step), alert.tag, alert.kind, ", ".join(map(str, alert.heads)))
                  and (not name or row["run"] == name)]  # sinks: one alert a head
        assert row["severity"] == alert.severity and row["cause"] == (alert.cause or "—")
        assert shown_number(row["value"], alert.value), (row, alert)
        assert shown_number(row["threshold"], alert.threshold), (row, alert)
        assert row["figure"] == f"{alert.figure} ({alert.reduction})", (row, alert)
        assert row["condition"] == alert.condition, (row, alert)
        if alert.since == alert.step:
            assert row["since"] == "—", (row, alert)
        else:
            shown, _, step = row["since"].partition(" at step ")
            assert int(step) == alert.since and shown_number(shown, alert.since_value), row
    return parsed


def read_events(log_dir: Path) -> Iterator:
    """Every raw ``Event`` record of the event files under ``log_dir``, in file order."""
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.compat.proto import event_pb2

    for path in _event_files(log_dir):
        for record in event_file_loader.RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event()
            event.ParseFromString(record)
            yield event


def read_layouts(log_dir: Path) -> list[tuple[str, object]]:
    """Every custom-scalars layout written under ``log_dir``: (tag, ``layout_pb2.Layout``)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    layouts = []
    for event in read_events(log_dir):
        for value in event.summary.value:
            if value.metadata.plugin_data.plugin_name == "custom_scalars":
                layout = layout_pb2.Layout()
                layout.ParseFromString(value.tensor.string_val[0])
                layouts.append((value.tag, layout))
    return layouts


# ------------------------------------------------------------------------------- helpers


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
        "global_hooks": any(getattr(module, f"_global_{kind}") for kind in GLOBAL_HOOKS),
    }


#: The global module hooks of ``torch.nn.modules.module`` (what its ``_has_any_global_hook``
#: looks at, on the torch versions that have it).
GLOBAL_HOOKS = (
    "backward_pre_hooks", "backward_hooks", "forward_pre_hooks", "forward_hooks",
    "forward_hooks_always_called", "forward_hooks_with_kwargs",
)


def hooks_on(model: torch.nn.Module) -> list[str]:
    """Names of the modules of ``model`` that carry a hook or an instance forward."""
    return [
        name for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__
    ]


def assert_logged(scalars: dict, want: Sequence, step: int, layers: int, tol: float) -> float:
    """Every logged rank/columns figure of each layer at ``step`` (the max over heads, and every
    head's, as ``per_head="all"`` logs them) equals the reference ``want[layer][metric]``
    (per-head values); returns the worst absolute difference."""
    worst = 0.0
    for layer in range(layers):
        tag = f"L{layer:02d}"
        for metric, prefix in (("rank", "rank90"), ("columns", "columns90")):
            values = want[layer][metric]
            pairs = [(f"{prefix}/max/{tag}", float(values.max()))]
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
