"""Write a report directory: report.html (self-contained), one PNG per figure, trace.json.

Everything is rendered in memory first, written into a temporary sibling directory, and only then moved
into place, so a failure leaves no half-written report behind: a new directory is renamed into place in
one step; into an existing directory each file is renamed over its old copy (a same-directory rename
needs no space), after checking that none of the names is taken by a directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from chunkft.files import current_umask
from chunkft.timeline import StepSimulation

from .data import ReportData, RunRecord, SweepPoint
from .figures import all_figures, png_bytes
from .html import render_html
from .trace import trace_json

if TYPE_CHECKING:
    from chunkft.plan_format import Plan
    from chunkft.planner.profile_model import ModelStructure

REPORT_FILE = "report.html"
TRACE_FILE = "trace.json"


class ReportError(Exception):
    """No report was written; the message is one line saying why and what to do."""


class ReportInputError(ReportError):
    """Refused before anything was written: the destination cannot become the report (bad input)."""


class ReportFailedError(ReportError):
    """Drawing or writing the report failed (the sweep failed, the disk is full); nothing was written."""


def render(data: ReportData) -> dict[str, bytes]:
    """File name -> contents of every file of the report."""
    figures = [(stem, caption, png_bytes(fig)) for stem, caption, fig in all_figures(data)]
    files = {f"{stem}.png": png for stem, _, png in figures}
    files[REPORT_FILE] = render_html(data, figures).encode("utf-8")
    files[TRACE_FILE] = trace_json(data.simulation, f"{data.model_name} on {data.gpu_name}").encode("utf-8")
    return files


def check_destination(out: Path) -> Path:
    """Fail early (before any rendering or simulating) on an output path that cannot become the report."""
    if out.exists() and not out.is_dir():
        raise ReportInputError(f"output path {out} exists and is not a directory; choose another -o DIR")
    parent = out.parent
    if not parent.is_dir():
        raise ReportInputError(f"cannot write the report: directory {parent} does not exist; create it first")
    if not os.access(out if out.is_dir() else parent, os.W_OK | os.X_OK):
        raise ReportInputError(
            f"cannot write the report into {out}: permission denied; choose a writable -o DIR"
        )
    return parent


def check_names_free(out: Path, names: Sequence[str]) -> None:
    """Into an existing directory, no report file may be a directory: its rename would fail half-way."""
    taken = sorted(name for name in names if (out / name).is_dir())
    if taken:
        raise ReportInputError(
            f"cannot write the report into {out}: {', '.join(taken)} there is a directory; "
            "remove it or choose another -o DIR"
        )


def write_report_data(data: ReportData, out_dir: str | os.PathLike[str]) -> Path:
    """Render and write the report into out_dir (created if missing); returns the report.html path."""
    out = Path(out_dir)
    parent = check_destination(out)
    files = render(data)
    if out.is_dir():
        check_names_free(out, list(files))
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as exc:
        raise ReportFailedError(_write_failure(parent, exc)) from exc
    replaced: list[str] = []
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        _move_into_place(tmp, out, list(files), replaced)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if replaced and len(replaced) < len(files):  # rare: a rename failed after others succeeded
            kept = [n for n in files if n not in replaced]
            raise ReportFailedError(
                f"cannot finish the report in {out}: {exc.strerror or exc}; {', '.join(replaced)} are new, "
                f"{', '.join(kept)} still the previous report's: fix the cause and write it again"
            ) from exc
        raise ReportFailedError(_write_failure(out, exc)) from exc
    return out / REPORT_FILE


def _move_into_place(tmp: Path, out: Path, names: Sequence[str], replaced: list[str]) -> None:
    """Rename the written files over an existing report (each rename atomic, noted in `replaced`), or the
    whole directory into place (one rename)."""
    if out.is_dir():
        for name in names:
            os.replace(tmp / name, out / name)
            replaced.append(name)
        tmp.rmdir()
    else:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp made it 0700; the files are 0666 & ~umask
        os.replace(tmp, out)


def _write_failure(where: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    return (
        f"cannot write the report into {where}: {reason}; nothing was written: "
        "free space (or fix the cause) or choose another -o DIR"
    )


def write_report(
    plan: Plan,
    out_dir: str | os.PathLike[str],
    run: RunRecord | None = None,
    *,
    simulation: StepSimulation | None = None,
    sweep: Sequence[SweepPoint] | None = None,
) -> Path:
    """The report of a Plan: simulate it (unless given the simulation), sweep budgets and GPUs through
    the solver (unless given the sweep), then write out_dir. Returns the report.html path.

    run: a RunRecord (reports.runfile.load_run) or None. The model is traced once: the simulation and
    the sweep share its structure (and the process's activation tables).
    """
    from .inputs import report_data

    check_destination(Path(out_dir))
    structure = None
    if simulation is None:
        from chunkft.planner.simulator import setup_and_candidate, simulate

        setup, cand, activation = setup_and_candidate(plan)
        structure = setup.structure
        simulation = simulate(setup, cand, activation).step
    if sweep is None:
        sweep = _sweep(plan, structure)
    data = report_data(plan, simulation, run=run, sweep=sweep)
    return write_report_data(data, out_dir)


def _sweep(plan: Plan, structure: ModelStructure | None) -> tuple[SweepPoint, ...]:
    """The solver sweep, or ReportError: a report without its sweep would hide a planner bug."""
    from chunkft.profiles import ProfileError

    from .sweep import solver_sweep

    try:
        return solver_sweep(plan, structure=structure)
    except ProfileError as exc:  # the plan's model (or GPU) is not here: bad input, not a bug
        raise ReportInputError(f"cannot sweep the plan's budgets: {exc}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the sweep is the report's failure
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ReportFailedError(
            f"the budget sweep failed ({reason}); nothing was written: this is a bug, please report it "
            "with the plan file"
        ) from exc
