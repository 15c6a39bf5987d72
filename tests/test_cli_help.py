"""Every console script answers --help (the entry points in pyproject.toml resolve and import)."""

from __future__ import annotations

import importlib

import pytest
from click.testing import CliRunner


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("chunkft.planner.cli:main", "chunkft-plan"),
        ("chunkft.executor.cli:main", "chunkft-run"),
        ("chunkft.reports.cli:main", "chunkft-report"),
    ],
)
def test_help(target: str, expected: str) -> None:
    module_name, attr = target.split(":")
    command = getattr(importlib.import_module(module_name), attr)
    result = CliRunner().invoke(command, ["--help"], prog_name=expected)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert expected in result.output
