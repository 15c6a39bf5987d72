"""chunkft-run: replay a plan to fine-tune a model for real (see executor/train.py for the loop).

Every failure is one line on stderr (`chunkft-run: error: ...`; with --debug the traceback first, the exit
code unchanged) that says what is wrong and what to do: where that is a command, the complete command
(executor/replan.py builds them). Exit codes:

    0    done: the model is exported and run.json written
    2    bad input (plan, data, output directory or one in use by another run, checkpoint to resume,
         options); nothing written
    1    the run failed while training (disk full, CUDA out of memory, repeated non-finite losses, an
         internal error); the last complete checkpoint is intact and the line gives the command to
         continue or to re-plan
    130  SIGINT, 143 SIGTERM: the current step finished, a checkpoint was written, the line gives the
         resume command
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import signal
from pathlib import Path
from typing import NoReturn

import click

from chunkft.cli_conventions import EXIT_BAD_INPUT, EXIT_FAILED, OneLineErrors, fail
from chunkft.executor.checkpoint import CheckpointDiskFull, CheckpointError, complete_checkpoints
from chunkft.executor.data import DataError
from chunkft.executor.distributed import DistributedError
from chunkft.executor.replan import replan_command, rerun_command, resume_command, smaller_budget
from chunkft.executor.state_files import StateFileError
from chunkft.executor.streams import PinnedMemoryError
from chunkft.executor.train import RunError, RunOptions, TrainingDiverged, TrainingInterrupted, train

# the recovery commands live in executor/replan.py; importable from here as before
__all__ = [
    "main", "out_of_memory_message", "replan_command", "rerun_command",
    "resume_command", "smaller_budget",
]

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
    help="Training data: .txt, .jsonl (text, instruction, chat `messages` or ShareGPT `conversations`), "
    ".tsv/.csv (text,label), .parquet/.arrow or a `datasets` save_to_disk directory (the same records). "
    "Tokenized with the "
    "model directory's own tokenizer, or the byte-level one for presets and tokenizer-less --random-init "
    "(--tokenizer chooses another).",
)
@click.option(
    "--tokenizer",
    "tokenizer_dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Tokenize with this Hugging Face tokenizer directory instead (its ids must fit the model's "
    "vocabulary); exported with the model.",
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
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the output directory's latest checkpoint; if `latest` is missing or that checkpoint "
    "is corrupt, from the newest intact one (a note says which and why).",
)
@click.option(
    "--resume-from",
    "resume_from",
    default=None,
    metavar="CHECKPOINT",
    help="Continue from this checkpoint: step-N (under --output's checkpoints/) or a checkpoint directory. "
    "Implies --resume.",
)
@click.option(
    "--allow-data-change",
    is_flag=True,
    help="Resume on a --data file (or --tokenizer) other than the one the checkpoint was trained on "
    "(refused otherwise).",
)
@click.option(
    "--device",
    default=None,
    help="cpu, cuda (the current GPU) or cuda:N [default: the current GPU if there is one, else cpu].",
)
@click.option(
    "--quiet",
    is_flag=True,
    help="No progress output (neither chunkft's nor transformers'/huggingface_hub's progress bars).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    default=None,
    help="Data parallel: start this many ranks with torchrun (python -m torch.distributed.run --standalone "
    "--nproc-per-node N) on this machine; the plan must be made for it (chunkft-plan --num-gpus N).",
)
@click.option(
    "--state-store",
    "state_store",
    type=click.Choice(["host", "disk"]),
    default=None,
    help="Where the inactive windows' states wait: pinned host memory, or files under --state-dir read "
    "ahead into a few pinned staging buffers (the same training, bit for bit, in a few windows of RAM) "
    "[default: the plan's placement.state_store, host].",
)
@click.option(
    "--state-dir",
    "state_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    metavar="DIR",
    help="Directory for the disk tier's state files (one per window and kind; scratch, deleted at the end) "
    "[default: <output>/state-files].",
)
@click.option("--debug", is_flag=True, help="Print the traceback before the one-line error (same exit code).")
def main(
    plan: Path,
    data: Path,
    tokenizer_dir: Path | None,
    output: Path | None,
    max_steps: int | None,
    resume: bool,
    resume_from: str | None,
    allow_data_change: bool,
    device: str | None,
    quiet: bool,
    nproc: int | None,
    state_store: str | None,
    state_dir: Path | None,
    debug: bool,
) -> None:
    """Fine-tune the model PLAN describes on --data with ChunkFT, writing everything under --output."""
    import torch

    from chunkft.plan_format import PlanError
    from chunkft.profiles import ProfileError

    if not plan.is_file():
        make = f"chunkft-plan MODEL --gpu GPU -o {shlex.quote(str(plan))}"
        _fail(f"plan {plan} not found; make one with {make}", EXIT_BAD_INPUT, debug)
    if max_steps is not None and max_steps > MAX_STEPS:
        _fail(f"--max-steps {max_steps} is absurdly large (at most {MAX_STEPS:,}); check the number",
              EXIT_BAD_INPUT, debug)
    if nproc is not None and "RANK" not in os.environ:
        _launch(plan, nproc, device, debug)
    out = output if output is not None else Path("runs") / plan.stem
    opts = RunOptions(
        plan_path=plan,
        data_path=data,
        output_dir=out,
        max_steps=max_steps,
        resume=resume or resume_from is not None,
        resume_from=resume_from,
        allow_data_change=allow_data_change,
        tokenizer_dir=tokenizer_dir,
        progress=not quiet,
        device=device,
        state_store=state_store,
        state_dir=state_dir,
    )
    try:
        result = train(opts)
    except TrainingInterrupted as e:
        click.echo(f"chunkft-run: {e}", err=True)
        click.echo(f"resume with: {resume_command(opts)}", err=True)
        raise SystemExit(128 + e.signum) from None  # 130 for SIGINT, 143 for SIGTERM
    except CheckpointDiskFull as e:
        then = f"resume with: {resume_command(opts)}" if e.previous else f"run again: {rerun_command(opts)}"
        _fail(f"{e}; free space and {then}", EXIT_FAILED, debug)
    except torch.OutOfMemoryError as e:
        _fail(out_of_memory_message(opts, e, _cuda_peaks()), EXIT_FAILED, debug)
    except DistributedError as e:  # init failed (nothing written) or a rank was lost mid-run
        _fail(str(e), EXIT_FAILED if "lost the other ranks" in str(e) else EXIT_BAD_INPUT, debug)
    except TrainingDiverged as e:  # a RunError, but raised mid-run: failed while working
        _fail(str(e), EXIT_FAILED, debug)
    except (RunError, DataError, CheckpointError, PlanError, ProfileError) as e:
        _fail(str(e), EXIT_BAD_INPUT, debug)
    except StateFileError as e:  # a disk-tier file failed mid-run (a full disk): the checkpoints are intact
        _fail(f"{e}; {_after_failure(opts)}", EXIT_FAILED, debug)
    except PinnedMemoryError as e:
        _fail(f"{e}; {_after_failure(opts)}", EXIT_FAILED, debug)
    except ValueError as e:  # the driver refusing the plan's chunks for this model (e.g. unsupported module)
        _fail(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}", EXIT_BAD_INPUT, debug)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            _fail(f"disk full writing {e.filename or out}; {_after_failure(opts)}", EXIT_FAILED, debug)
        _fail(f"{e.filename or out}: {e.strerror or e}; check the path and free space", EXIT_BAD_INPUT, debug)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        hint = "" if debug else " (rerun with --debug for the traceback)"
        _fail(f"internal error {type(e).__name__}: {first}; {_after_failure(opts)}{hint}", EXIT_FAILED, debug)
    if os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports the run
    ev = result.evals[-1] if result.evals else None
    final = result.train_losses[-1] if result.train_losses else None
    final_text = "not finite" if final is None else f"{final:.4f}"
    summary = f"done: {result.steps} steps, final train loss {final_text}"
    if ev is not None:
        summary += f", eval loss {ev[1]:.4f}" + (f", eval accuracy {ev[2]:.4f}" if ev[2] is not None else "")
    summary += f", {result.skipped_steps} skipped (non-finite) steps" if result.skipped_steps else ""
    click.echo(summary)
    click.echo(f"model: {result.model_dir}")
    click.echo(f"report: {result.run_json}")


# ------------------------------------------------------------------------------- recovery commands


def _after_failure(opts: RunOptions) -> str:
    """What survives a failure mid-run and how to continue (--resume finds the newest intact one)."""
    try:
        held = complete_checkpoints(opts.output_dir)
    except OSError:
        held = []
    if not held:
        return f"no checkpoint was written yet; run again: {rerun_command(opts)}"
    return f"the last checkpoint {held[0].name} is intact; resume with: {resume_command(opts)}"


def _cuda_peaks() -> tuple[int, int] | None:
    """(peak allocated, peak reserved) bytes of this process on the current CUDA device, if any."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


_TRIED = re.compile(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)")
_UNIT = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def out_of_memory_message(opts: RunOptions, error: BaseException, peaks: tuple[int, int] | None) -> str:
    """One line: what ran out, the measured peak, what is intact, and the exact re-planning command."""
    from chunkft.plan_format import load_plan

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
        f"{replan_command(plan, new_budget, target)} (a new plan starts from step 0)"
    )


def _launch(plan_path: Path, nproc: int, device: str | None, debug: bool) -> NoReturn:
    """chunkft-run --nproc N: this command again under torchrun, N ranks, without --nproc."""
    import subprocess
    import sys

    import torch

    from chunkft.plan_format import PlanError, load_plan

    try:
        plan = load_plan(plan_path)
    except PlanError as e:
        _fail(str(e), EXIT_BAD_INPUT, debug)
    on_cuda = plan.hardware.gpu != "cpu" and device != "cpu"
    if on_cuda and nproc > torch.cuda.device_count():
        _fail(
            f"--nproc {nproc} needs {nproc} GPUs and torch sees {torch.cuda.device_count()}; use at most "
            f"that many (and re-plan with chunkft-plan ... --num-gpus N to match)",
            EXIT_BAD_INPUT,
            debug,
        )
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "chunkft.executor.cli", *args]
    raise SystemExit(subprocess.call(cmd))


def _fail(message: str, code: int, debug: bool) -> NoReturn:
    """One line and the exit code; with --debug the traceback first (chunkft.cli_conventions.fail)."""
    fail("chunkft-run", message, code, debug=debug)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
