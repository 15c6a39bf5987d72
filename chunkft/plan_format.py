"""The plan format v1: the contract between the planner (which decides) and the executor (which obeys).

A plan is a tree of frozen dataclasses holding only scalars, tuples and other such dataclasses, so it
is immutable and hashable. It is stored as readable JSON with a stable key order (the field order
below) and floats written by repr, so `plan_from_json(plan_to_json(p)) == p` and, for text this module
wrote, `plan_to_json(plan_from_json(text)) == text`. The one non-obvious mapping: tuples of
(str, value) pairs, such as `Predictions.peak_by_category`, are JSON objects.

Loading checks everything it can and reports every problem at once, each with its field path
(`chunk_table.chunks[3].slices[1].row_end must be <= 4096 ...`), because a hand-edited plan with three
typos should take one round trip to fix, not three. Bump SCHEMA_VERSION on any incompatible change and
keep tests/golden/plan_v1.json loading. A field added later is compatible when a file without it has one
right reading, so it stays v1. _with_added_fields fills them in: `run.padded_batches` with the task's
default (what those plans were planned for); `hardware.headroom_bytes` 0, `run.cuda_alloc_conf` "",
`run.optimizer.weight_decay_mode` "window", `run.cross_entropy` "auto", the `hardware.measured_*` rates 0,
`hardware.parallel` "none", `hardware.reserve_given` false, `hardware.headroom_given` "",
`placement.state_store` "host" and
`predictions.host_peak_bytes` = host_bytes (what those plans assumed and
were run with). Such a file is rewritten with the fields spelled out.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import tempfile
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

from chunkft.chunks import DTYPE_BYTES, Chunk, CutPolicy, ParamSpec
from chunkft.timeline import CATEGORIES

SCHEMA_VERSION = 1
CREATED_BY = "chunkft 0.1.0"

# "hf-config": a directory's config, randomly initialised (chunkft-plan --random-init); added in v1, so a
# chunkft from before refuses such a plan by naming model.source, and every older plan reads as before.
ModelSource = Literal["preset", "hf-dir", "hf-config", "hub"]
Task = Literal["causal-lm", "sequence-classification"]
WeightDtype = Literal["float32", "bfloat16", "float16"]
OptimizerName = Literal["adamw", "sgd"]
ScheduleKind = Literal["constant", "linear", "cosine"]
RotationOrder = Literal["bottom-up", "top-down", "random"]
StatesOn = Literal["gpu", "host"]
# Where the host tier's inactive windows wait: pinned host memory, or files under chunkft-run's --state-dir
# read ahead into a few pinned staging buffers (the disk tier, executor/state_files.py).
StateStore = Literal["host", "disk"]
HostStateDtype = Literal["float32", "bfloat16", "reset"]
WeightsPlacement = Literal["resident", "streamed"]
WeightDecayMode = Literal["window", "compensated"]
CheckpointMode = Literal["none", "all", "selected"]
# How num_gpus > 1 GPUs are used: "none" splits the decoder layers across them (placement.layer_gpu;
# what every plan before the field meant; not run), "data" runs one rank per GPU, each on its own
# micro-batches, every window's master and states sharded 1/N per rank (executor/distributed.py);
# "shard" the same, and every rank holds 1/N of every block's weights too (FSDP2 fully_shard per decoder
# layer, gathered a block at a time).
Parallel = Literal["none", "data", "shard"]

# Whether a task's batches are padded when the plan does not say (files written before
# run.padded_batches): what the planner assumed then, planner.profile_model.default_padded (causal-LM
# text is packed into full rows, classification rows are padded). Kept here so loading a plan needs
# no torch; tests/test_padded_plan.py checks the two agree.
DEFAULT_PADDED_BATCHES: dict[str, bool] = {"causal-lm": False, "sequence-classification": True}


class PlanError(Exception):
    """A plan that cannot be used; str() is one line naming every problem, `problems` lists them."""

    def __init__(self, problems: Sequence[str], *, source: str = "plan", summary: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        if summary is None:
            n = len(self.problems)
            summary = f"{source} is invalid: {n} problem{'s' if n != 1 else ''}: " + "; ".join(self.problems)
        super().__init__(summary)


@dataclass(frozen=True)
class ModelIdentity:
    """Which model the plan is for; the fingerprint catches a plan applied to a different model."""

    name: str  # preset key, directory name or hub id, as given to chunkft-plan
    source: ModelSource
    path: str | None  # the directory for "hf-dir" and "hf-config", else None
    task: Task
    num_labels: int | None  # for sequence-classification, else None
    architecture: str  # e.g. "LlamaForCausalLM"
    num_params: int  # all parameters, trainable or not
    fingerprint: str  # fingerprint(param_specs) of the model as planned


@dataclass(frozen=True)
class Hardware:
    """The GPU(s) the plan was made for and how much of them it may use."""

    gpu: str  # GPU profile key
    gpu_name: str
    num_gpus: int
    memory_total_bytes: int  # per GPU
    budget_bytes: int  # GPU memory the plan may use on each of the num_gpus GPUs
    reserve_bytes: int  # CUDA context + allocator fragmentation, counted against the budget
    host_budget_bytes: int
    # Safety margin on top of peak + reserve (planner.simulator.headroom_bytes says what it covers):
    # the plan fits when peak + reserve + headroom <= budget. Files written before it had none: 0.
    headroom_bytes: int = 0
    # chunkft-plan --calibrate (--gpu cpu): this machine's measured matmul FLOP/s in the compute dtype and
    # copy bandwidth (bytes read + written per second), planned with instead of the profile's figures
    # (planner.costs.with_measured_rates); 0: the profile's figure. Files written before them: 0.
    measured_flops_per_s: int = 0
    measured_memory_bytes_per_s: int = 0
    # Files written before it: "none" (layers split across num_gpus, what they were planned for).
    parallel: Parallel = "none"
    # What the user asked for, so a re-plan command asks the same (executor/replan.py): --reserve given
    # (reserve_bytes is exactly it, no share of the peak), and --headroom as written ("" = the default).
    # Files written before them: False and "" (the re-plan takes the defaults, as it did).
    reserve_given: bool = False
    headroom_given: str = ""


@dataclass(frozen=True)
class OptimizerSettings:
    """Optimizer and hyper-parameters; fields the optimizer does not use keep their defaults."""

    name: OptimizerName
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    momentum: float
    nesterov: bool
    max_grad_norm: float | None  # None: no clipping; else clip the active window's own gradient norm
    # Decoupled (AdamW) weight decay of a window: "window" decays only the active window, so each
    # parameter decays 1/K as often as in dense training; "compensated" multiplies the active window by
    # (1 - lr * weight_decay) ** K per step, so over a rotation every parameter decays as much as under
    # dense AdamW for as many steps at a constant lr. Files written before it: "window" (what they ran).
    weight_decay_mode: WeightDecayMode = "window"


@dataclass(frozen=True)
class ScheduleSettings:
    """LR schedule over optimizer steps (every step, whichever chunk it updates)."""

    kind: ScheduleKind
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float


@dataclass(frozen=True)
class RunSettings:
    """What one optimizer step processes and with which numerics."""

    seq_len: int
    micro_batch_size: int
    grad_accum_steps: int
    total_steps: int
    seed: int
    weight_dtype: WeightDtype
    compute_dtype: WeightDtype  # autocast dtype, or the weight dtype when there is no autocast
    master_dtype: Literal["float32"]
    attn_implementation: Literal["sdpa", "eager"]
    chunked_cross_entropy: bool
    optimizer: OptimizerSettings
    schedule: ScheduleSettings
    eval_every: int  # optimizer steps; 0 = never
    checkpoint_every: int  # optimizer steps; 0 = never
    # PYTORCH_CUDA_ALLOC_CONF that chunkft-run sets before CUDA initialises: "expandable_segments:True"
    # for GPU plans (segments grow in place instead of leaving fragments between fixed-size ones), ""
    # for CPU plans and files written before it (leave the allocator as it is). With a default, like
    # padded_batches (which stays the last field, where files written before this one have it).
    cuda_alloc_conf: str = ""
    # Whether the training batches carry padding (attention-mask zeros): instruction JSONL and
    # classification rows do, packed text does not. It changes Hugging Face's attention path (a padded
    # causal batch materialises a B*S*S mask and repeats grouped-query K/V), so the activation bytes.
    # Last, with a default, so plans built in Python before it existed still build; the planner always
    # sets it, and a plan file without it loads with its task's default (DEFAULT_PADDED_BATCHES).
    padded_batches: bool = False
    # What chunkft-plan was asked for (--cross-entropy): "auto" (the solver chose chunked_cross_entropy),
    # or the loss the user forced. A report's budget sweep and a printed re-plan command keep a forced
    # choice and leave an automatic one free. Files written before it load as "auto".
    cross_entropy: Literal["auto", "full", "chunked"] = "auto"

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.micro_batch_size * self.grad_accum_steps


@dataclass(frozen=True)
class ChunkTable:
    """The partition: the trainable parameters in stream order and the windows cut from them."""

    policy: CutPolicy
    state_bytes_per_element: int
    params: tuple[ParamSpec, ...]
    chunks: tuple[Chunk, ...]

    @property
    def num_chunks(self) -> int:
        return len(self.chunks)


@dataclass(frozen=True)
class Rotation:
    """Which chunk each optimizer step updates.

    `sequence` is one cycle of chunk indices; each is held for update_interval optimizer steps.
    """

    order: RotationOrder
    seed: int
    update_interval: int
    sequence: tuple[int, ...]


@dataclass(frozen=True)
class Placement:
    """Where optimizer states and weights live."""

    optimizer_states: StatesOn
    host_state_dtype: HostStateDtype  # how inactive chunks' states are kept on the host
    weights: WeightsPlacement
    prefetch: bool
    layer_gpu: tuple[int, ...]  # device index per decoder layer; empty = all on GPU 0
    state_store: StateStore = "host"  # "disk": the host tier's states in files (optimizer_states "host")


@dataclass(frozen=True)
class Checkpointing:
    """Activation checkpointing of decoder layers."""

    mode: CheckpointMode
    layers: tuple[int, ...]  # the checkpointed layers for "selected", else empty


@dataclass(frozen=True)
class PrefetchOp:
    """One host-to-GPU copy of a chunk's states, issued after one compute event, needed by another."""

    chunk: int
    issue_after: str  # e.g. "fwd layers.0" or "step start"
    needed_by: str  # e.g. "update chunk 3"
    bytes: int


@dataclass(frozen=True)
class Predictions:
    """What the simulator predicts for this plan; the runner compares its measurements to these."""

    peak_bytes: int  # allocated peak per step on the busiest GPU, without the reserve
    peak_by_category: tuple[tuple[str, int], ...]  # (category, bytes) at the peak, CATEGORIES names
    peak_cause: str  # the event at the peak
    reserve_bytes: int
    host_bytes: int
    step_seconds: float
    tokens_per_second: float
    compute_efficiency: float  # achieved / peak FLOP/s assumed, in (0, 1]
    # Host bytes at the highest point: host_bytes plus what a checkpoint adds
    # (planner.simulator.checkpoint_host_bytes). Files written before it: host_bytes.
    host_peak_bytes: int


@dataclass(frozen=True)
class Alternative:
    """A runner-up or baseline the solver considered, kept so reports can show why this plan won."""

    label: str
    k: int
    checkpointing: CheckpointMode
    placement: str  # one-line summary, e.g. "states host float32, prefetch"
    peak_bytes: int
    step_seconds: float
    tokens_per_second: float
    feasible: bool


@dataclass(frozen=True)
class Plan:
    """Everything the executor needs to run, and everything the planner predicted about it."""

    schema_version: int
    created_by: str
    model: ModelIdentity
    hardware: Hardware
    run: RunSettings
    chunk_table: ChunkTable
    rotation: Rotation
    placement: Placement
    checkpointing: Checkpointing
    prefetch: tuple[PrefetchOp, ...]
    predictions: Predictions
    alternatives: tuple[Alternative, ...]


# ---------------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(specs: Sequence[ParamSpec]) -> str:
    """sha256 hex of one "name|d0,d1,...|dtype" line per parameter, in the order given.

    Both sides pass chunkft.chunks.param_specs(model) of the model as freshly built/loaded for
    training, where every parameter still requires grad, so the lines cover all of them (a tied head
    appears once). A different model, shape or dtype gives a different fingerprint.
    """
    h = hashlib.sha256()
    for s in specs:
        h.update(f"{s.name}|{','.join(str(d) for d in s.shape)}|{s.dtype}\n".encode())
    return h.hexdigest()


def check_model(
    plan: Plan, specs: Sequence[ParamSpec], *, source: str = "plan", model_name: str = "MODEL"
) -> None:
    """Refuse a plan made for another model (or the same model in another dtype)."""
    got = fingerprint(specs)
    want = plan.model.fingerprint
    if got == want:
        return
    hint = ""
    planned = plan.chunk_table.params
    if fingerprint(planned) == want:  # the table lists every parameter: name the first difference
        for i in range(max(len(planned), len(specs))):
            a = planned[i] if i < len(planned) else None
            b = specs[i] if i < len(specs) else None
            if a != b:
                hint = (
                    f"; first difference at parameter {i}: plan has {_spec_text(a)}, "
                    f"model has {_spec_text(b)}"
                )
                break
    raise PlanError(
        [f"fingerprint {want[:12]}… != {got[:12]}…"],
        source=source,
        summary=f"{source} was made for a different model ({plan.model.name}: fingerprint {want[:12]}… != "
        f"{got[:12]}…{hint}): re-plan with chunkft-plan {model_name}",
    )


def _spec_text(spec: ParamSpec | None) -> str:
    return "nothing" if spec is None else f"{spec.name} {tuple(spec.shape)} {spec.dtype}"


# ---------------------------------------------------------------------------------------------------
# Encoding

_hints = functools.cache(typing.get_type_hints)  # resolved field types, per dataclass


def plan_to_dict(plan: Plan) -> dict:
    """The plan as plain JSON data (dicts, lists, scalars) in field order."""
    try:
        return _encode(plan, Plan)  # type: ignore[return-value]
    except (TypeError, AttributeError, ValueError) as e:
        raise PlanError([f"the plan's Python values do not have the v1 structure ({e})"]) from e


def plan_to_json(plan: Plan) -> str:
    """Readable JSON: sections indented, table rows and short lists on one line, trailing newline.

    Raises PlanError when the plan is invalid or would not read back equal (e.g. a list where the
    schema has a tuple), so nothing invalid is ever written.
    """
    data = plan_to_dict(plan)
    problems = validate_plan_dict(data)
    if problems:
        raise PlanError(problems)
    if plan_from_dict(data) != plan:
        raise PlanError(
            ["the plan's Python values do not match the v1 field types (tuples, ints, floats, bools)"]
        )
    return _dump(data, 0, in_list=False) + "\n"


def save_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write atomically: a temp file in the same directory, fsync, then rename over `path`."""
    from chunkft.files import honour_umask

    text = plan_to_json(plan)  # raises before anything is written
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        honour_umask(tmp)  # mkstemp made it 0600; a plan is as readable as any file the user writes
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _encode(value: object, tp: object) -> object:
    if dataclasses.is_dataclass(tp):
        hints = _hints(tp)
        return {f.name: _encode(getattr(value, f.name), hints[f.name]) for f in dataclasses.fields(tp)}
    kind, args = _kind(tp)
    if kind == "optional":
        return None if value is None else _encode(value, args[0])
    if kind == "pairs":
        return {k: _encode(v, args[1]) for k, v in value}  # type: ignore[attr-defined]
    if kind == "tuple":
        return [_encode(v, args[0]) for v in value]  # type: ignore[attr-defined]
    if kind == "fixed":
        return [_encode(v, t) for v, t in zip(value, args, strict=True)]  # type: ignore[call-overload]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _dump(value: object, indent: int, *, in_list: bool) -> str:
    """JSON text; a dict in a list whose values are scalars or scalar lists goes on one line."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        if in_list and all(_flat(v) for v in value.values()):
            return json.dumps(value, ensure_ascii=False, allow_nan=False)
        pad = "  " * (indent + 1)
        items = [f"{pad}{json.dumps(k)}: {_dump(v, indent + 1, in_list=False)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return json.dumps(value, ensure_ascii=False, allow_nan=False)
        pad = "  " * (indent + 1)
        items = [pad + _dump(v, indent + 1, in_list=True) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def _flat(v: object) -> bool:
    if isinstance(v, list):
        return all(not isinstance(x, (dict, list)) for x in v)
    return not isinstance(v, dict)


# ---------------------------------------------------------------------------------------------------
# Decoding and validation


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """Read and validate a plan file; PlanError names the file and every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        reason = f"{path}: cannot read it ({e.strerror}): check the path or run chunkft-plan to make one"
        raise PlanError([reason], source=str(path), summary=reason) from e
    except UnicodeDecodeError as e:
        reason = f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): is it a plan file?"
        raise PlanError([reason], source=str(path), summary=reason) from e
    return plan_from_json(text, source=str(path))


def plan_from_json(text: str, *, source: str = "plan") -> Plan:
    """Parse and validate; PlanError with every problem (or the JSON syntax error with line and column)."""
    try:
        data = json.loads(text, object_pairs_hook=_JsonObject.from_pairs, parse_constant=_NonFinite)
    except json.JSONDecodeError as e:
        raise PlanError(
            [f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"],
            source=source,
            summary=f"{source} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
            "the file may be truncated or mis-edited: fix it or re-plan",
        ) from e
    return plan_from_dict(data, source=source)


def plan_from_dict(data: object, *, source: str = "plan") -> Plan:
    """Validate parsed JSON data and build the Plan; PlanError lists every problem."""
    _refuse_newer(data, source)
    problems: list[str] = []
    plan = _decode_plan(data, problems)
    if problems or plan is None:
        raise PlanError(problems, source=source)
    return plan


def validate_plan_dict(data: object) -> list[str]:
    """Every problem of parsed plan JSON, each with its field path; empty when the plan is valid."""
    try:
        _refuse_newer(data, "plan")
    except PlanError as e:
        return [str(e)]
    problems: list[str] = []
    _decode_plan(data, problems)
    return problems


def validate(plan: Plan) -> list[str]:
    """Every problem of an in-memory plan (as it would be written), each with its field path."""
    return validate_plan_dict(plan_to_dict(plan))


def _refuse_newer(data: object, source: str) -> None:
    if not isinstance(data, dict):
        return
    version = data.get("schema_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise PlanError(
            [f"schema_version {version} is newer than {SCHEMA_VERSION}"],
            source=source,
            summary=f"{source} was written by a newer chunkft (schema {version}; this one reads "
            f"{SCHEMA_VERSION}): upgrade chunkft or re-plan",
        )


class _JsonObject(dict):
    """A parsed JSON object that remembers keys given twice (json.loads would silently keep the last)."""

    duplicates: tuple[str, ...] = ()

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, object]]) -> _JsonObject:
        obj = cls(pairs)
        seen: set[str] = set()
        repeated: list[str] = []
        for k, _ in pairs:
            if k in seen:
                repeated.append(k)
            seen.add(k)
        obj.duplicates = tuple(repeated)
        return obj


@dataclass(frozen=True)
class _NonFinite:
    """NaN / Infinity in the JSON text, kept so the field that holds it can be named."""

    text: str


_BAD = object()  # a value that failed to decode (its problem is already recorded)

# The top-level sections, decoded one by one so a broken section does not hide the others' problems.
_SECTIONS = [f for f in dataclasses.fields(Plan)]


def _decode_plan(data: object, problems: list[str]) -> Plan | None:
    if not isinstance(data, dict):
        problems.append(f"the plan must be a JSON object, got {_describe(data)}")
        return None
    hints = _hints(Plan)
    data = _with_added_fields(data)
    _check_keys(data, [f.name for f in _SECTIONS], "", problems)
    values: dict[str, object] = {}
    for f in _SECTIONS:
        if f.name not in data:
            continue
        before = len(problems)
        value = _decode(data[f.name], hints[f.name], f.name, problems)
        if len(problems) > before:
            continue  # structurally broken: its values cannot be checked further
        section_checks = _SECTION_CHECKS.get(f.name)
        if section_checks is not None:
            section_checks(value, f.name, problems)
        values[f.name] = value  # well-typed, so cross-section checks can read it
    if values.get("schema_version", SCHEMA_VERSION) < 1:  # type: ignore[operator]
        problems.append(f"schema_version must be {SCHEMA_VERSION}, got {values['schema_version']}")
    _cross_checks(values, problems)
    if problems:
        return None
    return Plan(**values)  # type: ignore[arg-type]


def _added_fields(data: dict) -> list[tuple[tuple[str, ...], str, object]]:
    """(section path, key, what a file without it means) for each field added to v1 after plans were
    written; data is the file's (possibly incomplete) JSON."""
    model = data.get("model")
    task = model.get("task") if isinstance(model, dict) else None
    # An unknown task is reported by the model section; the plan fails anyway, so any default will do.
    padded = DEFAULT_PADDED_BATCHES.get(task, False) if isinstance(task, str) else False
    fields: list[tuple[tuple[str, ...], str, object]] = [
        (("run",), "padded_batches", padded),
        (("run",), "cuda_alloc_conf", ""),
        (("run", "optimizer"), "weight_decay_mode", "window"),
        (("hardware",), "headroom_bytes", 0),
        (("run",), "cross_entropy", "auto"),
        (("hardware",), "measured_flops_per_s", 0),
        (("hardware",), "measured_memory_bytes_per_s", 0),
        (("hardware",), "parallel", "none"),
        (("hardware",), "reserve_given", False),
        (("hardware",), "headroom_given", ""),
        (("placement",), "state_store", "host"),
    ]
    predictions = data.get("predictions")
    if isinstance(predictions, dict) and "host_bytes" in predictions:  # else "is missing" is reported
        fields.append((("predictions",), "host_peak_bytes", predictions["host_bytes"]))
    return fields


def _with_added_fields(data: dict) -> dict:
    """Fill in fields added to v1 after plans were written, with what those plans meant (a copy; the
    caller's data is not changed). A section that is not an object is left for the decoder to report."""
    out = data
    for path, key, value in _added_fields(data):
        out = _filled(out, path, key, value)
    return out


def plan_digest(plan: Plan) -> str:
    """The sha256 that names a plan in run.json and in checkpoints: of its JSON without the fields added
    to v1 later where they hold what a file without them means. So a field added to the format does not
    make a newer chunkft refuse the runs and checkpoints an older one recorded for the same plan."""
    data = plan_to_dict(plan)
    for path, key, value in _added_fields(data):
        section = functools.reduce(lambda d, k: d[k], path, data)
        if section.get(key) == value:
            del section[key]
    return hashlib.sha256(json.dumps(data, separators=(",", ":")).encode()).hexdigest()


def plan_digests(plan: Plan) -> tuple[str, str]:
    """Every digest a record of this plan may carry: plan_digest, and the sha256 of its canonical JSON
    (what chunkft-run recorded before plan_digest, which changes whenever a field is added)."""
    return plan_digest(plan), hashlib.sha256(plan_to_json(plan).encode()).hexdigest()


# What a training run's numbers depend on, so a checkpoint can continue under another plan with the same
# trajectory: the same model, windows, rotation, optimizer, schedule, batches and numerics. Left out:
# the hardware (rank count, GPU, budgets), where states wait and how they are copied, activation
# checkpointing (recomputation is exact), evaluation and checkpoint intervals, and the predictions.
_TRAJECTORY_RUN_FIELDS = (
    "seq_len", "micro_batch_size", "grad_accum_steps", "total_steps", "seed", "weight_dtype",
    "compute_dtype", "master_dtype", "attn_implementation", "chunked_cross_entropy", "optimizer",
    "schedule", "padded_batches",
)  # fmt: skip


def trajectory_digest(plan: Plan) -> str:
    """sha256 of what decides the training trajectory (_TRAJECTORY_RUN_FIELDS and the rest below).

    Data parallel splits a step's micro-batches over the ranks without changing them, so plans for
    1 and for N ranks of one run share this digest, and a checkpoint of one resumes under the other."""
    data = plan_to_dict(plan)
    model, run = data["model"], data["run"]
    kept = {
        "model": {k: model[k] for k in ("fingerprint", "task", "num_labels")},
        "run": {k: run[k] for k in _TRAJECTORY_RUN_FIELDS},
        "chunk_table": data["chunk_table"],
        "rotation": data["rotation"],
        "host_state_dtype": data["placement"]["host_state_dtype"],
    }
    return hashlib.sha256(json.dumps(kept, separators=(",", ":")).encode()).hexdigest()


def _filled(data: dict, path: tuple[str, ...], key: str, value: object) -> dict:
    """data with `key` set to `value` in the object at `path` when that object lacks it (copies along
    the path keep the objects' record of repeated keys)."""
    if not path:
        if key in data:
            return data
        return _copy_object(data, {**data, key: value})
    inner = data.get(path[0])
    if not isinstance(inner, dict):
        return data
    filled = _filled(inner, path[1:], key, value)
    return data if filled is inner else _copy_object(data, {**data, path[0]: filled})


def _copy_object(original: dict, items: dict) -> _JsonObject:
    out = _JsonObject(items)
    out.duplicates = getattr(original, "duplicates", ())
    return out


def _check_keys(data: dict, known: list[str], path: str, problems: list[str]) -> None:
    for k in getattr(data, "duplicates", ()):
        problems.append(f"{_join(path, k)} is given more than once")
    for k in data:
        if k not in known:
            problems.append(f"{_join(path, k)} is not a known field (known: {', '.join(known)})")
    for k in known:
        if k not in data:
            problems.append(f"{_join(path, k)} is missing")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(tp: object) -> tuple[str, tuple]:
    """Classify a field type: optional, pairs (JSON object), tuple (variable), fixed, literal, scalar."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return "optional", (inner,)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            elem = args[0]
            e_args = typing.get_args(elem)
            if (
                typing.get_origin(elem) is tuple
                and len(e_args) == 2
                and e_args[0] is str
                and e_args[1] is not ...
            ):
                return "pairs", e_args
            return "tuple", (elem,)
        return "fixed", args
    if origin is Literal:
        return "literal", args
    return "scalar", ()


def _decode(value: object, tp: object, path: str, problems: list[str]) -> object:
    """Check value against the field type; record problems with their paths; return the typed value."""
    if isinstance(value, _NonFinite):
        problems.append(f"{path} must be a finite number, got {value.text}")
        return _BAD
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{path} must be an object, got {_describe(value)}")
            return _BAD
        fields = dataclasses.fields(tp)
        before = len(problems)
        _check_keys(value, [f.name for f in fields], path, problems)
        hints = _hints(tp)
        kwargs = {
            f.name: _decode(value[f.name], hints[f.name], _join(path, f.name), problems)
            for f in fields
            if f.name in value
        }
        return _BAD if len(problems) > before else tp(**kwargs)  # type: ignore[operator]
    kind, args = _kind(tp)
    if kind == "optional":
        return None if value is None else _decode(value, args[0], path, problems)
    if kind == "pairs":
        if not isinstance(value, dict):
            problems.append(f"{path} must be an object, got {_describe(value)}")
            return _BAD
        for k in getattr(value, "duplicates", ()):
            problems.append(f"{path}.{k} is given more than once")
        before = len(problems)
        out = tuple((k, _decode(v, args[1], f"{path}.{k}", problems)) for k, v in value.items())
        return _BAD if len(problems) > before else out
    if kind in ("tuple", "fixed"):
        if not isinstance(value, list):
            problems.append(f"{path} must be a list, got {_describe(value)}")
            return _BAD
        if kind == "fixed" and len(value) != len(args):
            problems.append(f"{path} must be a list of {len(args)} values, got {len(value)}")
            return _BAD
        elem_types = args if kind == "fixed" else args * len(value)
        before = len(problems)
        pairs = enumerate(zip(value, elem_types, strict=True))
        out = tuple(_decode(v, t, f"{path}[{i}]", problems) for i, (v, t) in pairs)
        return _BAD if len(problems) > before else out
    if kind == "literal":
        if not isinstance(value, str) or value not in args:
            allowed = ", ".join(repr(a) for a in args)
            problems.append(f"{path} must be one of {allowed}, got {_describe(value)}")
            return _BAD
        return value
    return _decode_scalar(value, tp, path, problems)


def _decode_scalar(value: object, tp: object, path: str, problems: list[str]) -> object:
    is_num = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and is_num and isinstance(value, int):
        return value
    if tp is float and is_num:
        if not math.isfinite(value):  # type: ignore[arg-type]
            problems.append(f"{path} must be a finite number, got {value!r}")
            return _BAD
        return float(value)  # type: ignore[arg-type]
    if tp is str and isinstance(value, str):
        return value
    want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[tp]  # type: ignore[index]
    problems.append(f"{path} must be {want}, got {_describe(value)}")
    return _BAD


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return json.dumps(value if len(value) <= 40 else value[:40] + "…", ensure_ascii=False)
    return json.dumps(value)


# ---------------------------------------------------------------------------------------------------
# Semantic checks, per section and across sections (run on every section that is well-typed)


def _need(cond: bool, problems: list[str], message: str) -> None:
    if not cond:
        problems.append(message)


def _check_model(m: ModelIdentity, p: str, problems: list[str]) -> None:
    _need(m.name != "", problems, f"{p}.name must not be empty")
    _need(m.architecture != "", problems, f"{p}.architecture must not be empty")
    _need(m.num_params > 0, problems, f"{p}.num_params must be > 0, got {m.num_params}")
    _need(
        len(m.fingerprint) == 64 and all(c in "0123456789abcdef" for c in m.fingerprint),
        problems,
        f"{p}.fingerprint must be 64 lowercase hex digits (sha256), got {_describe(m.fingerprint)}",
    )
    if m.source in ("hf-dir", "hf-config"):
        _need(bool(m.path), problems, f"{p}.path must name the model directory when source is {m.source!r}")
    if m.task == "sequence-classification":
        _need(
            m.num_labels is not None and m.num_labels >= 1,
            problems,
            f"{p}.num_labels must be >= 1 for task 'sequence-classification', got {m.num_labels}",
        )
    else:
        _need(m.num_labels is None, problems, f"{p}.num_labels must be null for task '{m.task}'")


def _check_hardware(h: Hardware, p: str, problems: list[str]) -> None:
    _need(h.gpu != "", problems, f"{p}.gpu must not be empty")
    _need(h.num_gpus >= 1, problems, f"{p}.num_gpus must be >= 1, got {h.num_gpus}")
    for name in ("memory_total_bytes", "budget_bytes", "host_budget_bytes"):
        _need(getattr(h, name) > 0, problems, f"{p}.{name} must be > 0, got {getattr(h, name)}")
    _need(h.reserve_bytes >= 0, problems, f"{p}.reserve_bytes must be >= 0, got {h.reserve_bytes}")
    _need(h.headroom_bytes >= 0, problems, f"{p}.headroom_bytes must be >= 0, got {h.headroom_bytes}")
    total = h.memory_total_bytes
    _need(
        h.budget_bytes <= total,
        problems,
        f"{p}.budget_bytes must be <= memory_total_bytes = {total} (the budget is per GPU), "
        f"got {h.budget_bytes}",
    )
    _need(
        h.reserve_bytes < h.budget_bytes,
        problems,
        f"{p}.reserve_bytes must be < budget_bytes = {h.budget_bytes}, got {h.reserve_bytes}",
    )
    _need(
        h.reserve_bytes + h.headroom_bytes < h.budget_bytes,
        problems,
        f"{p}.reserve_bytes + headroom_bytes must be < budget_bytes = {h.budget_bytes}, "
        f"got {h.reserve_bytes + h.headroom_bytes}",
    )


def _check_run(r: RunSettings, p: str, problems: list[str]) -> None:
    for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "total_steps"):
        _need(getattr(r, name) >= 1, problems, f"{p}.{name} must be >= 1, got {getattr(r, name)}")
    for name in ("seed", "eval_every", "checkpoint_every"):
        _need(getattr(r, name) >= 0, problems, f"{p}.{name} must be >= 0, got {getattr(r, name)}")
    o, op = r.optimizer, f"{p}.optimizer"
    _need(math.isfinite(o.lr) and o.lr > 0, problems, f"{op}.lr must be > 0, got {o.lr!r}")
    for i, b in enumerate(o.betas):
        _need(0.0 <= b < 1.0, problems, f"{op}.betas[{i}] must be in [0, 1), got {b!r}")
    _need(o.eps > 0, problems, f"{op}.eps must be > 0, got {o.eps!r}")
    _need(o.weight_decay >= 0, problems, f"{op}.weight_decay must be >= 0, got {o.weight_decay!r}")
    _need(0.0 <= o.momentum < 1.0, problems, f"{op}.momentum must be in [0, 1), got {o.momentum!r}")
    if o.nesterov:
        _need(
            o.name == "sgd" and o.momentum > 0,
            problems,
            f"{op}.nesterov needs optimizer 'sgd' with momentum > 0",
        )
    if o.max_grad_norm is not None:
        _need(
            o.max_grad_norm > 0, problems, f"{op}.max_grad_norm must be > 0 or null, got {o.max_grad_norm!r}"
        )
    if o.weight_decay_mode == "compensated":
        # SGD's weight decay is coupled (added to the gradient), so the decoupled compensation does not apply
        _need(o.name == "adamw", problems, f"{op}.weight_decay_mode 'compensated' needs optimizer 'adamw'")
        _need(
            o.lr * o.weight_decay < 1.0,
            problems,
            f"{op}.weight_decay_mode 'compensated' needs lr * weight_decay < 1 (the factor (1 - lr * "
            f"weight_decay) ** K must stay positive), got {o.lr * o.weight_decay!r}",
        )
    _need(
        _alloc_conf_ok(r.cuda_alloc_conf),
        problems,
        f"{p}.cuda_alloc_conf must be empty or comma-separated key:value settings (e.g. "
        f'"expandable_segments:True"), got {_describe(r.cuda_alloc_conf)}',
    )
    s, sp = r.schedule, f"{p}.schedule"
    _need(s.warmup_steps >= 0, problems, f"{sp}.warmup_steps must be >= 0, got {s.warmup_steps}")
    _need(
        s.warmup_steps <= s.total_steps,
        problems,
        f"{sp}.warmup_steps must be <= total_steps = {s.total_steps}, got {s.warmup_steps}",
    )
    _need(
        0.0 <= s.min_lr_ratio <= 1.0, problems, f"{sp}.min_lr_ratio must be in [0, 1], got {s.min_lr_ratio!r}"
    )
    # The schedule counts every optimizer step (the reference advanced it once per K steps: defect 3).
    _need(
        s.total_steps == r.total_steps,
        problems,
        f"{sp}.total_steps must equal {p}.total_steps = {r.total_steps}, got {s.total_steps}",
    )


def _alloc_conf_ok(conf: str) -> bool:
    """PYTORCH_CUDA_ALLOC_CONF syntax: "" or "key:value[,key:value...]" without spaces."""
    if conf == "":
        return True
    items = [item.split(":") for item in conf.split(",")]
    return all(len(kv) == 2 and all(x and not any(c.isspace() for c in x) for x in kv) for kv in items)


def _check_chunk_table(ct: ChunkTable, p: str, problems: list[str]) -> None:
    _need(
        ct.state_bytes_per_element >= 0,
        problems,
        f"{p}.state_bytes_per_element must be >= 0, got {ct.state_bytes_per_element}",
    )
    _need(len(ct.params) > 0, problems, f"{p}.params must not be empty")
    _need(len(ct.chunks) > 0, problems, f"{p}.chunks must not be empty")
    index: dict[str, int] = {}
    for i, s in enumerate(ct.params):
        sp = f"{p}.params[{i}]"
        if s.name in index:
            problems.append(f"{sp}.name {_describe(s.name)} repeats {p}.params[{index[s.name]}]")
        else:
            index[s.name] = i
        _need(s.name != "", problems, f"{sp}.name must not be empty")
        for d, n in enumerate(s.shape):
            _need(n >= 1, problems, f"{sp}.shape[{d}] must be >= 1, got {n}")
        _need(
            s.dtype in DTYPE_BYTES,
            problems,
            f"{sp}.dtype must be one of {', '.join(repr(k) for k in DTYPE_BYTES)}, got {_describe(s.dtype)}",
        )

    # Every slice that names a known parameter, clipped to its rows, with its path.
    covered: dict[str, list[tuple[int, int, str]]] = {name: [] for name in index}
    stream: list[tuple[str, int, int, str]] = []
    for k, ch in enumerate(ct.chunks):
        cp = f"{p}.chunks[{k}]"
        _need(
            ch.index == k,
            problems,
            f"{cp}.index must be {k} (chunks are listed in stream order), got {ch.index}",
        )
        _need(len(ch.slices) > 0, problems, f"{cp}.slices must not be empty")
        for j, sl in enumerate(ch.slices):
            sp = f"{cp}.slices[{j}]"
            if sl.name not in index:
                problems.append(f"{sp}.name {_describe(sl.name)} is not in {p}.params")
                continue
            rows = ct.params[index[sl.name]].rows
            _need(sl.row_start >= 0, problems, f"{sp}.row_start must be >= 0, got {sl.row_start}")
            _need(
                sl.row_end <= rows,
                problems,
                f"{sp}.row_end must be <= {rows} (rows of {sl.name}), got {sl.row_end}",
            )
            if sl.row_start >= sl.row_end:
                problems.append(f"{sp} is empty: row_start {sl.row_start} must be < row_end {sl.row_end}")
                continue
            if ct.policy == "whole" and (sl.row_start, sl.row_end) != (0, rows):
                problems.append(
                    f"{sp} takes rows {sl.row_start}:{sl.row_end} of {sl.name} ({rows} rows) but "
                    f"{p}.policy is 'whole'"
                )
            lo, hi = max(sl.row_start, 0), min(sl.row_end, rows)
            covered[sl.name].append((lo, hi, sp))
            stream.append((sl.name, lo, hi, sp))

    coverage_ok = True
    for name, spans in covered.items():
        rows = ct.params[index[name]].rows
        spans.sort()
        end, end_path = 0, ""
        for lo, hi, sp in spans:
            if lo < end:
                coverage_ok = False
                problems.append(f"{sp} rows {lo}:{min(hi, end)} of {name} are also in {end_path}")
            elif lo > end:
                coverage_ok = False
                problems.append(f"rows {end}:{lo} of {name} are in no chunk")
            if hi > end:
                end, end_path = hi, sp
        if end < rows:
            coverage_ok = False
            problems.append(
                f"rows {end}:{rows} of {name} are in no chunk" if end else f"{name} is in no chunk"
            )
    if not coverage_ok:
        return
    # Each row is in exactly one chunk; now the slices must also follow the stream (params) order.
    pos = (0, 0)  # (param index, row)
    for name, lo, hi, sp in stream:
        if (index[name], lo) != pos:
            want = ct.params[pos[0]].name
            problems.append(
                f"{sp} ({name} rows {lo}:{hi}) is out of stream order: expected {want} from row {pos[1]}"
            )
            return
        rows = ct.params[index[name]].rows
        pos = (index[name] + 1, 0) if hi == rows else (index[name], hi)


def _check_rotation(r: Rotation, p: str, problems: list[str]) -> None:
    _need(r.seed >= 0, problems, f"{p}.seed must be >= 0, got {r.seed}")
    _need(r.update_interval >= 1, problems, f"{p}.update_interval must be >= 1, got {r.update_interval}")


def _check_checkpointing(c: Checkpointing, p: str, problems: list[str]) -> None:
    if c.mode == "selected":
        _need(len(c.layers) > 0, problems, f"{p}.layers must not be empty when mode is 'selected'")
    else:
        _need(len(c.layers) == 0, problems, f"{p}.layers must be empty when mode is '{c.mode}'")
    _need(all(x >= 0 for x in c.layers), problems, f"{p}.layers must be >= 0")
    _need(
        list(c.layers) == sorted(set(c.layers)), problems, f"{p}.layers must be increasing, without repeats"
    )


def _check_prefetch(ops: tuple[PrefetchOp, ...], p: str, problems: list[str]) -> None:
    for i, op in enumerate(ops):
        _need(op.bytes > 0, problems, f"{p}[{i}].bytes must be > 0, got {op.bytes}")
        _need(op.issue_after != "", problems, f"{p}[{i}].issue_after must not be empty")
        _need(op.needed_by != "", problems, f"{p}[{i}].needed_by must not be empty")


def _check_predictions(pr: Predictions, p: str, problems: list[str]) -> None:
    for name in ("peak_bytes", "reserve_bytes", "host_bytes"):
        _need(getattr(pr, name) >= 0, problems, f"{p}.{name} must be >= 0, got {getattr(pr, name)}")
    _need(
        pr.host_peak_bytes >= pr.host_bytes,
        problems,
        f"{p}.host_peak_bytes must be >= host_bytes = {pr.host_bytes} (it adds what a checkpoint "
        f"holds), got {pr.host_peak_bytes}",
    )
    for cat, b in pr.peak_by_category:
        _need(
            cat in CATEGORIES,
            problems,
            f"{p}.peak_by_category.{cat} is not a memory category (categories: {', '.join(CATEGORIES)})",
        )
        _need(b >= 0, problems, f"{p}.peak_by_category.{cat} must be >= 0, got {b}")
    total = sum(b for _, b in pr.peak_by_category)
    _need(
        total == pr.peak_bytes,
        problems,
        f"{p}.peak_by_category must sum to peak_bytes = {pr.peak_bytes}, sums to {total}",
    )
    _need(pr.step_seconds > 0, problems, f"{p}.step_seconds must be > 0, got {pr.step_seconds!r}")
    _need(
        pr.tokens_per_second > 0, problems, f"{p}.tokens_per_second must be > 0, got {pr.tokens_per_second!r}"
    )
    _need(
        0.0 < pr.compute_efficiency <= 1.0,
        problems,
        f"{p}.compute_efficiency must be in (0, 1], got {pr.compute_efficiency!r}",
    )


def _check_alternatives(alts: tuple[Alternative, ...], p: str, problems: list[str]) -> None:
    for i, a in enumerate(alts):
        _need(a.label != "", problems, f"{p}[{i}].label must not be empty")
        _need(a.k >= 1, problems, f"{p}[{i}].k must be >= 1, got {a.k}")
        for name in ("peak_bytes", "step_seconds", "tokens_per_second"):
            _need(getattr(a, name) >= 0, problems, f"{p}[{i}].{name} must be >= 0, got {getattr(a, name)!r}")


def _check_created_by(c: str, p: str, problems: list[str]) -> None:
    _need(c != "", problems, f"{p} must not be empty")


_SECTION_CHECKS: dict[str, typing.Callable[[typing.Any, str, list[str]], None]] = {
    "created_by": _check_created_by,
    "model": _check_model,
    "hardware": _check_hardware,
    "run": _check_run,
    "chunk_table": _check_chunk_table,
    "rotation": _check_rotation,
    "checkpointing": _check_checkpointing,
    "prefetch": _check_prefetch,
    "predictions": _check_predictions,
    "alternatives": _check_alternatives,
}


def _cross_checks(v: dict[str, typing.Any], problems: list[str]) -> None:
    """Checks between sections, each run when the sections it reads are well-typed."""
    model, hw, ct = v.get("model"), v.get("hardware"), v.get("chunk_table")
    rot, pl, ops, pr = v.get("rotation"), v.get("placement"), v.get("prefetch"), v.get("predictions")
    if model is not None and ct is not None:
        trainable = sum(s.numel for s in ct.params)
        _need(
            trainable <= model.num_params,
            problems,
            f"model.num_params must be >= the {trainable} elements of chunk_table.params, "
            f"got {model.num_params}",
        )
    run = v.get("run")
    if run is not None and run.cross_entropy != "auto":
        _need(
            run.chunked_cross_entropy == (run.cross_entropy == "chunked"),
            problems,
            f"run.chunked_cross_entropy must be {str(run.cross_entropy == 'chunked').lower()} when "
            f"run.cross_entropy is \"{run.cross_entropy}\"",
        )
    if rot is not None and ct is not None:
        k = len(ct.chunks)
        seq = rot.sequence
        if sorted(seq) != list(range(k)):
            missing = sorted(set(range(k)) - set(seq))
            extra = sorted({x for x in seq if not 0 <= x < k})
            repeated = sorted({x for x in seq if seq.count(x) > 1})
            detail = "; ".join(
                f"{label} {', '.join(map(str, xs))}"
                for label, xs in (("missing", missing), ("out of range", extra), ("repeated", repeated))
                if xs
            )
            problems.append(f"rotation.sequence must list each chunk index 0..{k - 1} once ({detail})")
        elif rot.order == "bottom-up":
            _need(
                list(seq) == list(range(k)),
                problems,
                f"rotation.sequence must be 0..{k - 1} in order for 'bottom-up'",
            )
        elif rot.order == "top-down":
            _need(
                list(seq) == list(range(k))[::-1],
                problems,
                f"rotation.sequence must be {k - 1}..0 in order for 'top-down'",
            )
    if pl is not None and hw is not None:
        _need(
            hw.parallel == "none" or not any(pl.layer_gpu),
            problems,
            "placement.layer_gpu must be all 0 when hardware.parallel is 'data' or 'shard' (each rank runs "
            "every layer)",
        )
        for i, g in enumerate(pl.layer_gpu):
            _need(
                0 <= g < hw.num_gpus,
                problems,
                f"placement.layer_gpu[{i}] must be in 0..{hw.num_gpus - 1} (hardware.num_gpus), got {g}",
            )
    if pl is not None:
        _need(
            pl.state_store == "host" or pl.optimizer_states == "host",
            problems,
            "placement.state_store \"disk\" needs placement.optimizer_states \"host\" (the disk tier holds "
            "the host tier's states)",
        )
    if ops is not None and ct is not None:
        for i, op in enumerate(ops):
            _need(
                0 <= op.chunk < len(ct.chunks),
                problems,
                f"prefetch[{i}].chunk must be in 0..{len(ct.chunks) - 1}, got {op.chunk}",
            )
    if ops is not None and pl is not None:
        _need(
            pl.prefetch or not ops,
            problems,
            f"prefetch lists {len(ops)} copies but placement.prefetch is false",
        )
    if pr is not None and hw is not None:
        used = pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes
        _need(
            used <= hw.budget_bytes,
            problems,
            f"predictions.peak_bytes + reserve_bytes + hardware.headroom_bytes = {used} must be <= "
            f"hardware.budget_bytes = {hw.budget_bytes}: the plan does not fit; re-plan",
        )
        _need(
            pr.host_peak_bytes <= hw.host_budget_bytes,
            problems,
            f"predictions.host_peak_bytes = {pr.host_peak_bytes} must be <= hardware.host_budget_bytes = "
            f"{hw.host_budget_bytes}",
        )
