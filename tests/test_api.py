"""chunkft.plan() and chunkft.run(): the Python API gives what the command lines give."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from tiny_runs import PLAN_ARGS, shakespeare_text

import chunkft
from chunkft.plan_format import load_plan, plan_to_json
from chunkft.planner.cli import NoPlanFits, request_from
from chunkft.planner.cli import main as plan_main
from chunkft.profiles import ProfileError

OPTIONS = {"seq_len": 32, "batch_size": 2, "chunks": 4, "lr": 2e-3, "dtype": "fp32",
           "checkpointing": "none", "host_mem": "4GiB", "steps": 3}  # fmt: skip  (PLAN_ARGS, as keywords)


def test_plan_equals_the_command_line_plan(tmp_path: Path) -> None:
    res = CliRunner().invoke(plan_main, [*PLAN_ARGS, "--steps", "3", "-o", str(tmp_path / "cli.json")])
    assert res.exit_code == 0, res.output
    plan = chunkft.plan("tiny-llama", gpu="cpu", **OPTIONS)
    assert isinstance(plan, chunkft.Plan)
    assert plan_to_json(plan) == plan_to_json(load_plan(tmp_path / "cli.json"))
    assert list(tmp_path.iterdir()) == [tmp_path / "cli.json"]  # without output= nothing is written
    written = chunkft.plan("tiny-llama", gpu="cpu", output=f"{tmp_path}/api/", **OPTIONS)  # DIR/ as -o takes
    assert plan_to_json(load_plan(tmp_path / "api" / "plan.json")) == plan_to_json(written)
    assert plan_to_json(written) == plan_to_json(plan)


def test_options_take_the_command_lines_defaults_and_checks() -> None:
    req = request_from("tiny-llama", "cpu", budget="1GiB", max_grad_norm="none")
    assert (req.budget, req.max_grad_norm, req.lr, req.steps) == (2**30, None, 1e-5, 1000)
    defaults = {p.name: p.default for p in plan_main.params}
    assert req.batch_size == defaults["batch_size"] and req.efficiency is None  # resolved when planning
    with pytest.raises(TypeError, match="unknown option.*seqlen.*the options are.*seq_len"):
        request_from("tiny-llama", "cpu", seqlen=64)
    with pytest.raises(ValueError, match=r"chunks=0: 0 is not in the range x>=1"):
        request_from("tiny-llama", "cpu", chunks=0)
    with pytest.raises(ValueError, match="budget='lots'"):
        request_from("tiny-llama", "cpu", budget="lots")


def test_plan_raises_what_the_command_line_prints() -> None:
    with pytest.raises(NoPlanFits, match="does not fit 2.00 GiB per GPU.*smallest budget that fits"):
        chunkft.plan("llama-3-8b", gpu="4090", budget="2GiB", seq_len=1024)
    with pytest.raises(click.UsageError, match="--calibrate measures this machine's CPU"):
        chunkft.plan("tiny-llama", gpu="4090", calibrate=True)
    with pytest.raises(ProfileError, match="unknown GPU 'nosuch'; known: "):
        chunkft.plan("tiny-llama", gpu="nosuch")


def test_run_replays_a_plan_object_and_leaves_a_resumable_run(tmp_path: Path) -> None:
    plan = chunkft.plan("tiny-llama", gpu="cpu", **OPTIONS)
    data = shakespeare_text(tmp_path)
    out = tmp_path / "run"
    result = chunkft.run(plan, data=data, output=out, max_steps=2, progress=False)
    assert result.steps == 2 and result.output_dir == out
    assert plan_to_json(load_plan(out / "plan.json")) == plan_to_json(plan)
    assert json.loads(result.run_json.read_text())["plan"]["path"] == str(out / "plan.json")
    resumed = chunkft.run(out / "plan.json", data=data, output=out, resume=True, progress=False)
    assert resumed.steps == 3 and resumed.train_losses[:2] == result.train_losses
    with pytest.raises(TypeError, match="unknown option.*steps"):
        chunkft.run(out / "plan.json", data=data, output=out, steps=3)
    with pytest.raises(ValueError, match="needs output="):
        chunkft.run(plan, data=data)
