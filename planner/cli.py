"""chunkft-plan: will this fine-tuning fit, and how fast will it run? Writes a plan the executor replays.

Exit codes (chunkft/cli_conventions.py, shared with chunkft-run and chunkft-report): 0 plan written;
1 failed while working (an internal error, or the disk refused the plan); 2 bad input: an option, a
profile, a path that cannot be written (nothing written); 3 nothing fits the budget (the line says the
smallest budget that would, or, when none on this card would, what to change); 4 the plan was written
but --report failed (the plan stays; the line says how to redo the report). Every error is one line on
stderr, `chunkft-plan: error: WHAT; WHAT TO DO`; --debug prints the traceback first and keeps the code.
Nothing is written unless every input is valid, a plan fits and the simulator, re-run from the plan
itself, agrees with the solver.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chunkft.cli_conventions import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_NO_FIT,
    EXIT_OK,
    EXIT_REPORT_FAILED,
    OneLineErrors,
    fail,
)
from chunkft.profiles.host import available_host_bytes

if TYPE_CHECKING:
    from chunkft.planner.solver import Headroom

PROG = "chunkft-plan"
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
    from chunkft.planner.solver import Headroom

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


def gib(n: int | float) -> str:
    return f"{n / GIB:.2f} GiB"


def gib_up(n: int) -> str:
    """A size to pass back as an option: rounded up, so that the printed figure is itself enough."""
    return f"{math.ceil(n * 100 / GIB) / 100:.2f} GiB"


def _stderr_line(text: str) -> None:
    """One line on stderr after everything already printed on stdout: with the two merged (2>&1, a CI
    log) an unflushed stdout would otherwise land after it, or the line in the middle of another."""
    sys.stdout.flush()
    click.echo(" ".join(text.split()), err=True)
    sys.stderr.flush()


def error_line(message: str) -> None:
    """`chunkft-plan: error: ...` for a failure that still returns its own exit code (no fit, report)."""
    _stderr_line(f"{PROG}: error: {message}")


def warning_line(message: str) -> None:
    _stderr_line(f"{PROG}: warning: {message}")


# Beyond these a value is a typo (an extra zero, bytes for GiB), or so large the solver would search for
# minutes; each error says the limit.
MAX_SEQ_LEN = 1 << 21
MAX_BATCH_SIZE = 1024  # the solver's time grows with the global batch: 1024 sequences take ~1 min on 2 cores
MAX_STEPS = 10**8
MAX_BYTES = 1 << 50  # 1 PiB
DEFAULT_SEQ_LEN = 1024  # shortened to the model's positions when it has fewer (resolve_seq_len)
# The shortest rows that train: a causal LM learns from seq_len - 1 next-token targets (1 token: none, a
# NaN loss); a classifier's row is [CLS] text [SEP] (executor/data.py keeps the closing token), so 2
# positions hold no text at all and the label would be learned from the special tokens alone.
MIN_SEQ_LEN = {"causal-lm": 2, "sequence-classification": 3}


def default_batch_size(req: Request) -> int:
    """--batch-size left out: --micro-batch x --grad-accum, those defaulting to 1 sequence and to one
    micro-batch per GPU, so --num-gpus N alone gives every rank one sequence a step (a global batch of 1
    cannot be dealt out to 2 ranks)."""
    return (req.micro_batch or 1) * (req.grad_accum or req.num_gpus)


def check_bounds(req: Request) -> None:
    """Zero, negative and absurd sizes: one UsageError, before anything is loaded or written."""
    for flag, value, limit in (
        ("--seq-len", req.seq_len or 0, MAX_SEQ_LEN),
        ("--batch-size", req.batch_size, MAX_BATCH_SIZE),
        ("--steps", req.steps, MAX_STEPS),
    ):
        if value > limit:
            raise click.UsageError(f"{flag} {value} is absurdly large (at most {limit:,}); check the number")
    sizes = (("--budget", req.budget), ("--host-mem", req.host_mem), ("--reserve", req.reserve),
             ("--disk-read", req.disk_read), ("--disk-write", req.disk_write))
    for flag, size in sizes:
        if size is None:
            continue
        if size <= 0 and flag != "--reserve":
            raise click.UsageError(f"{flag} must be more than 0 bytes; write e.g. 20GiB")
        if size > MAX_BYTES:
            raise click.UsageError(f"{flag} {gib(size)} is absurdly large (over 1 PiB); write e.g. 20GiB")
    fixed = 0 if req.headroom is None else req.headroom.fixed_bytes
    if fixed > MAX_BYTES:
        raise click.UsageError(f"--headroom {gib(fixed)} is absurdly large (over 1 PiB); write e.g. 1GiB")
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


def check_margins(req: Request, budget: int, gpu: Any) -> None:
    """A reserve or headroom that alone takes the whole budget leaves no plan to search for; say so up
    front, naming where the budget came from (else the no-fit line would suggest a budget beyond the
    card: the reserve plus what the plan needs)."""
    of = f"--budget {gib(budget)}" if req.budget is not None else f"the {gpu.name}'s {gib(budget)} budget"
    reserve = req.reserve or 0
    if reserve >= budget:
        if req.budget is not None:
            raise click.UsageError(f"--reserve {gib(reserve)} leaves nothing of {of}; lower --reserve")
        raise click.UsageError(f"--reserve {gib(reserve)} is more than {of}; lower --reserve")
    fixed = 0 if req.headroom is None else req.headroom.fixed_bytes
    if fixed and fixed + reserve >= budget:
        raise click.UsageError(
            f"--headroom {gib(fixed)} (with the reserve) leaves nothing of {of}; lower --headroom"
        )


def resolve_seq_len(req: Request, key: str, longest: int | None) -> tuple[int, str]:
    """The sequence length to plan (the user's, else DEFAULT_SEQ_LEN cut to the model's positions), and
    the note the summary prints when the default was shortened."""
    if req.seq_len is None:
        if longest is not None and longest < DEFAULT_SEQ_LEN:
            return longest, f" (the default {DEFAULT_SEQ_LEN} shortened to {key}'s {longest} positions)"
        return DEFAULT_SEQ_LEN, ""
    if longest is not None and req.seq_len > longest:
        raise click.UsageError(
            f"--seq-len {req.seq_len} is beyond {key}'s {longest} positions "
            f"(max_position_embeddings); use --seq-len {longest} or less"
        )
    return req.seq_len, ""


def check_trainable_seq_len(seq_len: int, task: str) -> None:
    """Refuse rows too short to learn from (MIN_SEQ_LEN): such a plan would run and train nothing."""
    least = MIN_SEQ_LEN.get(task, 2)
    if seq_len >= least:
        return
    why = (
        "a causal LM learns from each next token, and 1 token has none (the loss would be NaN)"
        if task == "causal-lm"
        else "a classifier's rows begin and end with special tokens, which leaves no room for text"
    )
    raise click.UsageError(f"--seq-len {seq_len} is too short to train: {why}; use --seq-len {least} or more")


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's position embeddings (or rotary table) are defined for."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


PLAN_FILE = "plan.json"  # what `-o DIR/` (or an existing directory) writes inside DIR


def resolve_output(text: str) -> Path:
    """-o as a file: a path ending in a separator, or an existing directory, means DIR/plan.json (the
    directory is created with the plan), as `cp x DIR/` puts a file into DIR."""
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    path = Path(text)
    if text.endswith(seps) or path.is_dir():
        return path / PLAN_FILE
    return path


def check_output_path(path: Path, flag: str = "-o") -> None:
    """Refuse a destination that cannot be written, before minutes of solving."""
    if path.is_dir():
        raise click.UsageError(f"{flag} {path} is a directory; give a file name such as {path / 'plan.json'}")
    _check_creatable(path, flag, "choose another path")


def check_report_dir(path: Path) -> None:
    """--report names a directory to create or fill; refuse one that cannot be, in --report's words
    (reports.writer.check_destination speaks of chunkft-report's -o, which here is the plan's file)."""
    if path.exists() and not path.is_dir():
        raise click.UsageError(f"--report {path} is a file, not a directory; choose another --report DIR")
    _check_creatable(path, "--report", "choose another --report DIR")


def _check_creatable(path: Path, flag: str, fix: str) -> None:
    """path's nearest existing ancestor is a writable directory (and path, if it exists, writable)."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise click.UsageError(f"{flag} {path}: {ancestor} is a file, not a directory; {fix}")
    if not os.access(ancestor, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise click.UsageError(f"{flag} {path}: {ancestor} is not writable; {fix}")


def initialisation(preset: Any, random_init: bool) -> Any:
    """The model as it will be trained: a directory's weights, or with --random-init its config from a random
    initialisation (source "hf-config"). A directory without weights is only warned about: planning from
    config.json alone (will a 70B fit?) is a use of its own, but chunkft-run will refuse that plan."""
    if random_init:
        if preset.source != "hf-dir":
            what = (
                "a preset, always randomly initialised: drop --random-init"
                if preset.source == "preset"
                else "a hub id: download it into a directory and pass that"
            )
            raise click.UsageError(f"--random-init is for a model directory; {preset.key} is {what}")
        return replace(preset, source="hf-config")
    if preset.source == "hf-dir" and not preset.has_weights:
        click.echo(
            f"chunkft-plan: warning: {preset.path} has config.json but no weights (*.safetensors, "
            "pytorch_model.bin), so chunkft-run will refuse this plan; copy the weights in, or add "
            "--random-init to train from a random initialisation",
            err=True,
        )
    return preset


@dataclass(frozen=True)
class Request:
    """Every command-line choice, validated."""

    model: str
    gpu: str
    num_gpus: int
    budget: int | None
    reserve: int | None
    seq_len: int | None  # None: DEFAULT_SEQ_LEN, or the model's positions when fewer (resolve_seq_len)
    batch_size: int | None  # None: default_batch_size (one sequence per GPU unless the split says more)
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
    attn: str | None  # None: sdpa where the model's class supports it, else eager (resolved in run_request)
    efficiency: float | None  # None: the default for the rates used (planner.costs)
    eval_every: int = 0  # optimizer steps between evaluations; 0: only at the end
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0: only at the end
    padded_batches: bool | None = None  # batches carry padding; None: the task's (default_padded)
    headroom: Headroom | None = None  # None: planner.solver.DEFAULT_HEADROOM on GPUs, none on cpu
    max_grad_norm: float | None = 1.0  # clip the active window's gradient norm; None: no clipping
    weight_decay_mode: str = "window"  # "window" | "compensated" (chunkft.plan_format.OptimizerSettings)
    calibrate: bool = False  # --gpu cpu: measure this machine's matmul and copy rates (planner.costs)
    random_init: bool = False  # a directory's config, randomly initialised (model.source "hf-config")
    parallel: str = "auto"  # --num-gpus > 1: "auto" (data, else shard, else layers), or one forced
    disk_read: int | None = None  # --disk-read: the state disk's sustained read, bytes/s (None: profile)
    disk_write: int | None = None  # --disk-write: its sustained write, bytes/s (None: profile)
    probe_disk: str | None = None  # --probe-disk DIR: measure the disk under DIR instead (profiles.disk)


# fp16 is not offered: it needs loss scaling, which the executor does not do (bf16 does not).
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class Notes:
    """Where the summary's figures came from, when not simply from the user or the profile."""

    headroom: str = ""  # what the safety margin covers
    budget: str = ""  # " (free of X, NVML)"
    host: str = ""  # " (--host-mem)", " (this machine's available memory)", ...
    seq_len: str = ""  # " (the default 1024 shortened to ...)"
    rates: str = ""  # the --calibrate line, or ""
    disk: str = ""  # the state disk's rates and where they come from


class NoPlanFits(ValueError):
    """No choice of chunks, checkpointing and placement fits the budget; the message says what would."""


@dataclass(frozen=True)
class Planned:
    """A plan and what the summary says about it: the solver's candidates, the budget and its notes."""

    plan: Any  # chunkft.plan_format.Plan
    solution: Any  # the solver's Solution: the chosen candidate and the runners-up
    budget: int
    notes: Notes
    host_warning: str  # "" or the one warning line about host memory
    replayed: Any  # the plan's step as the simulator replays it (check_replay)
    measured: Any  # the --calibrate rates, or None
    layout_warning: str = ""  # "" or why --num-gpus N fell back to the layer split chunkft-run refuses


def make_plan(req: Request) -> Planned:
    """Plan a request: profile the model and GPU, solve, build the plan and check it replays. Raises
    click.UsageError for inconsistent options, ProfileError/PlanError/ValueError for bad input and
    NoPlanFits when nothing fits; prints nothing but the profile's own warnings."""
    from chunkft import profiles
    from chunkft.planner.costs import CALIBRATED_EFFICIENCY, DEFAULT_EFFICIENCY
    from chunkft.planner.profile_model import (
        check_attention,
        default_padded,
        model_structure,
        supported_attention,
    )
    from chunkft.planner.solver import batch_splits, build_plan, make_setup

    if req.efficiency is None:
        req = replace(req, efficiency=CALIBRATED_EFFICIENCY if req.calibrate else DEFAULT_EFFICIENCY)
    if req.batch_size is None:
        req = replace(req, batch_size=default_batch_size(req))
    check_bounds(req)
    preset = initialisation(profiles.load_model(req.model, task=req.task), req.random_init)
    gpu = profiles.load_gpu(req.gpu)
    seq_len, seq_note = resolve_seq_len(req, preset.key, max_positions(preset.config))
    check_trainable_seq_len(seq_len, preset.task)
    on_gpu = gpu.pcie_gen is not None
    if req.calibrate and on_gpu:
        raise click.UsageError(
            f"--calibrate measures this machine's CPU, so it needs --gpu cpu, not {gpu.key}; a GPU plans "
            "with its profile's figures (scale them with --efficiency)"
        )
    dtype = DTYPES[req.dtype] if req.dtype else ("bfloat16" if on_gpu else "float32")
    budget = default_budget(gpu) if req.budget is None else req.budget
    if budget > gpu.memory_total_bytes:
        raise click.UsageError(
            f"--budget {gib(budget)} is more than the {gpu.name}'s {gib(gpu.memory_total_bytes)}; "
            "use at most that"
        )
    check_margins(req, budget, gpu)
    padded = default_padded(preset.task) if req.padded_batches is None else req.padded_batches
    attn = req.attn or supported_attention(preset.config, preset.task)[0]
    check_attention(preset.config, preset.task, attn)  # a forced --attn sdpa the model has not
    req = replace(req, seq_len=seq_len, padded_batches=padded, attn=attn)  # resolved: build_plan records them
    structure = model_structure(preset.config, preset.task, dtype)
    measured = calibrate(structure, dtype, req) if req.calibrate else None
    setup = make_setup(
        structure,
        planning_cost(gpu, dtype, req.efficiency, measured),
        weight_dtype=dtype,
        optimizer=req.optimizer,
        sgd_momentum=True,
        seq_len=seq_len,
        on_gpu=on_gpu,
        context_bytes=req.reserve,
        fragmentation=0.0 if req.reserve is not None else None,
        headroom=req.headroom,
    )
    # --num-gpus > 1 (--parallel auto): data parallel (every rank holds the whole model) when the model
    # fits one GPU, else sharded weights (FSDP2, 1/N per rank), else, on a GPU profile, layers split across
    # the GPUs (planned, not run). The simulator plans each rank as it runs: its share of the
    # micro-batches, its shard of the slots and stores (and weights), the collectives' buffers and time
    # (planner.simulator.Candidate.ranks and .layout).
    layouts = parallel_layouts(req, on_gpu)
    sol = host = host_note = host_warning = None
    parallel = layouts[0]
    skip: set[str] = set()
    uneven = False
    for parallel in layouts:
        if parallel in skip:
            continue
        solver = make_solver(
            req, preset, structure, setup, budget, dtype,
            split_layers=parallel == "layers", layout="shard" if parallel == "shard" else "data",
        )
        if parallel in ("data", "shard") and not batch_splits(solver.space):
            # the batch cannot be shared evenly by the ranks: refuse where data parallel is what fits
            if parallel == "shard" or req.parallel != "auto":
                raise click.UsageError(uneven_split_message(req, parallel))
            whole = make_solver(req, preset, structure, setup, budget, dtype, split_layers=False, ranks=1)
            sol, host, host_note, host_warning = solve_with_host(whole, req, budget)
            if sol.best is not None or not on_gpu:
                raise click.UsageError(uneven_split_message(req, parallel))
            skip.add("shard")  # it needs the same even split: the layers split (as before shard existed)
            uneven = True
            continue
        sol, host, host_note, host_warning = solve_with_host(solver, req, budget)
        if sol.best is not None:
            break
    if sol.best is None:
        raise NoPlanFits(no_fit_message(sol.smallest, req, preset.key, gpu, budget, host, parallel))
    plan = build_plan(req, preset, gpu, dtype, structure, setup, sol, budget, host, measured=measured)
    if parallel in ("data", "shard"):
        plan = replace(plan, hardware=replace(plan.hardware, parallel=parallel))
    cadence = replace(plan.run, eval_every=req.eval_every, checkpoint_every=req.checkpoint_every)
    plan = replace(plan, run=cadence)
    replayed = check_replay(plan)
    notes = Notes(
        headroom_note(req, on_gpu), budget_note(req, gpu), host_note, seq_note, rates_note(measured, dtype),
        disk_note(resolve_disk(req)),
    )
    layout_warning = ""
    if parallel == "layers" and uneven:
        n = req.num_gpus
        layout_warning = (
            f"the layers are split across the {n} GPUs, which chunkft-run does not run: the batch cannot be "
            f"dealt out to {n} ranks; --grad-accum a multiple of {n} (--batch-size their product) lets "
            "the planner try sharded weights (--parallel shard)"
        )
    elif parallel == "layers" and req.parallel == "auto":
        layout_warning = (
            f"the layers are split across the {req.num_gpus} GPUs, which chunkft-run does not run: neither "
            f"data parallel nor sharded weights fit {gib(budget)} per GPU (--parallel shard says what "
            "sharding needs)"
        )
    return Planned(plan, sol, budget, notes, host_warning, replayed, measured, layout_warning)


def run_request(
    req: Request, out_path: str, report_dir: str | None = None, *, debug: bool = False
) -> int:
    """chunkft-plan's work: plan, print the summary, write the plan (and the report); the exit code."""
    from chunkft.plan_format import save_plan

    out = resolve_output(out_path)
    check_output_path(out)
    if report_dir is not None:
        check_report_dir(Path(report_dir))
    try:
        planned = make_plan(req)
    except NoPlanFits as e:
        error_line(str(e))
        return EXIT_NO_FIT
    out.parent.mkdir(parents=True, exist_ok=True)  # checked writable above
    save_plan(planned.plan, out)
    click.echo(summary(planned.plan, planned.solution, planned.budget, notes=planned.notes))
    if planned.host_warning:
        warning_line(planned.host_warning)
    if planned.layout_warning:
        warning_line(planned.layout_warning)
    unreached = unreached_warning(planned.plan)
    if unreached:
        warning_line(unreached)
    into_dir = out != Path(out_path)  # -o named a directory (resolve_output)
    click.echo(f"plan written to {out}" + (f" (-o {out_path} is a directory)" if into_dir else ""))
    if report_dir is None:
        return EXIT_OK
    replayed = planned.replayed if planned.measured else None
    return write_plan_report(planned.plan, out, report_dir, replayed, debug=debug)


def resolve_disk(req: Request) -> Any:
    """The state disk the disk tier would use: the shipped profile, --probe-disk's measurement of DIR, or
    --disk-read/--disk-write (which win over both, figure by figure)."""
    from chunkft.profiles import disk

    profile = disk.load_disk()
    if req.probe_disk is not None:
        read, write = disk.probe(req.probe_disk)
        where = f"measured under {req.probe_disk} (--probe-disk, {disk.PROBE_BYTES // 2**20} MiB file)"
        profile = disk.with_rates(profile, read, write, where)
    return disk.with_rates(profile, req.disk_read, req.disk_write, "--disk-read/--disk-write")


def disk_note(d: Any) -> str:
    """The summary's disk line: both rates and where each comes from (the shipped profile, or not)."""
    from chunkft.profiles import disk

    shipped = disk.load_disk(d.key).sources
    whys = []
    for figure in ("read_bytes_per_s", "write_bytes_per_s"):
        why = d.sources[figure]
        why = f"profiles/disks/{d.key}.json: a conservative PCIe 4.0 NVMe" if why == shipped[figure] else why
        if why not in whys:
            whys.append(why)
    return (
        f"disk       read {d.read_bytes_per_s / 1e9:.2f} GB/s, write {d.write_bytes_per_s / 1e9:.2f} GB/s "
        f"for a disk state store ({'; '.join(whys)})"
    )


def request_from(model: str, gpu: str, **options: Any) -> Request:
    """A Request from Python values, with chunkft-plan's defaults and checks (its click parameters: one
    source for both), e.g. request_from("llama-3-8b", "4090", budget="20GiB", seq_len=2048)."""
    fields = set(Request.__dataclass_fields__) - {"model", "gpu"}
    params = {p.name: p for p in main.params if p.name in fields}
    unknown = sorted(set(options) - set(params))
    if unknown:
        names = ", ".join(sorted(params))
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; the options are {names}")
    ctx = click.Context(main)
    values: dict[str, Any] = {}
    for name, param in params.items():
        value = options[name] if name in options else param.get_default(ctx)
        if not isinstance(value, (str, int, float, bool)):  # None, or click's "unset" for a tri-state flag
            value = None
        try:
            values[name] = None if value is None else param.type_cast_value(ctx, value)
        except click.BadParameter as e:
            raise ValueError(f"{name}={value!r}: {e.message}") from None
    return Request(model=model, gpu=gpu, **values)


def calibrate(structure: Any, dtype: str, req: Request) -> Any:
    """--calibrate: this machine's rates at the model's shapes (planner.costs.measure_host_rates; looked
    up on the module so that tests can inject a result instead of timing anything)."""
    from chunkft.planner import costs

    shape = costs.probe_shape(structure, req.seq_len * req.batch_size)  # seq_len resolved by run_request
    return costs.measure_host_rates(dtype, shape)


def planning_cost(gpu: Any, dtype: str, efficiency: float, measured: Any) -> Any:
    """The profile's cost model, with the --calibrate figures in place of its FLOP/s and bandwidth."""
    from chunkft.planner.costs import cost_model, with_measured_rates

    cost = cost_model(gpu, dtype, efficiency)
    if measured is None:
        return cost
    return with_measured_rates(cost, measured_hardware(measured))


def measured_hardware(measured: Any) -> Any:
    """The plan's record of a --calibrate result: Hardware's measured_* fields, as build_plan writes them."""
    from types import SimpleNamespace

    return SimpleNamespace(
        measured_flops_per_s=measured.flops_per_s, measured_memory_bytes_per_s=measured.memory_bytes_per_s
    )


def rates_note(measured: Any, dtype: str) -> str:
    if measured is None:
        return ""
    rows, inner, out = measured.shape
    return (
        f"rates      measured on this machine (--calibrate): {measured.flops_per_s / 1e9:,.0f} GFLOP/s "
        f"{dtype} matmul ({rows}x{inner} @ {inner}x{out}), {measured.memory_bytes_per_s / 1e9:.1f} GB/s "
        "copy (read + write)"
    )


def parallel_layouts(req: Request, on_gpu: bool) -> list[str]:
    """The layouts to try, in order: "none" on one GPU; --parallel auto: data parallel, sharded weights,
    then (GPU profiles only: the CPU has nothing to split onto) layers; or the one --parallel forces."""
    n, forced = req.num_gpus, req.parallel
    if forced not in ("auto", "data", "shard", "layers"):
        raise click.UsageError(f"--parallel must be auto, data, shard or layers, not {forced!r}")
    if n == 1:
        if forced != "auto":
            raise click.UsageError(
                f"--parallel {forced} needs --num-gpus 2 or more (one GPU runs the whole model)"
            )
        return ["none"]
    if forced == "layers" and not on_gpu:
        raise click.UsageError(
            "--parallel layers splits layers across GPUs; --gpu cpu has nothing to split onto"
        )
    if forced != "auto":
        return [forced]
    return ["data", "shard", "layers"] if on_gpu else ["data", "shard"]


def unreached_warning(plan: Any) -> str:
    """"" or why the plan's steps never train some windows (the driver's own check, in the options' words:
    --steps 3 over 4 windows leaves one untrained)."""
    from chunkft.executor.chunkft import unreached_windows_message
    from chunkft.executor.rotation import RotationSpec

    r = plan.rotation
    message = unreached_windows_message(
        plan.chunk_table.chunks, RotationSpec(r.order, r.update_interval, r.seed), plan.run.total_steps
    )
    if message is None:
        return ""
    message = message.replace("update_interval <=", "--update-interval at most").replace(
        "fewer chunks, or more steps (schedule total_steps)", "fewer --chunks, or more --steps"
    )
    return message


def uneven_split_message(req: Request, parallel: str = "data") -> str:
    """Data parallel and sharded weights give every rank the same number of each step's micro-batches."""
    n = req.num_gpus
    what = "sharded weights (--parallel shard)" if parallel == "shard" else "data parallel"
    if req.batch_size % n:
        return (
            f"{what} deals each step's sequences out to --num-gpus {n} ranks, and --batch-size "
            f"{req.batch_size} is not a multiple of {n}: pass e.g. --batch-size {-(-req.batch_size // n) * n}"
        )
    return (
        f"{what} splits each step's micro-batches over --num-gpus {n}: pass --micro-batch and "
        f"--grad-accum with --grad-accum a multiple of {n} (and --batch-size their product)"
    )


def dp_label(hw: Any) -> str:
    """How the summary names the multi-GPU layout."""
    if hw.num_gpus == 1:
        return ""
    if hw.parallel == "shard":
        return " (sharded weights, FSDP2: one rank each, 1/N of every block)"
    return " (data parallel: one rank each)" if hw.parallel == "data" else " (layers split across them)"


def make_solver(
    req: Request,
    preset: Any,
    structure: Any,
    setup: Any,
    budget: int,
    dtype: str,
    *,
    split_layers: bool = True,
    ranks: int | None = None,
    layout: str = "data",
) -> Any:
    """The solver over the request's search space, with this machine's memory as the host limit;
    split_layers: --num-gpus > 1 places the decoder layers across the GPUs (else data parallel over
    --num-gpus ranks, or `ranks` when given)."""
    from chunkft.planner.profile_model import tables_for
    from chunkft.planner.solver import Limits, Solver, Space, balance_layers

    layer_gpu: tuple[int, ...] = ()
    if req.num_gpus > 1 and split_layers:
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
        ranks=(req.num_gpus if req.num_gpus > 1 and not split_layers else 1) if ranks is None else ranks,
        layout=layout if req.num_gpus > 1 and not split_layers and ranks is None else "data",
    )
    host = available_host_bytes() if req.host_mem is None else req.host_mem
    tables = tables_for(preset.config, preset.task, req.seq_len, dtype, req.attn, padded=req.padded_batches)
    return Solver(setup, Limits(budget, host), tables, space)


def solve_with_host(solver: Any, req: Request, budget: int) -> tuple[Any, int, str, str]:
    """(solution, host budget planned against, what that host budget is, a warning or "").

    Without --host-mem the limit is this machine's available memory; when only that is in the way, the
    plan is usually made for another machine (a 4090 box): plan it anyway and say what host it needs."""
    from chunkft.planner.solver import Limits

    sol = solver.solve()
    host = solver.limits.host_budget_bytes
    if req.host_mem is not None:
        return sol, host, " (--host-mem)", ""
    if sol.best is not None or sol.smallest is None:
        return sol, host, " (this machine's available memory)", ""
    solver.limits = Limits(budget, UNBOUNDED_HOST_BYTES)
    unbounded = solver.solve()
    if unbounded.best is None:
        return sol, host, " (this machine's available memory)", ""
    res = unbounded.best.result
    states, need = res.step.host_bytes * unbounded.best.candidate.ranks, res.host_machine_bytes
    warning = (
        f"this plan keeps {gib(states)} of optimizer states in host memory, {gib(need)} at checkpoints; "
        f"this machine has {gib(host)} available: train on a machine with more, or pass --host-mem SIZE "
        "to plan for a specific host"
    )
    note = f" (what the plan needs; this machine has {gib(host)} available)"
    return unbounded, max(host, need), note, warning


def no_fit_message(
    s: Any, req: Request, key: str, gpu: Any, budget: int, host: int, parallel: str = "none"
) -> str:
    """`MODEL does not fit ...; why; what to do` (the smallest option s tells what would fit)."""
    if s is None:
        raise click.UsageError("no configuration could be simulated for this model; try fewer --chunks")
    forced = f" with --parallel {parallel}" if req.parallel != "auto" else ""
    head = f"{key} does not fit {gib(budget)} per GPU on {req.num_gpus} x {gpu.name}{forced}"
    need = s.result.budget_needed_bytes
    if need <= budget:
        return (
            f"{head}; host memory: needs {gib(s.result.host_machine_bytes)} (states "
            f"{gib(s.result.step.host_bytes * s.candidate.ranks)} + a checkpoint) > --host-mem {gib(host)}; "
            "raise --host-mem, "
            "or plan for a bigger host"
        )
    parts = (
        f"(peak {gib(s.result.step.peak_bytes)} + reserve {gib(s.result.step.reserve_bytes)} + headroom "
        f"{gib(s.result.headroom_bytes)}) with K={s.num_chunks}, checkpointing {s.checkpoint_mode}, "
        f"{s.placement_text()}, micro-batch {s.candidate.micro_batch} x {s.candidate.grad_accum}"
    )
    total = gpu.memory_total_bytes
    if need <= total:
        fix = f"give --budget {gib_up(need)} or more" if req.budget is not None else "free memory on the card"
        return f"{head}; smallest budget that fits: {gib_up(need)} per GPU {parts}; {fix}"
    fixes = ["a shorter --seq-len" + (" or a smaller --batch-size" if req.batch_size > 1 else "")]
    if gpu.pcie_gen is not None:
        fixes.append("more GPUs (--num-gpus)")
    fixes += [f"a lower {flag}" for flag, given in (("--reserve", req.reserve), ("--headroom", req.headroom))
              if given is not None]
    fixes.append("a card with more memory")
    return (
        f"{head}; no budget on the {gpu.name}'s {gib(total)} fits: the smallest plan needs "
        f"{gib_up(need)} per GPU {parts}; try {', '.join(fixes[:-1])} or {fixes[-1]}"
    )


def write_plan_report(plan: Any, out: Path, report_dir: str, simulation: Any, *, debug: bool) -> int:
    """--report after the plan is saved: any failure keeps the plan, says how to redo the report in one
    line and exits EXIT_REPORT_FAILED (a script must not read a missing report as success)."""
    import traceback

    from chunkft.reports import write_report

    try:
        Path(report_dir).parent.mkdir(parents=True, exist_ok=True)  # checked creatable above
        extra = {} if simulation is None else {"simulation": simulation}
        html = write_report(plan, report_dir, **extra)
    except BrokenPipeError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way, with its exit code
        if debug:
            traceback.print_exc()
        error_line(
            f"the plan is written ({out}) but the report failed: {report_error_text(e)}; redo it with: "
            f"{shlex.join(['chunkft-report', str(out), '-o', str(report_dir)])}"
        )
        return EXIT_REPORT_FAILED
    click.echo(f"report written to {html}")
    return EXIT_OK


def report_error_text(e: Exception) -> str:
    from chunkft.reports import ReportError

    if isinstance(e, ReportError):
        return str(e)
    if isinstance(e, OSError):
        return f"{e.filename or 'the report'}: {e.strerror or e}"
    return f"{type(e).__name__}: {e}"


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
    from chunkft.planner.solver import DEFAULT_HEADROOM

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


def check_replay(plan: Any) -> Any:
    """Re-simulate the plan from the plan alone; refuse to write one the simulator does not reproduce.
    Returns the step simulation (a --calibrate plan's, with its measured rates, for the report)."""
    from chunkft.planner.simulator import setup_and_candidate, simulate

    setup, cand, act = setup_and_candidate(plan)  # with a --calibrate plan's measured rates
    res = simulate(setup, cand, act)
    pr, hw = plan.predictions, plan.hardware
    host_peak = res.host_peak_bytes  # per rank (rank 0's) under data parallel, as the plan records it
    got = (res.step.peak_bytes, round(res.step.step_seconds, 9), res.budget_needed_bytes, host_peak)
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
    return res.step


def summary(  # type: ignore[no-untyped-def]
    plan, sol, budget: int, notes: Notes = Notes()
) -> str:
    """The table a user reads before spending an hour (notes: where figures came from, when not simply
    from the user or the profile)."""
    from chunkft.executor.loss import DEFAULT_CHUNK_TOKENS

    pr, hw, run = plan.predictions, plan.hardware, plan.run
    headroom_why = notes.headroom
    lines = [
        f"model      {plan.model.name} ({plan.model.num_params:,} parameters, {run.weight_dtype})",
        f"hardware   {hw.num_gpus} x {hw.gpu_name}{dp_label(hw)}, "
        f"budget {gib(budget)}{notes.budget} per GPU, "
        f"host budget {gib(hw.host_budget_bytes)}{notes.host}",
        *([notes.rates] if notes.rates else []),
        *([notes.disk] if notes.disk else []),
        f"batch      {run.micro_batch_size} x {run.grad_accum_steps} sequences of {run.seq_len} tokens"
        + notes.seq_len
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
    host_line = (
        f"host memory                          {gib(pr.host_bytes)} states + "
        f"{gib(pr.host_peak_bytes - pr.host_bytes)} at checkpoints"
    )
    if hw.parallel in ("data", "shard") and sol.best is not None:  # per rank; every rank saves its own rows
        machine = sol.best.result.host_machine_bytes
        host_line += f" per rank; {gib(machine)} for {hw.num_gpus} ranks on one host"
    lines += [
        host_line,
        f"step time                            {pr.step_seconds * 1000:.1f} ms  "
        f"(compute efficiency {pr.compute_efficiency:.2f} of "
        + ("the measured matmul FLOP/s)" if hw.measured_flops_per_s else "datasheet FLOP/s)"),
        f"throughput                           {pr.tokens_per_second:,.0f} tokens/s",
        "",
        f"{'alternative':<52} {'K':>5} {'ckpt':>8} {'peak':>10} {'step':>10} {'tok/s':>9}  fits",
    ]
    for a in plan.alternatives:
        lines.append(
            f"{a.label[:52]:<52} {a.k:>5} {a.checkpointing:>8} {a.peak_bytes / GIB:>6.2f} GiB "
            f"{a.step_seconds * 1000:>7.1f} ms {a.tokens_per_second:>9,.0f}  {'yes' if a.feasible else 'no'}"
        )
    return "\n".join(lines + why_chosen(plan))


def why_chosen(plan: Any) -> list[str]:
    """The tie rule under the alternatives, and why each one faster per step lost (a faster runner-up
    with nothing said reads as a solver bug)."""
    from chunkft.planner.solver import TIE_RULE, Contender, why_not_chosen

    if not plan.alternatives:
        return []
    pr = plan.predictions
    chosen = Contender(plan.chunk_table.num_chunks, pr.step_seconds, pr.peak_bytes, True)
    lines = [f"why this plan: {TIE_RULE}"]
    for a in plan.alternatives:
        if a.step_seconds < pr.step_seconds:
            alt = Contender(a.k, a.step_seconds, a.peak_bytes, a.feasible)
            lines.append(f"  {a.label}: {why_not_chosen(alt, chosen)}")
    return lines


@click.command(
    name="chunkft-plan",
    cls=OneLineErrors,
    usage_exit_code=EXIT_BAD_INPUT,
    context_settings={"help_option_names": ["-h", "--help"]},
)
@click.argument("model", required=False)
@click.option("--gpu", default=None, help="GPU profile (e.g. 4090, h800, cpu) or 'auto' (NVML).")
@click.option("--num-gpus", default=1, type=click.IntRange(1, 64), show_default=True)
@click.option(
    "--parallel",
    default="auto",
    type=click.Choice(["auto", "data", "shard", "layers"]),
    show_default=True,
    help="How --num-gpus > 1 share the work: auto (data parallel when the model fits one GPU, else "
    "sharded weights, else layers split), data (every rank the whole model), shard (FSDP2: 1/N of every "
    "block's weights per rank), layers (split across the GPUs; chunkft-run does not run it).",
)
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
@click.option(
    "--seq-len",
    default=None,
    type=click.IntRange(1),
    help=f"Tokens per sequence (default {DEFAULT_SEQ_LEN}, or the model's maximum positions when fewer; "
    "at least 2 for a causal LM, 3 for classification).",
)
@click.option(
    "--batch-size",
    default=None,
    type=click.IntRange(1),
    help="Sequences per optimizer step (global batch; default --micro-batch x --grad-accum, which default "
    "to 1 and to --num-gpus: one sequence per GPU).",
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
    "--random-init",
    is_flag=True,
    help="For a model directory: train its config from a random initialisation (seeded by the plan) "
    "instead of its weights, e.g. one with config.json only; without tokenizer files the byte-level "
    "tokenizer is used.",
)
@click.option(
    "--padded-batches/--unpadded-batches",
    default=None,
    help="Whether the training batches carry padding, which changes attention memory (a mask, and "
    "grouped-query K/V repeated to every head). Give --padded-batches for instruction JSONL on a causal "
    'LM (padded rows); packed text (.txt, JSONL {"text"}) is unpadded. Default: the task\'s '
    "(causal LM unpadded, classification padded).",
)
@click.option(
    "--attn",
    default=None,
    type=click.Choice(["sdpa", "eager"]),
    help="Attention implementation the plan traces and chunkft-run builds  [default: sdpa where the "
    "model supports it, else eager (Gemma-2)]",
)
@click.option(
    "--efficiency",
    default=None,
    type=click.FloatRange(0, 1, min_open=True),
    help="Achieved fraction of datasheet FLOP/s (default 0.45), or with --calibrate of the measured "
    "matmul FLOP/s (default 0.42).",
)
@click.option(
    "--calibrate",
    is_flag=True,
    help="With --gpu cpu: measure this machine's matmul FLOP/s (the plan's dtype, the model's shapes) and "
    "copy bandwidth for about 2 s, and plan with them instead of the generic CPU profile's figures.",
)
@click.option(
    "-o",
    "--output",
    default=None,
    type=click.Path(),
    help="Where to write the plan; a directory (DIR/ or an existing one) gets DIR/plan.json.",
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
@click.option(
    "--disk-read", type=Size(), default=None,
    help="The state disk's sustained read per second (e.g. 3GB); default: profiles/disks/nvme-pcie4.json.",
)
@click.option(
    "--disk-write", type=Size(), default=None,
    help="The state disk's sustained write per second (e.g. 1.5GB); default: profiles/disks/nvme-pcie4.json.",
)
@click.option(
    "--probe-disk", default=None, type=click.Path(file_okay=False),
    help="Measure the disk under DIR (write+fsync and read a 256 MiB file) for the disk tier's rates.",
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
    from chunkft import profiles

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
    req = Request(**options)  # every other option is a field of the request, by name
    try:
        code = run_request(req, output, report_dir, debug=debug)
    except (click.ClickException, click.exceptions.Exit):
        raise
    except BrokenPipeError:  # stdout closed by the reader (e.g. `| head`): say nothing
        sys.exit(141)
    except Exception as e:  # one line; --debug prints the traceback first, the exit code stays
        message, code = failure(e, output, debug)
        fail(PROG, message, code, debug=debug)
    sys.exit(code)


def failure(e: Exception, output: str, debug: bool = False) -> tuple[str, int]:
    """The one line and exit code of an exception out of run_request: bad input (a profile, a plan, a
    value the solver refused) is EXIT_BAD_INPUT; the disk refusing the plan or a bug, EXIT_FAILED (with
    a pointer to --debug unless it was given)."""
    from chunkft.plan_format import PlanError
    from chunkft.profiles import ProfileError

    if isinstance(e, OSError):
        where = e.filename or output
        return f"{where}: {e.strerror or e}; check the path and free space (nothing written)", EXIT_FAILED
    if isinstance(e, (ProfileError, PlanError, ValueError)):
        return str(e), EXIT_BAD_INPUT
    hint = "" if debug else " (rerun with --debug for the traceback)"
    return f"{type(e).__name__}: {e}{hint}", EXIT_FAILED


if __name__ == "__main__":
    main()
