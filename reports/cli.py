"""chunkft-report: draw a plan (and optionally a run's measurements) as report.html, PNGs and trace.json.

Exit codes (chunkft/cli_conventions.py): 2 for bad input, refused before anything is written (a missing
or invalid plan, an invalid run.json or one of another model or plan, an -o that cannot become the
report); 1 for a failure while drawing or writing (the budget sweep failed, the disk is full: nothing is
half-written) and for internal errors. --debug prints the traceback first and keeps the exit code.
"""

from __future__ import annotations

from pathlib import Path

import click

from chunkft.cli_conventions import EXIT_BAD_INPUT, EXIT_FAILED, OneLineErrors, fail

from .runfile import RunFileError, load_run, plan_sha256
from .writer import ReportError, ReportInputError, write_report

PROG = "chunkft-report"


@click.command(name=PROG, cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("plan_path", metavar="PLAN.json", type=click.Path(path_type=Path))
@click.argument("run_path", metavar="[RUN.json]", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    metavar="DIR",
    type=click.Path(path_type=Path),
    help="Directory for report.html, the PNG figures and trace.json (created if missing). Required.",
)
@click.option("--out", "legacy_out", hidden=True, type=click.Path(path_type=Path))  # deprecated: -o
@click.option("--debug", is_flag=True, help="Print the Python traceback before the error (same exit code).")
def main(
    plan_path: Path, run_path: Path | None, out_dir: Path | None, legacy_out: Path | None, debug: bool
) -> None:
    """Write a self-contained report.html (figures embedded), PNGs beside it and trace.json of the
    simulated step (open it in ui.perfetto.dev or chrome://tracing).

    With RUN.json (written by chunkft-run for this plan) the report adds predicted against measured
    memory and step time, and the loss curves.
    """
    out = output_dir(out_dir, legacy_out)
    try:
        path = report(plan_path, run_path, out)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line and its exit code
        message, code = describe(exc, debug)
        fail(PROG, message, code, debug=debug)
    click.echo(f"wrote {path}")


def output_dir(out_dir: Path | None, legacy_out: Path | None) -> Path:
    """-o/--output, or the deprecated --out that older scripts pass (accepted with a note)."""
    if legacy_out is not None:
        if out_dir is not None and out_dir != legacy_out:
            raise click.UsageError("give -o/--output once (--out is its old name)")
        click.echo(f"{PROG}: note: --out is deprecated; use -o/--output", err=True)
        return legacy_out
    if out_dir is None:
        raise click.UsageError("missing option -o/--output DIR: where to write the report")
    return out_dir


def report(plan_path: Path, run_path: Path | None, out: Path) -> Path:
    """Load and check the inputs, then write the report; returns the report.html path."""
    from chunkft.plan_format import load_plan

    plan = load_plan(plan_path)
    run = None
    if run_path is not None:
        run = load_run(
            run_path, plan.model.fingerprint, plan_digest=plan_sha256(plan), plan_where=str(plan_path)
        )
        for note in run.notes:
            click.echo(f"{PROG}: note: {note}", err=True)
    return write_report(plan, out, run=run)


def describe(exc: BaseException, debug: bool = False) -> tuple[str, int]:
    """(one-line message, exit code): bad input is refused with 2; a failure while working exits 1 (with
    a pointer to --debug unless it was given)."""
    to_debug = "" if debug else " (rerun with --debug for the traceback)"
    from chunkft.plan_format import PlanError
    from chunkft.profiles import ProfileError

    if isinstance(exc, PlanError | RunFileError | ReportInputError | ProfileError):
        return str(exc), EXIT_BAD_INPUT
    if isinstance(exc, ReportError):
        hint = "" if isinstance(exc.__cause__, OSError) else to_debug
        return f"{exc}{hint}", EXIT_FAILED
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{reason}{where}; nothing was written: fix that (e.g. free space) and rerun", EXIT_FAILED
    return f"internal error {type(exc).__name__}: {exc}{to_debug}", EXIT_FAILED
