"""chunkft reports: figures, a self-contained report.html and a Chrome trace of the simulated step.

The only matplotlib user in chunkft (object API on the Agg canvas: no display, no pyplot state).
"""

from .data import Alternative, ReportData, RunRecord, SweepPoint
from .runfile import RunFileError, load_run, plan_sha256
from .trace import trace_events, trace_json
from .writer import (
    ReportError,
    ReportFailedError,
    ReportInputError,
    render,
    write_report,
    write_report_data,
)

if __name__ != "chunkft.reports":  # this folder imported by its bare name from a checkout
    raise ImportError(f"import chunkft.reports, not {__name__} (chunkft's packages are chunkft.*)")

__all__ = [
    "Alternative",
    "ReportData",
    "ReportError",
    "ReportFailedError",
    "ReportInputError",
    "RunFileError",
    "RunRecord",
    "SweepPoint",
    "load_run",
    "plan_sha256",
    "render",
    "trace_events",
    "trace_json",
    "write_report",
    "write_report_data",
]
