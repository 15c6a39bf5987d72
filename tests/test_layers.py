"""The package layering ARCHITECTURE.md promises: one chunkft.* namespace, imports running one way."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# lower rank = lower layer; a module may import its own layer and the ones below
RANK = {"chunkft": 0, "profiles": 1, "executor": 2, "planner": 3, "reports": 4}
FOLDERS = ("chunkft", "profiles", "executor", "planner", "reports")
OLD_NAMES = ("planner", "executor", "profiles", "reports")
ENTRY_POINTS = {
    REPO / "chunkft" / "api.py",
    *(REPO / f / "cli.py" for f in ("planner", "executor", "reports")),
}


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every absolute import in the file, lazy ones inside functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
            if node.module == "chunkft":  # from chunkft import profiles
                out += [(node.lineno, f"chunkft.{a.name}") for a in node.names]
    return out


def layer(module: str) -> str | None:
    """Which layer a chunkft.* module belongs to (the namespace's own modules are layer "chunkft")."""
    parts = module.split(".")
    if parts[0] != "chunkft":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "chunkft"


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (REPO / f).rglob("*.py"))


def test_imports_run_one_way() -> None:
    upward = []
    for path in sources(*FOLDERS):
        if path in ENTRY_POINTS:  # above every layer (chunkft-plan --report draws with chunkft.reports)
            continue
        own = RANK[path.relative_to(REPO).parts[0]]
        for line, module in imported(path):
            target = layer(module)
            if target is not None and RANK[target] > own:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert upward == []


def test_nothing_imports_the_bare_folder_names() -> None:
    bare = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sources(*FOLDERS, "tests", "bench")
        for line, module in imported(path)
        if module.split(".")[0] in OLD_NAMES
    ]
    assert bare == []


def test_tests_import_their_helpers_by_module_name() -> None:
    """tests/ is no package: pytest puts the folder itself on sys.path, so `from tiny_runs import ...`
    works from any checkout, while `from tests.tiny_runs import ...` only where the repository root
    happens to be importable (it broke CI once)."""
    by_package = [
        f"{path.relative_to(REPO)}:{line} imports {module}"
        for path in sources("tests", "bench")
        for line, module in imported(path)
        if module.split(".")[0] == "tests"
    ]
    assert by_package == []


@pytest.mark.parametrize("name", OLD_NAMES)
def test_a_bare_folder_name_refuses_to_import(name: str) -> None:
    """From a checkout (the repository on sys.path) `import planner` would make a second copy of every
    module beside chunkft.planner's, with its own classes: refused in one line instead."""
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {name}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"ImportError: import chunkft.{name}, not {name}" in proc.stderr


def test_the_namespace_imports_light() -> None:
    """`import chunkft` gives the API without importing torch, transformers or the planner."""
    code = (
        "import sys, chunkft; print(sorted(m for m in ('torch', 'transformers', 'chunkft.planner', "
        "'chunkft.executor') if m in sys.modules)); print(chunkft.plan.__module__, chunkft.Plan.__module__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "chunkft.api chunkft.plan_format"]
