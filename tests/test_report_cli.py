"""chunkft-report's conventions (chunkft/cli_conventions.py): -o/--output (old --out still works), one line
per error, exit 2 for bad input refused before anything is written, 1 for a failure while drawing or
writing (nothing half-written) and for internal errors, --debug adds the traceback and keeps the code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chunkft.plan_format import load_plan
from chunkft.reports.cli import main as report_cli

PLAN_ARGS = ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--batch-size", "2", "--steps", "3"]
PREFIX = "chunkft-report: error: "


@pytest.fixture(scope="module")
def plan_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from chunkft.planner.cli import main as plan_cli

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    r = CliRunner().invoke(plan_cli, [*PLAN_ARGS, "-o", str(path)])
    assert r.exit_code == 0, r.output
    return path


@pytest.fixture
def no_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the solver sweep (seconds per report): these tests are about the command, not the figures."""
    monkeypatch.setattr("chunkft.reports.sweep.solver_sweep", lambda *args, **kwargs: ())


def run_doc(plan: Path, **plan_fields: object) -> dict:
    """A run.json as chunkft-run writes it for `plan` (plan_fields override its "plan" section)."""
    return {
        "plan": {"model_fingerprint": load_plan(plan).model.fingerprint, **plan_fields},
        "measured": {"device": "cpu", "memory_method": "memtracker", "peak_bytes": 100,
                     "peak_by_category": {}, "step_seconds": 0.5, "tokens_per_second": 2048.0},
        "losses": {"train": [3.0, 2.5], "eval": []},
    }


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(report_cli, [str(a) for a in args])


def one_error_line(result: Result, code: int, *expected: str) -> str:
    """The result exited `code` with exactly one stderr line, `chunkft-report: error: ...`."""
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def test_output_option_and_the_old_out(plan_path: Path, tmp_path: Path, no_sweep: None) -> None:
    for flag in ("-o", "--output"):
        r = invoke(plan_path, flag, tmp_path / flag)
        assert r.exit_code == 0 and r.stdout.strip() == f"wrote {tmp_path / flag / 'report.html'}", r.output
    r = invoke(plan_path, "--out", tmp_path / "old")
    assert r.exit_code == 0 and (tmp_path / "old" / "report.html").is_file(), r.output
    assert "--out is deprecated; use -o/--output" in r.stderr
    help_text = invoke("--help").stdout
    assert "-o, --output DIR" in help_text and "--out " not in help_text and "--debug" in help_text


def test_missing_output_is_one_line(plan_path: Path) -> None:
    one_error_line(invoke(plan_path), 2, "-o/--output")
    one_error_line(invoke(plan_path, "--bogus"), 2, "--bogus")


def test_run_of_another_plan_is_refused(plan_path: Path, tmp_path: Path) -> None:
    """A run.json made from another plan of the same model would draw a misleading comparison."""
    run = tmp_path / "run.json"
    run.write_text(json.dumps(run_doc(plan_path, sha256="ab12" * 16)))
    line = one_error_line(invoke(plan_path, run, "-o", tmp_path / "rep"), 2, "made from another plan",
                          "sha256 ab12ab12ab12", str(run), str(plan_path), "pass the plan the run replayed")
    assert line.count(";") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]


def test_run_without_plan_hash_is_noted(plan_path: Path, tmp_path: Path, no_sweep: None) -> None:
    """An older run.json (no plan.sha256) is accepted: the report and stderr say it was not checked."""
    run = tmp_path / "run.json"
    run.write_text(json.dumps(run_doc(plan_path)))
    r = invoke(plan_path, run, "-o", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "records no plan sha256" in r.stderr
    assert "records no plan sha256" in (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-plan", "cannot read it"),
        ("invalid-plan", "not valid JSON"),
        ("invalid-run", "missing measured.peak_bytes"),
        ("out-is-a-file", "not a directory"),
        ("out-parent-missing", "does not exist"),
    ],
)
@pytest.mark.parametrize("debug", [False, True])
def test_bad_input_exits_2(plan_path: Path, tmp_path: Path, case: str, expected: str, debug: bool) -> None:
    """Refused before anything is written; --debug adds the traceback and keeps the exit code."""
    plan, run, out = plan_path, None, tmp_path / "rep"
    if case == "missing-plan":
        plan = tmp_path / "nope.json"
    elif case == "invalid-plan":
        plan = tmp_path / "bad.json"
        plan.write_text('{"schema_version": 1,')
    elif case == "invalid-run":
        run = tmp_path / "run.json"
        run.write_text('{"measured": {}}')
    elif case == "out-is-a-file":
        out = tmp_path / "file"
        out.write_text("x")
    else:
        out = tmp_path / "missing" / "rep"
    before = sorted(p.name for p in tmp_path.iterdir())
    r = invoke(plan, *([run] if run else []), "-o", out, *(["--debug"] if debug else []))
    check_failure(r, 2, debug, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def check_failure(r: Result, code: int, debug: bool, *expected: str) -> None:
    """Without --debug one error line; with it the traceback first, the same line last, the same code."""
    if not debug:
        one_error_line(r, code, *expected)
        return
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("Traceback (most recent call last):"), r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(PREFIX) and all(text in last for text in expected), last


@pytest.mark.parametrize("debug", [False, True])
def test_failed_sweep_exits_1_and_writes_nothing(
    plan_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug: bool
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("activation profile has chunk_tokens 256, the candidate None")

    monkeypatch.setattr("chunkft.reports.sweep.solver_sweep", broken)
    r = invoke(plan_path, "-o", tmp_path / "rep", *(["--debug"] if debug else []))
    check_failure(r, 1, debug, "the budget sweep failed (ValueError: activation profile has chunk_tokens 256")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_exits_1_and_writes_nothing(
    plan_path: Path, tmp_path: Path, disk_full_after_one_file: None, no_sweep: None
) -> None:
    r = invoke(plan_path, "-o", tmp_path / "rep")
    one_error_line(r, 1, "No space left on device", "nothing was written")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("debug", [False, True])
def test_internal_error_exits_1(
    plan_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug: bool
) -> None:
    def kaboom(plan: object) -> None:
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr("chunkft.planner.simulator.setup_and_candidate", kaboom)
    r = invoke(plan_path, "-o", tmp_path / "rep", *(["--debug"] if debug else []))
    check_failure(r, 1, debug, "internal error RuntimeError: kaboom second line")
    assert ("rerun with --debug" in r.stderr) != debug  # not told to add what was given
    assert list(tmp_path.iterdir()) == []
