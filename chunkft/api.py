"""chunkft.plan() and chunkft.run(): the library calls chunkft-plan and chunkft-run make.

Each takes the command line's options as keyword arguments, by the same names (--seq-len is seq_len)
and with the same defaults and checks, and raises instead of printing: TypeError for an unknown
option, click.UsageError for options that contradict each other, ProfileError, PlanError or ValueError
for bad input (chunkft.planner.cli.NoPlanFits when nothing fits: its message says what would), and
chunkft.executor.train.RunError and the other errors chunkft-run turns into its one line from a run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from chunkft.executor.train import RunResult
    from chunkft.plan_format import Plan

PathLike = str | os.PathLike[str]


def plan(model: str, *, gpu: str, output: PathLike | None = None, **options: Any) -> Plan:
    """Plan fine-tuning `model` (a preset, a Hugging Face directory or hub id) on `gpu` (a profile
    name, "cpu" or "auto"). Options are chunkft-plan's (budget="20GiB" or bytes, seq_len, batch_size,
    chunks, lr, steps, ...; `chunkft-plan --help` lists them). With `output`, the plan is also written
    there (a directory gets plan.json), atomically, as chunkft-plan writes it."""
    from chunkft.plan_format import save_plan
    from chunkft.planner.cli import check_output_path, make_plan, request_from, resolve_output

    req = request_from(model, gpu, **options)
    out = None
    if output is not None:
        out = resolve_output(os.fspath(output))
        check_output_path(out, "output")
    planned = make_plan(req)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        save_plan(planned.plan, out)
    return planned.plan


def run(
    plan: PathLike | Plan,
    *,
    data: PathLike,
    output: PathLike | None = None,
    **options: Any,
) -> RunResult:
    """Replay a plan (a plan.json path, or a Plan) on `data`, writing checkpoints, the exported model
    and run.json under `output` (default runs/<plan name>). A Plan object is first saved as
    OUTPUT/plan.json, so the run can be resumed from the command line. Options are RunOptions' fields
    (resume, max_steps, tokenizer_dir, device, progress, ...)."""
    from chunkft.executor.train import RunOptions, train
    from chunkft.plan_format import Plan, save_plan

    if isinstance(plan, Plan):
        if output is None:
            raise ValueError("chunkft.run(Plan, ...) needs output=: the plan is saved there as plan.json")
        plan_path = Path(output) / "plan.json"
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        save_plan(plan, plan_path)
    else:
        plan_path = Path(plan)
        if not plan_path.is_file():
            raise ValueError(f"plan {plan_path} not found; make one with chunkft.plan(..., output=...)")
    out = Path(output) if output is not None else Path("runs") / plan_path.stem
    fields = set(RunOptions.__dataclass_fields__) - {"plan_path", "data_path", "output_dir"}
    unknown = sorted(set(options) - fields)
    if unknown:
        names = ", ".join(sorted(fields))
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are {names}")
    if options.get("resume_from") is not None:
        options["resume"] = True  # as chunkft-run --resume-from implies --resume
    if options.get("tokenizer_dir") is not None:
        options["tokenizer_dir"] = Path(options["tokenizer_dir"])
    return train(RunOptions(plan_path=plan_path, data_path=Path(data), output_dir=out, **options))
