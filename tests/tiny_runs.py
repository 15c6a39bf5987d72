"""The tiny Llama run plan the executor's CLI tests share (planned once per module, edited per test)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from click.testing import CliRunner

from chunkft.plan_format import Plan, load_plan, save_plan
from chunkft.planner.cli import main as plan_main

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
PLAN_ARGS = [
    "tiny-llama",
    "--gpu",
    "cpu",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--chunks",
    "4",
    "--lr",
    "2e-3",
    "--dtype",
    "fp32",
    "--checkpointing",
    "none",
    "--host-mem",
    "4GiB",
]  # fmt: skip  (the schedule is the default, constant)


def plan_tiny(directory: Path, steps: int) -> Plan:
    """chunkft-plan the tiny Llama for `steps` steps into directory/plan.json and load it."""
    path = directory / "plan.json"
    res = CliRunner().invoke(plan_main, [*PLAN_ARGS, "--steps", str(steps), "-o", str(path)])
    assert res.exit_code == 0, res.output
    return load_plan(path)


def plan_file(
    tmp: Path,
    plan: Plan,
    *,
    steps: int,
    checkpoint_every: int = 0,
    lr: float | None = None,
    schedule: str | None = None,
) -> Path:
    """plan with `steps` steps (its schedule too), a checkpoint interval, a learning rate and a schedule
    kind, saved as tmp/plan.json."""
    opt = plan.run.optimizer if lr is None else dataclasses.replace(plan.run.optimizer, lr=lr)
    kind = plan.run.schedule.kind if schedule is None else schedule
    run = dataclasses.replace(
        plan.run,
        total_steps=steps,
        schedule=dataclasses.replace(plan.run.schedule, total_steps=steps, kind=kind),
        checkpoint_every=checkpoint_every,
        optimizer=opt,
    )
    path = tmp / "plan.json"
    save_plan(dataclasses.replace(plan, run=run), path)
    return path


def shakespeare_text(
    tmp: Path, chars: int = 8_000, name: str = "shakespeare.txt", start: int = 0
) -> Path:
    """`chars` characters of Tiny Shakespeare from `start` as tmp/name (a few blocks of data)."""
    path = tmp / name
    path.write_text(SHAKESPEARE.read_text()[start : start + chars])
    return path
