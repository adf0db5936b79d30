"""The documentation site: ``mkdocs build --strict`` passes offline, and its API reference holds
every public name.

The build is the real one (mkdocs-material, mkdocstrings-python, the repository's
``mkdocs.yml``) into a temporary directory: a broken link between pages, a page missing from
the navigation or a docstring the reference cannot parse is a warning, and ``--strict`` turns
it into a failed build. The pages' Python code is compiled (the README's is executed, in
``test_snippets.py``), and the adapter of ``docs/adapters.md`` is registered as written and
checked against the module's own attention.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from extras_rule import extra
from torch import nn

import attn_probe

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    extra("mkdocs")
    extra("material", reason="the docs theme is mkdocs-material")
    extra("mkdocstrings_handlers.python", reason="the API reference needs mkdocstrings-python")
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}\n{done.stderr}"
    return out


def reference_html(site: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((site / "reference").rglob("*.html")))


@pytest.mark.slow
def test_api_reference_documents_every_public_name(site):
    html = reference_html(site)
    documented = set(re.findall(r'id="attn_probe\.([A-Za-z_]\w*)"', html))
    missing = sorted(set(attn_probe.__all__) - documented)
    assert not missing, f"public names without an entry in docs/reference/: {missing}"
    # The callbacks are public too, from their own modules.
    for module in ("huggingface", "lightning"):
        assert f'id="attn_probe.integrations.{module}.AttentionProbeCallback"' in html
    # Each entry is rendered from its docstring: the probe's arguments are listed, with text.
    probe = (site / "reference" / "probe" / "index.html").read_text()
    for argument in ("every", "capture", "alerts", "outputs", "log_dir", "on_alert", "history"):
        assert re.search(rf"<code>{argument}</code>", probe), argument


@pytest.mark.slow
def test_site_reads_offline_and_sphinx_roles_do_not_show(site):
    pages = sorted(site.rglob("*.html"))
    assert {p.relative_to(site).as_posix() for p in pages} >= {
        "index.html", "guide/index.html", "install/index.html", "reference/index.html"}
    for page in pages:
        html = page.read_text()
        # Stylesheets, scripts and fonts come from the site itself: it reads without network.
        remote = re.findall(r'<(?:link|script)[^>]+(?:href|src)="(https?:[^"]+)"', html)
        assert not remote, (page, remote)
        # The docstrings' :class:`~x.Y` roles are rendered as code, not as ":class:" text.
        assert not re.search(r":(class|meth|func|mod|attr|data|exc|obj):<code>", html), page


def test_every_python_block_of_the_pages_compiles():
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    blocks = 0
    for page in pages:
        for code in re.findall(r"^```python\n(.*?)^```", page.read_text(), re.M | re.S):
            blocks += 1
            try:
                ast.parse(code)
            except SyntaxError as error:
                raise AssertionError(f"{page.relative_to(ROOT)}: {error}\n{code}") from None
    assert blocks >= 10



class MyAttention(nn.Module):
    """What the adapters page's snippet expects of ``MyAttention``: ``wq``, ``wk`` and
    ``n_heads``, and a hand-written causal softmax that no kernel interception sees."""

    def __init__(self, dim: int = 16, n_heads: int = 2):
        super().__init__()
        self.n_heads = n_heads
        self.wq, self.wk, self.wv = (nn.Linear(dim, dim) for _ in range(3))

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, T) attention, computed in float64 from the module's weights."""
        b, t, _ = x.shape
        heads = [w.double()(x.double()).view(b, t, self.n_heads, -1).transpose(1, 2)
                 for w in (self.wq, self.wk)]
        scores = heads[0] @ heads[1].transpose(-1, -2) / heads[0].size(-1) ** 0.5
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        return scores.masked_fill(~causal, float("-inf")).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        v = self.wv(x).view(b, t, self.n_heads, -1).transpose(1, 2)
        return (self.weights(x).float() @ v).transpose(1, 2).reshape(b, t, c)


def test_adapter_page_snippet_measures_the_modules_attention():
    page = (DOCS / "adapters.md").read_text()
    code = next(c for c in re.findall(r"^```python\n(.*?)^```", page, re.M | re.S)
                if "register_adapter" in c)
    namespace = {"MyAttention": MyAttention}
    exec(compile(code, "docs/adapters.md", "exec"), namespace)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(MyAttention(), MyAttention())
        x = torch.randn(3, 7, 16)
        with attn_probe.capture(model) as cap:
            model(x)
        assert cap.modules == ["0", "1"]  # found by discovery once registered
        want = [model[0].weights(x), model[1].weights(model[0](x))]
        for name, reference in zip(cap.modules, want):
            torch.testing.assert_close(cap.attention[name].double(), reference,
                                       atol=1e-6, rtol=0)
    finally:
        namespace["handle"].remove()
