"""The code's own rules: layering by imports, lint, and types (STYLE.md)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cacheproxy"
BIN = Path(sys.executable).parent


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", ["model.py", "policy.py"])
def test_pure_core_imports_only_the_standard_library(module: str):
    """model.py and policy.py import the standard library and cacheproxy.model only."""
    allowed = set(sys.stdlib_module_names) | {"cacheproxy.model", "cacheproxy"}
    for name in _imports(PACKAGE / module):
        assert name in allowed or name.split(".")[0] in sys.stdlib_module_names, name


def test_store_knows_no_twisted():
    """store.py does not import Twisted."""
    assert not any(n.startswith("twisted") for n in _imports(PACKAGE / "store.py"))


def test_no_module_level_reactor_import():
    """No module imports the global reactor at import time; it is passed down."""
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
                assert "reactor" not in {a.name for a in node.names}, path.name


def _tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it is part of the [test] extra")
    return found


def test_ruff_is_clean():
    """ruff finds nothing to report in the package, the tests and the benchmarks."""
    result = subprocess.run(
        [_tool("ruff"), "check", "cacheproxy", "tests", "bench", "twisted"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean():
    """mypy --strict (with Twisted's untyped calls allowed) passes on the package."""
    result = subprocess.run(
        [_tool("mypy")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
