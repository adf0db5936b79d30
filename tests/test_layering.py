"""Data flows one way through the package: no module imports from a layer above its own.

Every module under attn_probe/ is parsed (nothing is imported) and every ``from .x import``,
``from attn_probe.x import`` and ``import attn_probe.x`` is collected, also inside functions and
``TYPE_CHECKING`` blocks. The layers below are the package's data flow as it stands, lowest first:
option checks and compatibility shims at the bottom; the data model (snapshot) that aggregation
and outputs share; model -> attention -> metrics (of the matrix, and of the whole sequence) ->
aggregate -> alerts and outputs; probe and protocol
drive those stages; integrations on the probe; models (with the loaders of models and token
ids), used by the front ends only; the two front ends, the command line and the notebook's
explore, which import neither each other nor (the command line) from the package's namespace;
the package's own namespace. Otherwise modules of one layer may import each other.

And ``import attn_probe`` loads neither the command line nor the demo's trainer (checked in a
fresh interpreter).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from reference import REPO, repo_env

PACKAGE = REPO / "attn_probe"

#: Lowest first. A name is a module or a subpackage (with everything in it).
LAYERS = [
    ["options", "notices"],
    ["figures", "snapshot"],
    ["attention"],
    ["metrics"],
    ["aggregate", "parallel"],
    ["alerts", "outputs"],
    ["probe", "protocol"],
    ["integrations"],
    ["models"],
    ["cli", "notebook"],
    ["__init__"],
]


#: Layer-mates that must not import each other: the two front ends stand side by side.
APART = [("cli", "notebook")]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    """The layer of ``attn_probe.x.y``: that of ``x`` (``__init__`` for the package itself)."""
    parts = module.split(".")
    assert parts[0] == "attn_probe", module
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add {top!r} to LAYERS in {__file__}")


def resolve(name: str) -> str:
    """The module a dotted name refers to: ``attn_probe.x.y`` itself when it is a module or a
    package, else the module it is an attribute of."""
    parts = name.split(".")
    while len(parts) > 1:
        path = REPO.joinpath(*parts)
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            break
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported attn_probe module) for every import statement in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names
                      if a.name.split(".")[0] == "attn_probe"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.split(".")[0] == "attn_probe":
                target = node.module
            else:
                continue
            # from .x import y: y may be a module of package x
            found += [(node.lineno, resolve(f"{target}.{a.name}")) for a in node.names]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for path in MODULES:
        layer_of(module_name(path))


def test_the_parser_sees_relative_and_absolute_imports():
    sample = PACKAGE / "outputs" / "tracker.py"
    targets = {target for _, target in imports(sample)}
    assert {"attn_probe.snapshot", "attn_probe.options"} <= targets
    protocol = {target for _, target in imports(PACKAGE / "protocol.py")}
    assert {"attn_probe.aggregate", "attn_probe.attention", "attn_probe.metrics"} <= protocol


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_import_from_a_higher_layer(path):
    module = module_name(path)
    own = layer_of(module)
    upward = [
        f"line {line}: {module} (layer {own}: {LAYERS[own]}) imports {target} "
        f"(layer {layer_of(target)}: {LAYERS[layer_of(target)]})"
        for line, target in imports(path) if layer_of(target) > own
    ]
    assert not upward, "\n".join(upward)


def top_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_the_front_ends_do_not_import_each_other(path):
    module = module_name(path)
    apart = {b for a, b in APART if top_of(module) == a} | \
        {a for a, b in APART if top_of(module) == b}
    crossing = [f"line {line}: {module} imports {target}" for line, target in imports(path)
                if top_of(target) in apart]
    assert not crossing, "\n".join(crossing)


IMPORTED = """
import sys
import attn_probe
loaded = sorted(m for m in sys.modules if m.startswith("attn_probe."))
print("cli:", [m for m in loaded if m.startswith("attn_probe.cli")])
print("demo:", [m for m in loaded if "demo" in m or m in ("attn_probe.models.gpt",
                                                           "attn_probe.models.corpus")])
print("explore:", attn_probe.explore.__module__)
"""


def test_import_attn_probe_loads_neither_the_command_line_nor_the_demo():
    done = subprocess.run([sys.executable, "-c", IMPORTED], capture_output=True, text=True,
                          timeout=240, env=repo_env(), cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["cli: []", "demo: []",
                                        "explore: attn_probe.notebook.view"]


# ------------------------------------------------------------------ small, acyclic, no privates

#: The longest a module may grow before it is split.
MAX_LINES = 600


def module_graph() -> dict[str, set[str]]:
    """Module -> the attn_probe modules it imports (a package's ``__init__`` stands for the
    package), TYPE_CHECKING imports included."""
    return {module_name(path): {target for _, target in imports(path)} - {module_name(path)}
            for path in MODULES}


def test_the_graph_sees_imports_inside_type_checking_blocks():
    graph = module_graph()
    assert "attn_probe.attention.sites" in graph["attn_probe.attention.hooks"]


def test_no_two_modules_import_each_other():
    """Following the imports never leads back to where it started (Tarjan's strongly connected
    components; a package imports its modules, so a package and its own modules are exempt)."""
    graph = module_graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target.startswith(node + "."):
                continue  # a package importing its own modules
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"modules that import each other: {cycles}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{module_name(path)} has {lines} lines (at most {MAX_LINES})"


def private_uses(path: Path) -> list[str]:
    """Private names (``_x``) this module takes from another attn_probe module: imported by
    name, or read as an attribute of an imported module (``hooks._pre``). Attributes of
    objects passed around cannot be told apart by a parser and are not checked."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    imported_modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(
                "attn_probe")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"line {node.lineno}: from {'.' * node.level}"
                                 f"{node.module or ''} import {alias.name}")
                else:
                    imported_modules.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in imported_modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_private_name_crosses_a_module(path):
    assert not private_uses(path), "\n".join(private_uses(path))


def test_private_uses_are_seen(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from .metrics import _margin\nfrom . import hooks\nhooks._pre(1)\n"
                      "self._fine = 1\n")
    assert private_uses(sample) == ["line 1: from .metrics import _margin", "line 3: hooks._pre"]
