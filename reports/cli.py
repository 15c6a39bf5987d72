"""chunkft-report: draw a plan (and optionally a run's measurements) as report.html, PNGs and trace.json."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .runfile import RunFileError, load_run
from .writer import ReportError, write_report


@click.command(name="chunkft-report", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(path_type=Path))
@click.argument("run_path", metavar="[RUN.json]", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory for report.html, the PNG figures and trace.json (created if missing).",
)
def main(plan_path: Path, run_path: Path | None, out_dir: Path) -> None:
    """Write a self-contained report.html (figures embedded), PNGs beside it and trace.json of the
    simulated step (open it in ui.perfetto.dev or chrome://tracing).

    With RUN.json (written by chunkft-run) the report adds predicted against measured memory and step
    time, and the loss curves.
    """
    from planner.plan import PlanError, load_plan

    try:
        plan = load_plan(plan_path)
        run = load_run(run_path, plan.model.fingerprint) if run_path is not None else None
        path = write_report(plan, out_dir, run=run)
    except (PlanError, RunFileError, ReportError) as exc:
        click.echo(f"chunkft-report: error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote {path}")
