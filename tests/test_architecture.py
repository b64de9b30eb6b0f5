"""The package's layers (docs/architecture.md): every import points down, ``formats/`` and ``tools/`` never
branch on an algorithm name, no module uses another's underscore-private names, one name per file job."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import lyco
from lyco.methods.registry import all_methods

SRC = Path(lyco.__file__).parent

# unit → the units it may import (besides itself). Bottom to top; ``lyco`` is the package's public API.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "ops": {"errors"},
    "methods": {"errors", "ops"},
    "formats": {"errors", "ops", "methods"},
    "layer": {"errors", "ops", "methods"},
    "modules_to_save": set(),
    "targeting": {"errors", "ops", "methods"},
    "sharding": {"errors"},
    "tree": {"errors", "ops", "methods", "layer", "modules_to_save", "targeting"},
    "model_io": {"errors", "ops", "methods", "formats", "sharding", "tree"},
    "model": {"errors", "ops", "methods", "formats", "layer", "modules_to_save", "targeting", "sharding", "tree",
              "model_io", "status"},
    "lycoris_files": {"errors", "ops", "methods", "formats", "targeting", "tree", "layer", "model"},
    "lycoris_config": {"errors", "ops", "methods"},
    "network": {"errors", "ops", "methods", "formats", "layer", "lycoris_config", "lycoris_files", "model", "tree"},
    "kohya": {"errors", "ops", "methods", "formats", "lycoris_config", "network"},
    "integrations": {"errors", "ops", "methods", "formats", "sharding", "tree", "model", "model_io"},
    "functional": {"errors", "ops", "methods", "formats", "tree", "model", "model_io"},
    "status": {"errors", "layer", "modules_to_save"},
    "tools": {"errors", "ops", "methods", "formats"},
    "cli_output": {"tools"},
    "cli": {"lyco", "errors", "ops", "formats", "tools", "cli_output", "demo"},
    "demo": {"lyco"},
    "__main__": {"cli"},
    "lyco": {"errors", "functional", "status", "layer", "lycoris_files", "methods", "model", "modules_to_save", "ops",
             "network"},
}


def modules() -> dict[str, Path]:
    """Dotted module name (``lyco.formats.peft``) → file, for every module of the package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def unit(module: str) -> str:
    """The layer a module belongs to: its first component below ``lyco`` (``lyco`` for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "lyco"


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every ``lyco`` module ``module`` imports (module level, functions, ``TYPE_CHECKING`` blocks), with lines."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "lyco"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "lyco":
                found.append((target, node.lineno))
    return found


def test_imports_point_down() -> None:
    mods = modules()
    assert set(map(unit, mods)) <= set(ALLOWED), sorted(set(map(unit, mods)) - set(ALLOWED))
    bad = []
    for name, path in mods.items():
        src = unit(name)
        for target, line in imports(name, path):
            dst = unit(target)
            if dst != src and dst not in ALLOWED[src]:
                bad.append(f"{path.relative_to(SRC)}:{line}: {src} imports {target} ({dst})")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


def test_no_algorithm_name_branches_in_formats_or_tools() -> None:
    """Method knowledge lives in methods/: formats/ and tools/ ask the registry."""
    algos = {m.algo for m in all_methods()}
    bad = []
    for path in [*(SRC / "formats").rglob("*.py"), *(SRC / "tools").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef,
                      ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)}  # fmt: skip
        for node in ast.walk(tree):
            literal = isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            if literal and (node.value in algos or node.value.upper() in {"LOHA", "LOKR"}):
                bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
    assert not bad, "algorithm names in formats/ or tools/:\n" + "\n".join(bad)


def _private_definitions(tree: ast.AST) -> set[str]:
    """Underscore names a module defines: functions, classes, assignments, ``self._x = …`` attributes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return {n for n in names if re.fullmatch(r"_[^_].*", n) and not n.endswith("__")}


def test_no_module_uses_another_modules_private_names() -> None:
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in modules().items()}
    defined = {name: _private_definitions(tree) for name, tree in trees.items()}
    owners: dict[str, set[str]] = defaultdict(set)
    for name, names in defined.items():
        for n in names:
            owners[n].add(name)
    bad = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            used = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                used = node.attr
            elif isinstance(node, ast.ImportFrom):
                bad += [f"{name}:{node.lineno}: imports {a.name}" for a in node.names if re.fullmatch(r"_[^_].*", a.name)]
            if used in owners and name not in owners[used]:
                bad.append(f"{name}:{node.lineno}: uses {used} of {sorted(owners[used])}")
    assert not bad, "underscore-private names used outside their module:\n" + "\n".join(bad)


def test_one_name_per_file_job() -> None:
    """No two modules share a file name (no ``convert.py`` ×2, no ``base.py`` meaning two things)."""
    names = defaultdict(list)
    for path in SRC.rglob("*.py"):
        if path.name not in ("__init__.py", "__main__.py"):
            names[path.name].append(str(path.relative_to(SRC)))
    assert not {k: v for k, v in names.items() if len(v) > 1}
