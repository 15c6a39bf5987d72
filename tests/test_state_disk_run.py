"""The disk tier through chunkft-run (issue 16 step 1): `--state-store disk --state-dir DIR` trains the
tiny Llama exactly as the host tier does, its checkpoints resume exactly (also when the run is killed in
the middle of a state file's write-back), and a full disk is one line with the resume command while the
last checkpoint stays intact."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_runs import plan_file, plan_tiny, shakespeare_text

from chunkft.cli_conventions import EXIT_FAILED
from chunkft.executor import state_files
from chunkft.executor.checkpoint import read_meta
from chunkft.executor.cli import main as run_main
from chunkft.executor.train import RunError, RunOptions, train

STEPS = 12  # 3 rotations of the 4 windows


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, Path, object]:
    """The plan, the data and the host-tier run every disk-tier run must equal."""
    tmp = tmp_path_factory.mktemp("disk-run")
    plan = plan_file(tmp, plan_tiny(tmp, STEPS), steps=STEPS, checkpoint_every=5)
    data = shakespeare_text(tmp, 20_000)
    host = train(RunOptions(plan, data, tmp / "host", progress=False))
    return plan, data, host


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def same_as_host(result, host) -> bool:
    wa, wb = weights(result.output_dir), weights(host.output_dir)
    return result.train_losses == host.train_losses and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_chunkft_run_on_the_disk_tier_equals_the_host_run(setup, tmp_path):
    plan, data, host = setup
    out, states = tmp_path / "disk", tmp_path / "states"
    args = [str(plan), "--data", str(data), "--output", str(out), "--quiet"]
    res = CliRunner().invoke(run_main, [*args, "--state-store", "disk", "--state-dir", str(states)])
    assert res.exit_code == 0, res.output
    run = json.loads((out / "run.json").read_text())["measured"]
    assert run["state_store"] == "disk" and run["host_state_bytes"] == 0
    assert run["state_file_bytes"] == json.loads((host.run_json).read_text())["measured"]["host_state_bytes"]
    assert 0 < run["staging_bytes"] < run["state_file_bytes"]  # 3 windows' worth of 4
    # what chunkft-run's host check counts for the disk tier, against what the run pinned
    from chunkft.executor.state_store import staging_host_bytes
    from chunkft.plan_format import load_plan

    predicted = staging_host_bytes(load_plan(plan))
    assert abs(predicted - run["staging_bytes"]) <= 0.01 * run["staging_bytes"], predicted
    wa, wb = weights(out), weights(host.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == list(host.train_losses)
    assert not states.exists()  # scratch: removed at the end of the run


def test_a_disk_tier_run_resumes_exactly_and_from_a_host_checkpoint(setup, tmp_path):
    plan, data, host = setup
    out = tmp_path / "split"
    first = train(RunOptions(plan, data, out, max_steps=7, progress=False, state_store="disk"))
    assert first.steps == 7 and (out / "checkpoints" / "step-000005").is_dir()
    assert not (out / "state-files").exists()
    resumed = train(RunOptions(plan, data, out, resume=True, progress=False, state_store="disk"))
    assert same_as_host(resumed, host)
    # a host-tier checkpoint continues on the disk tier (and the reverse): the trajectory is the same
    mixed = tmp_path / "mixed"
    train(RunOptions(plan, data, mixed, max_steps=7, progress=False))
    again = train(RunOptions(plan, data, mixed, resume=True, progress=False, state_store="disk"))
    assert same_as_host(again, host)


def test_a_full_disk_during_a_write_back_is_one_line_and_resumes(setup, tmp_path, monkeypatch):
    plan, data, host = setup
    out, states = tmp_path / "full", tmp_path / "states"
    real = state_files._write_all
    writes = {"n": 0}

    def fills_after_step_5(f, view):  # the only stand-in: a disk cannot be filled on purpose here
        if (out / "checkpoints" / "step-000005").is_dir():
            raise OSError(errno.ENOSPC, "No space left on device")
        writes["n"] += 1
        real(f, view)

    monkeypatch.setattr(state_files, "_write_all", fills_after_step_5)
    args = [str(plan), "--data", str(data), "--output", str(out), "--quiet", "--state-store", "disk"]
    res = CliRunner().invoke(run_main, [*args, "--state-dir", str(states)])
    assert res.exit_code == EXIT_FAILED and writes["n"] > 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    line = lines[0]
    assert "No space left on device" in line and str(states) in line and "free space" in line
    command = line.split("resume with: ")[1]
    assert "--state-store disk" in command and f"--state-dir {states}" in command and "--resume" in command
    read_meta(out / "checkpoints" / "step-000005")  # intact: sizes and digests verified
    assert not list(states.glob("*.tmp"))  # no half-written file left beside the old ones
    monkeypatch.setattr(state_files, "_write_all", real)
    res = CliRunner().invoke(run_main, command.split()[1:] + ["--quiet"])
    assert res.exit_code == 0, res.output
    wa, wb = weights(out), weights(host.output_dir)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


KILLER = """
import os, signal, sys
from chunkft.executor import state_files
from chunkft.executor.cli import main
real, n = state_files._write_all, [0]
def write(f, view):
    n[0] += 1
    if n[0] == int(os.environ["KILL_AT_WRITE"]):  # half of this file's bytes, then the process dies
        f.write(view[: len(view) // 2]); os.fsync(f.fileno()); os.kill(os.getpid(), signal.SIGKILL)
    real(f, view)
state_files._write_all = write
main(sys.argv[1:])
"""


def test_a_run_killed_during_a_write_back_resumes_exactly(setup, tmp_path):
    plan, data, host = setup
    out = tmp_path / "killed"
    args = [str(plan), "--data", str(data), "--output", str(out), "--quiet", "--state-store", "disk"]
    # fp32 weights: 2 files (the moments) per write-back, one write-back per step (one step per visit):
    # the 13th file write is step 7's, after checkpoint step-000005
    env = {**os.environ, "KILL_AT_WRITE": "13"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert (out / "checkpoints" / "step-000005").is_dir() and not (out / "run.json").exists()
    assert list((out / "state-files").glob("*.tmp"))  # it died with a state file half written
    resumed = train(RunOptions(plan, data, out, resume=True, progress=False, state_store="disk"))
    assert same_as_host(resumed, host)


def test_the_disk_tier_is_refused_for_states_kept_on_the_gpu_and_for_a_small_disk(setup, tmp_path):
    import dataclasses

    from chunkft.executor.distributed import World
    from chunkft.executor.state_store import check_state_disk, disk_tier, state_store_for
    from chunkft.plan_format import load_plan

    plan = load_plan(setup[0])
    on_gpu = dataclasses.replace(plan, placement=dataclasses.replace(plan.placement, optimizer_states="gpu"))
    with pytest.raises(ValueError, match="keeps the optimizer states on the GPU"):
        state_store_for(on_gpu, "disk")
    assert state_store_for(plan, None) == "host" and state_store_for(plan, "disk") == "disk"
    tier = disk_tier(tmp_path, None, World.single())
    assert tier.directory == tmp_path / "state-files"
    with pytest.raises(ValueError, match="free space there or give --state-dir on a larger disk"):
        check_state_disk(tier, 1 << 62)
    check_state_disk(tier, 1 << 20)


def test_the_host_check_counts_the_staging_buffers_instead_of_the_stores(setup):
    from chunkft.executor.state_store import staging_host_bytes
    from chunkft.executor.train import check_host_memory, host_bytes_needed
    from chunkft.plan_format import load_plan

    plan, cpu = load_plan(setup[0]), torch.device("cpu")
    host_need, _ = host_bytes_needed(plan, cpu)
    disk_need, _ = host_bytes_needed(plan, cpu, "disk")
    assert host_need - disk_need == plan.predictions.host_bytes - staging_host_bytes(plan) > 0
    check_host_memory(plan, disk_need, cpu, setup[0], "disk")  # enough for the disk tier
    with pytest.raises(RunError, match="of optimizer states in host memory"):
        check_host_memory(plan, disk_need, cpu, setup[0])  # not for the host tier
    with pytest.raises(RunError, match="of disk-tier staging buffers in host memory"):
        check_host_memory(plan, disk_need - 1, cpu, setup[0], "disk")


def test_a_resume_refused_after_the_driver_is_built_leaves_no_state_files(setup, tmp_path):
    import dataclasses

    from chunkft.executor.checkpoint import CheckpointError
    from chunkft.plan_format import load_plan, save_plan

    plan, data, _ = setup
    out = tmp_path / "refused"
    train(RunOptions(plan, data, out, max_steps=5, progress=False, state_store="disk"))
    other = load_plan(plan)
    opt = dataclasses.replace(other.run.optimizer, lr=other.run.optimizer.lr * 2)
    changed = dataclasses.replace(other, run=dataclasses.replace(other.run, optimizer=opt))
    save_plan(changed, tmp_path / "o.json")
    with pytest.raises(CheckpointError, match="another plan"):
        train(RunOptions(tmp_path / "o.json", data, out, resume=True, progress=False, state_store="disk"))
    assert not (out / "state-files").exists()  # built, then removed with the refusal
