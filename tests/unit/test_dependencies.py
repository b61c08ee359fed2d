"""Every third-party module that flowpp/ and orchestrator/ import is declared in pyproject.toml.

The imports are read with ``ast`` (``import x``, ``from x.y import z``, and the names handed to
``importlib.import_module`` / ``importlib.util.find_spec``), each is mapped to the distributions
that ship it through ``importlib.metadata``, and one of those must be a core dependency, or, for
the few modules that only optional code paths reach, the extra named in ``OPTIONAL``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from functools import cache
from importlib import metadata
from pathlib import Path

import pytest

from orchestrator.core.errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OWN_PACKAGES = ("flowpp", "orchestrator")

# Modules that only an optional code path imports, and the extra that declares their distribution.
OPTIONAL = {
    # `flowpp prepare demo` only (orchestrator/data/sources.py finds it with find_spec and, when it
    # is missing, says `pip install 'flowpp-orchestrator[demo]'`)
    "skimage": "demo",
    # a sqlite:/// MLflow store only (orchestrator/tracking/connection.py finds them with find_spec and, when
    # they are missing, says `pip install 'flowpp-orchestrator[server]'`)
    "sqlalchemy": "server",
    "alembic": "server",
}


def normalize(name: str) -> str:
    """A distribution name as PEP 503 compares them: ``PyYAML`` and ``pyyaml``, ``a_b`` and ``a-b``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"[A-Za-z0-9._-]+", requirement.strip()).group(0))


def project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def declared() -> dict[str, set[str]]:
    """{"core": names, extra: names} of the distributions pyproject declares."""
    spec = project()
    groups = {"core": {requirement_name(r) for r in spec["dependencies"]}}
    for extra, requirements in spec.get("optional-dependencies", {}).items():
        groups[extra] = {requirement_name(r) for r in requirements}
    return groups


def imported_modules(source: str) -> set[str]:
    """Dotted names of the absolute imports in one file, with the literal names given to
    ``import_module`` and ``find_spec``."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "find_spec") and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def third_party(names: set[str]) -> set[str]:
    def top(name: str) -> str:
        return name.partition(".")[0]

    return {n for n in names if top(n) not in sys.stdlib_module_names and top(n) not in OWN_PACKAGES + ("__future__",)}


@cache
def _shipped_by() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions(module: str) -> set[str]:
    """The installed distributions that ship ``module``'s top-level package."""
    return {normalize(d) for d in _shipped_by().get(module.partition(".")[0], ())}


def undeclared(sources: dict[str, str]) -> list[str]:
    """One line per imported third-party module that no allowed distribution declares."""
    groups = declared()
    problems = []
    for path, source in sorted(sources.items()):
        for module in sorted(third_party(imported_modules(source))):
            allowed = groups["core"] | groups.get(OPTIONAL.get(module.partition(".")[0], "core"), set())
            shipped_by = distributions(module)
            if not shipped_by:
                problems.append(f"{path}: {module} is not installed, so no distribution can be named for it")
            elif not shipped_by & allowed:
                problems.append(f"{path}: {module} comes from {sorted(shipped_by)}, which pyproject does not declare")
    return problems


def package_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for pkg in OWN_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def test_every_imported_module_is_declared():
    sources = package_sources()
    assert len(sources) > 20
    assert undeclared(sources) == []


def test_an_undeclared_import_is_caught():
    source = "import numpy\nimport pandas\nfrom yaml import safe_load\nfrom sklearn.linear_model import Ridge\n"
    problems = undeclared({"orchestrator/new.py": source})
    assert [p.split(":")[1].split()[0] for p in problems] == ["pandas", "sklearn.linear_model"]
    # an extra counts only for the modules OPTIONAL names: moto is in `test`, skimage in `demo`
    assert undeclared({"orchestrator/x.py": "import skimage\n"}) == []
    assert len(undeclared({"orchestrator/x.py": "import moto\n"})) == 1


def test_the_scan_sees_every_kind_of_import():
    source = (
        "import os, torch.nn as nn\nfrom . import sibling\nfrom PIL import Image\n"
        "def f():\n    import importlib.util\n    return importlib.util.find_spec('skimage')\n"
    )
    assert third_party(imported_modules(source)) == {"torch.nn", "PIL", "skimage"}


def test_core_is_lean_and_the_extras_hold_the_rest():
    groups = declared()
    core = groups["core"]
    assert {"mlflow-skinny", "psutil", "nvidia-ml-py", "aiobotocore", "pyarrow"} <= core
    assert not {"mlflow", "scikit-image", "boto3", "moto", "pytest"} & core
    assert "mlflow" in groups["server"] and "scikit-image" in groups["demo"]
    assert "flowpp-orchestrator[server,demo]" in project()["optional-dependencies"]["test"]
    assert {"pytest", "moto", "boto3"} <= groups["test"]


def test_the_demo_source_names_its_extra_when_scikit_image_is_missing(monkeypatch):
    from orchestrator.data.sources import _demo_dir

    assert (_demo_dir() / "astronaut.png").exists()
    monkeypatch.setitem(sys.modules, "skimage", None)  # what the import system reads as "not installed"
    with pytest.raises(UserError, match=re.escape("pip install 'flowpp-orchestrator[demo]'")):
        _demo_dir()


def test_a_sqlite_store_without_the_server_extra_names_it(monkeypatch, tmp_path):
    """mlflow-skinny (the core) has no local store: a sqlite:/// tracking URI needs [server]."""
    import mlflow.tracking._model_registry.utils  # noqa: F401 - it registers the sqlite scheme once, at import

    from orchestrator import tracking

    # imported first: hidden while MLflow's registry loads, sqlite would stay unknown to later tests
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)  # as on a core-only install (find_spec: None)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(UserError, match=re.escape("pip install 'flowpp-orchestrator[server]'")) as caught:
        tracking.mlflow_for(uri)
    assert uri in str(caught.value)
    assert not (tmp_path / "mlflow.db").exists()


def test_an_editable_install_is_a_plain_path_entry_without_setuptools_warning(tmp_path):
    """``pip install -e .`` builds this editable wheel (PEP 660, no network: the venv's setuptools).
    Found by name under an explicit root, the packages make setuptools' simple layout, a .pth line;
    otherwise setuptools installs an import hook and warns about "folders in your working directory
    with the same name as your package"."""
    script = (
        "import sys, zipfile, pathlib\nfrom setuptools import build_meta\n"
        "out = sys.argv[1]  # build_meta rewrites sys.argv\n"
        "name = build_meta.build_editable(out)\n"
        "with zipfile.ZipFile(pathlib.Path(out, name)) as z:\n"
        "    for n in z.namelist():\n"
        "        if not n.endswith(('METADATA', 'RECORD', 'WHEEL', 'entry_points.txt', 'top_level.txt')):\n"
        "            print('FILE', n, z.read(n).decode().strip() if n.endswith('.pth') else '')\n"
    )
    out = subprocess.run([sys.executable, "-W", "always", "-c", script, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    files = [line.split(" ", 2)[1:] for line in out.stdout.splitlines() if line.startswith("FILE ")]
    assert len(files) == 1 and files[0][0].endswith(".pth"), files  # no __editable__ finder module
    assert Path(files[0][1]).resolve() == ROOT.resolve()
    assert "same name" not in out.stdout + out.stderr
