"""Dependencies point inward: the package import graph the developers' guide asks for."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("server", "clients", "audit", "shared")
# What each package must never import, at module level or inside a function.
FORBIDDEN = {
    "server": {"clients", "audit"},
    "clients": {"server", "audit"},
    "audit": {"server", "clients"},
    "shared": {"server", "clients", "audit"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in one source file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_import_check_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from clients.app import app\n    import server.app as s\n")
    assert imported_packages(source) == {"os", "clients", "server"}


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_point_inward(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no sources under {package}/"
    offending = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[package]) for path in files
    }
    assert {path: bad for path, bad in offending.items() if bad} == {}
