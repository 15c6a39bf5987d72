"""chunkft-plan end to end through click's runner."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from chunkft.plan_format import load_plan
from chunkft.planner.cli import main, parse_headroom, parse_size
from chunkft.planner.simulator import simulate_plan

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


def test_infeasible_budget_exits_3_with_an_error_line_and_writes_nothing(tmp_path: Path) -> None:
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
    assert r.exit_code == 3  # EXIT_NO_FIT
    assert not out.exists()
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("chunkft-plan: error: tiny-llama does not fit "), last
    assert "smallest budget that fits" in last and last.endswith("; give --budget 0.02 GiB or more"), last


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
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    out = tmp_path / "sub" / "plan.json"
    r = CliRunner().invoke(main, [*args, "-o", str(out)] if "give -o" not in expected else args)
    assert r.exit_code == 2, r.output  # EXIT_BAD_INPUT, as chunkft-run
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-plan: error: "), r.output
    assert expected in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # not even the parent directory


def test_unwritable_output_is_refused_before_planning(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir" / "plan.json").mkdir(parents=True)  # -o dir means dir/plan.json: a directory here
    for out, expected in [
        (tmp_path / "afile" / "plan.json", "is a file, not a directory"),
        (tmp_path / "dir", "plan.json is a directory"),
    ]:
        r = CliRunner().invoke(main, [*BASE, "-o", str(out)])
        assert r.exit_code == 2 and expected in r.output and len(r.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "dir"]


def test_debug_shows_the_traceback_only_when_asked_and_keeps_the_exit_code(tmp_path: Path) -> None:
    args = ["tiny-llama", "--gpu", "nosuchgpu", "-o", str(tmp_path / "p.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit) and "Traceback" not in r.output
    r = CliRunner().invoke(main, [*args, "--debug"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output  # the same code
    assert "Traceback (most recent call last)" in r.output and "ProfileError" in r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("chunkft-plan: error: unknown GPU 'nosuchgpu'"), last


def test_debug_in_a_real_process_prints_a_traceback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "chunkft.planner.cli", "tiny-llama", "--gpu", "nosuch"]
    cmd += ["-o", str(tmp_path / "p")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    loud = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert quiet.returncode == 2 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()  # the same one line, last


def test_a_real_process_prints_no_torch_warnings(tmp_path: Path) -> None:
    """Before: planning tiny-bert printed torch's ModTracker warnings ("Module is None. Skipping PRE_BW
    hook", with a source line) above the summary."""
    cmd = [sys.executable, "-m", "chunkft.planner.cli", "tiny-bert", "--gpu", "cpu", "--seq-len", "64"]
    proc = subprocess.run([*cmd, "-o", str(tmp_path / "p.json")], capture_output=True, text=True,
                          cwd=REPO, env=ENV, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr + proc.stdout, proc.stderr


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
    assert r.exit_code == 2 and "--report " in r.output and "is a file, not a directory" in r.output
    assert not out.exists()
    # passes the early check (a writable directory), then fails for real: report.html is a directory
    (tmp_path / "rep" / "report.html").mkdir(parents=True)
    r = CliRunner().invoke(main, [*BASE, "--report", str(tmp_path / "rep"), "-o", str(out)])
    assert r.exit_code == 4, r.output  # EXIT_REPORT_FAILED
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
    from chunkft.planner.cli import available_host_bytes

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
    assert r.exit_code == 3
    assert "host memory: needs" in r.output and not out.exists()


def test_headroom_sizes() -> None:
    from chunkft.planner.solver import Headroom

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
    assert r.exit_code == 3 and not out.exists(), r.output
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
    from chunkft.profiles import nvml

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
    assert r.exit_code == 3 and not out.exists(), r.output
    assert "host memory: needs" in r.output and "+ a checkpoint" in r.output


# ---------------------------------------------------------------- issue 17: rough edges a new user hits


def _one_line(r) -> str:  # type: ignore[no-untyped-def]
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-plan: error: "), r.output
    return lines[0]


def test_an_oserror_while_writing_the_plan_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import chunkft.plan_format

    def full(plan, path):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(chunkft.plan_format, "save_plan", full)
    r = CliRunner().invoke(main, [*BASE, "--chunks", "2", "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 1, r.output  # EXIT_FAILED: the input was fine
    assert "No space left on device; check the path and free space" in r.output.strip().splitlines()[-1]


@pytest.mark.parametrize("error", ["report-error", "runtime-error"])
def test_any_report_failure_keeps_the_plan_and_exits_4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str
) -> None:
    """reports.write_report raises ReportError when its budget sweep fails (or anything else on a bug):
    never exit 0 without the report, never lose the plan."""
    from chunkft import reports
    from chunkft.reports import ReportError

    def broken(plan, out_dir, **kwargs):  # type: ignore[no-untyped-def]
        raise ReportError("the budget sweep failed") if error == "report-error" else RuntimeError("boom")

    monkeypatch.setattr(reports, "write_report", broken)
    out, rep = tmp_path / "plan.json", tmp_path / "rep"
    r = CliRunner().invoke(main, [*BASE, "--chunks", "2", "--report", str(rep), "-o", str(out)])
    assert r.exit_code == 4, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("chunkft-plan: error: the plan is written (")
    assert ("the budget sweep failed" if error == "report-error" else "RuntimeError: boom") in last
    assert last.endswith(f"redo it with: chunkft-report {out} -o {rep}") and load_plan(out)


@pytest.mark.parametrize("debug", [False, True])
def test_an_internal_error_points_to_debug_unless_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, debug: bool
) -> None:
    """Before: "(rerun with --debug for the traceback)" was printed under the traceback --debug gave."""
    import chunkft.planner.cli

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom")

    monkeypatch.setattr(chunkft.planner.cli, "run_request", boom)
    r = CliRunner().invoke(main, [*BASE, "-o", str(tmp_path / "p.json"), *(["--debug"] if debug else [])])
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code == 1 and last.startswith("chunkft-plan: error: RuntimeError: boom"), r.output
    assert ("rerun with --debug" in last) != debug


def test_an_unwritable_report_dir_is_named_as_report_not_o(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In chunkft-plan -o is the plan's file: a --report problem must not say "choose a writable -o DIR"
    (reports.writer's wording, for chunkft-report). os.access is faked: these tests may run as root."""
    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path / "ro" and real(p, mode))
    rep = tmp_path / "ro" / "rep"
    r = CliRunner().invoke(main, [*BASE, "--report", str(rep), "-o", str(tmp_path / "p.json")])
    assert r.exit_code == 2
    line = _one_line(r)
    assert f"--report {rep}: {tmp_path / 'ro'} is not writable; choose another --report DIR" in line
    assert "-o DIR" not in line and not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(
    ("model", "seq_len", "least"), [("tiny-llama", "1", 2), ("tiny-bert", "1", 3), ("tiny-bert", "2", 3)]
)
def test_sequences_too_short_to_train_are_refused(
    tmp_path: Path, model: str, seq_len: str, least: int
) -> None:
    args = [model, "--gpu", "cpu", "--seq-len", seq_len, "-o", str(tmp_path / "p.json")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    line = _one_line(r)
    assert f"--seq-len {seq_len} is too short to train" in line and f"use --seq-len {least} or more" in line
    assert list(tmp_path.iterdir()) == []


def test_the_shortest_trainable_sequences_pass_the_check() -> None:
    from chunkft.planner.cli import check_trainable_seq_len

    check_trainable_seq_len(2, "causal-lm")
    check_trainable_seq_len(3, "sequence-classification")


def test_tiny_bert_defaults_to_its_own_positions_and_says_why_this_plan(tmp_path: Path) -> None:
    """The README's tiny-bert line plans without --seq-len (its 512 positions, not the default 1024); the
    summary says so, labels the host budget, and explains a runner-up that is faster per step."""
    plan, text = _plan(tmp_path, "tiny-bert", "--gpu", "cpu")
    assert plan.run.seq_len == 512
    assert "sequences of 512 tokens (the default 1024 shortened to tiny-bert's 512 positions)" in text
    assert "host budget " in text and "(this machine's available memory)" in text
    assert "why this plan: the least time to update every parameter once (K x step time); within 1%" in text
    faster = [a for a in plan.alternatives if a.step_seconds < plan.predictions.step_seconds]
    assert faster, text  # K=2 runner-ups: faster steps, but two of them per full update
    for a in faster:
        assert f"  {a.label}: slower to update every parameter once: K={a.k} x" in text, text
    args = ["tiny-bert", "--gpu", "cpu", "--seq-len", "1024", "-o", str(tmp_path / "x")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2 and "beyond tiny-bert's 512 positions" in _one_line(r)
    help_text = " ".join(CliRunner().invoke(main, ["--help"]).output.split())
    assert "default 1024, or the model's maximum positions when fewer" in help_text


def test_host_budget_from_host_mem_is_labelled(tmp_path: Path) -> None:
    _, text = _plan(tmp_path, *BASE, "--chunks", "2")
    assert "host budget 4.00 GiB (--host-mem)" in text


def test_a_reserve_larger_than_the_card_is_refused_up_front(tmp_path: Path) -> None:
    args = ["tiny-llama", "--gpu", "4090", "--reserve", "30GiB", "-o", str(tmp_path / "p")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2
    line = _one_line(r)
    expected = (
        "--reserve 30.00 GiB is more than the NVIDIA GeForce RTX 4090's 23.99 GiB budget; lower --reserve"
    )
    assert expected in line


def test_no_budget_above_the_card_is_ever_suggested(tmp_path: Path) -> None:
    """The reserve alone is just under the card: the smallest plan needs more than the card has, so the line
    says no budget on this card fits and what would, instead of a 24.1 GiB --budget for a 23.99 GiB card."""
    out = tmp_path / "p.json"
    args = ["tiny-llama", "--gpu", "4090", "--seq-len", "64", "--chunks", "2", "--headroom", "0"]
    r = CliRunner().invoke(main, [*args, "--reserve", "23.98GiB", "--host-mem", "4GiB", "-o", str(out)])
    assert r.exit_code == 3, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("chunkft-plan: error: tiny-llama does not fit 23.99 GiB per GPU")
    assert "no budget on the NVIDIA GeForce RTX 4090's 23.99 GiB fits" in line
    assert "smallest budget that fits" not in line and "more GPUs (--num-gpus)" in line
    assert "a lower --reserve" in line and line.endswith("or a card with more memory") and not out.exists()


@pytest.mark.parametrize("existing", [False, True])
def test_o_naming_a_directory_writes_plan_json_inside_it(tmp_path: Path, existing: bool) -> None:
    target = tmp_path / "newdir"
    if existing:
        target.mkdir()
    arg = str(target) if existing else str(target) + os.sep
    r = CliRunner().invoke(main, [*BASE, "--chunks", "2", "-o", arg])
    assert r.exit_code == 0, r.output
    assert target.is_dir() and load_plan(target / "plan.json")
    assert f"plan written to {target / 'plan.json'} (-o {arg} is a directory)" in r.output


def test_the_host_warning_is_its_own_line_in_order_when_stdout_and_stderr_are_merged(tmp_path: Path) -> None:
    """2>&1 into a pipe (a CI log): stdout is block-buffered, stderr is not, so without a flush the warning
    came out before the summary or glued to another line."""
    out = tmp_path / "p.json"
    code = (
        "import sys, chunkft.planner.cli as c; c.available_host_bytes = lambda: 2**20; "
        "c.main(prog_name='chunkft-plan')"
    )
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", "64", "--chunks", "2", "-o", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=REPO, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout
    lines = proc.stdout.splitlines()  # no torch warnings among them (executor/measure.py filters them)
    warn = [i for i, ln in enumerate(lines) if "optimizer states in host memory" in ln]
    assert len(warn) == 1 and lines[warn[0]].startswith("chunkft-plan: warning: this plan keeps "), lines
    written = next(i for i, ln in enumerate(lines) if ln.startswith("plan written to "))
    table = next(i for i, ln in enumerate(lines) if ln.startswith("why this plan:"))
    assert table < warn[0] < written, lines
    assert "(what the plan needs; this machine has 0.00 GiB available)" in proc.stdout


def test_calibrate_plans_with_the_measured_rates_and_records_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plumbing only (no timing): an injected probe result lands in the plan, the solver plans with it,
    the plan replays with it (chunkft-plan re-simulates before writing) and the summary names it."""
    from chunkft.planner import costs

    def rates(flops: int):  # type: ignore[no-untyped-def]
        return lambda dtype, shape: costs.MeasuredRates(flops, 40_000_000_000, shape)

    args = [*BASE, "--chunks", "2", "--checkpointing", "none", "--calibrate"]
    monkeypatch.setattr(costs, "measure_host_rates", rates(10**11))
    slow, text = _plan(tmp_path, *args)
    hw = slow.hardware
    assert (hw.measured_flops_per_s, hw.measured_memory_bytes_per_s) == (10**11, 40_000_000_000)
    assert slow.predictions.compute_efficiency == costs.CALIBRATED_EFFICIENCY
    assert "rates      measured on this machine (--calibrate): 100 GFLOP/s float32 matmul (" in text
    assert "40.0 GB/s copy" in text and "of the measured matmul FLOP/s)" in text
    monkeypatch.setattr(costs, "measure_host_rates", rates(10**12))
    fast, _ = _plan(tmp_path, *args)
    assert fast.predictions.step_seconds < slow.predictions.step_seconds / 5  # compute-bound: ~10x
    plain, text = _plan(tmp_path, *BASE, "--chunks", "2", "--checkpointing", "none")
    assert plain.hardware.measured_flops_per_s == 0 and "rates " not in text


def test_a_calibrated_plan_replays_and_sweeps_with_its_measured_rates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chunkft-report rebuilds the step from the plan alone (setup_and_candidate) and sweeps budgets:
    both must use the plan's measured rates. Before: the profile's (0.4 s predicted, 0.01 s redrawn)."""
    from chunkft.planner import costs
    from chunkft.planner.simulator import setup_and_candidate, simulate
    from chunkft.reports.sweep import solver_sweep

    measured = costs.MeasuredRates(10**10, 4_000_000_000, (1, 1, 1))  # a slow machine: far from the profile
    monkeypatch.setattr(costs, "measure_host_rates", lambda dtype, shape: measured)
    plan, _ = _plan(tmp_path, *BASE, "--calibrate")  # the solver's choices, as the sweep's are
    setup, cand, act = setup_and_candidate(plan)
    redrawn = simulate(setup, cand, act).step.step_seconds
    assert redrawn == pytest.approx(plan.predictions.step_seconds, rel=1e-9)
    points = solver_sweep(plan, structure=setup.structure, gpus=(), points_per_gpu=3)
    mine = next(p for p in points if p.budget_bytes == plan.hardware.budget_bytes)
    assert (mine.k, mine.step_seconds) == (plan.chunk_table.num_chunks, plan.predictions.step_seconds)


def test_calibrate_is_for_the_host_cpu_only(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["tiny-llama", "--gpu", "4090", "--calibrate", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2
    assert "--calibrate measures this machine's CPU, so it needs --gpu cpu, not rtx-4090" in _one_line(r)


def test_the_probe_shape_follows_the_model() -> None:
    from chunkft import profiles
    from chunkft.planner.costs import PROBE_MAX_ROWS, probe_shape
    from chunkft.planner.profile_model import model_structure

    preset = profiles.load_model("tiny-llama")
    st = model_structure(preset.config, preset.task, "float32")
    rows, inner, out = probe_shape(st, 8 * 128)
    assert rows == 1024 and inner == st.hidden_size and out * inner >= st.hidden_size**2
    assert probe_shape(st, 10**6)[0] == PROBE_MAX_ROWS


def test_num_gpus_alone_gives_every_rank_a_sequence_and_an_uneven_batch_names_one_that_works(
    tmp_path: Path,
) -> None:
    """--batch-size left out is one sequence per GPU (a batch of 1 cannot be dealt out to 2 ranks); a
    batch that does not divide is refused in one line whose suggestion then plans."""
    base = ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--chunks", "2", "--steps", "4"]
    res = CliRunner().invoke(main, [*base, "--num-gpus", "2", "-o", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    plan = load_plan(tmp_path / "a.json")
    assert plan.hardware.parallel == "data"
    assert (plan.run.micro_batch_size, plan.run.grad_accum_steps) == (1, 2)
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "one.json")])
    assert res.exit_code == 0 and load_plan(tmp_path / "one.json").run.grad_accum_steps == 1  # as before
    bad = [*base, "--num-gpus", "2", "--batch-size", "3", "-o", str(tmp_path / "b.json")]
    res = CliRunner().invoke(main, bad)
    lines = [ln for ln in res.output.splitlines() if ln.startswith("chunkft-plan: error:")]
    assert res.exit_code == 2 and len(lines) == 1 and "pass e.g. --batch-size 4" in lines[0], res.output
    assert not (tmp_path / "b.json").exists()
    fixed = [a if a != "3" else "4" for a in bad]
    res = CliRunner().invoke(main, fixed)
    assert res.exit_code == 0, res.output
    assert load_plan(tmp_path / "b.json").run.grad_accum_steps % 2 == 0


def test_a_run_too_short_for_every_window_is_one_warning_line_at_plan_and_at_run(tmp_path: Path) -> None:
    """--steps 3 over 4 windows at 1 step per visit never trains window 3: chunkft-plan says so in one
    warning line (its options' words) and writes the plan; chunkft-run says it in one line too, not as a
    Python warning with a source path; enough steps: no warning."""
    from chunkft.executor.cli import main as run_main

    base = ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--chunks", "4", "--update-interval", "1"]
    res = CliRunner().invoke(main, [*base, "--steps", "3", "-o", str(tmp_path / "p.json")])
    lines = [ln for ln in res.output.splitlines() if "warning:" in ln]
    assert res.exit_code == 0 and len(lines) == 1, res.output
    assert lines[0].startswith("chunkft-plan: warning: 3 steps at 1 step per visit reach 3 of 4 windows")
    assert "window(s) 3 would never be trained" in lines[0] and "fewer --chunks, or more --steps" in lines[0]
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 40)
    res = CliRunner().invoke(run_main, [str(tmp_path / "p.json"), "--data", str(data),
                                        "--output", str(tmp_path / "run"), "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "window(s) 3 would never be trained" in ln]
    assert len(lines) == 1 and lines[0].startswith("chunkft-run: warning: 3 steps"), res.output
    res = CliRunner().invoke(main, [*base, "--steps", "8", "-o", str(tmp_path / "q.json")])
    assert res.exit_code == 0 and "warning:" not in res.output, res.output
