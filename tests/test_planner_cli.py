"""chunkft-plan end to end through click's runner."""

from pathlib import Path

from click.testing import CliRunner

from planner.cli import main, parse_size
from planner.plan import load_plan
from planner.simulator import simulate_plan


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


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["tiny-llama", "--gpu", "cpu", "--budget", "lots", "-o", str(out)])
    assert r.exit_code == 2 and "cannot read size" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["tiny-llama", "--gpu", "nosuchgpu", "-o", str(out)])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert not out.exists()


def test_llama3_8b_fits_a_4090(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, ["llama-3-8b", "--gpu", "4090", "--host-mem", "128GiB", "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    pr = plan.predictions
    assert pr.peak_bytes + pr.reserve_bytes <= plan.hardware.budget_bytes <= 24 * 2**30
    assert "predicted GPU peak" in r.output
