"""The GPU check: do chunkft's plans hold on a real GPU, through chunkft-run's own code path?

Every case plans with chunkft-plan (`chunkft.planner.cli.main`, the plan's own loss: chunked
cross-entropy where the planner chose it) and trains with `chunkft.executor.train.train(RunOptions(...))`,
the function chunkft-run calls, on the tinyshakespeare bytes; the figures come from the run.json that
train() writes:

    measured.peak_bytes / reserved_bytes   CudaPeak over the measured span (one rotation after step 0)
    measured.phase_peaks                   evaluation, checkpoint and export, each on its own
    measured.step_seconds                  compute-stream events (mean over windows of their medians)
    losses.train                           per optimizer step

beside the plan's predictions (peak, reserve, headroom, step time). Cases, on a GPU:

1. llama-3-8b-4090    Llama-3-8B, seq 1024, as planned for an RTX 4090 (budget: the whole card).
2. llama-2-7b-13.72   Llama-2-7B, seq 1024, `--budget 13.72GiB` (the paper's figure), twice: with the
   llama-2-7b-13.72-r0  plan's reserve and headroom, and with `--reserve 0 --headroom 0` (the paper counts
                      neither). A budget nothing fits is a "no-plan" row with the planner's own line.
3. k1-vs-adamw        tiny-llama with `--chunks 1` against dense torch.optim.AdamW on the same device:
                      same init and batches (rebuilt with train()'s own functions), same lr/betas/eps/
                      weight decay and the same clipping, fp32 master weights like ChunkFT's. Tolerance:
                      every step's loss within ADAMW_RTOL (relative) of dense AdamW's.
4. cuda-vs-cpu        tiny-llama (K=4, 2 steps per visit): the same plan trained on the GPU and on the CPU.
                      Tolerance CPU_RTOL (relative, every step): bf16 GEMMs accumulate in a different order
                      (and split-K / blocking) on a GPU than on a CPU, so each step's logits differ by a few
                      bf16 ulps (2^-8 relative) and the trajectories drift apart slowly; 2e-2 is ~5 ulps,
                      far below what a wrong copy or a missed wait does (the loss jumps back by O(1)).

Each plan runs `2 * K * update_interval + 1` optimizer steps (RunOptions.max_steps, chunkft-run's
--max-steps; the loss comparisons at least MIN_STEPS), so every window is written back and fetched again
at least once (the rotation goal reads metrics.jsonl's chunk column). To keep the 8B/7B cases short at
K=32 (65 steps) and K=256 (513 steps), every case plans with `--update-interval 1` (copies at every step:
the hardest case for the prefetch), except cuda-vs-cpu (2). The data is the first SEQUENCES sequences of
the text (10% held out: train()'s final evaluation stays a few forward passes; the training sequences
repeat as often as a case needs). Evaluation and checkpoints are off
in the plans (`--eval-every 0 --checkpoint-every 0`); train() still writes its final checkpoint, evaluates
and exports. For the 8B/7B cases the final checkpoint streams the weights tensor by tensor like
chunkft-run's (`save_safetensors_streaming`) into /dev/null and counts the trainer state instead of
writing it: the host optimizer states are 75-90 GiB, more than the GPU machine's disk and minutes of
writing; the GPU side of a checkpoint (driver.state_dict(), one tensor's staging at a time) still runs and
is measured (`--full-checkpoints` writes them for real).

The memory cap: an H200 stands in for a 24 GiB RTX 4090. The CUDA context lives outside the caching
allocator, so it is measured (NVML's used memory before CUDA starts, `torch.cuda.mem_get_info` after a
warm-up that loads the common kernels) and the allocator is capped with
`torch.cuda.set_per_process_memory_fraction` to 23.99 GiB minus that context; after each case the memory
outside the allocator is measured again (lazily loaded kernels grow it) and "reserved + context <=
23.99 GiB" uses the larger figure. OOM (torch.OutOfMemoryError, or cuBLAS failing to allocate) in a case
is a "missed" row with chunkft-run's own message; the summary JSON and markdown are written atomically
after every case, so a crash or a time-out keeps the finished rows. Target: under 8 minutes on one H200.

    python -m bench.gpu_check --out bench/results/gpu_check.json

The CPU dry run (tests/test_gpu_check.py runs it): the same cases scaled down to tiny-llama with K=4,
trained on the CPU through the same train() path with the transfer engine's asynchronous (CUDA) branch on
stand-in streams (RunOptions(streams="late")), on one intra-op thread; cuda-vs-cpu then compares those
streams with synchronous copies, which must agree exactly (18 s on a shared 2-core machine):

    python -m bench.gpu_check --device cpu --model tiny-llama --seq-len 64 --out /tmp/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from chunkft.executor.streams import PinnedMemoryError

GIB = 2**30
CAP_BYTES = 25_757_220_864  # the RTX 4090 profile's memory (23.99 GiB, "24 GB"): what the cap stands in for
PAPER_BUDGET = "13.72GiB"  # the ChunkFT paper's Llama-2-7B peak at 1K tokens
PAPER_BYTES = int(13.72 * GIB)
ADAMW_RTOL = 1e-2  # K=1 ChunkFT vs dense AdamW: same math, fp32 op order differs (bf16 rounding flips)
CPU_RTOL = 2e-2  # the same plan on CUDA vs CPU: bf16 GEMMs differ across devices (see the docstring)
SEQUENCES = 100  # of the text, 10 of them held out; the runs repeat the 90 others as often as needed
MIN_STEPS = 10  # the loss comparisons need a few steps even when 2*K*ui+1 is smaller (K=1: 3)
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


class CheckError(Exception):
    """The check cannot run as asked; one line."""


@dataclass(frozen=True)
class Case:
    """One checked plan: the model, what chunkft-plan is told, and what the case compares against."""

    name: str
    model: str
    plan_args: tuple[str, ...]  # chunkft-plan options beyond the common ones
    update_interval: int = 1
    batch_size: int = 1
    lr: str = "1e-4"  # random init: large enough that the losses move within a check's steps
    compare: str = ""  # "" | "adamw" (dense torch.optim.AdamW) | "cpu" (the same plan on the CPU)
    sink_checkpoint: bool = False  # final checkpoint's bytes to /dev/null (host states too big to write)
    paper: bool = False  # the allocated peak is held to the paper's 13.72 GiB
    budget_goal: bool = False  # "reserved + context <= the plan's budget" (the reserve's own claim)


@dataclass
class Row:
    """One case's figures (bytes, seconds; None where the device gives no such figure) and verdicts."""

    case: str
    model: str
    status: str = "pending"  # ok | missed (out of memory) | no-plan | error
    message: str = ""
    plan_command: str = ""
    num_chunks: int | None = None
    update_interval: int | None = None
    checkpointing: str | None = None
    chunked_cross_entropy: bool | None = None
    steps: int | None = None
    budget_bytes: int | None = None
    predicted_peak_bytes: int | None = None
    predicted_reserve_bytes: int | None = None
    predicted_headroom_bytes: int | None = None
    predicted_step_seconds: float | None = None
    predicted_host_bytes: int | None = None
    memory_method: str | None = None
    peak_bytes: int | None = None
    reserved_bytes: int | None = None
    context_bytes: int | None = None  # outside the allocator: CUDA context, kernels (max of before/after)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    step_seconds: float | None = None
    transfer_wait_s: float | None = None
    tokens_per_second: float | None = None
    losses: list[float] = field(default_factory=list)
    reference_losses: list[float] = field(default_factory=list)  # dense AdamW, or the CPU run
    max_rel_diff: float | None = None
    window_visits: dict[str, int] = field(default_factory=dict)  # window -> visits (runs of its steps)
    checkpoint: str = ""  # how the final checkpoint was written
    wall_seconds: float | None = None
    goals: list[tuple[str, str]] = field(default_factory=list)  # (goal, met | MISSED | n/a: why)


def cases(a: argparse.Namespace) -> list[Case]:
    """The four cases; on the CPU (the dry run) scaled down to the tiny model with K=4."""
    dry = a.device == "cpu"
    big8 = a.model or "llama-3-8b"
    big7 = a.model or "llama-2-7b"
    k = ("--chunks", str(a.chunks)) if a.chunks else (("--chunks", "4") if dry else ())
    sink = not a.full_checkpoints
    tiny = {"batch_size": 1 if dry else 4, "lr": "1e-3"}  # 4 sequences: steadier losses on a GPU
    return [
        Case("llama-3-8b-4090", big8, k, sink_checkpoint=sink),
        Case(f"llama-2-7b-{a.budget}", big7, (*k, "--budget", a.budget), sink_checkpoint=sink,
             budget_goal=True),
        Case(f"llama-2-7b-{a.budget}-r0", big7, (*k, "--budget", a.budget, "--reserve", "0",
                                                 "--headroom", "0"),
             sink_checkpoint=sink, paper=a.budget == PAPER_BUDGET),
        Case("k1-vs-adamw", a.tiny_model, ("--chunks", "1", "--weight-decay", "0.01"), compare="adamw",
             **tiny),
        Case("cuda-vs-cpu", a.tiny_model, ("--chunks", "4"), update_interval=2, compare="cpu", **tiny),
    ]


# ------------------------------------------------------------------------------------------- planning


def plan_case(case: Case, a: argparse.Namespace, out: Path, row: Row) -> Any:
    """chunkft-plan for the case (its command line is the contract); None when nothing fits."""
    import click

    from chunkft.cli_conventions import EXIT_NO_FIT
    from chunkft.plan_format import load_plan
    from chunkft.planner.cli import main as plan_main

    args = [case.model, "--gpu", "4090", "--dtype", "bf16", "--seq-len", str(a.seq_len),
            "--batch-size", str(case.batch_size), "--lr", case.lr, "--schedule", "constant",
            "--steps", "1000", "--eval-every", "0", "--checkpoint-every", "0",
            "--update-interval", str(case.update_interval), *case.plan_args, "-o", str(out)]
    row.plan_command = "chunkft-plan " + " ".join(args)
    buf = io.StringIO()
    code: Any = 0
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            plan_main.main(args=args, standalone_mode=False)
    except SystemExit as e:
        code = e.code
    except click.ClickException as e:
        raise CheckError(f"chunkft-plan: {e.format_message()}") from None
    text = buf.getvalue().rstrip()
    print(text)
    if code == EXIT_NO_FIT:  # nothing fits: the planner's line says what budget would
        row.message = next((ln for ln in text.splitlines() if "does not fit" in ln), text.splitlines()[-1])
        return None
    if code not in (0, None):
        raise CheckError(f"chunkft-plan exited {code}: {text.splitlines()[-1] if text else ''}")
    return load_plan(out)


def describe_plan(plan: Any, row: Row, min_steps: int) -> int:
    """The plan's choices and predictions into the row; returns the steps the case runs."""
    pr, hw = plan.predictions, plan.hardware
    row.num_chunks = len(plan.chunk_table.chunks)
    row.update_interval = plan.rotation.update_interval
    row.checkpointing = plan.checkpointing.mode
    row.chunked_cross_entropy = plan.run.chunked_cross_entropy
    row.budget_bytes = hw.budget_bytes
    row.predicted_peak_bytes = pr.peak_bytes
    row.predicted_reserve_bytes = pr.reserve_bytes
    row.predicted_headroom_bytes = int(getattr(hw, "headroom_bytes", 0))  # 0 in plans made before it
    row.predicted_step_seconds = pr.step_seconds
    row.predicted_host_bytes = int(getattr(pr, "host_peak_bytes", pr.host_bytes))
    row.steps = max(2 * row.num_chunks * row.update_interval + 1, min_steps)
    return row.steps


# ------------------------------------------------------------------------------------------- training


def sink_checkpoint(counted: list[int]) -> Any:
    """A stand-in for executor.checkpoint.save_checkpoint that does its GPU-side work and writes nothing:
    the weights go through the real streaming writer (one tensor's host staging at a time) into /dev/null,
    the trainer state and the windows' states (the host stores themselves, and CPU copies of the slots
    not written back: ChunkFT.sharded_state_dict) are counted."""
    from chunkft.executor.checkpoint import tensor_bytes
    from chunkft.executor.safetensors_stream import model_tensors_for_save, save_safetensors_streaming

    def save(
        output_dir: Path,
        meta: Any,
        model: torch.nn.Module,
        trainer: dict[str, Any],
        keep: int = 2,
        *,
        shards: dict[str, Any] | None = None,
        world: Any = None,
    ) -> Path:
        tensors, metadata = model_tensors_for_save(model)
        save_safetensors_streaming(tensors, os.devnull, metadata)
        states = [s.local for s in (shards or {}).values()]
        counted.append(tensor_bytes(tensors) + tensor_bytes(trainer) + tensor_bytes(states))
        return Path(output_dir) / "checkpoints" / "not-written"

    return save


def run_plan(
    case: Case, plan_path: Path, a: argparse.Namespace, out: Path, row: Row, device: str, streams: str | None
) -> dict[str, Any]:
    """chunkft-run's train() on the plan; returns its run.json."""
    import chunkft.executor.train
    from chunkft.executor.train import RunOptions

    opts = RunOptions(plan_path=plan_path, data_path=a.data, output_dir=out, device=device,
                      max_steps=row.steps, progress=False, streams=streams)
    counted: list[int] = []
    sink = (mock.patch.object(chunkft.executor.train, "save_checkpoint", sink_checkpoint(counted))
            if case.sink_checkpoint else contextlib.nullcontext())
    with sink:
        chunkft.executor.train.train(opts)
    if case.sink_checkpoint:
        row.checkpoint = (f"streamed to /dev/null, {max(counted, default=0) / GIB:.2f} GiB counted "
                          "(weights + trainer state)")
    else:
        row.checkpoint = "written"
    return json.loads((out / "run.json").read_text())


def read_run(doc: dict[str, Any], out: Path, row: Row) -> None:
    """The measured figures of run.json and the rotation seen in metrics.jsonl."""
    m = doc["measured"]
    row.memory_method = m.get("memory_method")
    row.peak_bytes = m.get("peak_bytes")
    row.reserved_bytes = m.get("reserved_bytes")
    row.phase_peaks = dict(m.get("phase_peaks") or {})
    row.step_seconds = m.get("step_seconds")
    row.transfer_wait_s = m.get("transfer_wait_s")
    row.tokens_per_second = m.get("tokens_per_second")
    row.losses = [float(x) for x in doc["losses"]["train"]]
    row.window_visits = window_visits(out / "metrics.jsonl")


def window_visits(metrics: Path) -> dict[str, int]:
    """Per window, how many visits (maximal runs of consecutive steps on it) metrics.jsonl shows."""
    chunks = [r["chunk"] for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    visits: dict[str, int] = {}
    for i, c in enumerate(chunks):
        if i == 0 or chunks[i - 1] != c:
            visits[str(c)] = visits.get(str(c), 0) + 1
    return visits


def dense_adamw_losses(plan: Any, data: Path, device: torch.device, steps: int) -> list[float]:
    """Dense torch.optim.AdamW on the plan's model, init, batches, loss and hyperparameters, with fp32
    master weights like ChunkFT's (bf16 weights for forward/backward, the update in fp32, copied back)."""
    from chunkft.executor.data import Batches, load_dataset
    from chunkft.executor.loss import causal_lm_loss
    from chunkft.executor.train import apply_checkpointing, build_model, chunk_tokens_for, step_micro_batches

    run, o = plan.run, plan.run.optimizer
    if o.name != "adamw" or run.schedule.kind != "constant" or run.schedule.warmup_steps:
        raise CheckError("the AdamW comparison needs an AdamW plan with a constant learning rate")
    if run.compute_dtype != run.weight_dtype:
        raise CheckError("the AdamW comparison needs a plan without autocast")
    model, tokenizer = build_model(plan, device)  # torch.manual_seed(plan.run.seed), as train() does
    apply_checkpointing(model, plan.checkpointing.mode, plan.checkpointing.layers)
    model.train()
    dataset = load_dataset(data, tokenizer, task=plan.model.task, seq_len=run.seq_len,
                           num_labels=plan.model.num_labels, min_train_examples=run.micro_batch_size)
    batches = Batches(dataset.train, run.micro_batch_size, seed=run.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    masters = [p.detach().float().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(masters, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                            foreach=False)
    chunk_tokens = chunk_tokens_for(plan)
    losses = []
    for _ in range(steps):
        micro = step_micro_batches([batches.next() for _ in range(run.grad_accum_steps)], plan.model.task)
        loss_sum = 0.0
        for cpu_batch, scale in micro:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
            loss = causal_lm_loss(model, batch, chunk_tokens) * scale
            loss.backward()
            loss_sum += float(loss.detach())
        for p, mp in zip(params, masters, strict=True):
            mp.grad = p.grad.float()
            p.grad = None
        if o.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(masters, o.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, mp in zip(params, masters, strict=True):
                p.copy_(mp)
        losses.append(loss_sum)
    return losses


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b) or not a:
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------- CUDA memory cap


def nvml_used_bytes(index: int) -> int | None:
    """The GPU's used memory as the driver reports it (before this process starts CUDA), if NVML is there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def outside_allocator_bytes(device: torch.device, used_before: int) -> int:
    """Device memory in use that the caching allocator does not hold: this process's context and kernels."""
    free, total = torch.cuda.mem_get_info(device)
    return int(total - free - torch.cuda.memory_reserved(device) - used_before)


def cap_cuda(device: torch.device, used_before: int | None) -> dict[str, Any]:
    """Load the common kernels, measure the context (`used_before`: NVML's figure before CUDA started) and
    cap the allocator to 23.99 GiB minus it."""
    import torch.nn.functional as F

    x = torch.randn(512, 512, device=device, dtype=torch.bfloat16, requires_grad=True)  # cuBLAS, sdpa, CE
    q = x.view(1, 16, 128, 128)  # Llama's head size: the flash-attention kernels
    (F.scaled_dot_product_attention(q, q, q, is_causal=True).sum() + F.cross_entropy(x @ x, torch.zeros(
        512, dtype=torch.long, device=device))).backward()
    del x, q
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    context = outside_allocator_bytes(device, used_before or 0)
    total = torch.cuda.get_device_properties(device).total_memory
    cap = CAP_BYTES - context
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    return {
        "total_bytes": int(total),
        "used_before_cuda_bytes": used_before,
        "context_bytes": context,
        "allocator_cap_bytes": cap,
        "counted": ("context = total - free - allocator reserved after a warm-up (cuBLAS, sdpa, "
                    "cross-entropy), "
                    + ("less NVML's used memory before CUDA started" if used_before is not None
                       else "NVML unavailable: other processes' memory counted as context too")
                    + "; allocator cap = 23.99 GiB - context via set_per_process_memory_fraction; the memory "
                    "outside the allocator is measured again after each case (row context_bytes)"),
    }


# --------------------------------------------------------------------------------------------- verdicts


def verdict(ok: bool | None, why: str = "no CUDA allocator figures (CPU dry run)") -> str:
    return f"n/a: {why}" if ok is None else ("met" if ok else "MISSED")


def judge(case: Case, row: Row, cuda: bool) -> list[tuple[str, str]]:
    """The goals of the case, each with its verdict."""
    goals = [("losses finite", verdict(bool(row.losses) and all(math.isfinite(x) for x in row.losses)))]
    if row.num_chunks and row.num_chunks > 1:
        goals.append(("every window written back and fetched again (>= 2 visits each)", verdict(
            len(row.window_visits) == row.num_chunks and min(row.window_visits.values()) >= 2)))
    if row.peak_bytes is not None and row.predicted_peak_bytes is not None:
        peak = "allocated peak" if cuda else "tracked peak (CPU: MemoryTracker)"
        goals.append((f"{peak} <= predicted peak + headroom", verdict(
            row.peak_bytes <= row.predicted_peak_bytes + (row.predicted_headroom_bytes or 0))))
    reserved = (None if not cuda or row.reserved_bytes is None
                else row.reserved_bytes + (row.context_bytes or 0))
    goals.append(("reserved + context <= 23.99 GiB (the RTX 4090's memory)",
                  verdict(None if reserved is None else reserved <= CAP_BYTES)))
    if case.budget_goal and row.budget_bytes is not None:
        goals.append((f"reserved + context <= the plan's budget {row.budget_bytes / GIB:.2f} GiB",
                      verdict(None if reserved is None else reserved <= row.budget_bytes)))
    if case.paper:
        goals.append(("allocated peak <= 13.72 GiB (paper, Llama-2-7B at 1K tokens)",
                      verdict(None if not cuda or row.peak_bytes is None else row.peak_bytes <= PAPER_BYTES)))
    if case.compare == "adamw":
        goals.append((f"losses equal dense torch.optim.AdamW (relative {ADAMW_RTOL:g})",
                      verdict(row.max_rel_diff is not None and row.max_rel_diff <= ADAMW_RTOL)))
    if case.compare == "cpu":
        goals.append((f"losses equal the CPU run of the plan (relative {CPU_RTOL:g})",
                      verdict(row.max_rel_diff is not None and row.max_rel_diff <= CPU_RTOL)))
    return goals


# ---------------------------------------------------------------------------------------------- a case


def is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text or "CUBLAS_STATUS_ALLOC_FAILED" in text)


def check_case(case: Case, a: argparse.Namespace, device: torch.device, work: Path,
               cap: dict[str, Any]) -> Row:
    """Plan, train through train(), read run.json, compare, judge. An OOM is a "missed" row."""
    row = Row(case=case.name, model=case.model)
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    plan_path, run_dir = work / f"{case.name}.plan.json", work / case.name
    try:
        plan = plan_case(case, a, plan_path, row)
        if plan is None:
            row.status = "no-plan"
        else:
            train_and_compare(case, plan, plan_path, a, device, work, cap, row)
            row.status = "ok"
    except PinnedMemoryError as e:
        row.status = "pinning-failed"
        row.message = " ".join(str(e).split())
    except Exception as e:
        if is_out_of_memory(e):
            row.status = "missed"
            row.message = oom_message(plan_path, run_dir, row, e)
        else:
            row.status = "error"
            row.message = f"{type(e).__name__}: {' '.join(str(e).split())}"[:2000]
            traceback.print_exc()
        traceback.clear_frames(e.__traceback__)  # frees the model and driver the frames still hold
    finally:
        row.wall_seconds = time.perf_counter() - t0
        gc.collect()  # the model, the driver and its pinned host stores
        if cuda:
            torch.cuda.empty_cache()
        if not a.keep:
            for d in (run_dir, work / f"{case.name}-cpu"):
                shutil.rmtree(d, ignore_errors=True)
    if row.status == "ok":
        row.goals = judge(case, row, cuda)
    else:
        row.goals = [("the plan runs", "n/a: no plan fits" if row.status == "no-plan" else "MISSED")]
    return row


def train_and_compare(case: Case, plan: Any, plan_path: Path, a: argparse.Namespace, device: torch.device,
                      work: Path, cap: dict[str, Any], row: Row) -> None:
    """The case's run (and its reference) into the row."""
    cuda = device.type == "cuda"
    describe_plan(plan, row, MIN_STEPS if case.compare else 1)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    streams = None if cuda else "late"  # CPU: the engine's CUDA branch on stand-in streams
    doc = run_plan(case, plan_path, a, work / case.name, row, str(device), streams)
    if cuda:  # kernels loaded lazily during the run count too
        row.context_bytes = max(cap["context_bytes"],
                                outside_allocator_bytes(device, cap["used_before_cuda_bytes"] or 0))
    read_run(doc, work / case.name, row)
    if case.compare == "adamw":
        row.reference_losses = dense_adamw_losses(plan, a.data, device, row.steps or 0)
    elif case.compare == "cpu":
        ref = run_plan(replace(case, sink_checkpoint=False), plan_path, a, work / f"{case.name}-cpu", row,
                       "cpu", None)
        row.reference_losses = [float(x) for x in ref["losses"]["train"]]
    if case.compare:
        row.max_rel_diff = max_rel_diff(row.losses, row.reference_losses)


def oom_message(plan_path: Path, run_dir: Path, row: Row, e: BaseException) -> str:
    """chunkft-run's own out-of-memory line (the measured peaks and the re-plan command)."""
    from chunkft.executor.cli import out_of_memory_message
    from chunkft.executor.train import RunOptions

    opts = RunOptions(plan_path=plan_path, data_path=Path("data"), output_dir=run_dir, max_steps=row.steps)
    peaks = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peaks = int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())
    try:
        return out_of_memory_message(opts, e, peaks)
    except Exception:
        return f"out of memory: {' '.join(str(e).split())}"[:2000]


# ------------------------------------------------------------------------------------------- reporting


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    g = lambda n: "n/a" if n is None else f"{n / GIB:.2f}"  # noqa: E731
    s = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"## GPU check ({meta['date']})", "", f"- command: `{meta['command']}`",
             f"- device: {meta['device']}", f"- versions: {meta['versions']}", f"- memory cap: {meta['cap']}",
             f"- data: {meta['data']}; total wall time {meta['wall_seconds']:.0f} s", "",
             "| case | status | K | ui | steps | act. ckpt | chunked CE | budget | predicted peak | "
             "+ headroom | allocated peak | reserved | context | eval / ckpt / export peaks | "
             "s/step predicted | s/step | transfer wait s | min visits | losses (first, last) | "
             "max rel diff | wall s |",
             "|" + "---|" * 21]
    for r in rows:
        ph = " / ".join(g(r.phase_peaks.get(k)) for k in ("evaluation", "checkpoint", "export"))
        visits = min(r.window_visits.values()) if r.window_visits else None
        head = f"{r.losses[0]:.3f}, {r.losses[-1]:.3f}" if r.losses else "n/a"
        lines.append(
            f"| {r.case} ({r.model}) | {r.status} | {r.num_chunks or 'n/a'} | {r.update_interval or 'n/a'} | "
            f"{r.steps or 'n/a'} | {r.checkpointing or 'n/a'} | {r.chunked_cross_entropy} | "
            f"{g(r.budget_bytes)} | "
            f"{g(r.predicted_peak_bytes)} | {g(r.predicted_headroom_bytes)} | {g(r.peak_bytes)} | "
            f"{g(r.reserved_bytes)} | {g(r.context_bytes)} | {ph} | {s(r.predicted_step_seconds)} | "
            f"{s(r.step_seconds)} | {s(r.transfer_wait_s)} | {visits if visits is not None else 'n/a'} | "
            f"{head} | "
            f"{'n/a' if r.max_rel_diff is None else f'{r.max_rel_diff:.2e}'} | "
            f"{'n/a' if r.wall_seconds is None else f'{r.wall_seconds:.0f}'} |")
    lines += ["", "Sizes in GiB.", "", "| case | goal | verdict |", "|---|---|---|"]
    lines += [f"| {r.case} | {goal} | {v} |" for r in rows for goal, v in r.goals]
    notes = [f"- {r.case}: {r.status}: {r.message}" for r in rows if r.message]
    notes += [f"- {r.case}: final checkpoint {r.checkpoint}" for r in rows if r.checkpoint]
    notes += [f"- not run yet (the check stopped or is running): {', '.join(meta['pending'])}"] \
        if meta.get("pending") else []
    lines += (["", "Notes:", ""] + notes) if notes else []
    return "\n".join(lines) + "\n"


def write_results(out: Path, rows: list[Row], meta: dict[str, Any], pending: list[str]) -> None:
    """The summary JSON and markdown, each written beside and swapped in (a crash keeps finished rows)."""
    meta = {**meta, "pending": pending}
    summary = {"meta": meta, "rows": [asdict(r) for r in rows]}
    out.parent.mkdir(parents=True, exist_ok=True)
    bodies = ((out, json.dumps(summary, indent=2) + "\n"), (out.with_suffix(".md"), markdown(rows, meta)))
    for path, body in bodies:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(body, encoding="utf-8")
        os.replace(tmp, path)


def cut_data(path: Path, chars: int, work: Path) -> Path:
    """The text's first `chars` characters (byte tokens for presets) as a file of its own: a short held-out
    split keeps train()'s final evaluation to a few forward passes."""
    text = path.read_text(encoding="utf-8")
    if len(text) <= chars:
        return path
    target = work / f"data-{chars}.txt"
    target.write_text(text[:chars], encoding="utf-8")
    return target


@contextlib.contextmanager
def work_dir(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        yield Path(tmp)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="summary JSON; the markdown goes beside it (.md)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the dry run)")
    p.add_argument("--model", default=None, help="model for cases 1-2 (default llama-3-8b / llama-2-7b)")
    p.add_argument("--tiny-model", default="tiny-llama", help="model for the loss comparisons (cases 3-4)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--chunks", type=int, default=None, help="force K in cases 1-2 (default: planner; cpu: 4)")
    p.add_argument("--budget", default=PAPER_BUDGET, help="case 2's budget (default the paper's 13.72GiB)")
    p.add_argument("--only", action="append", help="run only this case (repeatable)")
    p.add_argument("--data", type=Path, default=DATA, help="training text (default tinyshakespeare)")
    p.add_argument("--sequences", type=int, default=SEQUENCES,
                   help="cut the text to this many sequences (the last 10%% are held out)")
    p.add_argument("--work-dir", type=Path, default=None, help="plans and runs go here (default: temporary)")
    p.add_argument("--keep", action="store_true", help="keep each case's run directory")
    p.add_argument("--full-checkpoints", action="store_true", help="write the 8B/7B final checkpoints")
    a = p.parse_args(argv)
    started = time.perf_counter()
    try:
        if not a.data.is_file():
            raise CheckError(f"{a.data} not found; give --data (a text file)")
        from chunkft.executor.devices import DeviceError, resolve_device

        used_before = None
        if a.device.startswith("cuda"):  # before CUDA starts: the allocator reads this once; no context yet
            os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the plans ask
            index = a.device.partition(":")[2]
            used_before = nvml_used_bytes(int(index) if index.isdigit() else 0)
        try:
            device = resolve_device(a.device)
        except DeviceError as e:
            raise CheckError(f"{e} (the GPU check needs a GPU; --device cpu is the dry run)") from None
        a.device = device.type
        todo = [c for c in cases(a) if not a.only or c.name in a.only]
        if not todo:
            raise CheckError(f"--only {a.only} names no case")
    except CheckError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 1
    import importlib.metadata as md

    cap: dict[str, Any] = {}
    if device.type == "cuda":
        cap = cap_cuda(device, used_before)
        name = torch.cuda.get_device_name(device)
        dev_name = f"{name} ({cap['total_bytes'] / GIB:.1f} GiB), capped to stand in for an RTX 4090"
        cap_text = (f"allocator {cap['allocator_cap_bytes'] / GIB:.2f} GiB + context "
                    f"{cap['context_bytes'] / GIB:.2f} GiB = 23.99 GiB; {cap['counted']}; "
                    f"PYTORCH_CUDA_ALLOC_CONF={os.environ.get('PYTORCH_CUDA_ALLOC_CONF')}")
    else:
        torch.set_num_threads(1)  # the tiny dry run: faster on one intra-op thread (as the test suite runs)
        dev_name = "cpu (dry run: train() with stand-in streams 'late', no allocator figures)"
        cap_text = "none (cpu)"
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.gpu_check " + " ".join(argv),
        "device": dev_name,
        "versions": f"torch {torch.__version__}, transformers {md.version('transformers')}",
        "cap": cap_text,
        "cap_figures": cap,
        "data": str(a.data),
        "tolerances": {"adamw_rtol": ADAMW_RTOL, "cpu_rtol": CPU_RTOL},
        "wall_seconds": 0.0,
    }
    rows: list[Row] = []
    with work_dir(a.work_dir) as work:
        a.data = cut_data(a.data, a.sequences * a.seq_len, work)
        meta["data"] = f"{a.data}: the first {a.sequences} sequences of {a.seq_len} tokens of {meta['data']}"
        for i, case in enumerate(todo):
            print(f"gpu_check: case {case.name} ({case.model})", flush=True)
            row = check_case(case, a, device, work, cap)  # every failure of a case is its row's status
            rows.append(row)
            meta["wall_seconds"] = time.perf_counter() - started
            write_results(a.out, rows, meta, [c.name for c in todo[i + 1:]])
            print(f"gpu_check: {case.name}: {row.status} in {row.wall_seconds or 0:.0f} s", flush=True)
            if row.status == "pinning-failed":
                # A failed cudaHostRegister leaves its CUDA error pending: every later case in this process
                # would fail on it. The rows so far are written; the rest need a new process.
                print(f"gpu_check: stopping: {row.message}", file=sys.stderr)
                return 1
    print(a.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
