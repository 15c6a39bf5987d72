"""chunkft-plan end to end through click's runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from planner.cli import main, parse_headroom, parse_size
from planner.plan import load_plan
from planner.simulator import simulate_plan

REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_sizes() -> None:
    assert parse_size("20GiB") == 20 * 2**30
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("24G") == 24 * 2**30
    assert parse_size("13.72GiB") == int(13.72 * 2**30)
    assert parse_size("1048576") == 1048576


def test_tiny_llama_on_cpu_writes_a_replayable_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(
        main,
        [
            "tiny-llama",
            "--gpu",
            "cpu",
            "--seq-len",
            "128",
            "--batch-size",
            "2",
            "--host-mem",
            "4GiB",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    assert plan.run.weight_dtype == "float32" and plan.hardware.gpu == "cpu"
    assert plan.run.micro_batch_size * plan.run.grad_accum_steps == 2
    sim = simulate_plan(plan)
    assert sim.peak_bytes == plan.predictions.peak_bytes
    assert "predicted GPU peak" in r.output and "tokens/s" in r.output


def test_infeasible_budget_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(
        main,
        [
            "tiny-llama",
            "--gpu",
            "cpu",
            "--seq-len",
            "128",
            "--budget",
            "1MiB",
            "--host-mem",
            "4GiB",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 2
    assert not out.exists()
    assert "smallest budget that fits" in r.output


BASE = ["tiny-llama", "--gpu", "cpu", "--seq-len", "64", "--host-mem", "4GiB"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["tiny-lama", "--gpu", "cpu"], "unknown model 'tiny-lama'; closest: tiny-llama"),
        (["tiny-llama", "--gpu", "rtx409"], "unknown GPU 'rtx409'; closest: rtx-4090"),
        ([*BASE, "--budget", "lots"], "cannot read size 'lots'"),
        ([*BASE, "--budget", "-2GiB"], "cannot read size '-2GiB'"),
        ([*BASE, "--budget", "0"], "--budget must be more than 0 bytes"),
        ([*BASE, "--budget", "2PiB"], "cannot read size"),
        ([*BASE, "--budget", "4096TiB"], "--budget 4194304.00 GiB is absurdly large"),
        ([*BASE, "--host-mem", "0"], "--host-mem must be more than 0 bytes"),
        (["tiny-llama", "--gpu", "4090", "--budget", "30GiB"], "is more than the NVIDIA GeForce RTX 4090's"),
        ([*BASE, "--budget", "1GiB", "--reserve", "1GiB"], "--reserve 1.00 GiB leaves nothing"),
        (
            [*BASE, "--budget", "1GiB", "--reserve", "0.5GiB", "--headroom", "0.5GiB"],
            "--headroom 0.50 GiB (with",
        ),
        ([*BASE, "--headroom", "lots"], "cannot read headroom 'lots'"),
        ([*BASE, "--headroom", "80%"], "keeps over 50% of the peak free"),
        ([*BASE, "--headroom", "1%+2%"], "cannot read headroom '1%+2%'"),
        ([*BASE, "--max-grad-norm", "0"], "must be a number > 0, or 'none'"),
        ([*BASE, "--max-grad-norm", "off"], "'off' is not a number or 'none'"),
        ([*BASE, "--optimizer", "sgd", "--weight-decay-mode", "compensated"], "is for --optimizer adamw"),
        ([*BASE, "--lr", "0.5", "--weight-decay", "2", "--weight-decay-mode", "compensated"], "< 1, got 1"),
        (["tiny-llama", "--gpu", "cpu", "--seq-len", "0"], "'--seq-len': 0 is not in the range x>=1"),
        (["tiny-llama", "--gpu", "cpu", "--seq-len", "-5"], "'--seq-len': -5 is not in the range x>=1"),
        (["tiny-llama", "--gpu", "cpu", "--seq-len", "4096"], "beyond tiny-llama's 1024 positions"),
        (["tiny-llama", "--gpu", "cpu", "--seq-len", "99999999"], "--seq-len 99999999 is absurdly large"),
        ([*BASE, "--batch-size", "0"], "'--batch-size': 0 is not in the range x>=1"),
        ([*BASE, "--batch-size", "100000000"], "--batch-size 100000000 is absurdly large"),
        ([*BASE, "--batch-size", "2", "--micro-batch", "4"], "--micro-batch 4 is more than --batch-size 2"),
        ([*BASE, "--steps", "10", "--warmup-steps", "20"], "--warmup-steps 20 is more than --steps 10"),
        ([*BASE, "--steps", "10", "--checkpoint-every", "50"], "--checkpoint-every 50 is more than --steps"),
        ([*BASE, "--lr", "inf"], "--lr inf is not a usable learning rate"),
        ([*BASE, "--lr", "-1"], "'--lr': -1.0 is not in the range x>0"),
        (["--gpu", "cpu"], "give a MODEL"),
        (["tiny-llama"], "give --gpu"),
    ],
)
def test_bad_input_is_one_line_exit_1_and_writes_nothing(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    out = tmp_path / "sub" / "plan.json"
    r = CliRunner().invoke(main, [*args, "-o", str(out)] if "give -o" not in expected else args)
    assert r.exit_code == 1, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-plan: error: "), r.output
    assert expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # not even the parent directory


def test_unwritable_output_is_refused_before_planning(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    for out, expected in [
        (tmp_path / "afile" / "plan.json", "is a file, not a directory"),
        (tmp_path, "is a directory"),
    ]:
        r = CliRunner().invoke(main, [*BASE, "-o", str(out)])
        assert r.exit_code == 1 and expected in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_debug_shows_the_traceback_only_when_asked(tmp_path: Path) -> None:
    args = ["tiny-llama", "--gpu", "nosuchgpu", "-o", str(tmp_path / "p.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and r.exception is not None and isinstance(r.exception, SystemExit)
    r = CliRunner().invoke(main, [*args, "--debug"])
    from profiles import ProfileError

    assert isinstance(r.exception, ProfileError)  # raised through: Python prints the traceback


def test_debug_in_a_real_process_prints_a_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "planner.cli", "tiny-llama", "--gpu", "nosuch", "-o", str(tmp_path / "p")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    loud = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert quiet.returncode == 1 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr


def test_eval_and_checkpoint_cadence_and_report(tmp_path: Path) -> None:
    out = tmp_path / "new" / "plan.json"  # the parent is created once the plan fits
    args = [*BASE, "--steps", "20", "--eval-every", "5", "--checkpoint-every", "10", "--chunks", "2"]
    args += ["--checkpointing", "none", "--report", str(tmp_path / "rep"), "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    assert (plan.run.eval_every, plan.run.checkpoint_every) == (5, 10)
    assert (tmp_path / "rep" / "report.html").is_file() and "report written to" in r.output


def test_a_bad_report_dir_writes_nothing_and_a_failed_report_keeps_the_plan(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, [*BASE, "--report", str(tmp_path / "afile" / "rep"), "-o", str(out)])
    assert r.exit_code == 1 and "--report: cannot write the report" in r.output, r.output
    assert not out.exists()
    # passes the early check (a writable directory), then fails for real: report.html is a directory
    (tmp_path / "rep" / "report.html").mkdir(parents=True)
    r = CliRunner().invoke(main, [*BASE, "--report", str(tmp_path / "rep"), "-o", str(out)])
    assert r.exit_code == 3, r.output
    last = r.output.strip().splitlines()[-1]
    assert "the plan is written" in last and "the report failed" in last
    assert f"chunkft-report {out} -o {tmp_path / 'rep'}" in last
    assert load_plan(out).run.total_steps == 1000


def test_llama3_8b_fits_a_4090(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["llama-3-8b", "--gpu", "4090", "--host-mem", "128GiB", "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    pr, hw = plan.predictions, plan.hardware
    assert pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes <= hw.budget_bytes <= 24 * 2**30
    assert hw.headroom_bytes == 256 * 2**20 + int(0.03 * pr.peak_bytes)  # the default margin
    assert plan.run.cuda_alloc_conf == "expandable_segments:True"
    assert "predicted GPU peak" in r.output


def test_the_readme_main_job_plans_without_host_mem(tmp_path: Path) -> None:
    """`chunkft-plan llama-3-8b --gpu 4090` (no --host-mem) writes a plan on any machine; when this
    machine's free memory is smaller than the states the plan keeps on the host, it says so."""
    from planner.cli import available_host_bytes

    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["llama-3-8b", "--gpu", "4090", "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    assert plan.model.fingerprint and plan.chunk_table.num_chunks > 1
    need = plan.predictions.host_peak_bytes  # the states and a checkpoint
    assert need > plan.predictions.host_bytes and plan.hardware.host_budget_bytes >= need
    assert ("optimizer states in host memory" in r.output) == (need > available_host_bytes())


def test_an_explicit_host_mem_is_a_hard_limit(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["llama-3-8b", "--gpu", "4090", "--host-mem", "8GiB", "-o", str(out)])
    assert r.exit_code == 2
    assert "host memory: needs" in r.output and not out.exists()


def test_headroom_sizes() -> None:
    from planner.solver import Headroom

    assert parse_headroom("3%+256MiB") == Headroom(256 * 2**20, 0.03)
    assert parse_headroom("256MiB + 3%") == Headroom(256 * 2**20, 0.03)
    assert parse_headroom("5%") == Headroom(0, 0.05)
    assert parse_headroom("1GiB") == Headroom(2**30, 0.0)
    assert parse_headroom("0") == Headroom()
    assert [Headroom(256 * 2**20, 0.03).text(), Headroom(0, 0.05).text(), Headroom().text()] == [
        "3%+256MiB",
        "5%",
        "0",
    ]
    for bad in ("", "5", "%", "1GiB+1GiB", "3%+", "-1%"):
        with pytest.raises(ValueError, match="cannot read"):
            parse_headroom(bad if bad != "5" else "5%%")


def _plan(tmp_path: Path, *args: str) -> tuple:  # type: ignore[type-arg]
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert r.exit_code == 0, r.output
    return load_plan(out), r.output


def test_headroom_default_choice_and_what_the_output_says(tmp_path: Path) -> None:
    gpu = ["tiny-llama", "--gpu", "4090", "--seq-len", "64", "--host-mem", "4GiB", "--chunks", "2"]
    plan, text = _plan(tmp_path, *gpu)
    pr, hw = plan.predictions, plan.hardware
    assert hw.headroom_bytes == 256 * 2**20 + int(0.03 * pr.peak_bytes)
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("headroom"))
    assert "(prediction error +-3% of the peak, 256 MiB for untested GPU allocator behaviour)" in line
    total = f"{(pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes) / 2**30:.2f} GiB of"
    assert total in text
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in text
    plan, text = _plan(tmp_path, *gpu, "--headroom", "1GiB")
    assert plan.hardware.headroom_bytes == 2**30 and "(--headroom 1GiB)" in text
    plan, text = _plan(tmp_path, *gpu, "--headroom", "0")
    assert plan.hardware.headroom_bytes == 0 and "(--headroom 0: no safety margin)" in text
    plan, text = _plan(tmp_path, *BASE)  # the host CPU: no allocator to guard against
    assert plan.hardware.headroom_bytes == 0 and plan.run.cuda_alloc_conf == ""
    assert "none on the host CPU" in text and "PYTORCH_CUDA_ALLOC_CONF" not in text
    plan, _ = _plan(tmp_path, *BASE, "--headroom", "5%")
    assert plan.hardware.headroom_bytes == int(0.05 * plan.predictions.peak_bytes) > 0


def test_headroom_changes_what_fits(tmp_path: Path) -> None:
    """A budget that the bare plan fills exactly leaves no room for a margin: the solver must choose
    differently (or report nothing fits), never write a plan whose peak + reserve + headroom overflows."""
    args = [*BASE, "--chunks", "4", "--checkpointing", "none", "--headroom", "0"]
    bare, _ = _plan(tmp_path, *args)
    need = bare.predictions.peak_bytes + bare.predictions.reserve_bytes
    out = tmp_path / "tight.json"
    r = CliRunner().invoke(
        main, [*args[:-1], "64KiB", "--budget", str(need), "-o", str(out)]
    )  # the same plan no longer fits
    assert r.exit_code == 2 and not out.exists(), r.output
    assert "smallest budget that fits" in r.output and "headroom 0.00 GiB" in r.output


def test_clipping_and_weight_decay_are_plan_choices(tmp_path: Path) -> None:
    plan, text = _plan(tmp_path, *BASE)
    o = plan.run.optimizer
    assert (o.max_grad_norm, o.weight_decay_mode) == (1.0, "window")
    assert "clip the window's gradient norm at 1" in text
    plan, text = _plan(tmp_path, *BASE, "--max-grad-norm", "none", "--weight-decay", "0.1")
    assert plan.run.optimizer.max_grad_norm is None and "no clipping" in text
    assert "weight decay 0.1 (active window only)" in text
    plan, text = _plan(
        tmp_path,
        *BASE,
        "--max-grad-norm",
        "0.5",
        "--weight-decay",
        "0.1",
        "--weight-decay-mode",
        "compensated",
    )
    o = plan.run.optimizer
    assert (o.max_grad_norm, o.weight_decay, o.weight_decay_mode) == (0.5, 0.1, "compensated")
    assert "(compensated: (1 - lr*wd)**K per step)" in text
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "active window's own" in " ".join(help_text.split())


def test_gpu_auto_budgets_from_the_free_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A display or another process holds part of the card: --gpu auto plans for what NVML says is free."""
    from profiles import nvml

    total, free = 25_757_220_864, 20 * 2**30
    card = nvml.NvmlDevice(0, "NVIDIA GeForce RTX 4090", total, free)
    monkeypatch.setattr(nvml, "probe_all", lambda: [card])
    args = ["tiny-llama", "--gpu", "auto", "--seq-len", "64", "--host-mem", "4GiB", "--chunks", "2"]
    plan, text = _plan(tmp_path, *args)
    assert plan.hardware.gpu == "rtx-4090"
    assert (plan.hardware.budget_bytes, plan.hardware.memory_total_bytes) == (free, total)
    assert "budget 20.00 GiB (free of 23.99 GiB, NVML) per GPU" in text
    plan, _ = _plan(tmp_path, *args, "--budget", "22GiB")  # an explicit budget may exceed what is free now
    assert plan.hardware.budget_bytes == 22 * 2**30


def test_the_host_budget_must_hold_a_checkpoint_too(tmp_path: Path) -> None:
    plan, text = _plan(tmp_path, *BASE, "--chunks", "2")
    pr = plan.predictions
    assert pr.host_peak_bytes > pr.host_bytes
    at = (
        f"{pr.host_bytes / 2**30:.2f} GiB states + {(pr.host_peak_bytes - pr.host_bytes) / 2**30:.2f} GiB at "
    )
    assert at + "checkpoints" in text
    out = tmp_path / "small.json"
    host = str(pr.host_bytes)  # the states fit, a checkpoint on top does not
    r = CliRunner().invoke(main, [*BASE, "--chunks", "2", "--host-mem", host, "-o", str(out)])
    assert r.exit_code == 2 and not out.exists(), r.output
    assert "host memory: needs" in r.output and "+ a checkpoint" in r.output
