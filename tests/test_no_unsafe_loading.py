"""Nothing streamconv reads can run code: an audit of the package source (AST, not grep) for every way
Python deserialises executable content. Allowed: ``torch.load(..., weights_only=True)``, ``yaml.safe_load``,
and ``pickle.Unpickler`` subclasses that override ``find_class`` (allow-lists); ``pickle.dumps`` writes."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for d in ("streamconv", "tools", "bench") for p in (ROOT / d).rglob("*.py"))

FORBIDDEN_CALLS = {
    "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "cPickle.loads",
    "marshal.load", "marshal.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all",
    "yaml.unsafe_load_all", "yaml.full_load_all", "shelve.open", "eval", "exec", "compile",
    "numpy.load", "np.load", "torch.jit.load", "jsonpickle.decode", "dill.load", "dill.loads",
    "cloudpickle.load", "cloudpickle.loads", "joblib.load",
}
FORBIDDEN_IMPORTS = {"dill", "cloudpickle", "jsonpickle", "joblib", "shelve", "marshal"}
FORBIDDEN_FROM = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("yaml", "load"),
                  ("yaml", "unsafe_load"), ("yaml", "full_load"), ("yaml", "Loader"), ("yaml", "UnsafeLoader")}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def problems(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    where = lambda n: f"{path.relative_to(ROOT)}:{n.lineno}"  # noqa: E731
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in FORBIDDEN_CALLS:
                found.append(f"{where(node)}: {name}(...)")
            if name == "torch.load":
                wo = [k for k in node.keywords if k.arg == "weights_only"]
                if not wo or not (isinstance(wo[0].value, ast.Constant) and wo[0].value.value is True):
                    found.append(f"{where(node)}: torch.load without weights_only=True")
            for k in node.keywords:
                if k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False):
                    found.append(f"{where(node)}: {name}(allow_pickle=...)")
                if k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is True:
                    found.append(f"{where(node)}: {name}(trust_remote_code=True)")
        elif isinstance(node, ast.Import):
            found += [f"{where(node)}: import {a.name}" for a in node.names if a.name.split(".")[0] in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.ImportFrom):
            found += [f"{where(node)}: from {node.module} import {a.name}" for a in node.names
                      if (node.module, a.name) in FORBIDDEN_FROM or (node.module or "").split(".")[0] in FORBIDDEN_IMPORTS]
        elif isinstance(node, ast.ClassDef) and any(dotted(b).endswith("Unpickler") for b in node.bases):
            methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef)}
            if "find_class" not in methods:
                found.append(f"{where(node)}: Unpickler subclass {node.name} without its own find_class allow-list")
    return found


def test_sources_found():
    assert len(SOURCES) > 10 and ROOT / "streamconv" / "cli.py" in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_deserialisation(path):
    assert problems(path) == []


def test_the_audit_catches_what_it_looks_for(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle, torch, yaml\nfrom pickle import loads\npickle.loads(b'')\n"
                   "torch.load('x')\ntorch.load('x', weights_only=False)\nyaml.load('a')\n"
                   "class U(pickle.Unpickler):\n    pass\nf(trust_remote_code=True)\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    found = problems(bad)
    assert len(found) == 7, found
