"""The training loop of chunkft-run: replay a plan on real data, top to bottom.

    load plan -> build model -> check fingerprint -> data -> ChunkFT driver from the plan
    -> for each step: micro-batches (forward, backward) -> driver.step -> log, eval, checkpoint
    -> export the model -> run.json

Everything a run writes goes under the output directory: metrics.jsonl (one line per step and per
evaluation), checkpoints/ (see executor/checkpoint.py), model/ (a Hugging Face directory) and run.json
(measured figures beside the plan's predictions). Every input is validated before anything is written,
and before the model is built (its identity is checked on the meta device). One run at a time holds the
output directory (executor/lock.py).
`--max-steps` changes how many steps run, never the learning-rate schedule (the plan's), so a run stopped
at step 7 and resumed to 15 takes exactly the steps of an uninterrupted 15-step run; running past the end
of a schedule that decays to 0 is refused (those steps would train at learning rate 0).
A step whose loss or gradient norm is not finite is skipped (no weights or states change) and logged
with skipped true; JSON never holds NaN or infinity (null instead).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from chunkft.chunks import DTYPE_BYTES, param_specs
from chunkft.executor import distributed as dist_
from chunkft.executor.checkpoint import (
    CheckpointError,
    CheckpointMeta,
    NoCheckpoint,
    NoIntactCheckpoint,
    ResumePoint,
    complete_checkpoints,
    export_safetensors,
    find_resume_point,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    states_reader,
)
from chunkft.executor.chunkft import UnreachedWindowsWarning
from chunkft.executor.data import (
    Batches,
    ByteTokenizer,
    DataError,
    DataPosition,
    Dataset,
    HFTokenizer,
    TokenData,
    Tokenizer,
    eval_batches,
    load_dataset,
)
from chunkft.executor.devices import DeviceError, configure_allocator, resolve_device
from chunkft.executor.distributed import DistributedError, World
from chunkft.executor.lock import OutputInUse, OutputLock
from chunkft.executor.loss import (
    DEFAULT_CHUNK_TOKENS,
    IGNORE_INDEX,
    UnsupportedArchitectureError,
    causal_lm_loss,
    causal_lm_parts,
)
from chunkft.executor.measure import (
    CudaPeak,
    MemoryMeasurement,
    MemoryTracker,
    StepClock,
    driver_tensors,
    measured_steps,
)
from chunkft.executor.replan import (
    elsewhere_command,
    free_sibling,
    fresh_command,
    replan_command,
    rerun_command,
    resume_command,
    run_args,
)
from chunkft.executor.state_files import DiskTier, StateFileError
from chunkft.executor.state_store import check_state_disk, disk_tier, staging_host_bytes, state_store_for
from chunkft.files import honour_umask
from chunkft.profiles.host import available_host_bytes

GIB = 2**30
MAX_EVAL_EXAMPLES = 256  # the first examples of the held-out split; bounds eval time on large files
MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run stops


class RunError(Exception):
    """A run that cannot start or continue; str() is one line (what is wrong, what to do)."""


class TrainingDiverged(RunError):
    """Training stopped after MAX_BAD_STEPS non-finite steps in a row: the run had started (metrics and
    maybe checkpoints written), so it failed while working rather than on its input."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived: the current step finished and a checkpoint was written."""

    def __init__(self, signum: int, step: int) -> None:
        self.signum = signum
        self.step = step
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written")


@dataclass(frozen=True)
class RunOptions:
    plan_path: Path
    data_path: Path
    output_dir: Path
    max_steps: int | None = None  # None: the plan's run.total_steps
    resume: bool = False
    resume_from: str | None = None  # step-N or a checkpoint directory (implies resume); None: the newest
    allow_data_change: bool = False  # resume on a --data file (or --tokenizer) other than the checkpoint's
    tokenizer_dir: Path | None = None  # --tokenizer: this directory's tokenizer instead of the model's own
    progress: bool = True
    keep_checkpoints: int = 2
    max_bad_steps: int = MAX_BAD_STEPS
    device: str | None = None  # None: the current GPU when there is one, else cpu (executor/devices.py)
    # CPU only, for tests and the GPU check's dry run: run the transfer engine's asynchronous path with
    # stand-in streams ("late" or "early", executor/stream_standins.py) instead of synchronous copies
    streams: str | None = None
    collective_timeout_s: float = dist_.DEFAULT_TIMEOUT_S  # data parallel: a dead rank is an error after this
    state_store: str | None = None  # --state-store host|disk; None: the plan's placement.state_store
    state_dir: Path | None = None  # --state-dir for the disk tier's files; None: <output>/state-files


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    steps: int  # optimizer steps completed in total
    train_losses: tuple[float | None, ...]  # per step, whole run including resumed parts; None: not finite
    evals: tuple[tuple[int, float, float | None], ...]  # (step, eval loss, eval accuracy)
    skipped_steps: int
    memory: MemoryMeasurement | None
    run_json: Path
    model_dir: Path


def _check_replayable(plan: Any) -> None:
    """Refuse what this executor cannot replay yet, instead of silently training something else."""
    problems = []
    split = plan.hardware.num_gpus > 1 and plan.hardware.parallel not in ("data", "shard")
    if split or any(g != 0 for g in plan.placement.layer_gpu):
        problems.append(f"{plan.hardware.num_gpus} GPUs with layers placed across them")
    if plan.placement.weights != "resident":
        problems.append(f"weights {plan.placement.weights!r}")
    if plan.run.weight_dtype == "float16" or plan.run.compute_dtype == "float16":
        problems.append("float16 training (no loss scaling; use bfloat16)")
    if plan.hardware.parallel == "shard" and plan.run.chunked_cross_entropy:
        # it calls the decoder around FSDP's root module, whose own weights would stay sharded
        problems.append("chunked cross-entropy with sharded weights")
    if problems:
        raise RunError(
            f"this plan needs {', '.join(problems)}, which chunkft-run does not do yet; re-plan for one "
            "GPU with chunkft-plan (the planner's multi-GPU figures are predictions only)"
        )
    if plan.run.chunked_cross_entropy and plan.model.task != "causal-lm":
        raise RunError(
            f"run.chunked_cross_entropy is set for a {plan.model.task} plan; chunked cross-entropy only "
            "applies to causal-LM heads: re-plan without it"
        )


_PADDED_KIND = {
    "instruction": "instruction rows",
    "chat": "chat rows",
    "classification": "classification rows",
    "text": "text rows",
    "jsonl-text": "JSONL text rows",
}


def _check_padding(plan: Any, dataset: Dataset, opts: RunOptions, log: TextIO) -> None:
    """Refuse padded data under a plan made for unpadded batches: Hugging Face then builds a B*S*S
    attention mask and repeats grouped-query K/V to every head, which the plan's peak does not count.
    The reverse (a padded plan on packed rows) only over-predicts, so it runs with a note."""
    mask = dataset.train.attention_mask
    padded_rows = int((mask == 0).any(dim=1).sum())
    if padded_rows and not plan.run.padded_batches:
        # the same K, batch split and checkpointing: only the padding (and so the predicted peak) changes
        target = _sibling_plan(opts.plan_path, "padded")
        command = replan_command(
            plan, plan.hardware.budget_bytes, target, keep_choices=True, extra=("--padded-batches",)
        )
        raise RunError(
            f"{opts.data_path}: {_PADDED_KIND.get(dataset.format, 'rows')} are padded ({padded_rows} of "
            f"{len(mask)} training rows) but {opts.plan_path} was planned for unpadded batches "
            "(run.padded_batches false), so its predicted peak is too low (padding adds an attention mask "
            f"and repeated K/V); re-plan with --padded-batches: {command}"
        )
    if plan.run.padded_batches and not padded_rows:
        log.write(
            f"chunkft-run: note: {opts.plan_path} was planned for padded batches and {opts.data_path} has "
            "no padding; the measured peak will be somewhat below the prediction\n"
        )


def _streams_for(opts: RunOptions, device: torch.device) -> Any:
    """None (the device's own streams), or the stand-in RunOptions.streams names (CPU only)."""
    if opts.streams is None:
        return None
    if device.type != "cpu":
        raise RunError(f"stand-in streams {opts.streams!r} run on the CPU only; drop them on {device}")
    from chunkft.executor.stream_standins import standin_streams

    try:
        return standin_streams(opts.streams)
    except ValueError as e:
        raise RunError(str(e)) from None


def host_bytes_needed(plan: Any, device: torch.device, state_store: str = "host") -> tuple[int, int]:
    """(host bytes the run needs at its peak, of which the model's weights): the inactive windows'
    states (on the disk tier: its staging buffers) and a checkpoint's extra, plus on the CPU the weights."""
    weights = plan.model.num_params * DTYPE_BYTES[plan.run.weight_dtype] if device.type == "cpu" else 0
    pred = plan.predictions
    stores = int(pred.host_bytes) if state_store == "host" else staging_host_bytes(plan)
    return stores + int(pred.host_peak_bytes - pred.host_bytes) + weights, weights


def check_host_memory(
    plan: Any, available: int, device: torch.device, plan_path: Path, state_store: str = "host"
) -> None:
    """Refuse before building anything: the inactive windows' states (and a checkpoint's extra; on the CPU
    the model's weights too) must fit in the host memory available now, or the machine swaps or the
    kernel kills the run hours in. plan_path: the plan's file (the re-plan writes beside it)."""
    pred = plan.predictions
    stores = int(pred.host_bytes) if state_store == "host" else staging_host_bytes(plan)
    need, weights = host_bytes_needed(plan, device, state_store)
    if need <= available:
        return
    extra = f" plus {(pred.host_peak_bytes - pred.host_bytes) / GIB:.2f} GiB while a checkpoint is written"
    on_cpu = f" and, on the CPU, {weights / GIB:.2f} GiB of weights" if weights else ""
    what = "optimizer states" if state_store == "host" else "disk-tier staging buffers"
    raise RunError(
        f"this plan keeps {stores / GIB:.2f} GiB of {what} in host memory{extra}{on_cpu}, and "
        f"this machine has {available / GIB:.2f} GiB available; free memory, or re-plan for this host (the "
        f"states move to the GPU or shrink): "
        f"{replan_command(plan, plan.hardware.budget_bytes, _sibling_plan(plan_path, 'host'), available)}"
    )


def check_world(plan: Any, opts: RunOptions, world: World) -> None:
    """A data-parallel or sharded plan runs on exactly its num_gpus ranks (each rank's share of the batch,
    of the host states and of the weights was planned for that many); a 1-GPU plan runs on one."""
    n = plan.hardware.num_gpus if plan.hardware.parallel in ("data", "shard") else 1
    if world.size == n:
        return
    if plan.hardware.parallel == "none" and plan.hardware.num_gpus > 1:
        return  # a layer-split plan: _check_replayable says what to do
    raise RunError(
        f"{opts.plan_path} was made for {n} rank(s) and this run has {world.size}; launch it with "
        f"torchrun --nproc-per-node {n} (or chunkft-run --nproc {n}), or re-plan with "
        f"chunkft-plan {plan.model.name} --gpu {plan.hardware.gpu} --num-gpus {world.size} ..."
    )


def my_micro_batches(micro: list, world: World) -> list:
    """This rank's share of a step's micro-batches: every rank draws the step's whole list from the same
    data order (so positions and resume are the same on every rank) and keeps every N-th, from its rank.
    The loss scale is multiplied by N: the driver averages the ranks' gradient sums."""
    if not world.parallel:
        return micro
    return [(b, scale * world.size) for b, scale in micro[world.rank :: world.size]]


def _collective_failure(e: BaseException) -> bool:
    """gloo reports a dead peer as a plain RuntimeError from its transport."""
    text = str(e)
    return torch.distributed.is_initialized() and any(
        k in text for k in ("gloo", "Connection closed by peer", "NCCL", "timed out", "Timed out")
    )


def lost_rank_message(opts: RunOptions, e: BaseException) -> str:
    """One line for a collective that failed mid-run (a rank killed, hung past the timeout)."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return (
        f"rank {os.environ.get('RANK', '?')}: lost the other ranks ({first}); a rank died or hung past "
        f"{opts.collective_timeout_s:.0f} s; the last complete checkpoint in {opts.output_dir} is intact: "
        f"relaunch every rank with --resume ({resume_command(opts)})"
    )


class _NoMetrics:
    """metrics.jsonl on ranks other than 0: nothing is written."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def check_device(plan: Any, opts: RunOptions, device: torch.device) -> None:
    """Refuse a GPU plan that would fall back to the CPU because this machine has no GPU: it would build
    the model in host memory and train orders of magnitude slower, silently. --device cpu says it is meant."""
    if opts.device is not None or device.type != "cpu" or plan.hardware.gpu == "cpu":
        return
    need, _ = host_bytes_needed(plan, device)
    cpu_run = rerun_command(dataclasses.replace(opts, device="cpu"))
    raise RunError(
        f"{opts.plan_path} was made for {plan.hardware.num_gpus} x {plan.hardware.gpu_name} and this machine "
        f"has no GPU (torch sees no CUDA device); run on that machine, or for a deliberate CPU run (needs "
        f"{need / GIB:.2f} GiB host memory): {cpu_run}"
    )


def check_trainable(plan: Any, opts: RunOptions) -> None:
    """Refuse a plan whose rows give no training signal (hand-edited or older plans): a causal LM
    predicts each next token, so a row of seq_len 1 has no target and every loss is NaN."""
    if plan.model.task == "causal-lm" and plan.run.seq_len < 2:
        replan = replan_command(
            plan, plan.hardware.budget_bytes, _sibling_plan(opts.plan_path, "seq512"), seq_len=512
        )
        raise RunError(
            f"{opts.plan_path}: run.seq_len is {plan.run.seq_len}, and a causal LM learns by predicting "
            "each next token, so rows of 1 token have no targets (the loss would be NaN on every step); "
            f"re-plan with 2 or more tokens per row (e.g. 512): {replan}"
        )


def check_schedule_end(plan: Any, opts: RunOptions, total_steps: int, log: TextIO) -> None:
    """--max-steps past the schedule's end: refused where the rate decays to 0 (every further step would
    train at lr 0, changing nothing at full cost), a note where it stays at a floor (min_lr_ratio > 0),
    nothing for a constant schedule (the rate stays what it was)."""
    s = plan.run.schedule
    if total_steps <= s.total_steps or s.kind == "constant":
        return
    if s.min_lr_ratio > 0:
        log.write(
            f"chunkft-run: note: --max-steps {total_steps} runs past the end of the plan's {s.kind} schedule "
            f"(step {s.total_steps}); steps after it train at the floor, lr "
            f"{plan.run.optimizer.lr * s.min_lr_ratio:g}\n"
        )
        return
    raise RunError(
        f"--max-steps {total_steps} runs past the end of the plan's {s.kind} schedule (step "
        f"{s.total_steps}), where the learning rate is 0: those steps would change nothing; keep "
        f"--max-steps at most {s.total_steps}, or re-plan for {total_steps} steps and run that plan (it "
        f"starts from step 0): {longer_run_command(plan, opts, total_steps)}"
    )


def diverged_message(plan: Any, opts: RunOptions, bad: int, step: int) -> str:
    """Why the run stopped, what is kept, and a re-plan at a tenth of the learning rate with its run."""
    lr = plan.run.optimizer.lr / 10
    target = _sibling_plan(opts.plan_path, f"lr{lr:g}")
    replan = replan_command(plan, plan.hardware.budget_bytes, target, keep_choices=True, lr=lr)
    fresh = dataclasses.replace(opts, plan_path=target, resume=False, resume_from=None)
    run = shlex.join(run_args(fresh, output=free_sibling(Path(opts.output_dir))))
    held = complete_checkpoints(Path(opts.output_dir))
    kept = f"checkpoint {held[0].name} is intact" if held else "no checkpoint was written"
    return (
        f"loss or gradients were not finite for {bad} steps in a row (up to step {step}); {kept}; check "
        f"the data, or lower the learning rate: {replan} && {run}"
    )


def longer_run_command(plan: Any, opts: RunOptions, steps: int) -> str:
    """`chunkft-plan ... --steps N -o PLAN-Nsteps.json && chunkft-run PLAN-Nsteps.json ...` into a new
    output directory: a schedule for N steps (a new plan, so a new run: checkpoints belong to one plan)."""
    target = _sibling_plan(opts.plan_path, f"{steps}steps")
    replan = replan_command(plan, plan.hardware.budget_bytes, target, keep_choices=True, steps=steps)
    fresh = dataclasses.replace(opts, plan_path=target, max_steps=None)
    run = run_args(fresh, output=free_sibling(Path(opts.output_dir)))
    return f"{replan} && {shlex.join(run)}"


def _sibling_plan(plan_path: Path, what: str) -> Path:
    """Where a printed re-plan command writes its plan: PLAN-what.json beside the run's plan."""
    return plan_path.with_name(f"{plan_path.stem}-{what}.json")


def check_identity(plan: Any, opts: RunOptions) -> None:
    """Refuse a plan made for another model before building it: the fingerprint comes from the model
    built on the meta device (no memory, a second for 8B), exactly as chunkft-plan computes it."""
    from chunkft.plan_format import check_model
    from chunkft.profiles import build_model as build_hf_model
    from chunkft.profiles import load_model

    preset = load_model(plan.model.path or plan.model.name, task=plan.model.task)
    if plan.model.task == "sequence-classification" and plan.model.num_labels:
        preset.config.num_labels = plan.model.num_labels
    model = build_hf_model(preset, device="meta", dtype=getattr(torch, plan.run.weight_dtype))
    check_model(plan, param_specs(model), source=str(opts.plan_path), model_name=plan.model.name)
    if preset.source == "hf-dir" and not preset.has_weights and plan.model.source != "hf-config":
        replan = replan_command(
            plan,
            plan.hardware.budget_bytes,
            _sibling_plan(opts.plan_path, "random-init"),
            keep_choices=True,
            extra=("--random-init",),
        )
        raise RunError(
            f"{preset.path} has config.json but no weights (*.safetensors, pytorch_model.bin); copy the "
            f"weights in, or train from a random initialisation (the plan's seed): {replan}"
        )


def data_fingerprint(path: Path) -> tuple[str, int]:
    """(sha256 hex, size in bytes) of the data file, what a checkpoint records to catch another --data; of
    a `datasets` directory (save_to_disk), over its files' relative names and contents in sorted order."""
    h, size = hashlib.sha256(), 0
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                size += len(block)
    return h.hexdigest(), size


def check_same_data(point: ResumePoint, data: tuple[str, int], opts: RunOptions, log: TextIO) -> None:
    """Refuse resuming on another data file than the checkpoint's (the shuffle position would index a
    different dataset) unless --allow-data-change; checkpoints from before the fingerprint get a note."""
    name, meta = point.path.name, point.meta
    if meta.data_sha256 is None:
        log.write(
            f"chunkft-run: note: checkpoint {name} predates data fingerprints; cannot check that "
            f"{opts.data_path} is the data it was trained on\n"
        )
        return
    if (meta.data_sha256, meta.data_bytes) == data:
        return
    differs = (
        f"{opts.data_path} (sha256 {data[0][:12]}, {data[1]:,} bytes) is not the data checkpoint {name} was "
        f"trained on (sha256 {meta.data_sha256[:12]}, {meta.data_bytes:,} bytes)"
    )
    _refuse_data_change(differs, ("on it", "the original --data", "on this file"), opts, log)


def _refuse_data_change(differs: str, words: tuple[str, str, str], opts: RunOptions, log: TextIO) -> None:
    """A resume on other data (or another tokenizer): refused with the command that allows it, or a note
    under --allow-data-change. words: (continuing ..., resume with ..., or continue ...)."""
    going_on, original, this = words
    if opts.allow_data_change:
        log.write(f"chunkft-run: note: {differs}; continuing {going_on} (--allow-data-change)\n")
        return
    allow = rerun_command(dataclasses.replace(opts, allow_data_change=True))
    raise RunError(f"{differs}; resume with {original}, or continue {this}: {allow}")


def user_tokenizer(plan: Any, opts: RunOptions) -> Tokenizer | None:
    """--tokenizer DIR: that directory's tokenizer, refused in one line when it cannot load or makes ids
    the model has no embedding rows for (an index error deep in the forward otherwise)."""
    if opts.tokenizer_dir is None:
        return None
    from chunkft.profiles import load_model

    if not Path(opts.tokenizer_dir).is_dir():
        raise RunError(f"--tokenizer {opts.tokenizer_dir} is not a directory; give a tokenizer's directory")
    tokenizer = HFTokenizer(opts.tokenizer_dir)  # a DataError (one line) when it cannot load or is empty
    vocab = int(getattr(load_model(plan.model.path or plan.model.name, task=plan.model.task).config,
                        "vocab_size", 0))  # fmt: skip
    if tokenizer.id_count() > vocab:
        raise RunError(
            f"--tokenizer {opts.tokenizer_dir} makes ids up to {tokenizer.id_count() - 1}, and "
            f"{plan.model.name} embeds {vocab} (ids 0..{vocab - 1}); use the base model's tokenizer"
        )
    return tokenizer


def check_same_tokenizer(point: ResumePoint, identity: str, opts: RunOptions, log: TextIO) -> None:
    """Refuse resuming with another tokenizer (identity: Tokenizer.identity()) than the checkpoint's (the
    data position counts its blocks), unless --allow-data-change; checkpoints from before it pass."""
    recorded = point.meta.tokenizer_sha256
    if recorded is None or recorded == identity:
        return
    differs = (
        f"the tokenizer ({opts.tokenizer_dir or 'the model default'}) is not the one checkpoint "
        f"{point.path.name} was trained with (identity {identity[:12]}, not {recorded[:12]})"
    )
    _refuse_data_change(differs, ("with it", "the original tokenizer", "with this one"), opts, log)


def chunk_tokens_for(plan: Any) -> int | None:
    """Tokens per chunked cross-entropy piece, or None for the plain loss. The plan format has no field for
    the piece size yet, so a plan that asks for chunking gets executor/loss.py's DEFAULT_CHUNK_TOKENS."""
    return DEFAULT_CHUNK_TOKENS if plan.run.chunked_cross_entropy else None


def train(opts: RunOptions, log: TextIO | None = None) -> RunResult:
    """Run the plan. Raises RunError/DataError/CheckpointError/PlanError/ProfileError on bad input (nothing
    written), TrainingInterrupted after a signal (checkpoint written). Holds the output directory's lock
    from before its checkpoints are read until run.json is written. log: notes and progress (stderr)."""
    log = sys.stderr if log is None else log  # looked up per call: a caller may have replaced stderr
    lock = OutputLock(Path(opts.output_dir))
    try:
        with _hub_progress_bars(opts.progress):
            return _train(opts, log, lock)
    except RuntimeError as e:  # a collective failed: another rank died or timed out
        if isinstance(e, torch.distributed.DistError) or _collective_failure(e):
            raise DistributedError(lost_rank_message(opts, e)) from None
        raise
    finally:
        dist_.shutdown_any()
        lock.release()


def wants_cuda(requested: str | None, cuda_available: bool) -> bool:
    """Whether this run trains on CUDA: --device as given, else CUDA when torch sees a GPU."""
    return (requested or ("cuda" if cuda_available else "cpu")).startswith("cuda")


def rank_device(
    requested: str | None, parallel: bool, on_cuda: bool, current_device: Callable[[], int]
) -> str | None:
    """The device this rank trains on: data parallel on CUDA takes LOCAL_RANK's GPU (init_from_env made
    it current), whatever --device named; otherwise --device as given (None: resolve_device chooses)."""
    return f"cuda:{current_device()}" if parallel and on_cuda else requested


def _train(opts: RunOptions, log: TextIO, lock: OutputLock) -> RunResult:
    # ---- plan, device, model, data: all validated before anything is written
    from chunkft.plan_format import (
        check_model,
        load_plan,
        plan_digest,
        plan_digests,
        trajectory_digest,
    )

    plan = load_plan(opts.plan_path)
    plan_sha = plan_digest(plan)  # what run.json and new checkpoints record
    trajectory = trajectory_digest(plan)  # what lets another rank count's plan continue a checkpoint
    on_cuda = wants_cuda(opts.device, torch.cuda.is_available())
    world = dist_.init_from_env("cuda" if on_cuda else "cpu", opts.collective_timeout_s)
    check_world(plan, opts, world)
    try:
        device = resolve_device(rank_device(opts.device, world.parallel, on_cuda, torch.cuda.current_device))
    except DeviceError as e:
        raise RunError(str(e)) from None
    check_device(plan, opts, device)
    streams = _streams_for(opts, device)
    try:
        state_store = state_store_for(plan, opts.state_store)
    except ValueError as e:
        raise RunError(str(e)) from None
    tier = disk_tier(Path(opts.output_dir), opts.state_dir, world) if state_store == "disk" else None
    configure_allocator(plan.run.cuda_alloc_conf, device, log)  # a no-op off CUDA
    total_steps = plan.run.total_steps if opts.max_steps is None else opts.max_steps
    if total_steps < 1:
        raise RunError(f"--max-steps must be >= 1, got {total_steps}")
    _check_replayable(plan)
    check_trainable(plan, opts)
    check_schedule_end(plan, opts, total_steps, log)
    out = Path(opts.output_dir)
    if world.is_main:  # rank 0 alone writes into the output directory
        _check_writable(out)
        if out.is_dir():
            _lock_output(lock, log)  # before reading its checkpoints: another run may be writing them
        _check_output_dir(out, opts, total_steps)
    data_id = data_fingerprint(opts.data_path) if opts.data_path.exists() else None  # else load_dataset says
    # every rank must train the same plan on the same data: checked before anything is written
    dist_.check_same(world, {"plan": plan_sha, "data": str(data_id), "world size": str(world.size)})
    point = _resume_point(plan, out, opts, total_steps, log) if opts.resume or opts.resume_from else None
    if point is not None and data_id is not None:
        check_same_data(point, data_id, opts, log)
    # before the model is built and states pinned
    check_host_memory(plan, available_host_bytes(), device, opts.plan_path, state_store)
    if tier is not None:
        try:
            # every rank's files, as if all ranks shared this disk (they do on one machine)
            check_state_disk(tier, int(plan.predictions.host_bytes) * world.size)
        except ValueError as e:
            raise RunError(str(e)) from None
    check_identity(plan, opts)  # on the meta device: a plan for another model fails in a second, not an OOM
    chosen_tokenizer = user_tokenizer(plan, opts)  # --tokenizer, checked before the model is built

    sharded = plan.hardware.parallel == "shard"
    start_files = sharded_start_files(plan) if sharded else None
    chosen = chosen_tokenizer is not None
    model, tokenizer = build_model(plan, device, meta=start_files is not None, tokenizer_chosen=chosen)
    if start_files is not None and not meta_start_covers(model, start_files):
        start_files = None  # weights the files lack (a fresh head): build it whole, then shard it
        model, tokenizer = build_model(plan, device, tokenizer_chosen=chosen)
    tokenizer = chosen_tokenizer or tokenizer
    tokenizer_id = tokenizer.identity()  # what checkpoints record (hashing a 128K vocabulary takes a while)
    if point is not None:
        check_same_tokenizer(point, tokenizer_id, opts, log)
    check_model(plan, param_specs(model), source=str(opts.plan_path), model_name=plan.model.name)
    chunk_tokens = chunk_tokens_for(plan)
    if chunk_tokens is not None:
        try:
            causal_lm_parts(model)
        except UnsupportedArchitectureError as e:
            raise RunError(str(e)) from None
    seq_len, mbs, accum = plan.run.seq_len, plan.run.micro_batch_size, plan.run.grad_accum_steps
    dataset = load_dataset(
        opts.data_path,
        tokenizer,
        task=plan.model.task,
        seq_len=seq_len,
        num_labels=plan.model.num_labels,
        min_train_examples=mbs,
    )
    for note in dataset.notes:  # e.g. rows too long to leave anything to learn, skipped
        log.write(f"chunkft-run: note: {note}\n")
    _check_padding(plan, dataset, opts, log)
    batches = Batches(dataset.train, mbs, seed=plan.run.seed)
    held_out = _head(dataset.eval, MAX_EVAL_EXAMPLES)
    apply_checkpointing(model, plan.checkpointing.mode, plan.checkpointing.layers)
    if sharded:  # FSDP2: each rank keeps 1/N of every block's weights, gathered a block at a time
        dist_.shard_model(model, world, device.type)
        if start_files is not None:  # built on the meta device: each rank reads its rows of the files
            materialize_sharded(model, start_files, device, world)
            if world.is_main:
                log.write(
                    f"chunkft-run: note: sharded start: each rank read its rows of {len(start_files)} "
                    f"weight file(s) in {plan.model.path}; no rank built the whole model\n"
                )
    model.train()
    with warnings.catch_warnings(record=True) as caught:  # the driver's own warning, in chunkft's words
        warnings.simplefilter("always", UnreachedWindowsWarning)
        driver = build_driver(model, plan, device, streams, world=world, disk=tier)
    for w in caught:
        if not issubclass(w.category, UnreachedWindowsWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif world.is_main:
            log.write(f"chunkft-run: warning: {str(w.message).removeprefix('ChunkFT: ')}\n")

    start_step, bad_in_a_row = 0, 0
    try:
        if point is not None:
            ckpt = load_checkpoint(
                point.path,
                model,
                model_fingerprint=plan.model.fingerprint,
                plan_sha256=plan_digests(plan),  # older chunkft recorded the second
                trajectory_sha256=trajectory,  # the same run planned for another rank count
                meta=point.meta,  # verified by find_resume_point: not hashed again
            )
            if ckpt.meta.plan_sha256 not in plan_digests(plan) and world.is_main:
                log.write(
                    f"chunkft-run: note: {ckpt.path.name} was written on {ckpt.meta.world_size} rank(s) "
                    f"under another plan of the same run; continuing on {world.size}\n"
                )
            driver.load_state_dict(ckpt.trainer["driver"], read=states_reader(ckpt.path, world))
            set_rng_state(ckpt.trainer["rng"])
            _seek(batches, ckpt.meta, opts, log)
            start_step, bad_in_a_row = ckpt.meta.step, ckpt.meta.consecutive_bad_steps
            del ckpt  # the driver holds its own copies now

        dist_.barrier(world)  # every rank built and resumed: a rank that failed its checks stops the others
    except BaseException:
        if tier is not None:  # refused before training: leave no state files behind (a crash later may)
            with contextlib.suppress(Exception):
                driver.engine.remove_files()
        raise

    # ---- from here on the run writes into the output directory (rank 0)
    if world.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not lock.tried:  # the directory did not exist before
            _lock_output(lock, log)
            _check_output_dir(out, opts, total_steps)  # a run may have come and gone here meanwhile
        lock.note_pid()
    metrics: Any = (
        _MetricsLog(out / "metrics.jsonl", keep_through_step=start_step if point else None)
        if world.is_main
        else _NoMetrics()
    )
    losses: list[float | None] = []
    autocast = _autocast(device, plan.run.weight_dtype, plan.run.compute_dtype)

    def save(step: int, position: DataPosition | None = None, rng: dict | None = None) -> Path:
        with tracker.phase("checkpoint"):  # not part of a training step's memory: its own line
            return _save(step, position, rng)

    def _save(step: int, position: DataPosition | None = None, rng: dict | None = None) -> Path:
        position = position or batches.position
        meta = CheckpointMeta(
            step=step,
            model_fingerprint=plan.model.fingerprint,
            plan_sha256=plan_sha,
            data_epoch=position.epoch,
            data_index=position.index,
            consecutive_bad_steps=bad_in_a_row,
            data_sha256=data_id[0] if data_id else None,
            data_bytes=data_id[1] if data_id else None,
            tokenizer_sha256=tokenizer_id,
            trajectory_sha256=trajectory,
            world_size=world.size,
        )
        small, shards = driver.sharded_state_dict()  # each rank's own rows of the states: nothing gathered
        trainer = {"driver": small, "rng": rng or rng_state()}
        # a collective when parallel: every rank writes its rows, rank 0 the rest
        keep = opts.keep_checkpoints
        return save_checkpoint(out, meta, model, trainer, keep=keep, shards=shards, world=world)

    def evaluate_and_log(step: int) -> None:
        if not world.is_main and not sharded:  # the same weights on every rank: rank 0 evaluates
            return  # (sharded weights: every rank takes part in each block's gather, rank 0 records)
        # Micro-batches of the plan's size, without gradients: below a training step's peak, which the
        # plan counts. An OOM anyway costs the evaluation only: no weight or state is touched by it.
        try:
            with tracker.phase("evaluation"):  # not part of a training step's memory: its own line
                loss, acc = evaluate(
                    model, held_out, mbs, device, autocast, plan.model.task, chunk_tokens=chunk_tokens
                )
        except torch.OutOfMemoryError:
            metrics.write({"step": step, "eval_error": "out of memory"})
            log.write(
                f"chunkft-run: evaluation at step {step} ran out of GPU memory and was skipped; training "
                "and every weight are unaffected\n"
            )
            loss = acc = None
        finally:
            model.train()
        if loss is not None:
            metrics.write({"step": step, "eval_loss": loss, "eval_accuracy": acc})

    rotation = len(plan.chunk_table.chunks) * plan.rotation.update_interval
    span = measured_steps(total_steps - start_step, rotation)
    span = range(start_step + span.start, start_step + span.stop)
    tracker: MemoryTracker | CudaPeak = MemoryTracker(model) if device.type == "cpu" else CudaPeak(device)
    clock = StepClock(driver.engine.streams)
    progress = _Progress(log if opts.progress and world.is_main else None, total_steps, start=start_step)
    stop = _StopSignals()

    failed = True
    try:
        with stop.installed():
            if plan.run.eval_every > 0 and start_step == 0:
                evaluate_and_log(0)
            for step in range(start_step, total_steps):
                if step == span.start:
                    if isinstance(tracker, MemoryTracker):
                        # the slots exist now; the host stores are host memory (see executor/measure.py)
                        persistent, host = driver_tensors(driver)
                        tracker = MemoryTracker(model, persistent=persistent, exclude=host)
                    tracker.start()
                measuring = step in span
                clock.start()
                loss_sum, tokens = 0.0, 0
                at_step_start = (batches.position, rng_state())
                try:
                    micro = step_micro_batches([batches.next() for _ in range(accum)], plan.model.task)
                    for cpu_batch, scale in my_micro_batches(micro, world):
                        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu_batch.items()}
                        with tracker.phase("forward"), autocast:
                            loss = causal_lm_loss(model, batch, chunk_tokens) * scale
                        with tracker.phase("backward"):
                            driver.backward(loss)
                        loss_sum += float(loss.detach()) / world.size
                        tokens += int(batch["attention_mask"].sum())
                except torch.OutOfMemoryError:
                    # Nothing of this step is applied yet (weights and states change only in step()):
                    # the state at its start is consistent, so save it before reporting the OOM.
                    batch = loss = micro = None
                    driver.discard_grads()
                    # Data parallel: the other ranks are in the step's collectives, not in a save (every
                    # rank writes its rows), so the last checkpoint is what a resume takes.
                    if step > start_step and not world.parallel:
                        with contextlib.suppress(Exception):  # the last checkpoint stays if this fails
                            save(step, *at_step_start)
                    raise
                if world.parallel:  # the step's loss and tokens over all ranks; one skip decision
                    both = torch.tensor([loss_sum, float(tokens)], dtype=torch.float64)
                    both = dist_.all_reduce_sum(both, world)
                    loss_sum, tokens = float(both[0]), int(both[1])
                if math.isfinite(loss_sum):
                    with tracker.phase("optimizer"):
                        stats = driver.step()
                else:
                    stats = _skip_step(driver)
                seconds = clock.stop(
                    tokens, stats.transfer_wait_s, exclude=measuring or step == start_step, window=stats.chunk
                )
                if measuring:
                    tracker.note_step(step)
                if step + 1 == span.stop:
                    tracker.stop()

                bad_in_a_row = bad_in_a_row + 1 if stats.skipped else 0
                done = step + 1
                losses.append(loss_sum if math.isfinite(loss_sum) else None)
                if world.parallel:  # a signal seen by any rank stops all of them at the same step
                    seen = float(stop.signum or 0)
                    signum = int(dist_.all_reduce_sum(torch.tensor([seen], dtype=torch.float64), world)[0])
                    stop.signum = stop.signum or (signum if signum else None)
                metrics.write(
                    {
                        "step": done,
                        "loss": loss_sum,
                        "lr": stats.lr,
                        "grad_norm": stats.grad_norm,
                        "chunk": stats.chunk,
                        "tokens": tokens,
                        "tokens_per_s": tokens / seconds,
                        "seconds": seconds,
                        "transfer_wait_s": stats.transfer_wait_s,
                        "skipped": stats.skipped,
                    }
                )
                progress.show(done, loss_sum, tokens / seconds, *_memory_now(device))
                if bad_in_a_row >= opts.max_bad_steps:
                    raise TrainingDiverged(diverged_message(plan, opts, bad_in_a_row, done))
                if plan.run.eval_every > 0 and done % plan.run.eval_every == 0 and done < total_steps:
                    evaluate_and_log(done)
                if stop.signum is not None and done < total_steps:  # the last step finishes normally
                    save(done)
                    raise TrainingInterrupted(stop.signum, done)
                if (
                    plan.run.checkpoint_every > 0
                    and done % plan.run.checkpoint_every == 0
                    and done < total_steps
                ):
                    save(done)
            tracker.stop()
            progress.end()
            save(total_steps)  # first: whatever the evaluation does, the trained weights are on disk
            evaluate_and_log(total_steps)
        failed = False
    finally:
        tracker.stop()
        progress.end()
        metrics.close()
        if failed:  # already failing: a state file error on the way out would hide the first error
            with contextlib.suppress(StateFileError):
                driver.close()
        else:
            driver.close()
    if tier is not None:
        driver.engine.remove_files()  # scratch space: the checkpoints and the model hold the run

    memory = tracker.result() if tracker.steps_measured else None
    if not world.is_main:
        if sharded:  # the gathers rank 0's export needs; this rank writes nothing
            export_safetensors(model, out / "model", world)
        dist_.shutdown(world)
        skipped = sum(x is None for x in losses)
        run_json, model_dir = out / "run.json", out / "model"  # rank 0 writes them
        return RunResult(out, total_steps, tuple(losses), (), skipped, memory, run_json, model_dir)
    with tracker.phase("export"):
        model_dir = export_model(model, tokenizer, out / "model", world)
    host_states = driver.host_state_bytes()
    store = {
        "state_store": state_store,
        "state_file_bytes": driver.engine.store_bytes("disk"),
        "staging_bytes": driver.engine.staging_bytes(),
    }
    result = _write_run_json(
        opts, plan, plan_sha, device, out, memory, clock, model_dir, host_state_bytes=host_states, store=store
    )
    dist_.shutdown(world)
    return result


# ------------------------------------------------------------------------------------ building blocks


def build_model(
    plan: Any, device: torch.device, meta: bool = False, tokenizer_chosen: bool = False
) -> tuple[torch.nn.Module, Tokenizer]:
    """The plan's model on the device, randomly initialised from the plan's seed (presets, and directories
    planned with --random-init: source "hf-config") or loaded (directories), and the tokenizer that goes
    with it: the directory's own, else the byte-level one (presets, config-only directories).
    meta: a directory's model on the meta device, nothing allocated (materialize_sharded fills it).
    tokenizer_chosen: --tokenizer replaces the default one, so a vocabulary too small for the byte-level
    tokenizer is no reason to refuse (user_tokenizer checks the chosen one)."""
    from chunkft.executor.data import fresh_model_tokenizer
    from chunkft.profiles import build_model as build_hf_model
    from chunkft.profiles import load_model

    dtype = getattr(torch, plan.run.weight_dtype)
    preset = load_model(plan.model.path or plan.model.name, task=plan.model.task)
    if plan.model.task == "sequence-classification" and plan.model.num_labels:
        preset.config.num_labels = plan.model.num_labels
    preset.config._attn_implementation = plan.run.attn_implementation
    if plan.model.source in ("preset", "hf-config"):
        tokenizer = fresh_model_tokenizer(preset.path if plan.model.source == "hf-config" else None)
        torch.manual_seed(plan.run.seed)  # the random init
        model = build_hf_model(preset, device="cpu", dtype=dtype)
        vocab = int(getattr(model.config, "vocab_size", 0))
        if isinstance(tokenizer, ByteTokenizer) and vocab < ByteTokenizer.vocab_size and not tokenizer_chosen:
            what, fix = f"preset {plan.model.name}", ""
            if preset.path is not None:
                what, fix = f"{preset.path} (no tokenizer files)", "; copy the base model's tokenizer in"
            raise RunError(
                f"{what} has a {vocab}-token vocabulary; the byte tokenizer needs "
                f"{ByteTokenizer.vocab_size}{fix}"
            )
    else:
        assert preset.has_weights, "check_identity refuses a directory without weights"
        tokenizer = HFTokenizer(preset.path or plan.model.name)
        torch.manual_seed(plan.run.seed)  # any fresh head
        if meta:
            model = build_hf_model(preset, device="meta", dtype=dtype)
        else:
            model = build_hf_model(preset, device="cpu", dtype=dtype, load_weights=True)
    if plan.model.task == "sequence-classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_id  # classifiers on decoders find the last real token
    return (model if meta else model.to(device)), tokenizer


# Non-persistent buffers a meta-device model gets back from transformers' own init (_init_weights
# recomputes rotary frequencies); a model with others is built whole before it is sharded.
_REBUILT_BUFFERS = ("inv_freq", "original_inv_freq")


def sharded_start_files(plan: Any) -> list[Path] | None:
    """The .safetensors files a sharded run of a directory's causal LM starts from, each rank reading
    only its rows (no rank ever holds the whole model: what lets 70B start on 2 x 80 GB); None: the
    model is built whole, then sharded (presets and random inits, .bin weights, classifiers)."""
    if plan.model.source != "hf-dir" or plan.model.path is None or plan.model.task != "causal-lm":
        return None
    files = sorted(Path(plan.model.path).glob("*.safetensors"))
    return files or None


def meta_start_covers(model: torch.nn.Module, files: list[Path]) -> bool:
    """Whether materialize_sharded can fill this meta-device model: every weight is in the files and
    every non-persistent buffer is one transformers' init recomputes."""
    from chunkft.executor.safetensors_stream import missing_weights

    persistent = set(model.state_dict())
    others = [n for n, _ in model.named_buffers() if n not in persistent]
    rebuilt = all(n.rsplit(".", 1)[-1] in _REBUILT_BUFFERS for n in others)
    return rebuilt and not missing_weights(model, files)


def materialize_sharded(
    model: torch.nn.Module, files: list[Path], device: torch.device, world: World
) -> None:
    """A meta-device model just sharded: allocate each rank's shards, recompute the non-persistent
    buffers (rotary frequencies) with transformers' init, and read each rank's rows of the weights."""
    from chunkft.executor.safetensors_stream import load_sharded_rows

    model.to_empty(device=device)
    with torch.no_grad():
        for module in model.modules():
            if module._non_persistent_buffers_set:
                model._init_weights(module)  # type: ignore[operator]
    missing = load_sharded_rows(model, files, world.rank, world.size)
    if missing:  # meta_start_covers checked this: a file changed under the run
        raise RunError(f"{files[0].parent}: the weight files lack {missing[:3]}; they changed while loading")


def apply_checkpointing(model: torch.nn.Module, mode: str, layers: tuple[int, ...]) -> None:
    """Activation checkpointing as the plan says: none, every decoder layer, or the selected layers."""
    if mode == "none":
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the input embeddings require grad (needed only by reentrant checkpointing);
    # that would run backward below the active window, which ChunkFT exists to avoid.
    model.disable_input_require_grads()
    if mode == "selected":
        blocks = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i in layers  # per-instance flag read by the layer's __call__


def build_driver(
    model: torch.nn.Module,
    plan: Any,
    device: torch.device,
    streams: Any = None,
    world: World | None = None,
    disk: DiskTier | None = None,
) -> Any:
    """The ChunkFT driver with every setting taken from the plan (streams: None for the device's own;
    disk: the disk tier's files, None for pinned host stores)."""
    from chunkft.executor.chunkft import AdamWHparams, ChunkFT, SGDHparams
    from chunkft.executor.rotation import RotationSpec
    from chunkft.executor.schedule import ScheduleSpec

    o, s = plan.run.optimizer, plan.run.schedule
    hparams = (
        AdamWHparams(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        if o.name == "adamw"
        else SGDHparams(lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, nesterov=o.nesterov)
    )
    return ChunkFT(
        model,
        plan.chunk_table.chunks,
        hparams=hparams,
        schedule=ScheduleSpec(
            kind=s.kind, warmup_steps=s.warmup_steps, total_steps=s.total_steps, min_lr_ratio=s.min_lr_ratio
        ),
        rotation=RotationSpec(
            order=plan.rotation.order, update_interval=plan.rotation.update_interval, seed=plan.rotation.seed
        ),
        host_state_dtype=plan.placement.host_state_dtype,
        states_on=plan.placement.optimizer_states,
        max_grad_norm=o.max_grad_norm,
        weight_decay_mode=o.weight_decay_mode,
        device=device,
        # Copies always overlap compute: with one fp32 state slot the next window's states are copied in
        # right after the update, during the next forward/backward (what the simulator's one-slot model
        # assumes); the plan's "prefetch" adds a second slot, filled one step ahead.
        prefetch_order=None,  # follow the driver's own rotation (exact for random orders too)
        state_slots=2 if plan.placement.prefetch else 1,
        streams=streams,
        world=world,
        disk=disk,
    )


def step_micro_batches(
    micro: list[dict[str, torch.Tensor]], task: str
) -> list[tuple[dict[str, Any], float]]:
    """The micro-batches of one optimizer step, each with how its loss is normalised (in the batch, and a
    factor for its loss) so that their gradients add up to those of the whole step's batch.

    Causal LM: Hugging Face's loss is a mean over the micro-batch's target tokens; with padding the
    micro-batches hold different numbers of them, and mean/accum would weight a short micro-batch's
    tokens more. So each is given the step's target count as `num_items_in_batch` (summed token losses
    / all the step's targets, as Hugging Face's Trainer does). Classification (equal-sized micro-batches
    of examples) and a single micro-batch keep the plain mean, times 1/accum."""
    if len(micro) == 1:
        return [(micro[0], 1.0)]
    if task == "causal-lm":
        targets = sum(int((b["labels"][..., 1:] != IGNORE_INDEX).sum()) for b in micro)
        return [({**b, "num_items_in_batch": max(targets, 1)}, 1.0) for b in micro]
    return [(b, 1.0 / len(micro)) for b in micro]


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: TokenData,
    batch_size: int,
    device: torch.device,
    autocast: Any,
    task: str,
    chunk_tokens: int | None = None,
) -> tuple[float, float | None]:
    """Mean loss over the held-out examples (and accuracy for classification). With chunk_tokens (causal
    LM only) the loss is chunked like training's, so evaluation never holds a larger batch's full logits."""
    model.eval()
    loss_sum, n, correct = 0.0, 0, 0
    for batch in eval_batches(data, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        rows = int(batch["input_ids"].shape[0])
        if chunk_tokens is not None:
            with autocast:
                loss_sum += float(causal_lm_loss(model, batch, chunk_tokens)) * rows
            n += rows
            continue
        with autocast:
            out = model(**batch)
        loss_sum += float(out.loss) * rows
        n += rows
        if task == "sequence-classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
    return loss_sum / n, (correct / n if task == "sequence-classification" else None)


def export_model(
    model: torch.nn.Module, tokenizer: Tokenizer, target: Path, world: World | None = None
) -> Path:
    """A Hugging Face directory (safetensors) that from_pretrained loads, written beside then swapped in.
    The weights stream to the file a piece at a time (save_pretrained would first copy them all to the
    host: 16 GB more for an 8B model, on top of the pinned optimizer states)."""
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=target.parent))
    try:
        export_safetensors(model, tmp, world)  # sharded weights: the other ranks gather with rank 0
        tokenizer.save(tmp)
        honour_umask(tmp)  # mkdtemp made it 0700: give it the modes mkdir/open would
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# -------------------------------------------------------------------------------------------- helpers


def _check_writable(out: Path) -> None:
    """Refuse an --output that is a file or lies in a directory this user cannot write (before locking
    it: its lock would fail with a less helpful error)."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--output {out} is a file; give a directory")
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise RunError(f"--output {out}: {probe_dir} is not writable; choose another --output")


def _check_output_dir(out: Path, opts: RunOptions, total_steps: int) -> None:
    """Refuse a fresh run into a directory that holds a run (a checkpoint: one that died before its
    first checkpoint holds nothing to continue, so a fresh run may replace it)."""
    held = complete_checkpoints(out)
    if opts.resume or opts.resume_from or not held:
        return
    step = _peek_step(held[0])
    if step is not None and step >= total_steps:
        raise RunError(
            f"--output {out} already holds a run, finished at step {step} (its model is in {out / 'model'}); "
            f"start over in a new directory: {elsewhere_command(opts)}"
        )
    raise RunError(
        f"--output {out} already holds a run (checkpoint {held[0].name}); continue it: "
        f"{resume_command(opts)}, or start over in a new directory: {elsewhere_command(opts)}"
    )


def _peek_step(path: Path) -> int | None:
    """The step a checkpoint's state.json records, unverified (for advice only; resuming verifies)."""
    try:
        return int(json.loads((path / "state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _lock_output(lock: OutputLock, log: TextIO) -> None:
    try:
        locked = lock.acquire()
    except OutputInUse as e:
        raise RunError(str(e)) from None
    except OSError as e:  # checked writable just before: the directory went away or is not ours
        raise RunError(
            f"--output {lock.output_dir}: cannot lock it ({e.strerror}); choose another --output"
        ) from None
    if not locked:
        log.write(
            f"chunkft-run: note: cannot lock --output {lock.output_dir} (the filesystem does not support "
            "flock); make sure no other chunkft-run writes there\n"
        )


def _resume_point(plan: Any, out: Path, opts: RunOptions, total_steps: int, log: TextIO) -> ResumePoint:
    """The verified checkpoint to resume from (a note when it is not `latest`), or one line whose advice
    is a command that works: start without --resume, resume from another one, or start elsewhere."""
    try:
        point = find_resume_point(out, opts.resume_from)
    except NoCheckpoint as e:
        why = "the run stopped before its first" if out.is_dir() else "nothing has run there"
        message = f"{e} ({why}); start it without --resume: {fresh_command(opts)}"
        raise CheckpointError(message) from None
    except NoIntactCheckpoint as e:
        if e.newest is not None:
            newest = shlex.join([*run_args(opts), "--resume-from", e.newest])
            raise CheckpointError(f"{e}; resume from the newest intact one: {newest}") from None
        raise CheckpointError(f"{e}; start over in a new directory: {elsewhere_command(opts)}") from None
    if point.note:
        log.write(f"chunkft-run: note: {point.note}\n")
    if point.meta.step >= total_steps:
        raise RunError(_nothing_left(point, plan, opts, total_steps))
    return point


def _nothing_left(point: ResumePoint, plan: Any, opts: RunOptions, total_steps: int) -> str:
    """The checkpoint is at or past --max-steps: the command that goes on (to the plan's end, further
    where the rate stays useful, or a longer plan where it has decayed to 0)."""
    step, s = point.meta.step, plan.run.schedule
    at = f"checkpoint {point.path.name} is at step {step} and --max-steps is {total_steps}"
    mine = dataclasses.replace(opts, resume_from=None)
    if plan.run.total_steps > step:
        more = resume_command(dataclasses.replace(mine, max_steps=None))
        return f"{at}; continue to the plan's {plan.run.total_steps} steps: {more}"
    done = f"{at}: the run is complete (its model is in {Path(opts.output_dir) / 'model'})"
    if s.kind == "constant" or s.min_lr_ratio > 0:
        more = resume_command(dataclasses.replace(mine, max_steps=step + plan.run.total_steps))
        return f"{done}; to train {plan.run.total_steps} steps more: {more}"
    longer = longer_run_command(plan, opts, 2 * step)
    return f"{done}; its {s.kind} schedule has ended at lr 0; to train longer, re-plan and run anew: {longer}"


def _seek(batches: Batches, meta: CheckpointMeta, opts: RunOptions, log: TextIO) -> None:
    """Restore the data position; on changed data (--allow-data-change) a position past its end starts
    the next epoch of the new data instead."""
    position = DataPosition(meta.data_epoch, meta.data_index)
    if opts.allow_data_change and position.index > len(batches.data):
        position = DataPosition(meta.data_epoch + 1, 0)
        log.write(
            f"chunkft-run: note: the checkpoint's data position is past the end of {opts.data_path}; "
            f"continuing at the start of epoch {position.epoch}\n"
        )
    batches.seek(position)


def _skip_step(driver: Any) -> Any:
    """A step whose loss is not finite: nothing to learn from, so no update, the same window, the
    schedule not advanced (what the driver does for a non-finite gradient norm)."""
    from chunkft.executor.chunkft import StepStats

    driver.discard_grads()
    return StepStats(driver.active_chunk.index, driver.lr(), math.nan, True, 0.0)


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Without progress output (--quiet) transformers' and huggingface_hub's bars (loading weights,
    downloading a tokenizer) are off too; restored afterwards."""
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub
    from transformers.utils import logging as hf_logging

    was_hf, was_hub = hf_logging.is_progress_bar_enabled(), not hub.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    hub.disable_progress_bars()
    try:
        yield
    finally:
        if was_hf:
            hf_logging.enable_progress_bar()
        if was_hub:
            hub.enable_progress_bars()


def json_safe(value: Any) -> Any:
    """value with every NaN or infinity replaced by None (JSON has neither; strict parsers refuse them)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _head(data: TokenData, n: int) -> TokenData:
    return TokenData(data.input_ids[:n], data.attention_mask[:n], data.labels[:n])


def _autocast(device: torch.device, weight_dtype: str, compute_dtype: str) -> Any:
    if compute_dtype == weight_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, compute_dtype))


def _memory_now(device: torch.device) -> tuple[str, int]:
    """(label, bytes) for the progress line: what the figure is, since neither is the tracked peak."""
    if device.type == "cuda":
        return "cuda alloc", int(torch.cuda.memory_allocated(device))
    return "rss peak", int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


class _MetricsLog:
    """metrics.jsonl, line-buffered; on resume, lines past the checkpoint's step are dropped first."""

    def __init__(self, path: Path, keep_through_step: int | None) -> None:
        self.path = path
        if keep_through_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            kept = [
                ln
                for ln in path.read_text().splitlines()
                if ln.strip() and _line_step(ln) <= keep_through_step
            ]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in kept))
            os.replace(tmp, path)
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")

    def close(self) -> None:
        self._f.close()

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _line_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62  # an unreadable (half-written) line is dropped


PROGRESS_LINES = 20  # plain lines per run when the log is not a terminal
PROGRESS_SECONDS = 60.0  # ... and at least one a minute however long a step takes


class _Progress:
    """Progress on stderr: step, loss, tokens/s, memory. On a terminal one `\\r`-rewritten line; in a log
    file (not a tty) plain lines, one every max(1, steps // PROGRESS_LINES) steps, after a minute without
    one, and at the last step: a log gets about 20 readable lines instead of one joined by `\\r`."""

    def __init__(
        self,
        stream: TextIO | None,
        total: int,
        start: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.total = total
        self.tty = stream is not None and _isatty(stream)
        self.every = max(1, (total - start) // PROGRESS_LINES)
        self._clock = clock
        self._last = clock()
        self._open = False

    def show(self, step: int, loss: float, tokens_per_s: float, memory_label: str, memory_bytes: int) -> None:
        if self.stream is None:
            return
        text = (
            f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tok/s  "
            f"{memory_label} {memory_bytes / 2**20:,.1f} MiB"
        )
        if self.tty:
            self.stream.write(f"\r{text} ")
            self._open = True
        elif step % self.every == 0 or step == self.total or self._clock() - self._last >= PROGRESS_SECONDS:
            self.stream.write(text + "\n")
            self._last = self._clock()
        self.stream.flush()

    def end(self) -> None:
        if self.stream is not None and self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class _StopSignals:
    """SIGINT/SIGTERM set a flag the loop checks after each step; a second signal stops at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous: dict[int, Callable[..., Any] | int | None] = {}
        for s in (signal.SIGINT, signal.SIGTERM):
            previous[s] = signal.signal(s, self._handle)
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _write_run_json(
    opts: RunOptions,
    plan: Any,
    plan_sha: str,
    device: torch.device,
    out: Path,
    memory: MemoryMeasurement | None,
    clock: StepClock,
    model_dir: Path,
    host_state_bytes: int | None = None,
    store: dict[str, Any] | None = None,
) -> RunResult:
    """run.json: what was measured beside what the plan predicted, and the losses. store: where the
    host-tier states waited (state_store, state_file_bytes, staging_bytes)."""
    import transformers

    from chunkft import executor
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    pred = plan.predictions
    measured: dict[str, Any] = {
        "device": str(device),
        "memory_method": memory.method if memory else None,
        "peak_bytes": memory.peak_bytes if memory else None,
        "reserved_bytes": memory.reserved_bytes if memory else None,
        "peak_by_category": dict(memory.peak_by_category) if memory else {},
        "memory_steps": list(memory.steps) if memory else [],
        # evaluation, checkpoint and export peaks, each measured on its own (not in peak_bytes)
        "phase_peaks": dict(memory.phase_peaks) if memory else {},
        # the mean over windows of each window's median step: the plan's step_seconds is such a mean
        "step_seconds": clock.rotation_step_seconds(len(plan.chunk_table.chunks)),
        "tokens_per_second": clock.tokens_per_second(),
        "transfer_wait_s": clock.median_transfer_wait_s(),  # per step, median; inside step_seconds
        "transfer_wait_s_total": clock.total_transfer_wait_s(),
        "timed_steps_this_session": len(clock.seconds),
        # master + optimizer states kept on the host by this rank (data parallel: ~1/N each)
        "host_state_bytes": host_state_bytes,
        **(store or {}),
    }
    predicted = {
        "peak_bytes": pred.peak_bytes,
        "peak_by_category": dict(pred.peak_by_category),
        "reserve_bytes": pred.reserve_bytes,
        "step_seconds": pred.step_seconds,
        "tokens_per_second": pred.tokens_per_second,
    }

    def ratio(a: float | None, b: float) -> float | None:
        return a / b if a is not None and b else None

    doc = {
        "plan": {
            "path": str(opts.plan_path),
            "sha256": plan_sha,
            "model_fingerprint": plan.model.fingerprint,
            "model": plan.model.name,
            "num_chunks": len(plan.chunk_table.chunks),
        },
        "data": str(opts.data_path),
        # the model's own tokenizer (or the byte-level one of presets) unless --tokenizer chose one
        "tokenizer": str(opts.tokenizer_dir) if opts.tokenizer_dir else "the model's",
        "steps": steps[-1]["step"] if steps else 0,
        "measured": measured,
        "predicted": predicted,
        "ratios": {
            "peak_bytes": ratio(measured["peak_bytes"], pred.peak_bytes),
            "step_seconds": ratio(measured["step_seconds"], pred.step_seconds),
            "tokens_per_second": ratio(measured["tokens_per_second"], pred.tokens_per_second),
        },
        "losses": {
            "train": [r["loss"] for r in steps],
            "final_train": steps[-1]["loss"] if steps else None,
            "eval": evals,
            "final_eval": evals[-1]["eval_loss"] if evals else None,
            "final_eval_accuracy": evals[-1]["eval_accuracy"] if evals else None,
        },
        "skipped_steps": sum(1 for r in steps if r["skipped"]),
        "model_dir": str(model_dir),
        "world_size": dist_.launched_size(),  # data parallel: ranks, each on its own micro-batches
        "versions": {
            "chunkft": getattr(executor, "__version__", _chunkft_version()),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path = out / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(doc), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return RunResult(
        output_dir=out,
        steps=doc["steps"],
        train_losses=tuple(r["loss"] for r in steps),
        evals=tuple((r["step"], r["eval_loss"], r["eval_accuracy"]) for r in evals),
        skipped_steps=doc["skipped_steps"],
        memory=memory,
        run_json=path,
        model_dir=model_dir,
    )


def _chunkft_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("chunkft")
    except PackageNotFoundError:
        return "unknown"


__all__ = ["RunError", "RunOptions", "RunResult", "TrainingInterrupted", "train", "DataError"]
