"""Write a report directory: report.html (self-contained), one PNG per figure, trace.json.

Everything is rendered in memory first, written into a temporary sibling directory, and only then moved
into place, so a failure leaves no half-written report behind.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from planner.timeline import StepSimulation

from .data import ReportData, RunRecord, SweepPoint
from .figures import all_figures, png_bytes
from .html import render_html
from .trace import trace_json

if TYPE_CHECKING:
    from planner.plan import Plan

REPORT_FILE = "report.html"
TRACE_FILE = "trace.json"


class ReportError(Exception):
    """Bad input or an unwritable destination; the message is one line saying what to do."""


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
        raise ReportError(f"output path {out} exists and is not a directory; choose another -o DIR")
    parent = out.parent
    if not parent.is_dir():
        raise ReportError(f"cannot write the report: directory {parent} does not exist; create it first")
    if not os.access(out if out.is_dir() else parent, os.W_OK | os.X_OK):
        raise ReportError(f"cannot write the report into {out}: permission denied; choose a writable -o DIR")
    return parent


def write_report_data(data: ReportData, out_dir: str | os.PathLike[str]) -> Path:
    """Render and write the report into out_dir (created if missing); returns the report.html path."""
    out = Path(out_dir)
    parent = check_destination(out)
    files = render(data)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    except OSError as exc:
        raise ReportError(
            f"cannot write the report into {parent}: {exc.strerror}; choose a writable -o DIR"
        ) from exc
    try:
        for name, content in files.items():
            (tmp / name).write_bytes(content)
        if out.is_dir():
            for name in files:
                os.replace(tmp / name, out / name)
            tmp.rmdir()
        else:
            os.chmod(tmp, 0o777 & ~_umask())
            os.replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ReportError(
            f"cannot write the report into {out}: {exc.strerror}; choose a writable -o DIR"
        ) from exc
    return out / REPORT_FILE


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    the sweep share its structure and activation profile.
    """
    from .inputs import report_data

    check_destination(Path(out_dir))
    structure = activation = None
    if simulation is None:
        from planner.simulator import setup_and_candidate, simulate

        setup, cand, activation = setup_and_candidate(plan)
        structure = setup.structure
        simulation = simulate(setup, cand, activation).step
    notes: tuple[str, ...] = ()
    if sweep is None:
        from .sweep import solver_sweep

        try:
            sweep = solver_sweep(plan, structure=structure, activation=activation)
        except Exception as exc:  # noqa: BLE001 - the sweep is an extra; the report stands without it
            notes = (f"No budget sweep: the solver failed ({type(exc).__name__}: {exc}).",)
            sweep = ()
    data = report_data(plan, simulation, run=run, sweep=sweep)
    if notes:
        data = dataclasses.replace(data, notes=notes + data.notes)
    return write_report_data(data, out_dir)
