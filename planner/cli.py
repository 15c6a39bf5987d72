"""chunkft-plan: will this fine-tuning fit, and how fast will it run? Writes a plan the executor replays.

Exit codes: 0 plan written; 1 bad input (one line on stderr); 2 nothing fits the budget (the line says
the smallest budget that would, and with which settings). Nothing is written unless a plan fits and the
simulator, re-run from the plan itself, agrees with the solver.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

import click

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
    task: str | None
    attn: str
    efficiency: float


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def run_request(req: Request, out_path: str) -> int:
    """Plan, print the summary, write the plan; returns the exit code."""
    import profiles
    from planner.costs import cost_model
    from planner.plan import save_plan
    from planner.profile_model import activation_profile, model_structure
    from planner.solver import Limits, Solver, Space, balance_layers, make_setup

    preset = profiles.load_model(req.model, task=req.task)
    gpu = profiles.load_gpu(req.gpu)
    on_gpu = gpu.pcie_gen is not None
    dtype = DTYPES[req.dtype] if req.dtype else ("bfloat16" if on_gpu else "float32")
    if not on_gpu and req.num_gpus > 1:
        raise click.UsageError("--num-gpus > 1 needs a GPU profile, not --gpu cpu")
    per_gpu_total = gpu.memory_total_bytes
    budget = per_gpu_total if req.budget is None else req.budget
    if budget > per_gpu_total:
        raise click.UsageError(
            f"--budget {gib(budget)} is more than the {gpu.name}'s {gib(per_gpu_total)}; use at most that"
        )
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
        layer_gpu=layer_gpu,
    )
    solver = Solver(
        setup,
        Limits(budget, host),
        lambda mb: activation_profile(preset.config, preset.task, mb, req.seq_len, dtype, req.attn),
        space,
    )
    sol = solver.solve()
    if sol.best is None:
        s = sol.smallest
        if s is None:
            raise click.ClickException(
                "no configuration could be simulated for this model; try fewer --chunks"
            )
        why = (
            f"host memory: needs {gib(s.result.step.host_bytes)} > --host-mem {gib(host)}"
            if s.result.budget_needed_bytes <= budget
            else f"smallest budget that fits: {gib(s.result.budget_needed_bytes)} per GPU "
            f"(peak {gib(s.result.step.peak_bytes)} + reserve {gib(s.result.step.reserve_bytes)}) with "
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
    from planner.simulator import simulate_plan

    check = simulate_plan(plan)
    if (check.peak_bytes, round(check.step_seconds, 9)) != (
        plan.predictions.peak_bytes,
        round(plan.predictions.step_seconds, 9),
    ):
        raise click.ClickException(
            f"internal error: re-simulating the plan gives peak {check.peak_bytes}, the solver "
            f"{plan.predictions.peak_bytes}; nothing written"
        )
    save_plan(plan, out_path)
    click.echo(summary(plan, sol, budget))
    click.echo(f"plan written to {out_path}")
    return 0


def summary(plan, sol, budget: int) -> str:  # type: ignore[no-untyped-def]
    """The table a user reads before spending an hour."""
    pr, hw, run = plan.predictions, plan.hardware, plan.run
    lines = [
        f"model      {plan.model.name} ({plan.model.num_params:,} parameters, {run.weight_dtype})",
        f"hardware   {hw.num_gpus} x {hw.gpu_name}, budget {gib(budget)} per GPU, "
        f"host {gib(hw.host_budget_bytes)}",
        f"batch      {run.micro_batch_size} x {run.grad_accum_steps} sequences of {run.seq_len} tokens",
        f"chunks     K={plan.chunk_table.num_chunks}, rotation {plan.rotation.order}, "
        f"checkpointing {plan.checkpointing.mode}"
        + (
            f" (first {len(plan.checkpointing.layers)} layers)"
            if plan.checkpointing.mode == "selected"
            else ""
        ),
        f"states     {plan.placement.optimizer_states}"
        + (
            f" ({plan.placement.host_state_dtype}, prefetch {'on' if plan.placement.prefetch else 'off'})"
            if plan.placement.optimizer_states == "host"
            else ""
        ),
        "",
        "predicted GPU peak (allocated)      " + gib(pr.peak_bytes) + f"   at {pr.peak_cause}",
    ]
    for cat, b in pr.peak_by_category:
        lines.append(f"  {cat:<32} {gib(b)}")
    lines += [
        f"  {'reserve (context + fragmentation)':<32} {gib(pr.reserve_bytes)}",
        f"  {'total against budget':<32} {gib(pr.peak_bytes + pr.reserve_bytes)} of {gib(budget)}",
    ]
    if sol.best is not None and len(sol.best.result.per_gpu_peak_bytes) > 1:
        lines.append("  per GPU: " + ", ".join(gib(b) for b in sol.best.result.per_gpu_peak_bytes))
    lines += [
        f"host memory                          {gib(pr.host_bytes)}",
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


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--gpu", default=None, help="GPU profile (e.g. 4090, h800, cpu) or 'auto' (NVML).")
@click.option("--num-gpus", default=1, type=click.IntRange(1, 64), show_default=True)
@click.option("--budget", type=Size(), default=None, help="Usable GPU memory per GPU (e.g. 20GiB).")
@click.option(
    "--reserve",
    type=Size(),
    default=None,
    help="CUDA context + fragmentation reserve (default: 512 MiB + 5% of the peak on GPUs).",
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
@click.option("--schedule", default="constant", type=click.Choice(["constant", "linear", "cosine"]))
@click.option("--warmup-steps", default=0, type=click.IntRange(0))
@click.option("--steps", default=1000, type=click.IntRange(1), show_default=True)
@click.option("--host-mem", type=Size(), default=None, help="Host memory for states (default: available).")
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
@click.option("--task", default=None, type=click.Choice(["causal-lm", "sequence-classification"]))
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
@click.option("--list-gpus", is_flag=True, help="List GPU profiles and exit.")
@click.option("--list-models", is_flag=True, help="List model presets and exit.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def main(
    model,
    gpu,
    num_gpus,
    budget,
    reserve,
    seq_len,
    batch_size,
    micro_batch,
    grad_accum,
    optimizer,
    lr,  # type: ignore[no-untyped-def]
    weight_decay,
    schedule,
    warmup_steps,
    steps,
    host_mem,
    dtype,
    chunks,
    checkpointing,
    rotation,
    task,
    attn,
    efficiency,
    output,
    list_gpus,
    list_models,
    debug,
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
    if model is None:
        raise click.UsageError("give a MODEL (preset, HF directory) or --list-models")
    if gpu is None:
        raise click.UsageError("give --gpu (e.g. --gpu 4090, --gpu cpu, --gpu auto); --list-gpus lists them")
    if output is None:
        raise click.UsageError("give -o plan.json: where to write the plan")
    req = Request(
        model,
        gpu,
        num_gpus,
        budget,
        reserve,
        seq_len,
        batch_size,
        micro_batch,
        grad_accum,
        optimizer,
        lr,
        weight_decay,
        schedule,
        warmup_steps,
        steps,
        host_mem,
        dtype,
        chunks,
        checkpointing,
        rotation,
        task,
        attn,
        efficiency or DEFAULT_EFFICIENCY,
    )
    if warmup_steps > steps:
        raise click.UsageError(f"--warmup-steps {warmup_steps} is more than --steps {steps}")
    try:
        code = run_request(req, output)
    except (click.ClickException, click.exceptions.Exit):
        raise
    except Exception as e:  # one line unless --debug
        if debug:
            raise
        from planner.plan import PlanError
        from profiles import ProfileError

        if isinstance(e, (ProfileError, PlanError, ValueError, OSError)):
            raise click.ClickException(str(e)) from None
        raise click.ClickException(
            f"{type(e).__name__}: {e} (rerun with --debug for the traceback)"
        ) from None
    sys.exit(code)
