"""chunkft-run under faults and bad input: SIGINT, SIGKILL then --resume, a full disk (a real, tiny tmpfs),
repeated non-finite losses, CUDA out-of-memory (the message and its re-planning command), and every bad
input refused with one line and nothing written."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_runs import plan_file, shakespeare_text

from chunkft.executor.checkpoint import (
    CheckpointDiskFull,
    CheckpointMeta,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    rng_state,
    save_checkpoint,
)
from chunkft.executor.cli import main as run_main
from chunkft.executor.cli import out_of_memory_message
from chunkft.executor.replan import smaller_budget
from chunkft.executor.train import RunOptions
from chunkft.plan_format import Plan, load_plan, plan_to_json
from chunkft.planner.cli import main as plan_main

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


@pytest.fixture(scope="module")
def base_plan(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    """A real CPU plan for the tiny Llama from chunkft-plan, made once for this module."""
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--batch-size", "2", "--chunks", "4"]
    args += ["--steps", "20", "--lr", "2e-3", "--dtype", "fp32", "--checkpointing", "none", "-o", str(path)]
    res = CliRunner().invoke(plan_main, args)
    assert res.exit_code == 0, res.output
    return load_plan(path)


def steps_logged(out: Path) -> list[int]:
    return [
        r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r
    ]


def start_run(plan: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "chunkft.executor.cli", str(plan), "--data", str(data), "--output", str(out)]
    return subprocess.Popen([*cmd, "--quiet", *extra], env=ENV, cwd=REPO, stderr=subprocess.PIPE, text=True)


def wait_for_steps(out: Path, n: int, proc: subprocess.Popen[str]) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(steps_logged(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run logged fewer than {n} steps in time (exit {proc.poll()})")


# ------------------------------------------------------------------------------------------- signals


def test_sigint_finishes_the_step_checkpoints_and_exits_130(tmp_path: Path, base_plan: Plan) -> None:
    plan, data, out = plan_file(tmp_path, base_plan, steps=500), shakespeare_text(tmp_path), tmp_path / "run"
    proc = start_run(plan, data, out)
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT after step" in err
    resume = err.strip().splitlines()[-1]
    assert resume.startswith("resume with: chunkft-run ") and resume.endswith("--resume")
    assert read_meta(latest_checkpoint(out)).step == steps_logged(out)[-1] >= 2


def test_sigkill_then_resume_with_max_steps_completes(tmp_path: Path, base_plan: Plan) -> None:
    """Killed with SIGKILL at an arbitrary moment after a few checkpoints: `--resume --max-steps` picks
    up from the last complete one, drops the metrics lines past it and finishes; every step is logged
    exactly once."""
    plan = plan_file(tmp_path, base_plan, steps=500, checkpoint_every=2)
    data, out = shakespeare_text(tmp_path), tmp_path / "run"
    proc = start_run(plan, data, out)
    wait_for_steps(out, 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    at = read_meta(latest_checkpoint(out)).step  # verified: digests match
    assert at >= 4 and at % 2 == 0
    target = at + 3
    res = CliRunner().invoke(
        run_main,
        [
            str(plan),
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            str(target),
            "--resume",
            "--quiet",
        ],
    )
    assert res.exit_code == 0, res.output
    assert steps_logged(out) == list(range(1, target + 1))
    assert json.loads((out / "run.json").read_text())["steps"] == target
    assert not [p for p in (out / "checkpoints").iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tiny_filesystem(path: Path, size_bytes: int) -> Iterator[Path]:
    """A real tmpfs of the given size (root only); the test is skipped where mounting is not permitted."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root); disk-full is tested where it can be")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _linear_meta(step: int) -> CheckpointMeta:
    return CheckpointMeta(step=step, model_fingerprint="fp", plan_sha256="p", data_epoch=0, data_index=step)


@pytest.mark.parametrize("where", ["before-writing", "mid-write"])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path: Path, where: str) -> None:
    """Two checkpoints do not fit. 'before-writing': the tensors alone exceed the free space, refused
    before a byte is written; 'mid-write': a large non-tensor payload makes the write itself hit ENOSPC."""
    model = torch.nn.Linear(256, 256)  # 257 KiB of weights
    with tiny_filesystem(tmp_path / "fs", 1 << 20) as fs:
        first = save_checkpoint(
            fs, _linear_meta(2), model, {"driver": {"x": torch.zeros(8)}, "rng": rng_state()}
        )
        with torch.no_grad():
            model.weight.fill_(7.0)
        big = {"x": torch.zeros(300_000)} if where == "before-writing" else {"blob": "x" * 900_000}
        with pytest.raises(CheckpointDiskFull) as e:
            save_checkpoint(fs, _linear_meta(4), model, {"driver": big, "rng": rng_state()})
        message = str(e.value)
        assert message.startswith("disk full while writing checkpoint step-000004")
        assert "the previous checkpoint step-000002 is intact" in message and "\n" not in message
        assert latest_checkpoint(fs) == first
        names = sorted(p.name for p in (fs / "checkpoints").iterdir())
        assert names == ["latest", "step-000002"]  # the partial directory is gone
        restored = torch.nn.Linear(256, 256)
        load_checkpoint(first, restored, model_fingerprint="fp", plan_sha256="p")
        assert not torch.all(restored.weight == 7.0)


def test_disk_full_during_a_run_says_what_survives_and_resume_works(tmp_path: Path, base_plan: Plan) -> None:
    """A real run on a small filesystem: a checkpoint at step 2 fits; a filler file then leaves too little
    room for the next one. The run stops with one line naming the intact checkpoint and the resume
    command; after freeing the space that exact command finishes the run. The plan's schedule is long
    enough to reach every window (a shorter one adds chunkft-run's warning line to the output)."""
    plan, data = plan_file(tmp_path, base_plan, steps=8), shakespeare_text(tmp_path)
    with tiny_filesystem(tmp_path / "fs", 160 << 20) as fs:
        out = fs / "run"
        args = [str(plan), "--data", str(data), "--output", str(out), "--quiet"]
        assert CliRunner().invoke(run_main, [*args, "--max-steps", "2"]).exit_code == 0
        ckpt = sum(f.stat().st_size for f in latest_checkpoint(out).iterdir())
        shutil_free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
        filler = fs / "filler"
        with open(filler, "wb") as f:  # leave half a checkpoint free
            f.truncate(0)
            f.write(b"\0" * max(0, shutil_free - ckpt // 2))
        res = CliRunner().invoke(run_main, [*args, "--max-steps", "4", "--resume"])
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1, res.output
        line = lines[0]
        assert line.startswith("chunkft-run: error: disk full while writing checkpoint step-000004")
        assert "the previous checkpoint step-000002 is intact; free space and resume with: " in line
        assert read_meta(latest_checkpoint(out)).step == 2
        filler.unlink()
        command = shlex.split(line.split("resume with: ", 1)[1])
        assert command[0] == "chunkft-run"
        res = CliRunner().invoke(run_main, [*command[1:], "--quiet"])
        assert res.exit_code == 0, res.output
        assert steps_logged(out) == [1, 2, 3, 4]


# ------------------------------------------------------------------------------- non-finite, OOM


def test_non_finite_losses_are_skipped_then_the_run_stops(tmp_path: Path, base_plan: Plan) -> None:
    """lr 1e30 overflows the first window's weights: every later loss is NaN. Each such step is skipped
    (logged with skipped=true) and the run stops after 5 in a row with one line, exit 1: it failed while
    training (before: 2, the code of bad input refused before anything is written)."""
    plan, data, out = (
        plan_file(tmp_path, base_plan, steps=20, lr=1e30),
        shakespeare_text(tmp_path),
        tmp_path / "run",
    )
    res = CliRunner().invoke(run_main, [str(plan), "--data", str(data), "--output", str(out), "--quiet"])
    assert res.exit_code == 1, res.output
    assert "not finite for 5 steps in a row" in res.output and len(res.output.strip().splitlines()) == 1
    records = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["skipped"] for r in records][-5:] == [True] * 5
    assert len(records) < 20


def test_out_of_memory_message_gives_the_peak_and_a_working_replan_command(
    tmp_path: Path, base_plan: Plan
) -> None:
    """The CLI's answer to torch.OutOfMemoryError (a CUDA-only error: the message is built from a real
    exception object, a real run directory and the plan; the re-planning command is then run)."""
    plan, data, out = plan_file(tmp_path, base_plan, steps=2), shakespeare_text(tmp_path), tmp_path / "run"
    assert (
        CliRunner()
        .invoke(run_main, [str(plan), "--data", str(data), "--output", str(out), "--quiet"])
        .exit_code
        == 0
    )
    opts = RunOptions(plan, data, out, max_steps=4, resume=True)
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total ...")
    budget = base_plan.hardware.budget_bytes
    message = out_of_memory_message(opts, error, (budget - 2**30, budget - 2**29))
    assert message.startswith("CUDA out of memory (measured peak ")
    assert "then 2.00 GiB more requested" in message
    assert "the last checkpoint step-000002 is intact; resume with: chunkft-run" in message
    new_budget = smaller_budget(budget, budget - 2**29, 2 * 2**30)
    overshoot = (budget - 2**29) + 2 * 2**30 - budget  # 1.5 GiB past the budget, under 10% of 16 GiB
    assert new_budget == (budget - max(overshoot, budget // 10)) // 2**20 * 2**20
    command = shlex.split(message.split("re-plan with a smaller budget: ", 1)[1].split(" (a new plan")[0])
    assert command[0] == "chunkft-plan" and f"{new_budget // 2**20}MiB" in command
    res = CliRunner().invoke(plan_main, command[1:])
    assert res.exit_code == 0, res.output
    replanned = load_plan(Path(command[command.index("-o") + 1]))
    assert replanned.hardware.budget_bytes == new_budget
    assert (replanned.run.seq_len, replanned.run.total_steps) == (base_plan.run.seq_len, 2)


def test_smaller_budget_is_at_least_ten_percent_less() -> None:
    gib = 2**30
    assert smaller_budget(24 * gib, None, 0) == int(24 * gib * 0.9) // 2**20 * 2**20
    assert smaller_budget(24 * gib, 23 * gib, 4 * gib) == 21 * gib  # overshot by 3 GiB
    assert smaller_budget(2**20, 2**30, 2**30) == 2**20  # never below 1 MiB


# ------------------------------------------------------------------------------------------ bad input


def _edit(plan: Plan, tmp: Path, change) -> Path:  # type: ignore[no-untyped-def]
    data = json.loads(plan_to_json(plan))
    change(data)
    path = tmp / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated-plan", "is not valid JSON"),
        ("edited-plan", "invalid: 2 problems: "),
        ("newer-plan", "written by a newer chunkft (schema 2"),
        ("other-model", "made for a different model"),
        ("empty-data", "data file is empty"),
        ("bad-jsonl", ".jsonl:3: "),
        ("corrupt-checkpoint", "does not match its recorded size/sha256"),
        ("absurd-steps", "--max-steps 1000000000 is absurdly large"),
        ("usage", "Missing option '--data'"),
        ("not-an-int", "'--max-steps': 'ten' is not a valid integer"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(
    tmp_path: Path, base_plan: Plan, case: str, expected: str
) -> None:
    plan, data, out = (
        plan_file(tmp_path, base_plan, steps=2),
        shakespeare_text(tmp_path, 4_000),
        tmp_path / "out",
    )
    args = [str(plan), "--data", str(data), "--output", str(out), "--quiet"]
    if case == "truncated-plan":
        plan.write_text(plan.read_text()[:500])
    elif case == "edited-plan":

        def change(d):  # type: ignore[no-untyped-def]
            d["run"]["seq_len"] = -4
            d["chunk_table"]["chunks"][0]["slices"][0]["row_end"] = 10**9

        args[0] = str(_edit(base_plan, tmp_path, change))
    elif case == "newer-plan":
        args[0] = str(_edit(base_plan, tmp_path, lambda d: d.update(schema_version=2)))
    elif case == "other-model":
        args[0] = str(_edit(base_plan, tmp_path, lambda d: d["model"].update(fingerprint="0" * 64)))
    elif case == "empty-data":
        data.write_text("")
    elif case == "bad-jsonl":
        data = tmp_path / "d.jsonl"
        data.write_text('{"text": "a"}\n{"text": "b"}\n[1, 2]\n')
        args[2] = str(data)
    elif case == "corrupt-checkpoint":
        assert CliRunner().invoke(run_main, args).exit_code == 0
        weights = latest_checkpoint(out) / "model.safetensors"
        blob = bytearray(weights.read_bytes())
        blob[-5] ^= 0xFF
        weights.write_bytes(bytes(blob))
        args += ["--resume", "--max-steps", "4"]
    elif case == "absurd-steps":
        args += ["--max-steps", str(10**9)]
    elif case == "usage":
        args = [str(plan)]
    elif case == "not-an-int":
        args += ["--max-steps", "ten"]
    before = sorted(str(p) for p in out.rglob("*")) if out.exists() else None
    res = CliRunner().invoke(run_main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-run: error: ") and expected in lines[0], (
        res.output
    )
    assert "Traceback" not in res.output
    after = sorted(str(p) for p in out.rglob("*")) if out.exists() else None
    assert after == before


def test_edited_plan_lists_every_problem(tmp_path: Path, base_plan: Plan) -> None:
    def change(d):  # type: ignore[no-untyped-def]
        d["run"]["seq_len"] = -4
        d["run"]["micro_batch_size"] = 0
        d["hardware"]["num_gpus"] = "two"

    path = _edit(base_plan, tmp_path, change)
    res = CliRunner().invoke(
        run_main, [str(path), "--data", str(shakespeare_text(tmp_path)), "--output", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    for field in ("run.seq_len", "run.micro_batch_size", "hardware.num_gpus"):
        assert field in res.output, res.output


def test_run_debug_shows_the_traceback(tmp_path: Path, base_plan: Plan) -> None:
    """--debug prints the traceback first and keeps the exit code (tests/test_rough_edges.py has more)."""
    plan = plan_file(tmp_path, base_plan, steps=2)
    args = [str(plan), "--data", str(tmp_path / "missing.txt"), "--output", str(tmp_path / "o")]
    assert CliRunner().invoke(run_main, args).exit_code == 2
    res = CliRunner().invoke(run_main, [*args, "--debug"])
    assert res.exit_code == 2 and "Traceback" in res.output
    assert "chunkft.executor.data.DataError" in res.output
