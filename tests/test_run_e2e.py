"""chunkft-run end to end on CPU: plan (chunkft-plan) then run the tiny Llama on tinyshakespeare, resume
exactly, export a loadable model, write run.json, stop cleanly on SIGTERM, refuse bad input with one line."""

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

from chunkft.executor.cli import main as run_main
from chunkft.executor.train import RunOptions, train
from chunkft.plan_format import Plan, load_plan, save_plan

REPO = Path(__file__).parents[1]
SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


_PLANNED: dict[str, object] = {}


def _plan(
    tmp: Path, *, steps: int, eval_every: int = 0, checkpoint_every: int = 0, name: str = "plan"
) -> Path:
    """A real CPU plan from chunkft-plan for the tiny Llama (planned once per session), with the step count
    and the eval/checkpoint cadence set for the test."""
    from chunkft.planner.cli import main as plan_main

    if "plan" not in _PLANNED:
        path = tmp / "planned.json"
        args = [
            "tiny-llama",
            "--gpu",
            "cpu",
            "--seq-len",
            "32",
            "--batch-size",
            "4",
            "--micro-batch",
            "2",
            "--chunks",
            "4",
            "--steps",
            "15",
            "--lr",
            "2e-3",
            "--schedule",
            "constant",
            "--dtype",
            "fp32",
            "--checkpointing",
            "none",
            "-o",
            str(path),
        ]
        res = CliRunner().invoke(plan_main, args)
        assert res.exit_code == 0, res.output
        _PLANNED["plan"] = load_plan(path)
    plan = _PLANNED["plan"]
    assert isinstance(plan, Plan)
    schedule = dataclasses.replace(plan.run.schedule, total_steps=steps)
    run = dataclasses.replace(
        plan.run,
        total_steps=steps,
        schedule=schedule,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
    )
    path = tmp / f"{name}.json"
    save_plan(dataclasses.replace(plan, run=run), path)
    return path


def _text(tmp: Path, chars: int) -> Path:
    path = tmp / "shakespeare.txt"
    path.write_text(SHAKESPEARE.read_text()[:chars])
    return path


def test_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    plan = _plan(tmp_path, steps=15, checkpoint_every=5)
    data = _text(tmp_path, 20_000)
    whole = train(RunOptions(plan, data, tmp_path / "whole", progress=False))
    first = train(RunOptions(plan, data, tmp_path / "split", max_steps=7, progress=False))
    assert len(first.train_losses) == 7
    resumed = train(RunOptions(plan, data, tmp_path / "split", max_steps=15, resume=True, progress=False))
    assert resumed.steps == 15 and len(resumed.train_losses) == 15
    torch.testing.assert_close(
        torch.tensor(resumed.train_losses), torch.tensor(whole.train_losses), rtol=0, atol=1e-6
    )
    assert whole.train_losses[-1] < whole.train_losses[0]
    from safetensors.torch import load_file

    wa = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    wb = load_file(str(tmp_path / "split" / "model" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    names = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert names == ["latest", "step-000010", "step-000015"]


def test_tiny_llama_on_shakespeare_eval_loss_falls_and_exports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    plan = _plan(tmp_path, steps=30, eval_every=10)
    out = tmp_path / "run"
    res = CliRunner().invoke(
        run_main, [str(plan), "--data", str(SHAKESPEARE), "--output", str(out), "--quiet"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads((out / "run.json").read_text())
    evals = [e["eval_loss"] for e in report["losses"]["eval"]]
    assert [e["step"] for e in report["losses"]["eval"]] == [0, 10, 20, 30]
    assert evals[-1] < evals[0] - 1.0, evals  # byte-level: from ~ln(512) towards character statistics
    assert len(report["losses"]["train"]) == 30 and report["skipped_steps"] == 0
    m = report["measured"]
    assert m["memory_method"] == "memtracker" and m["memory_steps"] == [1, 2, 3, 4]
    assert m["peak_bytes"] == sum(m["peak_by_category"].values()) > 0
    from chunkft.profiles import build_model, load_model

    ref = build_model(load_model("tiny-llama"), "cpu").eval()
    held = [*ref.parameters(), *ref.buffers()]  # fp32 weights + the rotary inv_freq buffer
    assert m["peak_by_category"]["weights"] == sum(t.numel() * t.element_size() for t in held)
    assert report["predicted"]["peak_bytes"] > 0 and report["ratios"]["peak_bytes"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm", "chunk", "tokens_per_s", "seconds", "skipped"} <= set(lines[1])
    assert [x["chunk"] for x in lines if "loss" in x][:5] == [0, 1, 2, 3, 0]

    # the exported directory loads with from_pretrained and equals the final checkpoint's weights
    exported = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    from safetensors.torch import load_model as load_weights

    from chunkft.executor.checkpoint import latest_checkpoint

    load_weights(ref, str(latest_checkpoint(out) / "model.safetensors"))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    assert json.loads((out / "model" / "chunkft_tokenizer.json").read_text())["eos_id"] == 257


def test_sigterm_finishes_the_step_checkpoints_and_exits_143(tmp_path: Path) -> None:
    plan = _plan(tmp_path, steps=500)
    data = _text(tmp_path, 20_000)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chunkft.executor.cli",
            str(plan),
            "--data",
            str(data),
            "--output",
            str(out),
            "--quiet",
        ],
        env=env,
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count("\n") < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "resume with: chunkft-run" in err and "--resume" in err
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    meta = json.loads(
        (
            out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip() / "state.json"
        ).read_text()
    )
    assert meta["step"] == steps[-1] >= 2


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing-data", "data file not found"),
        ("binary-data", ":1: binary data"),
        ("output-is-file", "is a file; give a directory"),
        ("resume-nothing", "no checkpoints to resume from"),
        ("missing-plan", "not found; make one with chunkft-plan"),
        ("bad-steps", "--max-steps must be >= 1"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path: Path, case: str, expected: str) -> None:
    plan = _plan(tmp_path, steps=3) if case != "missing-plan" else tmp_path / "nope.json"
    data = _text(tmp_path, 5_000)
    out = tmp_path / "out"
    args = [str(plan), "--data", str(data), "--output", str(out), "--quiet"]
    if case == "missing-data":
        args[2] = str(tmp_path / "missing.txt")
    elif case == "binary-data":
        data.write_bytes(b"\x00\x01\x02" * 100)
    elif case == "output-is-file":
        out.write_text("x")
    elif case == "resume-nothing":
        args.append("--resume")
    elif case == "bad-steps":
        args += ["--max-steps", "0"]
    res = CliRunner().invoke(run_main, args)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], res.output
    assert case == "output-is-file" or not out.exists()


def test_resume_refuses_a_checkpoint_from_another_plan(tmp_path: Path) -> None:
    plan = _plan(tmp_path, steps=2)
    data = _text(tmp_path, 5_000)
    out = tmp_path / "out"
    assert (
        CliRunner()
        .invoke(run_main, [str(plan), "--data", str(data), "--output", str(out), "--quiet"])
        .exit_code
        == 0
    )
    other = load_plan(plan)
    other = dataclasses.replace(other, run=dataclasses.replace(other.run, seed=other.run.seed + 1))
    save_plan(other, tmp_path / "other.json")
    res = CliRunner().invoke(
        run_main,
        [
            str(tmp_path / "other.json"),
            "--data",
            str(data),
            "--output",
            str(out),
            "--max-steps",
            "4",
            "--resume",
            "--quiet",
        ],
    )
    assert res.exit_code == 2 and "written under another plan" in res.output
    res = CliRunner().invoke(run_main, [str(plan), "--data", str(data), "--output", str(out), "--quiet"])
    assert res.exit_code == 2 and "already holds a run" in res.output


def test_checkpointing_as_planned_keeps_backward_above_the_window() -> None:
    """transformers' gradient_checkpointing_enable makes the input embeddings require grad; the run must
    undo that, or backward would reach the embedding whatever the window."""
    import torch

    from chunkft.chunks import param_specs, partition
    from chunkft.executor.slicegrad import SliceGradients
    from chunkft.executor.train import apply_checkpointing
    from chunkft.profiles import build_model, load_model

    torch.manual_seed(0)
    model = build_model(load_model("tiny-llama"), device="cpu")
    apply_checkpointing(model, "all", ())
    model.train()
    reached = []
    model.model.layers[0].register_full_backward_hook(lambda *_: reached.append(0))
    grads = SliceGradients(model)
    top = partition(param_specs(model), num_chunks=4)[-1]
    grads.activate(top)
    ids = torch.randint(0, 256, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    grads.deactivate()
    assert reached == []


def test_out_of_memory_mid_step_saves_the_step_start_and_resumes_exactly(tmp_path: Path) -> None:
    """An OOM in forward/backward leaves weights and states as they were at the step's start: the run
    checkpoints that state (data position and RNG included) and a resume continues exactly."""
    plan = _plan(tmp_path, steps=10, name="oom")
    data = _text(tmp_path, 20_000)
    whole = train(RunOptions(plan, data, tmp_path / "whole", progress=False))

    calls = {"n": 0}

    def fail_on_the_14th_forward(module, args, output):  # type: ignore[no-untyped-def]
        if type(module).__name__ == "LlamaForCausalLM":  # the outer model: one call per micro-batch
            calls["n"] += 1
            if calls["n"] == 14:  # step 7 (2 micro-batches a step), second micro-batch
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    handle = torch.nn.modules.module.register_module_forward_hook(fail_on_the_14th_forward)
    try:
        with pytest.raises(torch.OutOfMemoryError):
            train(RunOptions(plan, data, tmp_path / "oom", progress=False))
    finally:
        handle.remove()
    assert (tmp_path / "oom" / "checkpoints" / "step-000006").is_dir()
    resumed = train(RunOptions(plan, data, tmp_path / "oom", resume=True, progress=False))
    torch.testing.assert_close(
        torch.tensor(resumed.train_losses), torch.tensor(whole.train_losses), rtol=0, atol=1e-6
    )
