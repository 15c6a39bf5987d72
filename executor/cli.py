"""chunkft-run: replay a plan to fine-tune a model for real (see executor/train.py for the loop).

Every failure is one line on stderr (`chunkft-run: error: ...`, a traceback only with --debug) that says
what is wrong and what to do. Exit codes:

    0    done: the model is exported and run.json written
    2    bad input (plan, data, output directory, checkpoint to resume, options) or the run stopped after
         repeated non-finite losses; nothing half-written
    1    the run failed while training (disk full, CUDA out of memory, an internal error); the last
         complete checkpoint is intact and the line gives the command to continue or to re-plan
    130  SIGINT, 143 SIGTERM: the current step finished, a checkpoint was written, the line gives the
         resume command
"""

from __future__ import annotations

import errno
import re
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import click

from executor.checkpoint import CheckpointDiskFull, CheckpointError, latest_checkpoint
from executor.data import DataError
from executor.streams import PinnedMemoryError
from executor.train import RunError, RunOptions, TrainingInterrupted, train
from planner.cli_conventions import OneLineErrors

MAX_STEPS = 10**8
GIB = 2**30


@click.command(
    name="chunkft-run",
    cls=OneLineErrors,
    usage_exit_code=2,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("plan", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(path_type=Path),
    help="Training data: .txt, .jsonl (text or instruction), .tsv/.csv (text,label).",
)
@click.option(
    "--output",
    "output",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory for checkpoints, metrics.jsonl, run.json and the exported model "
    "[default: runs/<plan name>].",
)
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Optimizer steps to run in total (overrides the plan's; the LR schedule stays the plan's).",
)
@click.option("--resume", is_flag=True, help="Continue from the output directory's latest checkpoint.")
@click.option(
    "--device",
    default=None,
    help="cpu, cuda (the current GPU) or cuda:N [default: the current GPU if there is one, else cpu].",
)
@click.option("--quiet", is_flag=True, help="No progress line.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
def main(
    plan: Path,
    data: Path,
    output: Path | None,
    max_steps: int | None,
    resume: bool,
    device: str | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Fine-tune the model PLAN describes on --data with ChunkFT, writing everything under --output."""
    import torch

    from planner.plan import PlanError
    from profiles import ProfileError

    if not plan.is_file():
        _fail(f"plan {plan} not found; make one with chunkft-plan MODEL -o {plan}")
    if max_steps is not None and max_steps > MAX_STEPS:
        _fail(f"--max-steps {max_steps} is absurdly large (at most {MAX_STEPS:,}); check the number")
    out = output if output is not None else Path("runs") / plan.stem
    opts = RunOptions(
        plan_path=plan,
        data_path=data,
        output_dir=out,
        max_steps=max_steps,
        resume=resume,
        progress=not quiet,
        device=device,
    )
    try:
        result = train(opts)
    except TrainingInterrupted as e:
        click.echo(f"chunkft-run: {e}", err=True)
        click.echo(f"resume with: {resume_command(opts)}", err=True)
        sys.exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM
    except CheckpointDiskFull as e:
        if debug:
            raise
        then = f"resume with: {resume_command(opts)}" if e.previous else f"run again: {rerun_command(opts)}"
        _fail(f"{e}; free space and {then}", code=1)
    except torch.OutOfMemoryError as e:
        if debug:
            raise
        _fail(out_of_memory_message(opts, e, _cuda_peaks()), code=1)
    except (RunError, DataError, CheckpointError, PlanError, ProfileError) as e:
        if debug:
            raise
        _fail(str(e))
    except PinnedMemoryError as e:
        if debug:
            raise
        _fail(f"{e}; {_after_failure(opts)}", code=1)
    except ValueError as e:  # the driver refusing the plan's chunks for this model (e.g. unsupported module)
        if debug:
            raise
        _fail(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except OSError as e:
        if debug:
            raise
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail(f"disk full writing {e.filename or out}; {_after_failure(opts)}", code=1)
        _fail(f"{e.filename or out}: {e.strerror or e}; check the path and free space")
    except Exception as e:
        if debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        _fail(
            f"internal error {type(e).__name__}: {first}; {_after_failure(opts)} "
            "(rerun with --debug for the traceback)",
            code=1,
        )
    ev = result.evals[-1] if result.evals else None
    summary = f"done: {result.steps} steps, final train loss {result.train_losses[-1]:.4f}"
    if ev is not None:
        summary += f", eval loss {ev[1]:.4f}" + (f", eval accuracy {ev[2]:.4f}" if ev[2] is not None else "")
    summary += f", {result.skipped_steps} skipped (non-finite) steps" if result.skipped_steps else ""
    click.echo(summary)
    click.echo(f"model: {result.model_dir}")
    click.echo(f"report: {result.run_json}")


# ------------------------------------------------------------------------------- recovery commands


def _run_args(opts: RunOptions) -> list[str]:
    args = ["chunkft-run", str(opts.plan_path), "--data", str(opts.data_path)]
    args += ["--output", str(opts.output_dir)] + (["--device", opts.device] if opts.device else [])
    return args + (["--max-steps", str(opts.max_steps)] if opts.max_steps is not None else [])


def resume_command(opts: RunOptions) -> str:
    """The command that continues this run from its latest checkpoint (same plan, data and output)."""
    return shlex.join([*_run_args(opts), "--resume"])


def rerun_command(opts: RunOptions) -> str:
    """The command as given (a run that failed before its first checkpoint starts over)."""
    return shlex.join(_run_args(opts) + (["--resume"] if opts.resume else []))


def _latest_name(opts: RunOptions) -> str | None:
    try:
        return latest_checkpoint(opts.output_dir).name
    except (CheckpointError, OSError):
        return None


def _after_failure(opts: RunOptions) -> str:
    """What survives a failure mid-run and how to continue."""
    name = _latest_name(opts)
    if name is None:
        return f"no checkpoint was written yet; run again: {rerun_command(opts)}"
    return f"the last checkpoint {name} is intact; resume with: {resume_command(opts)}"


def _cuda_peaks() -> tuple[int, int] | None:
    """(peak allocated, peak reserved) bytes of this process on the current CUDA device, if any."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


_TRIED = re.compile(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)")
_UNIT = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def smaller_budget(budget_bytes: int, peak_reserved_bytes: int | None, tried_bytes: int) -> int:
    """A budget the re-plan should fit under: the plan's, less what the failed allocation overshot the
    card by (measured peak reserved + the allocation that failed - budget), and at least 10% less;
    rounded down to MiB."""
    over = 0 if peak_reserved_bytes is None else peak_reserved_bytes + tried_bytes - budget_bytes
    smaller = budget_bytes - max(over, budget_bytes // 10)
    return max(smaller, 2**20) // 2**20 * 2**20


def replan_command(plan: Any, budget_bytes: int, host_mem_bytes: int | None = None) -> str:
    """chunkft-plan with the plan's own choices and a new --budget (and --host-mem; K, checkpointing and
    the batch split are left to the solver: choosing them for the smaller budget is the point)."""
    run, hw = plan.run, plan.hardware
    dtype = {"bfloat16": "bf16", "float32": "fp32"}[run.weight_dtype]
    args = [
        "chunkft-plan",
        plan.model.path or plan.model.name,
        "--gpu",
        hw.gpu,
        "--budget",
        f"{budget_bytes // 2**20}MiB",
        "--seq-len",
        str(run.seq_len),
        "--batch-size",
        str(run.micro_batch_size * run.grad_accum_steps),
        "--steps",
        str(run.total_steps),
        "--optimizer",
        run.optimizer.name,
        "--lr",
        f"{run.optimizer.lr:g}",
        "--schedule",
        run.schedule.kind,
        "--dtype",
        dtype,
        "--task",
        plan.model.task,
        "--weight-decay",
        f"{run.optimizer.weight_decay:g}",
        "--rotation",
        plan.rotation.order,
        "--attn",
        run.attn_implementation,
        "--host-mem",
        f"{(hw.host_budget_bytes if host_mem_bytes is None else host_mem_bytes) // 2**20}MiB",
    ]
    if hw.num_gpus > 1:
        args += ["--num-gpus", str(hw.num_gpus)]
    if run.schedule.warmup_steps:
        args += ["--warmup-steps", str(run.schedule.warmup_steps)]
    if run.eval_every:
        args += ["--eval-every", str(run.eval_every)]
    if run.checkpoint_every:
        args += ["--checkpoint-every", str(run.checkpoint_every)]
    o = run.optimizer
    args += ["--max-grad-norm", "none" if o.max_grad_norm is None else f"{o.max_grad_norm:g}"]
    if o.weight_decay_mode != "window":
        args += ["--weight-decay-mode", o.weight_decay_mode]
    if run.padded_batches != (plan.model.task != "causal-lm"):  # not the task's default
        args += ["--padded-batches" if run.padded_batches else "--unpadded-batches"]
    return shlex.join(args)


def out_of_memory_message(opts: RunOptions, error: BaseException, peaks: tuple[int, int] | None) -> str:
    """One line: what ran out, the measured peak, what is intact, and the exact re-planning command."""
    from planner.plan import load_plan

    plan = load_plan(opts.plan_path)
    budget = plan.hardware.budget_bytes
    m = _TRIED.search(str(error))
    tried = int(float(m.group(1)) * _UNIT[m.group(2)]) if m else 0
    measured = (
        f"measured peak {peaks[0] / GIB:.2f} GiB allocated, {peaks[1] / GIB:.2f} GiB reserved"
        if peaks
        else "no CUDA peak measured"
    )
    if tried:
        measured += f", then {tried / GIB:.2f} GiB more requested"
    new_budget = smaller_budget(budget, peaks[1] if peaks else None, tried)
    target = opts.plan_path.with_name(f"{opts.plan_path.stem}-{new_budget // 2**20}MiB.json")
    return (
        f"CUDA out of memory ({measured}; the plan allowed {budget / GIB:.2f} GiB and predicted a peak of "
        f"{plan.predictions.peak_bytes / GIB:.2f} GiB); {_after_failure(opts)} once the GPU has room "
        f"(another process may hold memory: nvidia-smi); or re-plan with a smaller budget: "
        f"{replan_command(plan, new_budget)} -o {shlex.quote(str(target))} (a new plan starts from step 0)"
    )


def _fail(message: str, code: int = 2) -> None:
    click.echo(f"chunkft-run: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
