"""The commands chunkft-run's errors print: re-plan (chunkft-plan), resume, run again, start elsewhere.

Every piece of advice an error gives is one of these commands, complete, so it can be pasted as it is
(tests/test_recovery_advice.py runs each one). cli.py and train.py both import this module; neither
imports the other.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chunkft.executor.train import RunOptions

_CHECKPOINTING_FLAG = {"none": "none", "all": "all", "selected": "auto"}  # the CLI cannot name layers


def smaller_budget(budget_bytes: int, peak_reserved_bytes: int | None, tried_bytes: int) -> int:
    """A budget the re-plan should fit under: the plan's, less what the failed allocation overshot the
    card by (measured peak reserved + the allocation that failed - budget), and at least 10% less;
    rounded down to MiB."""
    over = 0 if peak_reserved_bytes is None else peak_reserved_bytes + tried_bytes - budget_bytes
    smaller = budget_bytes - max(over, budget_bytes // 10)
    return max(smaller, 2**20) // 2**20 * 2**20


def replan_command(
    plan: Any,
    budget_bytes: int,
    output: Path,
    host_mem_bytes: int | None = None,
    *,
    keep_choices: bool = False,
    steps: int | None = None,
    seq_len: int | None = None,
    lr: float | None = None,
    extra: tuple[str, ...] = (),
) -> str:
    """chunkft-plan with the plan's own settings, a new --budget (and --host-mem, --steps, --seq-len, --lr,
    extra flags) and `-o output`: a complete command, so the advice that prints it can be pasted as it is.

    keep_choices=False leaves K, checkpointing and the batch split to the solver: after an out-of-memory
    error choosing them for the smaller budget is the point. keep_choices=True pins them (--chunks,
    --micro-batch, --grad-accum, --update-interval, --checkpointing), for a re-plan that changes something
    else (padding, steps) and should keep the run the user chose."""
    args = _plan_args(plan, budget_bytes, host_mem_bytes, keep_choices, steps, seq_len, lr)
    return shlex.join([*args, *extra, "-o", str(output)])


def _number(x: float) -> str:
    """A float as the planner will read it back exactly (`:g` keeps 6 digits: 1.2345678e-05 would
    re-plan as 1.23457e-05)."""
    return repr(float(x))


def _plan_args(
    plan: Any,
    budget_bytes: int,
    host_mem_bytes: int | None,
    keep_choices: bool,
    steps: int | None,
    seq_len: int | None,
    lr: float | None,
) -> list[str]:
    run, hw, o = plan.run, plan.hardware, plan.run.optimizer
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[run.weight_dtype]
    host_mem = hw.host_budget_bytes if host_mem_bytes is None else host_mem_bytes
    args = [
        "chunkft-plan", plan.model.path or plan.model.name, "--gpu", hw.gpu,
        "--budget", f"{budget_bytes // 2**20}MiB",
        "--seq-len", str(run.seq_len if seq_len is None else seq_len),
        "--batch-size", str(run.micro_batch_size * run.grad_accum_steps),
        "--steps", str(run.total_steps if steps is None else steps),
        "--optimizer", o.name, "--lr", _number(o.lr if lr is None else lr),
        "--schedule", run.schedule.kind, "--dtype", dtype,
        "--task", plan.model.task, "--weight-decay", _number(o.weight_decay),
        "--rotation", plan.rotation.order, "--attn", run.attn_implementation,
        "--host-mem", f"{max(host_mem, 2**20) >> 20}MiB",
    ]  # fmt: skip
    args += ["--efficiency", _number(plan.predictions.compute_efficiency)]  # the plan's cost assumption
    if hw.measured_flops_per_s:  # made with --calibrate: measure this machine again
        args += ["--calibrate"]
    if plan.model.source == "hf-config":
        args += ["--random-init"]
    if hw.num_gpus > 1:
        args += ["--num-gpus", str(hw.num_gpus)]
    if hw.reserve_given:  # the user's --reserve: exactly the plan's reserve, no share of the peak
        args += ["--reserve", str(hw.reserve_bytes)]
    if hw.headroom_given:  # as the user wrote it (a share of the peak stays a share)
        args += ["--headroom", hw.headroom_given]
    if run.schedule.warmup_steps:
        args += ["--warmup-steps", str(run.schedule.warmup_steps)]
    if run.eval_every:
        args += ["--eval-every", str(run.eval_every)]
    if run.checkpoint_every:
        args += ["--checkpoint-every", str(run.checkpoint_every)]
    args += ["--max-grad-norm", "none" if o.max_grad_norm is None else _number(o.max_grad_norm)]
    if o.weight_decay_mode != "window":
        args += ["--weight-decay-mode", o.weight_decay_mode]
    if run.padded_batches != (plan.model.task != "causal-lm"):  # not the task's default
        args += ["--padded-batches" if run.padded_batches else "--unpadded-batches"]
    if run.cross_entropy != "auto":  # forced by the user: keep it
        args += ["--cross-entropy", run.cross_entropy]
    if keep_choices:
        args += _choice_args(plan)
    return args


def _choice_args(plan: Any) -> list[str]:
    """The solver's choices as flags that force them."""
    run = plan.run
    return [
        "--chunks", str(len(plan.chunk_table.chunks)),
        "--micro-batch", str(run.micro_batch_size), "--grad-accum", str(run.grad_accum_steps),
        "--update-interval", str(plan.rotation.update_interval),
        "--checkpointing", _CHECKPOINTING_FLAG[plan.checkpointing.mode],
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ chunkft-run


def run_args(opts: RunOptions, output: Path | None = None) -> list[str]:
    """chunkft-run with this run's plan, data, output, device, state store and --max-steps (no resume
    flags)."""
    args = ["chunkft-run", str(opts.plan_path), "--data", str(opts.data_path)]
    args += ["--tokenizer", str(opts.tokenizer_dir)] if opts.tokenizer_dir else []
    args += ["--output", str(opts.output_dir if output is None else output)]
    args += ["--device", opts.device] if opts.device else []
    args += ["--state-store", opts.state_store] if opts.state_store else []
    args += ["--state-dir", str(opts.state_dir)] if opts.state_dir else []
    return args + (["--max-steps", str(opts.max_steps)] if opts.max_steps is not None else [])


def resume_command(opts: RunOptions, *extra: str) -> str:
    """The command that continues this run from its newest intact checkpoint (same plan, data, output)."""
    return shlex.join([*run_args(opts), "--resume", *extra])


def rerun_command(opts: RunOptions) -> str:
    """The command as given (a run that failed before writing a checkpoint starts over the same way)."""
    args = run_args(opts)
    if opts.resume_from is not None:
        args += ["--resume-from", opts.resume_from]
    elif opts.resume:
        args += ["--resume"]
    return shlex.join(args + (["--allow-data-change"] if opts.allow_data_change else []))


def fresh_command(opts: RunOptions) -> str:
    """This run started from step 0 without --resume (for an output that holds no checkpoint)."""
    return shlex.join(run_args(opts))


def elsewhere_command(opts: RunOptions) -> str:
    """This run started from step 0 in a new output directory beside --output (nothing is deleted)."""
    return shlex.join(run_args(opts, output=free_sibling(Path(opts.output_dir))))


def free_sibling(path: Path) -> Path:
    """PATH-2, PATH-3, ...: the first that does not exist."""
    n = 2
    while path.with_name(f"{path.name}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}-{n}")
