"""Rough edges a new user hits (issue 17): plans that cannot train, NaN in JSON, two runs on one output,
identity checked before building, progress output in log files, --quiet, the umask, --debug's exit code."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tiny_runs import SHAKESPEARE, plan_file, plan_tiny, shakespeare_text

import chunkft.executor.train
from chunkft.executor.checkpoint import latest_checkpoint, read_meta
from chunkft.executor.cli import main as run_main
from chunkft.executor.train import RunOptions
from chunkft.plan_format import Plan, plan_to_json

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data")


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    return plan_tiny(tmp_path_factory.mktemp("plan"), steps=3)


def edited(tmp: Path, plan: Plan, change) -> Path:  # type: ignore[no-untyped-def]
    doc = json.loads(plan_to_json(plan))
    change(doc)
    path = tmp / "plan.json"
    path.write_text(json.dumps(doc))
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(run_main, list(args))


def one_error(res: Result) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-run: error: "), res.output
    return lines[0]


def strict_json(line: str) -> object:
    """json.loads refusing NaN and Infinity (Python's default accepts them; JSON does not)."""

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(line, parse_constant=refuse)


# ------------------------------------------------------------------------------- item 1: seq_len, NaN


def test_a_plan_with_seq_len_1_is_refused_before_anything(tmp_path: Path, base: Plan) -> None:
    """Before: it ran with a NaN loss on every step (a causal LM's 1-token row has no target)."""
    plan = edited(tmp_path, base, lambda d: d["run"].update(seq_len=1))
    out = tmp_path / "run"
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(out), "--quiet")
    assert res.exit_code == 2
    assert "run.seq_len is 1, and a causal LM learns by predicting each next token" in one_error(res)
    assert not out.exists()


def test_a_non_finite_loss_is_a_skipped_step_and_json_stays_strict(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 2's loss is NaN while its gradients are finite (a constant NaN added to the loss). Before: the
    step was applied and logged skipped=false, and metrics.jsonl/run.json held NaN (invalid JSON)."""
    real, calls = chunkft.executor.train.causal_lm_loss, []

    def nan_on_step_2(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        loss = real(*a, **kw)
        return loss + float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(chunkft.executor.train, "causal_lm_loss", nan_on_step_2)
    plan, out = plan_file(tmp_path, base, steps=3), tmp_path / "run"
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    assert "1 skipped (non-finite) steps" in res.output
    records = [strict_json(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["skipped"] for r in steps] == [False, True, False]
    assert steps[1]["loss"] is None and steps[1]["grad_norm"] is None
    assert [r["chunk"] for r in steps] == [0, 1, 1]  # skipped: the same window retries, nothing applied
    doc = strict_json((out / "run.json").read_text())
    assert doc["skipped_steps"] == 1 and doc["losses"]["train"][1] is None


# ------------------------------------------------------------------------------- item 3: the lock


def test_an_output_in_use_is_refused_in_one_line(tmp_path: Path, base: Plan) -> None:
    """Another process's flock on OUT (held here, its pid noted in OUT/.lock). Before: both ran and one
    died mid-checkpoint."""
    plan, data, out = plan_file(tmp_path, base, steps=2), shakespeare_text(tmp_path), tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()}\n")  # a live process: the holder's note
    held = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        res = run(str(plan), "--data", str(data), "--output", str(out), "--quiet")
        assert res.exit_code == 2
        assert one_error(res) == (
            f"chunkft-run: error: --output {out} is in use by another chunkft-run (pid {os.getppid()}); "
            "wait for it or choose another --output"
        )
        assert sorted(p.name for p in out.iterdir()) == [".lock"]
    finally:
        os.close(held)
    res = run(str(plan), "--data", str(data), "--output", str(out), "--quiet")  # released: it runs
    assert res.exit_code == 0, res.output


def test_a_refused_run_leaves_an_existing_output_as_it_was(tmp_path: Path, base: Plan) -> None:
    """The lock is the directory's own flock: a run refused while it validates writes nothing there
    (before: OUT/.lock with its pid)."""
    plan, out = plan_file(tmp_path, base, steps=2), tmp_path / "run"
    out.mkdir()
    res = run(str(plan), "--data", str(tmp_path / "missing.txt"), "--output", str(out), "--quiet")
    assert res.exit_code == 2 and list(out.iterdir()) == []


def test_an_output_in_a_read_only_directory_is_refused_before_locking(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the lock's EACCES surfaced as "Permission denied; check the path and free space"."""
    plan, out = plan_file(tmp_path, base, steps=2), tmp_path / "run"
    out.mkdir()
    real_access = os.access
    real_open = os.open

    def read_only(p: object, mode: int) -> bool:  # as a chmod 555 directory is (tests may run as root)
        return False if Path(str(p)) == out and mode & os.W_OK else real_access(p, mode)

    def no_create(p: object, flags: int, *args: object) -> int:
        if Path(str(p)).parent == out and flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
        return real_open(p, flags, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", read_only)
    monkeypatch.setattr(os, "open", no_create)
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(out), "--quiet")
    assert res.exit_code == 2
    assert one_error(res) == (
        f"chunkft-run: error: --output {out}: {out} is not writable; choose another --output"
    )


def test_a_filesystem_without_flock_is_noted_once(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the note was printed twice (once before validating, once when the run began writing)."""

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    plan, out = plan_file(tmp_path, base, steps=1), tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(fcntl, "flock", no_flock)
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(out), "--quiet")
    assert res.exit_code == 0, res.output
    assert res.output.count("cannot lock --output") == 1


def test_two_processes_on_one_output_and_sigkill_leaves_no_stale_lock(tmp_path: Path, base: Plan) -> None:
    plan, data, out = (
        plan_file(tmp_path, base, steps=500, checkpoint_every=2),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    cmd = [sys.executable, "-m", "chunkft.executor.cli", str(plan), "--data", str(data), "--output", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([*cmd, "--quiet"], env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoints" / "latest").exists():
            assert time.time() < deadline and proc.poll() is None, "the first run wrote no checkpoint"
            time.sleep(0.05)
        res = run(str(plan), "--data", str(data), "--output", str(out), "--resume", "--quiet")
        assert res.exit_code == 2
        assert f"is in use by another chunkft-run (pid {proc.pid})" in one_error(res)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    at = read_meta(latest_checkpoint(out)).step
    res = run(str(plan), "--data", str(data), "--output", str(out), "--resume", "--max-steps", str(at + 1))
    assert res.exit_code == 0, res.output


# -------------------------------------------------------------------- item 6: identity before building


def test_a_plan_for_another_model_is_refused_before_the_model_is_built(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the model was built first (an 8B one was OOM-killed after 187 s, nothing printed)."""

    def no_build(*a, **kw):  # type: ignore[no-untyped-def]
        raise AssertionError("built before the identity check")

    monkeypatch.setattr(chunkft.executor.train, "build_model", no_build)
    plan = edited(tmp_path, base, lambda d: d["model"].update(fingerprint="0" * 64))
    res = run(
        str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(tmp_path / "run"), "--quiet"
    )
    assert res.exit_code == 2
    assert "was made for a different model" in one_error(res)


# -------------------------------------------------------------- item 4: a decaying schedule's floor


def test_past_the_end_of_a_schedule_with_a_floor_runs_with_a_note(base: Plan, tmp_path: Path) -> None:
    from chunkft.executor.train import check_schedule_end

    schedule = dataclasses.replace(base.run.schedule, kind="cosine", min_lr_ratio=0.1)
    plan = dataclasses.replace(base, run=dataclasses.replace(base.run, schedule=schedule))
    log = io.StringIO()
    opts = RunOptions(tmp_path / "p.json", tmp_path / "d.txt", tmp_path / "o", max_steps=5)
    check_schedule_end(plan, opts, 5, log)
    assert "steps after it train at the floor, lr 0.0002" in log.getvalue()
    check_schedule_end(plan, opts, 3, log)  # within the schedule: nothing more said
    assert log.getvalue().count("\n") == 1


# ------------------------------------------------------------------------------ item 7: output hygiene


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_plain_lines_in_a_log_file_and_rewritten_on_a_terminal() -> None:
    """Before: a log file got one 'line' of 40 progress texts joined by carriage returns."""
    from chunkft.executor.train import _Progress

    log = io.StringIO()
    progress = _Progress(log, 40, clock=lambda: 0.0)
    for step in range(1, 41):
        progress.show(step, 1.5, 1000.0, "rss peak", 2**20)
    progress.end()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert [ln.split()[1] for ln in lines] == [f"{s}/40" for s in range(2, 41, 2)]
    assert lines[-1] == "step 40/40  loss 1.5000  1,000 tok/s  rss peak 1.0 MiB"
    slow = io.StringIO()  # a line at least once a minute, whatever the step count
    times = iter([0.0, 30.0, 61.0, 62.0])
    progress = _Progress(slow, 1000, clock=lambda: next(times))
    progress.show(1, 1.5, 1.0, "rss peak", 0)
    progress.show(2, 1.5, 1.0, "rss peak", 0)
    assert [ln.split()[1] for ln in slow.getvalue().splitlines()] == ["2/1000"]
    tty = _Tty()
    progress = _Progress(tty, 3)
    for step in (1, 2, 3):
        progress.show(step, 1.5, 1000.0, "cuda alloc", 2**20)
    progress.end()
    shown = tty.getvalue()
    assert shown.count("\r") == 3 and shown.endswith("\n") and "cuda alloc" in shown


def test_the_progress_memory_figure_says_what_it_is(tmp_path: Path, base: Plan) -> None:
    """Before: `mem` was ru_maxrss (the process's peak RSS) with no label, read as the tracked peak."""
    plan, out = plan_file(tmp_path, base, steps=2), tmp_path / "run"
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(out))
    assert res.exit_code == 0, res.output
    progress = [ln for ln in res.output.splitlines() if ln.startswith("step ")]
    assert len(progress) == 2 and all(" rss peak " in ln and " mem " not in ln for ln in progress)


def test_quiet_turns_off_transformers_and_hub_progress_bars(
    tmp_path: Path, base: Plan, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--quiet: the bars transformers draws while loading weights (and the hub's while downloading) are
    off while the model is built, and back on afterwards. Before: --quiet hid only chunkft's line."""
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    from chunkft.executor.train import _hub_progress_bars

    with _hub_progress_bars(enabled=False):
        for _ in hf_logging.tqdm(range(3), desc="Loading weights"):
            pass
    assert "Loading weights" not in capsys.readouterr().err
    seen = []

    def record(*a, **kw):  # type: ignore[no-untyped-def]
        seen.append((hf_logging.is_progress_bar_enabled(), hub.are_progress_bars_disabled()))
        raise RuntimeError("stop here")

    monkeypatch.setattr(chunkft.executor.train, "build_model", record)
    args = [str(plan_file(tmp_path, base, steps=2)), "--data", str(shakespeare_text(tmp_path))]
    args += ["--output", str(tmp_path / "o")]
    assert run(*args, "--quiet").exit_code == 1
    assert run(*args).exit_code == 1
    assert seen == [(False, True), (True, False)]
    assert hf_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()


def test_everything_a_run_writes_honours_the_umask(tmp_path: Path, base: Plan) -> None:
    """Before: model/ (tempfile.mkdtemp) was 0700 whatever the umask."""
    plan, out = plan_file(tmp_path, base, steps=2), tmp_path / "run"
    old = os.umask(0o027)
    try:
        res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--output", str(out), "--quiet")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    wrong = []
    for path in [out, *out.rglob("*")]:
        want = 0o750 if path.is_dir() else 0o640
        if stat.S_IMODE(path.stat().st_mode) != want:
            wrong.append(f"{path.relative_to(tmp_path)} {oct(stat.S_IMODE(path.stat().st_mode))}")
    assert not wrong, wrong


def test_debug_prints_the_traceback_and_keeps_the_exit_code(tmp_path: Path, base: Plan) -> None:
    """Before: --debug re-raised, so a bad input exited 1 (Python's) instead of 2."""
    args = [str(plan_file(tmp_path, base, steps=2)), "--data", str(tmp_path / "missing.txt")]
    args += ["--output", str(tmp_path / "o")]
    plain, debug = run(*args), run(*args, "--debug")
    assert plain.exit_code == debug.exit_code == 2
    assert "Traceback" not in plain.output and "Traceback (most recent call last)" in debug.output
    assert "DataError" in debug.output
    assert debug.output.strip().splitlines()[-1] == plain.output.strip()
