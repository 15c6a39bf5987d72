"""chunkft-run: replay a plan to fine-tune a model for real (see executor/train.py for the loop)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from executor.checkpoint import CheckpointError
from executor.data import DataError
from executor.train import RunError, RunOptions, TrainingInterrupted, train


@click.command(name="chunkft-run", context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("--quiet", is_flag=True, help="No progress line.")
def main(
    plan: Path, data: Path, output: Path | None, max_steps: int | None, resume: bool, quiet: bool
) -> None:
    """Fine-tune the model PLAN describes on --data with ChunkFT, writing everything under --output."""
    from planner.plan import PlanError
    from profiles import ProfileError

    if not plan.is_file():
        _fail(f"plan {plan} not found; make one with chunkft-plan MODEL -o {plan}")
    out = output if output is not None else Path("runs") / plan.stem
    opts = RunOptions(
        plan_path=plan, data_path=data, output_dir=out, max_steps=max_steps, resume=resume, progress=not quiet
    )
    try:
        result = train(opts)
    except TrainingInterrupted as e:
        click.echo(f"chunkft-run: {e}", err=True)
        click.echo(f"resume with: {e.resume_command}", err=True)
        sys.exit(128 + e.signum)  # 130 for SIGINT, 143 for SIGTERM
    except (RunError, DataError, CheckpointError, PlanError, ProfileError) as e:
        _fail(str(e))
    except ValueError as e:  # the driver refusing the plan's chunks for this model (e.g. unsupported module)
        _fail(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
    except OSError as e:
        _fail(f"{e.filename or out}: {e.strerror or e}; check the path and free space")
    ev = result.evals[-1] if result.evals else None
    summary = f"done: {result.steps} steps, final train loss {result.train_losses[-1]:.4f}"
    if ev is not None:
        summary += f", eval loss {ev[1]:.4f}" + (f", eval accuracy {ev[2]:.4f}" if ev[2] is not None else "")
    click.echo(summary)
    click.echo(f"model: {result.model_dir}")
    click.echo(f"report: {result.run_json}")


def _fail(message: str) -> None:
    click.echo(f"chunkft-run: error: {message}", err=True)
    sys.exit(2)


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    main()
