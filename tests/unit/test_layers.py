"""orchestrator/'s packages import one way, read from the code itself (ast, nothing imported).

Layers, bottom first: core, config, data, tracking, evaluation, training, driver, cli. A module
may import its own package and the layers below it, never one above, whether at the top of the
file, in a function body or under ``TYPE_CHECKING``; imports form no cycle, lazy ones included; no
module imports another module's ``_private`` name; every package says what it owns and lists
its public names in ``__all__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2] / "orchestrator"
LAYERS = ["core", "config", "data", "tracking", "evaluation", "training", "driver", "cli"]


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package tree at ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> list[tuple[str, str, bool, int]]:
    """(target module, imported name or "", at module level, line) for each import of the project."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, str, bool, int]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, "", top, child.lineno) for a in child.names if a.name.startswith("orchestrator"))
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("orchestrator"):
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    target, name = (sub, "") if sub in known else (child.module, a.name)
                    found.append((target, name, top, child.lineno))
            is_type_checking = isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            body = isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) or is_type_checking
            visit(child, top and not body)

    visit(tree, True)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def problems(root: Path = ROOT) -> list[str]:
    known = modules(root)
    out = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        here = layer(name)
        for target, imported, _top, line in imports(path, known):
            where = f"{path.relative_to(root.parent)}:{line}"
            there = layer(target)
            if here is not None and there is not None and there > here:
                out.append(f"{where}: {name} ({LAYERS[here]}) imports {target} ({LAYERS[there]}), a higher layer")
            if imported.startswith("_") and target != name:
                out.append(f"{where}: {name} imports {target}'s private name {imported}")
            if target in known and target != name:  # lazy and TYPE_CHECKING imports included
                graph[name].add(target)
    out += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of more than one module (or a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return groups


def test_imports_go_one_way_without_cycles_or_private_names():
    assert problems() == []


def test_nothing_but_the_entry_points_at_the_top_and_every_package_declares_itself():
    top = sorted(p.name for p in ROOT.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], top
    for package in sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith("__")):
        init = package / "__init__.py"
        assert init.is_file(), package
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init}: say what the package owns and what it may import"
        assert "May import" in ast.get_docstring(tree) or package.name == "cli", init
        names = [n for n in tree.body if isinstance(n, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)]  # fmt: skip
        assert names, f"{init}: no __all__"


def test_the_checks_catch_an_upward_import_a_cycle_and_a_private_name(tmp_path):
    root = tmp_path / "orchestrator"
    for pkg, text in {
        "core": "from orchestrator.driver import launch\n",  # upward
        "driver": "from orchestrator.core.storage import _secret\n",  # private
    }.items():
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
        (root / pkg / "storage.py" if pkg == "core" else root / pkg / "launch.py").write_text(text)
    (root / "__init__.py").write_text("")
    (root / "data").mkdir()
    (root / "data" / "__init__.py").write_text("")
    (root / "data" / "a.py").write_text("from orchestrator.data import b\n")
    (root / "data" / "b.py").write_text("def f():\n    pass\nfrom orchestrator.data import a\n")
    found = "\n".join(problems(root))
    assert "orchestrator.core.storage (core) imports orchestrator.driver.launch (driver), a higher layer" in found
    assert "private name _secret" in found
    assert "import cycle: orchestrator.data.a -> orchestrator.data.b -> orchestrator.data.a" in found


def test_the_model_library_imports_nothing_of_the_orchestrator():
    flowpp = ROOT.parent / "flowpp"
    found = [f"{p.relative_to(ROOT.parent)}:{line}" for p in sorted(flowpp.rglob("*.py"))
             for target, _, _, line in imports(p, {}) if target.startswith("orchestrator")]  # fmt: skip
    assert found == []


def lazy_without_reason(root: Path = ROOT) -> list[str]:
    """Imports of the project (flowpp, orchestrator) in a function body with no ``# lazy: why``
    comment on their line or the line above."""
    out = []
    for path in sorted(root.rglob("*.py")):
        lines = path.read_text().splitlines()
        for fn in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                mod = node.module if isinstance(node, ast.ImportFrom) else None
                if isinstance(node, ast.Import):
                    mod = node.names[0].name
                if mod and mod.split(".")[0] in ("flowpp", "orchestrator"):
                    near = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
                    if "# lazy" not in near:
                        out.append(f"{path.relative_to(root.parent)}:{node.lineno}: {mod}")
    return sorted(set(out))


def test_an_import_left_in_a_function_body_says_why_it_is_lazy(tmp_path):
    assert lazy_without_reason() == []
    (tmp_path / "orchestrator").mkdir()
    (tmp_path / "orchestrator" / "m.py").write_text("def f():\n    from orchestrator.core import storage\n")
    assert lazy_without_reason(tmp_path / "orchestrator") == ["orchestrator/m.py:2: orchestrator.core"]
