"""The tiny Llama run plan the executor's CLI tests share (planned once per module, edited per test)."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from planner.cli import main as plan_main
from planner.plan import Plan, load_plan

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
PLAN_ARGS = [
    "tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--batch-size", "2", "--chunks", "4", "--lr", "2e-3",
    "--dtype", "fp32", "--checkpointing", "none", "--host-mem", "4GiB",
]  # fmt: skip  (the schedule is the default, constant)


def plan_tiny(directory: Path, steps: int) -> Plan:
    """chunkft-plan the tiny Llama for `steps` steps into directory/plan.json and load it."""
    path = directory / "plan.json"
    res = CliRunner().invoke(plan_main, [*PLAN_ARGS, "--steps", str(steps), "-o", str(path)])
    assert res.exit_code == 0, res.output
    return load_plan(path)
