"""The layering the README's "Layout" promises, read off the import graph (every import, lazy ones included).

Data and imports flow one way: a module imports only from its own layer or the layers below it, no command
imports another command, and there are no cycles.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "streamconv"

# Lowest first. The top-level modules errors, units, dtypes and crashpoints are the base every layer uses.
LAYERS = [
    {"streamconv", "errors", "units", "dtypes", "crashpoints"},
    {"files"},  # exact reads and writes, CRC-32, the page cache, atomic commits
    {"formats"},  # byte codecs and file names: torch_save, dcp pickles, .distcp framing, safetensors headers
    {"models"},  # ModelSpec, config parsing, the rules table
    {"plan"},  # chunks and their recipes (pure)
    {"engine"},  # contracts, runner, direct and buffered paths, stages
    {"runtime"},  # resume journal, output lock, dist, progress, report
    {"sources", "sinks"},
    {"inputs", "reference"},
    {"commands"},
    {"cli", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, text: str, is_package: bool = False) -> set[str]:
    """The streamconv modules ``name`` (source ``text``) imports (a package when the import names one)."""
    out = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "streamconv")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] != "streamconv":
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.add(full if full in MODULES else base)
    out.discard(name)
    return out


GRAPH = {name: _imports(name, path.read_text(), path.name == "__init__.py") for name, path in MODULES.items()}


def _layer(module: str) -> int:
    parts = module.split(".")
    return RANK[parts[1] if len(parts) > 1 else "streamconv"]


def test_every_module_has_a_layer():
    assert {m for m in MODULES if (m.split(".") + [""])[1] not in RANK and m != "streamconv"} == set()


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_runs_up_the_layering(module):
    up = sorted(d for d in GRAPH[module] if d in MODULES and _layer(d) > _layer(module))
    assert up == [], f"{module} (layer {_layer(module)}) imports from a layer above it: {up}"


def test_no_command_imports_another_command():
    found = sorted((m, d) for m, deps in GRAPH.items() if m.startswith("streamconv.commands.")
                   for d in deps if d.startswith("streamconv.commands."))
    assert found == []


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d not in MODULES:
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_the_checker_sees_a_violation():
    """The graph reader finds lazy (function-level) and relative imports, so the tests above can fail."""
    text = "def f():\n    from streamconv.engine import runner\n    from ..commands import hf2mcore\n"
    deps = _imports("streamconv.plan.probe", text)
    assert deps == {"streamconv.engine.runner", "streamconv.commands.hf2mcore"}
    assert all(_layer(d) > _layer("streamconv.plan.probe") for d in deps)
