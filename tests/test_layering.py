"""Data flows one way through the package: no module imports from a layer above its own.

Every module under attn_probe/ is parsed (nothing is imported) and every ``from .x import``,
``from attn_probe.x import`` and ``import attn_probe.x`` is collected, also inside functions and
``TYPE_CHECKING`` blocks. The layers below are the package's data flow as it stands, lowest first:
option checks and compatibility shims at the bottom; the data model (snapshot) that aggregation
and outputs share; model -> attention -> metrics (of the matrix, and of the whole sequence) ->
aggregate -> alerts and outputs; probe and protocol
drive those stages; integrations on the probe; models, used by the command line only; the
command line; the package's own namespace. Modules of one layer may import each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from reference import REPO

PACKAGE = REPO / "attn_probe"

#: Lowest first. A name is a module or a subpackage (with everything in it).
LAYERS = [
    ["options", "_compat"],
    ["snapshot"],
    ["attention"],
    ["metrics", "full_context"],
    ["aggregate"],
    ["alerts", "outputs"],
    ["probe", "protocol"],
    ["integrations"],
    ["models"],
    ["cli"],
    ["__init__"],
]


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
    sample = PACKAGE / "outputs" / "tensorboard.py"
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
