"""Experiment 4, the GPU check: does a plan for a 24 GiB card hold on a real GPU?

For Llama-3-8B and Llama-2-7B architectures (random init, bf16, seq 1024, batch 1), with the caching
allocator capped to 24 GiB by torch.cuda.set_per_process_memory_fraction to stand in for an RTX 4090:
plan with chunkft-plan (--gpu 4090, the budget), build the ChunkFT driver from the plan exactly as
chunkft-run does, train a few steps, and compare the allocator's peak (max_memory_allocated, and reserved)
with the plan's prediction; tokens per second; the losses. One command, under 8 minutes on one GPU:

    python -m bench.gpu_check --out bench/results/gpu_check.json

Dry run of everything but the GPU (planning, model, driver, steps, summary) on a tiny preset:

    python -m bench.gpu_check --model tiny-llama --device cpu --seq-len 64 --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

GIB = 2**30
CAP_BYTES = 25_757_220_864  # the RTX 4090 profile's memory (23.99 GiB, "24 GB"); the cap stands in for it
PAPER_LLAMA2_7B_BYTES = int(13.72 * GIB)  # the ChunkFT paper's Llama-2-7B peak at 1K tokens
# What each plan must fit in (peak + reserve); None: the whole card.
DEFAULT_BUDGETS: dict[str, str | None] = {"llama-2-7b": "13.72GiB", "llama-3-8b": None}
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


class CheckError(Exception):
    """The check cannot run as asked; one line."""


@dataclass(frozen=True)
class ModelCheck:
    """One model's figures. Bytes and seconds; None where the device gives no such figure (CPU)."""

    model: str
    device: str
    num_params: int
    plan_budget: str
    num_chunks: int
    checkpointing: str
    predicted_peak_bytes: int
    predicted_reserve_bytes: int
    predicted_step_seconds: float
    measured_peak_allocated_bytes: int | None
    measured_peak_reserved_bytes: int | None
    peak_ratio: float | None  # measured allocated / predicted
    median_step_seconds: float
    tokens_per_second: float
    losses: tuple[float, ...]
    loss_fell: bool
    build_seconds: float
    goals: tuple[tuple[str, str], ...]  # (goal, "met"/"MISSED"/"n/a: why")


def plan_for(model: str, budget: str | None, seq_len: int, steps: int, lr: float, out: Path) -> Any:
    """chunkft-plan --gpu 4090 for the budget (its command line is the contract); None if nothing fits."""
    import click

    from planner.cli import main as plan_main
    from planner.plan import load_plan

    args = [model, "--gpu", "4090", "--dtype", "bf16", "--seq-len", str(seq_len),
            "--batch-size", "1", "--lr", f"{lr:g}", "--steps", str(steps), "--schedule", "constant",
            "-o", str(out)] + ([] if budget is None else ["--budget", budget])
    buf = io.StringIO()
    code: Any = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            plan_main.main(args=args, standalone_mode=False)
    except SystemExit as e:
        code = e.code
    except click.ClickException as e:
        raise CheckError(f"chunkft-plan {' '.join(args)}: {e.format_message()}") from None
    print(buf.getvalue().rstrip())
    if code == 2:
        return None
    if code not in (0, None):
        raise CheckError(f"chunkft-plan {' '.join(args)} exited {code}")
    return load_plan(out)


def batches(vocab: int, seq_len: int, n: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Consecutive tinyshakespeare byte blocks (valid ids in every vocabulary here), else random ids."""
    if SHAKESPEARE.is_file():
        ids = torch.tensor(list(SHAKESPEARE.read_bytes()[: n * seq_len]), dtype=torch.long)
    else:
        ids = torch.randint(0, min(vocab, 256), (n * seq_len,), generator=torch.Generator().manual_seed(0))
    x = ids.view(n, 1, seq_len).to(device)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b} for b in x]


def repeated_batch(vocab: int, seq_len: int, n: int, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """The first block n times: with one window trained per step, fitting one batch is the clearest sign
    within a few steps that the updates land (fresh batches would mostly show data noise)."""
    return batches(vocab, seq_len, 1, device) * n


def check_model(
    key: str, budget: str | None, a: argparse.Namespace, device: torch.device, tmp: Path
) -> ModelCheck:
    from executor.chunks import param_specs
    from executor.train import apply_checkpointing, build_driver
    from planner.plan import check_model as check_fingerprint
    from profiles import build_model, load_model

    plan = plan_for(key, budget, a.seq_len, a.steps, a.lr, tmp / f"{key}.plan.json")
    if plan is None and budget is not None:
        print(f"{key}: nothing fits {budget}; planning for the whole RTX 4090 instead")
        budget = None
        plan = plan_for(key, budget, a.seq_len, a.steps, a.lr, tmp / f"{key}.plan.json")
    if plan is None:
        raise CheckError(f"{key}: chunkft-plan finds no plan within an RTX 4090 at seq {a.seq_len}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    preset = load_model(key)
    preset.config._attn_implementation = plan.run.attn_implementation
    model = build_model(preset, device=str(device), dtype=torch.bfloat16)  # initialised on the device
    check_fingerprint(plan, param_specs(model), source=f"{key} plan", model_name=key)
    apply_checkpointing(model, plan.checkpointing.mode, plan.checkpointing.layers)
    model.train()
    driver = build_driver(model, plan, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    build_s = time.perf_counter() - t0
    data = repeated_batch(int(model.config.vocab_size), a.seq_len, a.steps, device)
    losses, seconds = [], []
    try:
        for i, batch in enumerate(data):
            if i == 1 and cuda:  # step 0 warms up (kernels, slots); the peak is over the steps after it
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            loss = model(**batch).loss
            driver.backward(loss)
            driver.step()
            if cuda:
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t)
            losses.append(float(loss.detach()))
            print(f"{key}: step {i} loss {losses[-1]:.4f} {seconds[-1]:.2f} s")
        allocated = int(torch.cuda.max_memory_allocated(device)) if cuda else None
        reserved = int(torch.cuda.max_memory_reserved(device)) if cuda else None
    finally:
        driver.close()
    timed = seconds[1:] or seconds
    median = sorted(timed)[len(timed) // 2]
    pr = plan.predictions
    ratio = allocated / pr.peak_bytes if allocated is not None else None
    result = ModelCheck(
        model=key, device=str(device), num_params=sum(p.numel() for p in model.parameters()),
        plan_budget=budget or "whole RTX 4090", num_chunks=plan.chunk_table.num_chunks,
        checkpointing=plan.checkpointing.mode,
        predicted_peak_bytes=pr.peak_bytes, predicted_reserve_bytes=pr.reserve_bytes,
        predicted_step_seconds=pr.step_seconds, measured_peak_allocated_bytes=allocated,
        measured_peak_reserved_bytes=reserved, peak_ratio=ratio, median_step_seconds=median,
        tokens_per_second=a.seq_len / median if median > 0 else 0.0, losses=tuple(losses),
        loss_fell=len(losses) > 1 and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0],
        build_seconds=build_s, goals=goals(key, allocated, reserved, ratio),
    )
    del driver, model, data
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def goals(
    key: str, allocated: int | None, reserved: int | None, ratio: float | None
) -> tuple[tuple[str, str], ...]:
    """The issue's GPU goals for this model, each with its verdict."""
    def verdict(ok: bool | None) -> str:
        return "n/a: no CUDA allocator figures (dry run)" if ok is None else ("met" if ok else "MISSED")

    out = [("measured allocated peak within 5% of the plan",
            verdict(None if ratio is None else abs(ratio - 1) <= 0.05))]
    if key == "llama-2-7b":
        out.append(("allocated peak under 13.72 GiB at 1K tokens",
                    verdict(None if allocated is None else allocated < PAPER_LLAMA2_7B_BYTES)))
    if key == "llama-3-8b":
        out.append(("inside 24 GB (reserved peak under the RTX 4090's 23.99 GiB)",
                    verdict(None if reserved is None else reserved <= CAP_BYTES)))
    return tuple(out)


def markdown(checks: list[ModelCheck], meta: dict[str, str]) -> str:
    g = lambda n: "n/a" if n is None else f"{n / GIB:.2f}"  # noqa: E731
    lines = [f"## GPU check ({meta['date']})", "", f"- command: `{meta['command']}`",
             f"- device: {meta['device']}", f"- versions: {meta['versions']}",
             f"- memory cap: {meta['cap']}", "",
             "| model | K | ckpt | plan budget | predicted peak GiB | allocated peak GiB | "
             "reserved peak GiB | allocated/predicted | s/step (predicted) | s/step | tokens/s | losses |",
             "|" + "---|" * 12]
    for c in checks:
        lines.append(
            f"| {c.model} | {c.num_chunks} | {c.checkpointing} | {c.plan_budget} | "
            f"{g(c.predicted_peak_bytes)} | "
            f"{g(c.measured_peak_allocated_bytes)} | {g(c.measured_peak_reserved_bytes)} | "
            f"{'n/a' if c.peak_ratio is None else f'{c.peak_ratio:.3f}'} | {c.predicted_step_seconds:.3f} | "
            f"{c.median_step_seconds:.3f} | {c.tokens_per_second:,.0f} | "
            f"{' '.join(f'{x:.3f}' for x in c.losses)} ({'falling' if c.loss_fell else 'NOT falling'}) |")
    lines += ["", "| model | goal | verdict |", "|---|---|---|"]
    lines += [f"| {c.model} | {goal} | {v} |" for c in checks for goal, v in c.goals]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="preset (repeatable); default llama-3-8b and llama-2-7b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: dry run of the logic")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6, help="optimizer steps per model (the first warms up)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--budget", default=None, help="plan budget for every model (default: per model)")
    p.add_argument("--out", type=Path, required=True, help="summary JSON; the markdown goes beside it (.md)")
    a = p.parse_args(argv)
    models = a.model or ["llama-3-8b", "llama-2-7b"]
    try:
        if a.steps < 2 or a.seq_len < 2:
            raise CheckError("--steps and --seq-len must be >= 2")
        device = torch.device(a.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise CheckError("no CUDA device; run on a GPU machine, or --device cpu for a dry run")
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, CAP_BYTES / total), device)
            dev_name = f"{torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB, capped to 23.99 GiB)"
        else:
            dev_name = "cpu (dry run: no allocator figures)"
        checks = []
        with tempfile.TemporaryDirectory() as tmp:
            for key in models:
                budget = a.budget or DEFAULT_BUDGETS.get(key)
                checks.append(check_model(key, budget, a, device, Path(tmp)))
    except CheckError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    import datetime
    import importlib.metadata as md

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.gpu_check " + " ".join(argv),
        "device": dev_name,
        "versions": f"torch {torch.__version__}, transformers {md.version('transformers')}",
        "cap": f"{CAP_BYTES} bytes via torch.cuda.set_per_process_memory_fraction" if a.device == "cuda"
        else "none (cpu)",
    }
    summary = {"meta": meta, "checks": [asdict(c) for c in checks]}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    text = markdown(checks, meta)
    for path, body in ((a.out, json.dumps(summary, indent=2) + "\n"), (a.out.with_suffix(".md"), text)):
        tmp_path = path.with_name(path.name + ".tmp")
        tmp_path.write_text(body, encoding="utf-8")
        os.replace(tmp_path, path)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
