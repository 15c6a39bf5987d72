"""chunkft-plan: will this fine-tuning fit, and how fast will it run? Writes a plan the executor replays.

Exit codes: 0 plan written; 1 bad input (one line on stderr, `chunkft-plan: error: ...`; a traceback only
with --debug); 2 nothing fits the budget (the line says the smallest budget that would, and with which
settings); 3 the plan was written but --report failed (the plan stays; the line says how to redo the
report). Nothing is written unless every input is valid, a plan fits and the simulator, re-run from the
plan itself, agrees with the solver.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from planner.cli_conventions import OneLineErrors

if TYPE_CHECKING:
    from planner.solver import Headroom

GIB = 2**30
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": GIB,
    "gb": 10**9,
    "gib": GIB,
    "t": 2**40,
    "tb": 10**12,
    "tib": 2**40,
}  # a bare "G" is read as GiB, like nvidia-smi and torch report memory


def parse_size(text: str) -> int:
    """'20GiB', '20GB', '24G', '13.72GiB', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read size {text!r}; write e.g. 20GiB, 24GB, 24G or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class Size(click.ParamType):
    name = "SIZE"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


MAX_HEADROOM_FRACTION = 0.5  # a larger share of the peak kept free is a typo (50 for 5%)


def parse_headroom(text: str) -> Headroom:
    """'3%+256MiB', '5%', '1GiB', '0' -> planner.solver.Headroom (a share of the peak, bytes, or both)."""
    from planner.solver import Headroom

    bad = ValueError(f"cannot read headroom {text!r}; write e.g. 1GiB, 0, 5% or 3%+256MiB")
    fraction, fixed = None, None
    for part in (p.strip() for p in text.split("+")):
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", part)
        if m and fraction is None:
            fraction = float(m.group(1)) / 100
        elif part and not part.endswith("%") and fixed is None:
            try:
                fixed = parse_size(part)
            except ValueError:
                raise bad from None
        else:
            raise bad
    if fraction is not None and fraction > MAX_HEADROOM_FRACTION:
        raise ValueError(
            f"headroom {text!r} keeps over {MAX_HEADROOM_FRACTION:.0%} of the peak free; write e.g. 5%"
        )
    return Headroom(fixed or 0, fraction or 0.0)


class HeadroomSize(click.ParamType):
    name = "SIZE|PCT%"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if not isinstance(value, str):
            return value
        try:
            return parse_headroom(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


class NormOrNone(click.ParamType):
    """A positive float, or 'none' (no clipping)."""

    name = "FLOAT|none"

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        if value is None or isinstance(value, float):
            return value
        if str(value).strip().lower() == "none":
            return None
        try:
            norm = float(value)
        except ValueError:
            self.fail(f"{value!r} is not a number or 'none'", param, ctx)
        if not (math.isfinite(norm) and norm > 0):
            self.fail(f"{value!r} must be a number > 0, or 'none' to turn clipping off", param, ctx)
        return norm


# Host budget when only this machine's free memory stood in the way and no --host-mem was given.
UNBOUNDED_HOST_BYTES = 1 << 60


def available_host_bytes() -> int:
    """MemAvailable of this machine (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


# Beyond these a value is a typo (an extra zero, bytes for GiB), or so large the solver would search for
# minutes; each error says the limit.
MAX_SEQ_LEN = 1 << 21
MAX_BATCH_SIZE = 1024  # the solver's time grows with the global batch: 1024 sequences take ~1 min on 2 cores
MAX_STEPS = 10**8
MAX_BYTES = 1 << 50  # 1 PiB


def check_bounds(req: Request) -> None:
    """Zero, negative and absurd sizes: one UsageError, before anything is loaded or written."""
    for flag, value, limit in (
        ("--seq-len", req.seq_len, MAX_SEQ_LEN),
        ("--batch-size", req.batch_size, MAX_BATCH_SIZE),
        ("--steps", req.steps, MAX_STEPS),
    ):
        if value > limit:
            raise click.UsageError(f"{flag} {value} is absurdly large (at most {limit:,}); check the number")
    for flag, size in (("--budget", req.budget), ("--host-mem", req.host_mem), ("--reserve", req.reserve)):
        if size is None:
            continue
        if size <= 0 and flag != "--reserve":
            raise click.UsageError(f"{flag} must be more than 0 bytes; write e.g. 20GiB")
        if size > MAX_BYTES:
            raise click.UsageError(f"{flag} {gib(size)} is absurdly large (over 1 PiB); write e.g. 20GiB")
    if req.budget is not None and req.reserve is not None and req.reserve >= req.budget:
        raise click.UsageError(
            f"--reserve {gib(req.reserve)} leaves nothing of --budget {gib(req.budget)}; lower --reserve"
        )
    fixed = 0 if req.headroom is None else req.headroom.fixed_bytes
    if fixed > MAX_BYTES:
        raise click.UsageError(f"--headroom {gib(fixed)} is absurdly large (over 1 PiB); write e.g. 1GiB")
    if req.budget is not None and fixed and fixed + (req.reserve or 0) >= req.budget:
        raise click.UsageError(
            f"--headroom {gib(fixed)} (with the reserve) leaves nothing of --budget {gib(req.budget)}; "
            "lower --headroom"
        )
    if req.weight_decay_mode == "compensated":
        if req.optimizer != "adamw":
            raise click.UsageError(
                "--weight-decay-mode compensated is for --optimizer adamw (SGD's weight decay is added to "
                "the gradient, not decoupled); use --weight-decay-mode window"
            )
        if req.lr * req.weight_decay >= 1.0:
            raise click.UsageError(
                "--weight-decay-mode compensated needs --lr x --weight-decay < 1, got "
                f"{req.lr * req.weight_decay:g}"
            )
    if req.micro_batch is not None and req.micro_batch > req.batch_size:
        raise click.UsageError(
            f"--micro-batch {req.micro_batch} is more than --batch-size {req.batch_size}; lower it"
        )
    if not math.isfinite(req.lr) or req.lr > 1.0:
        raise click.UsageError(f"--lr {req.lr} is not a usable learning rate; give e.g. 1e-5 (at most 1)")
    if req.warmup_steps > req.steps:
        raise click.UsageError(f"--warmup-steps {req.warmup_steps} is more than --steps {req.steps}")
    for flag, every in (("--eval-every", req.eval_every), ("--checkpoint-every", req.checkpoint_every)):
        if every > req.steps:
            raise click.UsageError(
                f"{flag} {every} is more than --steps {req.steps}; it would never happen (0 turns it off)"
            )


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings (or rotary table) are defined for."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_output_path(path: Path, flag: str = "-o") -> None:
    """Refuse a destination that cannot be written, before minutes of solving."""
    if path.is_dir():
        raise click.UsageError(f"{flag} {path} is a directory; give a file name such as {path / 'plan.json'}")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise click.UsageError(f"{flag} {path}: {ancestor} is a file, not a directory; choose another path")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.UsageError(f"{flag} {path}: {ancestor} is not writable; choose another path")


@dataclass(frozen=True)
class Request:
    """Every command-line choice, validated."""

    model: str
    gpu: str
    num_gpus: int
    budget: int | None
    reserve: int | None
    seq_len: int
    batch_size: int
    micro_batch: int | None
    grad_accum: int | None
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    steps: int
    host_mem: int | None
    dtype: str | None
    chunks: int | None
    checkpointing: str
    rotation: str
    update_interval: int | None
    cross_entropy: str
    task: str | None
    attn: str
    efficiency: float
    eval_every: int = 0  # optimizer steps between evaluations; 0: only at the end
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    padded_batches: bool | None = None  # batches carry padding; None: the task's (default_padded)
    headroom: Headroom | None = None  # None: planner.solver.DEFAULT_HEADROOM on GPUs, none on cpu
    max_grad_norm: float | None = 1.0  # clip the active window's gradient norm; None: no clipping
    weight_decay_mode: str = "window"  # "window" | "compensated" (planner.plan.OptimizerSettings)


# fp16 is not offered: it needs loss scaling, which the executor does not do (bf16 does not).
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def run_request(req: Request, out_path: str, report_dir: str | None = None) -> int:
    """Plan, print the summary, write the plan (and the report); returns the exit code."""
    import profiles
    from planner.costs import cost_model
    from planner.plan import save_plan
    from planner.profile_model import activation_profile, default_padded, model_structure
    from planner.solver import Limits, Solver, Space, balance_layers, make_setup

    check_bounds(req)
    check_output_path(Path(out_path))
    if report_dir is not None:
        from reports import ReportError
        from reports.writer import check_destination

        try:
            check_destination(Path(report_dir))
        except ReportError as e:
            raise click.UsageError(f"--report: {e}") from None
    preset = profiles.load_model(req.model, task=req.task)
    gpu = profiles.load_gpu(req.gpu)
    longest = max_positions(preset.config)
    if longest is not None and req.seq_len > longest:
        raise click.UsageError(
            f"--seq-len {req.seq_len} is beyond {preset.key}'s {longest} positions "
            f"(max_position_embeddings); use --seq-len {longest} or less"
        )
    on_gpu = gpu.pcie_gen is not None
    dtype = DTYPES[req.dtype] if req.dtype else ("bfloat16" if on_gpu else "float32")
    if not on_gpu and req.num_gpus > 1:
        raise click.UsageError("--num-gpus > 1 needs a GPU profile, not --gpu cpu")
    per_gpu_total = gpu.memory_total_bytes
    budget = default_budget(gpu) if req.budget is None else req.budget
    if budget > per_gpu_total:
        raise click.UsageError(
            f"--budget {gib(budget)} is more than the {gpu.name}'s {gib(per_gpu_total)}; use at most that"
        )
    padded = default_padded(preset.task) if req.padded_batches is None else req.padded_batches
    req = replace(req, padded_batches=padded)  # resolved: build_plan records it
    structure = model_structure(preset.config, preset.task, dtype)
    setup = make_setup(
        structure,
        cost_model(gpu, dtype, req.efficiency),
        weight_dtype=dtype,
        optimizer=req.optimizer,
        sgd_momentum=True,
        seq_len=req.seq_len,
        on_gpu=on_gpu,
        context_bytes=req.reserve,
        fragmentation=0.0 if req.reserve is not None else None,
        headroom=req.headroom,
    )
    host = available_host_bytes() if req.host_mem is None else req.host_mem
    layer_gpu: tuple[int, ...] = ()
    if req.num_gpus > 1:
        L = structure.num_layers
        layer_gpu = balance_layers(
            [structure.layer_numel(i) * 2 for i in range(L)],
            req.num_gpus,
            structure.layer_numel(L) * 2,
            structure.layer_numel(-1) * 2,
        )
    if req.batch_size % (req.micro_batch or 1) or req.batch_size % (req.grad_accum or 1):
        raise click.UsageError(
            f"--batch-size {req.batch_size} must be a multiple of --micro-batch and --grad-accum"
        )
    if req.micro_batch and req.grad_accum and req.micro_batch * req.grad_accum != req.batch_size:
        raise click.UsageError("--micro-batch x --grad-accum must equal --batch-size (sequences per step)")
    space = Space(
        global_batch=req.batch_size,
        micro_batch=req.micro_batch,
        grad_accum=req.grad_accum,
        num_chunks=req.chunks,
        checkpointing=req.checkpointing,
        rotation=req.rotation,
        update_interval=req.update_interval,
        total_steps=req.steps,
        cross_entropy=req.cross_entropy,
        layer_gpu=layer_gpu,
    )
    solver = Solver(
        setup,
        Limits(budget, host),
        lambda mb: activation_profile(
            preset.config, preset.task, mb, req.seq_len, dtype, req.attn, padded=padded
        ),
        space,
    )
    sol = solver.solve()
    host_warning = ""
    if sol.best is None and req.host_mem is None and sol.smallest is not None:
        # Only this machine's free memory is in the way, and the user named no host: the plan is
        # usually made for another machine (a 4090 box), so plan it and say what host it needs.
        solver.limits = Limits(budget, UNBOUNDED_HOST_BYTES)
        unbounded = solver.solve()
        if unbounded.best is not None:
            sol = unbounded
            states, need = sol.best.result.step.host_bytes, sol.best.result.host_peak_bytes
            host_warning = (
                f"warning: this plan keeps {gib(states)} of optimizer states in host memory, "
                f"{gib(need)} at checkpoints; this machine has {gib(host)} available: train on a machine "
                "with more, or pass --host-mem SIZE to plan for a specific host"
            )
            host = max(host, need)
    if sol.best is None:
        s = sol.smallest
        if s is None:
            raise click.ClickException(
                "no configuration could be simulated for this model; try fewer --chunks"
            )
        why = (
            f"host memory: needs {gib(s.result.host_peak_bytes)} (states {gib(s.result.step.host_bytes)} "
            f"+ a checkpoint) > --host-mem {gib(host)}"
            if s.result.budget_needed_bytes <= budget
            else f"smallest budget that fits: {gib(s.result.budget_needed_bytes)} per GPU "
            f"(peak {gib(s.result.step.peak_bytes)} + reserve {gib(s.result.step.reserve_bytes)} + "
            f"headroom {gib(s.result.headroom_bytes)}) with "
            f"K={s.num_chunks}, checkpointing {s.checkpoint_mode}, {s.placement_text()}, micro-batch "
            f"{s.candidate.micro_batch} x {s.candidate.grad_accum}"
        )
        click.echo(
            f"chunkft-plan: {preset.key} does not fit {gib(budget)} per GPU on {req.num_gpus} x {gpu.name}; "
            f"{why}",
            err=True,
        )
        return 2
    from planner.solver import build_plan

    plan = build_plan(req, preset, gpu, dtype, structure, setup, sol, budget, host)
    cadence = replace(plan.run, eval_every=req.eval_every, checkpoint_every=req.checkpoint_every)
    plan = replace(plan, run=cadence)
    check_replay(plan)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)  # checked writable above
    save_plan(plan, out_path)
    click.echo(summary(plan, sol, budget, headroom_note(req, on_gpu), budget_note(req, gpu)))
    if host_warning:
        click.echo(host_warning, err=True)
    click.echo(f"plan written to {out_path}")
    if report_dir is None:
        return 0
    from reports import ReportError, write_report

    try:
        html = write_report(plan, report_dir)
    except (ReportError, OSError) as e:
        click.echo(
            f"chunkft-plan: error: the plan is written ({out_path}) but the report failed: {e}; "
            f"redo it with: chunkft-report {out_path} -o {report_dir}",
            err=True,
        )
        return 3
    click.echo(f"report written to {html}")
    return 0


def default_budget(gpu: Any) -> int:
    """The GPU memory a plan may use without --budget: what is free on a probed card (--gpu auto: a
    display or another process holds the rest), else the profile's total."""
    free = gpu.memory_free_bytes
    return gpu.memory_total_bytes if free is None else min(free, gpu.memory_total_bytes)


def budget_note(req: Request, gpu: Any) -> str:
    if req.budget is None and gpu.memory_free_bytes is not None:
        return f" (free of {gib(gpu.memory_total_bytes)}, NVML)"
    return ""


def headroom_note(req: Request, on_gpu: bool) -> str:
    """What the plan's safety margin covers, for the printed table."""
    from planner.solver import DEFAULT_HEADROOM

    if req.headroom is not None:
        given = req.headroom.text()
        return f"--headroom {given}" + (": no safety margin" if given == "0" else "")
    if not on_gpu:
        return "none on the host CPU"
    h = DEFAULT_HEADROOM
    return (
        f"prediction error +-{h.fraction:.0%} of the peak, {h.fixed_bytes // 2**20} MiB for untested GPU "
        "allocator behaviour"
    )


def optimizer_text(o: Any) -> str:
    """The optimizer line: the choices that change the result, clipping and weight decay spelled out."""
    clip = "no clipping"
    if o.max_grad_norm is not None:
        clip = f"clip the window's gradient norm at {o.max_grad_norm:g}"
    decay = f"weight decay {o.weight_decay:g}"
    if o.weight_decay:
        compensated = o.weight_decay_mode == "compensated"
        decay += " (compensated: (1 - lr*wd)**K per step)" if compensated else " (active window only)"
    return f"{o.name}, lr {o.lr:g}, {decay}, {clip}"


def check_replay(plan: Any) -> None:
    """Re-simulate the plan from the plan alone; refuse to write one the simulator does not reproduce."""
    from planner.simulator import setup_and_candidate, simulate

    setup, cand, act = setup_and_candidate(plan)
    res = simulate(setup, cand, act)
    pr, hw = plan.predictions, plan.hardware
    got = (res.step.peak_bytes, round(res.step.step_seconds, 9), res.budget_needed_bytes, res.host_peak_bytes)
    want = (
        pr.peak_bytes,
        round(pr.step_seconds, 9),
        pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes,
        pr.host_peak_bytes,
    )
    if got != want:
        raise click.ClickException(
            f"internal error: re-simulating the plan gives (peak, step s, budget needed, host peak) {got}, "
            f"the solver {want}; nothing written"
        )


def summary(  # type: ignore[no-untyped-def]
    plan, sol, budget: int, headroom_why: str = "", budget_why: str = ""
) -> str:
    """The table a user reads before spending an hour (headroom_why: what the margin covers; budget_why:
    where the budget came from, when not from the user or the profile)."""
    from executor.loss import DEFAULT_CHUNK_TOKENS

    pr, hw, run = plan.predictions, plan.hardware, plan.run
    lines = [
        f"model      {plan.model.name} ({plan.model.num_params:,} parameters, {run.weight_dtype})",
        f"hardware   {hw.num_gpus} x {hw.gpu_name}, budget {gib(budget)}{budget_why} per GPU, "
        f"host {gib(hw.host_budget_bytes)}",
        f"batch      {run.micro_batch_size} x {run.grad_accum_steps} sequences of {run.seq_len} tokens"
        + (" (padded rows)" if run.padded_batches else ""),  # unpadded: packed full rows, the usual case
        f"chunks     K={plan.chunk_table.num_chunks}, rotation {plan.rotation.order}, "
        f"{plan.rotation.update_interval} step(s) per visit, checkpointing {plan.checkpointing.mode}"
        + (
            f" (first {len(plan.checkpointing.layers)} layers)"
            if plan.checkpointing.mode == "selected"
            else ""
        ),
        f"states     {plan.placement.optimizer_states}"
        + (
            f" ({plan.placement.host_state_dtype}, "
            f"{'2 state slots: prefetch a step ahead' if plan.placement.prefetch else '1 state slot'})"
            if plan.placement.optimizer_states == "host"
            else ""
        ),
        "loss       "
        + (
            f"chunked cross-entropy ({DEFAULT_CHUNK_TOKENS}-token pieces, no full logits)"
            if run.chunked_cross_entropy
            else "cross-entropy over the full logits"
        ),
        f"optimizer  {optimizer_text(run.optimizer)}",
    ]
    if run.cuda_alloc_conf:
        lines.append(
            f"allocator  PYTORCH_CUDA_ALLOC_CONF={run.cuda_alloc_conf} "
            "(chunkft-run sets it before CUDA starts)"
        )
    lines += [
        "",
        "predicted GPU peak (allocated)      " + gib(pr.peak_bytes) + f"   at {pr.peak_cause}",
    ]
    for cat, b in pr.peak_by_category:
        lines.append(f"  {cat:<32} {gib(b)}")
    lines += [
        f"  {'reserve (context + fragmentation)':<32} {gib(pr.reserve_bytes)}",
        f"  {'headroom':<32} {gib(hw.headroom_bytes)}" + (f"   ({headroom_why})" if headroom_why else ""),
        f"  {'total against budget':<32} {gib(pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes)} "
        f"of {gib(budget)}",
    ]
    if sol.best is not None and len(sol.best.result.per_gpu_peak_bytes) > 1:
        lines.append("  per GPU: " + ", ".join(gib(b) for b in sol.best.result.per_gpu_peak_bytes))
    lines += [
        f"host memory                          {gib(pr.host_bytes)} states + "
        f"{gib(pr.host_peak_bytes - pr.host_bytes)} at checkpoints",
        f"step time                            {pr.step_seconds * 1000:.1f} ms  "
        f"(compute efficiency {pr.compute_efficiency:.2f} of datasheet FLOP/s)",
        f"throughput                           {pr.tokens_per_second:,.0f} tokens/s",
        "",
        f"{'alternative':<52} {'K':>5} {'ckpt':>8} {'peak':>10} {'step':>10} {'tok/s':>9}  fits",
    ]
    for a in plan.alternatives:
        lines.append(
            f"{a.label[:52]:<52} {a.k:>5} {a.checkpointing:>8} {a.peak_bytes / GIB:>6.2f} GiB "
            f"{a.step_seconds * 1000:>7.1f} ms {a.tokens_per_second:>9,.0f}  {'yes' if a.feasible else 'no'}"
        )
    return "\n".join(lines)


@click.command(
    name="chunkft-plan",
    cls=OneLineErrors,
    usage_exit_code=1,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("model", required=False)
@click.option("--gpu", default=None, help="GPU profile (e.g. 4090, h800, cpu) or 'auto' (NVML).")
@click.option("--num-gpus", default=1, type=click.IntRange(1, 64), show_default=True)
@click.option("--budget", type=Size(), default=None, help="Usable GPU memory per GPU (e.g. 20GiB).")
@click.option(
    "--reserve",
    type=Size(),
    default=None,
    help="CUDA context + fragmentation reserve (default: 512 MiB + 5% of the peak on GPUs); the "
    "headroom comes on top (--headroom).",
)
@click.option(
    "--headroom",
    type=HeadroomSize(),
    default=None,
    help="Safety margin kept free on top of peak + reserve: bytes (1GiB, 0), a share of the predicted "
    "peak (5%), or both (3%+256MiB, the default on GPUs: the tested prediction error plus untested "
    "GPU allocator behaviour; none on cpu).",
)
@click.option("--seq-len", default=1024, type=click.IntRange(1), show_default=True)
@click.option(
    "--batch-size",
    default=1,
    type=click.IntRange(1),
    show_default=True,
    help="Sequences per optimizer step (global batch).",
)
@click.option("--micro-batch", default=None, type=click.IntRange(1))
@click.option("--grad-accum", default=None, type=click.IntRange(1))
@click.option("--optimizer", default="adamw", type=click.Choice(["adamw", "sgd"]), show_default=True)
@click.option("--lr", default=1e-5, type=click.FloatRange(min=0, min_open=True), show_default=True)
@click.option("--weight-decay", default=0.0, type=click.FloatRange(min=0), show_default=True)
@click.option(
    "--weight-decay-mode",
    default="window",
    type=click.Choice(["window", "compensated"]),
    show_default=True,
    help="AdamW's decoupled weight decay: 'window' decays only the active window each step, so every "
    "parameter decays 1/K as often as in dense training; 'compensated' multiplies the active window by "
    "(1 - lr*wd)**K per step, so over a rotation every parameter decays as much as under dense AdamW for "
    "as many steps at a constant lr (AdamW only).",
)
@click.option(
    "--max-grad-norm",
    default="1.0",
    type=NormOrNone(),
    show_default=True,
    help="Clip each step's gradient to this norm, or 'none'. The norm is the active window's own (the "
    "only gradients that exist), not the whole model's.",
)
@click.option("--schedule", default="constant", type=click.Choice(["constant", "linear", "cosine"]))
@click.option("--warmup-steps", default=0, type=click.IntRange(0))
@click.option("--steps", default=1000, type=click.IntRange(1), show_default=True)
@click.option(
    "--host-mem",
    type=Size(),
    default=None,
    help="Host memory for the states and a checkpoint's in-flight copies (default: available).",
)
@click.option(
    "--dtype",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Weight dtype (default bf16 on GPUs, fp32 on cpu).",
)
@click.option("--chunks", default=None, type=click.IntRange(1), help="Force the number of chunks K.")
@click.option(
    "--checkpointing", default="auto", type=click.Choice(["none", "all", "auto"]), show_default=True
)
@click.option("--rotation", default="bottom-up", type=click.Choice(["bottom-up", "top-down", "random"]))
@click.option(
    "--update-interval",
    default=None,
    type=click.IntRange(1),
    help="Optimizer steps per visit of a window (default: the solver chooses).",
)
@click.option(
    "--cross-entropy",
    default="auto",
    type=click.Choice(["auto", "full", "chunked"]),
    show_default=True,
    help="The loss: full logits, or chunked cross-entropy (no full logits; auto: where logits are large).",
)
@click.option("--task", default=None, type=click.Choice(["causal-lm", "sequence-classification"]))
@click.option(
    "--padded-batches/--unpadded-batches",
    default=None,
    help="Whether the training batches carry padding, which changes attention memory (a mask, and "
    "grouped-query K/V repeated to every head). Give --padded-batches for instruction JSONL on a causal "
    'LM (padded rows); packed text (.txt, JSONL {"text"}) is unpadded. Default: the task\'s '
    "(causal LM unpadded, classification padded).",
)
@click.option("--attn", default="sdpa", type=click.Choice(["sdpa", "eager"]), show_default=True)
@click.option(
    "--efficiency",
    default=None,
    type=click.FloatRange(0, 1, min_open=True),
    help="Achieved fraction of datasheet FLOP/s (default 0.45).",
)
@click.option(
    "-o", "--output", default=None, type=click.Path(dir_okay=False), help="Where to write plan.json."
)
@click.option(
    "--eval-every",
    default=0,
    type=click.IntRange(0),
    show_default=True,
    help="Evaluate every N optimizer steps (0: only at the end).",
)
@click.option(
    "--checkpoint-every",
    default=0,
    type=click.IntRange(0),
    show_default=True,
    help="Checkpoint every N optimizer steps (0: only at the end and on SIGINT/SIGTERM).",
)
@click.option(
    "--report",
    "report_dir",
    default=None,
    type=click.Path(file_okay=False),
    help="Also write the plan's report (report.html, figures, trace.json) into this directory.",
)
@click.option("--list-gpus", is_flag=True, help="List GPU profiles and exit.")
@click.option("--list-models", is_flag=True, help="List model presets and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(
    output: str | None,
    report_dir: str | None,
    list_gpus: bool,
    list_models: bool,
    debug: bool,
    **options: Any,
) -> None:
    """Plan full-parameter ChunkFT fine-tuning of MODEL on --gpu; write the plan with -o."""
    import profiles
    from planner.costs import DEFAULT_EFFICIENCY

    if list_gpus:
        for g in profiles.list_gpus():
            click.echo(f"{g.key:<18} {g.name:<36} {gib(g.memory_total_bytes)}")
        return
    if list_models:
        for m in profiles.list_models():
            click.echo(f"{m.key:<18} {m.task}")
        return
    if options["model"] is None:
        raise click.UsageError("give a MODEL (preset, HF directory) or --list-models")
    if options["gpu"] is None:
        raise click.UsageError("give --gpu (e.g. --gpu 4090, --gpu cpu, --gpu auto); --list-gpus lists them")
    if output is None:
        raise click.UsageError("give -o plan.json: where to write the plan")
    options["efficiency"] = options["efficiency"] or DEFAULT_EFFICIENCY
    req = Request(**options)  # every other option is a field of the request, by name
    try:
        code = run_request(req, output, report_dir)
    except (click.ClickException, click.exceptions.Exit):
        raise
    except Exception as e:  # one line unless --debug
        if debug:
            raise
        from planner.plan import PlanError
        from profiles import ProfileError

        if isinstance(e, BrokenPipeError):  # stdout closed by the reader (e.g. `| head`): say nothing
            sys.exit(141)
        if isinstance(e, OSError):
            raise click.ClickException(
                f"{e.filename or output}: {e.strerror or e}; check the path and free space (nothing written)"
            ) from None
        if isinstance(e, (ProfileError, PlanError, ValueError)):
            raise click.ClickException(str(e)) from None
        raise click.ClickException(
            f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"
        ) from None
    sys.exit(code)


if __name__ == "__main__":
    main()
