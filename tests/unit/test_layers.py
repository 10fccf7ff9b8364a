"""The layers import only downwards: `app/` (HTTP) and `workers/` (GPU side) never import each other, and
`jobs/` and `config/` (what both share: the job record and store, the queue, the chat format) import
neither. Read from the source (every import statement, also those inside functions), not by importing it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"app": {"workers"}, "workers": {"app"}, "jobs": {"app", "workers"}, "config": {"app", "workers", "jobs"}}


def imported_packages(source: str) -> set[str]:
    """The top-level packages that a module's import statements name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def forbidden_imports(package: str) -> list[str]:
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for name in sorted(imported_packages(path.read_text()) & FORBIDDEN[package]):
            found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layer_imports_only_what_it_may(package):
    assert forbidden_imports(package) == []


def test_the_check_sees_imports_inside_functions():
    source = "def f():\n    from workers.engine import x\n    import app.serving\n"
    assert imported_packages(source) == {"workers", "app"}
