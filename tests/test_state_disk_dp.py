"""The disk tier under data parallel (2 gloo ranks, CPU): each rank keeps its shard of every window in
files of its own (<state-dir>/rank-N) and the run equals the 2-rank host-tier run bit for bit; its
checkpoint (each rank's rows, through DCP) resumes on 1 rank on the host tier."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_runs import PLAN_ARGS, shakespeare_text

from chunkft.executor.cli import main as run_main
from chunkft.plan_format import load_plan, save_plan
from chunkft.planner.cli import main as plan_main

STEPS = 6
QUIET = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def test_two_ranks_on_the_disk_tier_equal_two_on_the_host_and_resume_on_one(tmp_path) -> None:
    args = [a if a != "2" else "4" for a in PLAN_ARGS]  # --batch-size 4
    args += ["--micro-batch", "1", "--grad-accum", "4", "--num-gpus", "2", "--steps", str(STEPS)]
    args += ["--checkpoint-every", "3", "-o", str(tmp_path / "plan2.json")]
    res = CliRunner().invoke(plan_main, args)
    assert res.exit_code == 0, res.output
    two = load_plan(tmp_path / "plan2.json")
    one = dataclasses.replace(two, hardware=dataclasses.replace(two.hardware, num_gpus=1, parallel="none"))
    save_plan(one, tmp_path / "plan1.json")
    data = shakespeare_text(tmp_path)
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k not in ("RANK", "WORLD_SIZE")}
    runs = {}
    for store in ("host", "disk"):
        out = tmp_path / store
        cmd = [sys.executable, "-m", "chunkft.executor.cli", tmp_path / "plan2.json", "--data", data,
               "--output", out, "--quiet", "--nproc", "2", "--state-store", store,
               "--max-steps", str(STEPS if store == "host" else 4)]  # fmt: skip
        proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs[store] = out
    # the disk run stopped after 4 steps (checkpoint step-3 and step-4), so resume it on 2 ranks to 6
    cmd = [sys.executable, "-m", "chunkft.executor.cli", tmp_path / "plan2.json", "--data", data,
           "--output", runs["disk"], "--quiet", "--nproc", "2", "--state-store", "disk",
           "--resume"]  # fmt: skip
    proc = subprocess.run(list(map(str, cmd)), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = json.loads((runs["host"] / "run.json").read_text())
    b = json.loads((runs["disk"] / "run.json").read_text())
    assert b["measured"]["state_store"] == "disk" and b["measured"]["host_state_bytes"] == 0
    assert b["measured"]["state_file_bytes"] == a["measured"]["host_state_bytes"]  # rank 0's shard
    assert a["losses"]["train"] == b["losses"]["train"]
    wa = load_file(str(runs["host"] / "model" / "model.safetensors"))
    wb = load_file(str(runs["disk"] / "model" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the 2-rank disk-tier checkpoint at step 4 resumes on 1 rank on the host tier (DCP reshards)
    res = CliRunner().invoke(
        run_main,
        [str(tmp_path / "plan1.json"), "--data", str(data), "--output", str(runs["disk"]), "--quiet",
         "--resume-from", "step-4", "--max-steps", str(STEPS)],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    c = json.loads((runs["disk"] / "run.json").read_text())
    assert c["world_size"] == 1
    assert torch.allclose(torch.tensor(c["losses"]["train"]), torch.tensor(a["losses"]["train"]), rtol=1e-5)
