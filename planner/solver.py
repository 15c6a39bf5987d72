"""The solver: enumerate ChunkFT settings, simulate each, keep the fastest that fits; baselines alike.

Objective: least predicted seconds per trained token subject to (per GPU) allocated peak + reserve +
headroom <= budget and host peak bytes (state stores plus a checkpoint) <= host budget. Every number
comes from planner/simulator.py, so the solver and the simulator cannot disagree; the plan written is
re-simulated from the plan file itself before saving.

Search space: K in powers of two (as many as the rows allow), activation checkpointing none / all /
the first n blocks (n found by bisection: the bottom blocks are the ones only bottom windows
backpropagate through, so checkpointing them costs the least recompute), micro-batch x accumulation
splits of the global batch, optimizer states on the host with two slots (prefetch) or one, or on the
GPU; the plain loss or chunked cross-entropy (executor/loss.py) where the logits are large; the update
interval (choose_update_interval).
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from chunkft.chunks import DTYPE_BYTES, Chunk, partition
from chunkft.executor.loss import DEFAULT_CHUNK_TOKENS
from chunkft.planner.costs import CostModel
from chunkft.planner.profile_model import ActivationProfile, EdgeKey, ModelStructure
from chunkft.planner.simulator import (
    HEADROOM_FIXED_BYTES,
    HEADROOM_FRACTION,
    Candidate,
    Setup,
    SimResult,
    Window,
    edge_patterns,
    forward_seconds_per_token,
    hiding_interval,
    simulate,
    windows_of,
)

# Optimizer steps per visit of a window when the run is long enough (choose_update_interval). Measured
# (bench/results/peers.md, update-interval study: small-llama-20m, 120 steps, lr tuned per row): held-out
# loss K=4: 3.075 at 1 step per visit, 2.757 at 3, 2.624 at 10, 2.623 at 30; K=8: 3.162, 2.806, 2.725,
# 2.769 (dense AdamW: 2.566). Adam's moments need a few steps on a window before its updates are good.
VISIT_STEPS = 10
MIN_CYCLES = 2  # every window is visited at least this often in the run
# What the plan asks chunkft-run to set as PYTORCH_CUDA_ALLOC_CONF on GPUs: expandable segments grow a
# segment in place instead of caching fixed-size ones, so freed activations and the state slots' turnover
# do not leave fragments between segments (less of the reserve's FRAGMENTATION is lost that way).
CUDA_ALLOC_CONF = "expandable_segments:True"
CHUNKED_CE_MIN_SHARE = 0.01  # auto: chunked cross-entropy is tried when full logits are >= 1% of the budget
K_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# Predictions within 1% of the fastest are a tie the cost model cannot resolve (its error is larger):
# among them the fewer windows win (each visit builds Adam's moments longer), then the lower peak.
TIE_TOLERANCE = 0.01
# The activation tables the solver simulates with: (micro-batch, chunk_tokens or None for the plain
# loss, the window-edge patterns the table must hold) -> a complete table. planner.profile_model's
# tables_for traces them; a test can hand the solver made-up ones.
Tables = Callable[[int, int | None, frozenset[EdgeKey]], ActivationProfile]
TIE_RULE = (
    f"the least time to update every parameter once (K x step time); within {TIE_TOLERANCE:.0%} of the "
    "fastest is a tie, won by fewer chunks, then the lower peak"
)


@dataclass(frozen=True)
class Headroom:
    """A safety margin per GPU: fixed bytes plus a fraction of each candidate's predicted peak."""

    fixed_bytes: int = 0
    fraction: float = 0.0

    def text(self) -> str:
        """As --headroom takes it: "3%+256MiB", "5%", "1GiB", "0"."""
        parts = []
        if self.fraction:
            parts.append(f"{self.fraction * 100:g}%")
        if self.fixed_bytes or not parts:
            parts.append(_size_text(self.fixed_bytes))
        return "+".join(parts)


def _size_text(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


DEFAULT_HEADROOM = Headroom(HEADROOM_FIXED_BYTES, HEADROOM_FRACTION)  # on GPUs; why: planner/simulator.py
NO_HEADROOM = Headroom()  # --gpu cpu: the host CPU has no CUDA allocator, workspaces or context


@dataclass(frozen=True)
class Limits:
    """What a plan must fit in (per GPU)."""

    gpu_budget_bytes: int  # per GPU, what peak + reserve + headroom may reach
    host_budget_bytes: int


@dataclass(frozen=True)
class Option:
    """One simulated configuration."""

    label: str
    candidate: Candidate
    result: SimResult
    num_chunks: int
    feasible: bool

    @property
    def seconds_per_token(self) -> float:
        s = self.result.step
        return s.step_seconds / s.tokens_per_step

    @property
    def rotation_seconds_per_token(self) -> float:
        """Seconds per token to update every parameter once: K steps of ChunkFT are one full update.

        The solver minimises this: per step, more windows always look faster (backward stops higher,
        fewer bytes move) while each step trains a smaller part of the model.
        """
        return self.seconds_per_token * self.num_chunks

    @property
    def checkpoint_mode(self) -> str:
        n = len(self.candidate.checkpoint_layers)
        if n == 0:
            return "none"
        return "selected" if n < self.num_layers else "all"

    num_layers: int = 0

    def placement_text(self) -> str:
        c = self.candidate
        loss = ", chunked CE" if c.chunk_tokens is not None else ""
        if c.states_on == "gpu":
            return "states gpu" + loss
        text = f"states host {c.host_state_dtype}"
        if c.synchronous_copies:
            return text + ", synchronous copies" + loss
        return text + (", prefetch" if c.prefetch else ", one slot") + loss


@dataclass(frozen=True)
class Solution:
    best: Option | None
    runners_up: tuple[Option, ...]
    baselines: tuple[Option, ...]
    smallest: Option | None  # the feasible-anywhere option with the least budget needed (for errors)


@dataclass(frozen=True)
class Space:
    """What the user fixed and what the solver may choose."""

    global_batch: int
    micro_batch: int | None = None
    grad_accum: int | None = None
    num_chunks: int | None = None
    checkpointing: str = "auto"  # none | all | auto
    rotation: str = "bottom-up"
    rotation_seed: int = 0
    update_interval: int | None = None  # optimizer steps per visit; None: the solver chooses
    total_steps: int = 0  # optimizer steps of the run (bounds the chosen update interval)
    cross_entropy: str = "auto"  # full | chunked | auto (see Solver.loss_options)
    layer_gpu: tuple[int, ...] = ()
    ranks: int = 1  # data-parallel ranks (planner.simulator.Candidate.ranks)
    layout: str = "data"  # how the ranks hold the weights: "data" (whole) or "shard" (Candidate.layout)
    placements: tuple[tuple[str, str, bool], ...] = (
        ("host", "float32", True),
        ("host", "float32", False),
        ("gpu", "float32", False),
    )


def rotation_sequence(order: str, k: int, seed: int) -> tuple[int, ...]:
    """The first cycle of window indices, drawn exactly as the executor draws it (random orders draw a
    fresh permutation every cycle; the plan records the first)."""
    from chunkft.executor.rotation import RotationSpec, cycle_order

    return cycle_order(RotationSpec(order=order, update_interval=1, seed=seed), k, 0)  # type: ignore[arg-type]


def choose_update_interval(num_chunks: int, total_steps: int, hiding: int) -> int:
    """Optimizer steps per visit of a window: long enough to hide the state copies behind compute
    (`hiding`, from the simulator) and for Adam's moments to build within a visit (VISIT_STEPS), short
    enough that every window is visited at least MIN_CYCLES times in the run."""
    if num_chunks <= 1:
        return 1
    u = max(hiding, VISIT_STEPS)
    if total_steps > 0:  # every window revisited: quality before hiding the copies
        u = min(u, max(1, total_steps // (num_chunks * MIN_CYCLES)))
    return u


def batch_splits(space: Space) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs whose product is the global batch."""
    b = space.global_batch
    if space.micro_batch is not None and space.grad_accum is not None:
        splits = [(space.micro_batch, space.grad_accum)]
    elif space.micro_batch is not None:
        splits = [(space.micro_batch, max(1, b // space.micro_batch))]
    elif space.grad_accum is not None:
        splits = [(max(1, b // space.grad_accum), space.grad_accum)]
    else:
        splits = [(m, b // m) for m in range(1, b + 1) if b % m == 0]
    # data parallel: every rank takes the same number of the step's micro-batches
    return [(m, a) for m, a in splits if a % space.ranks == 0]


def balance_layers(
    layer_bytes: Sequence[int], num_gpus: int, head_bytes: int = 0, embed_bytes: int = 0
) -> tuple[int, ...]:
    """Contiguous placement of blocks on GPUs with balanced weight bytes (embedding on the first GPU,
    head on the last)."""
    if num_gpus <= 1:
        return ()
    total = sum(layer_bytes) + head_bytes + embed_bytes
    target = total / num_gpus
    out, gpu, acc = [], 0, embed_bytes
    remaining = len(layer_bytes)
    for b in layer_bytes:
        if acc + b / 2 > target * (gpu + 1) and gpu < num_gpus - 1 and remaining > num_gpus - 1 - gpu:
            gpu += 1
        out.append(gpu)
        acc += b
        remaining -= 1
    return tuple(out)


class Solver:
    """Holds one request's fixed inputs and caches partitions and activation tables.

    The tables are complete before anything is simulated: the windows depend on K alone, so the edge
    patterns of every K the search may try are known up front (edges), and each (micro-batch, loss)
    table is built once with all of them (table). The simulator only reads them."""

    def __init__(self, setup: Setup, limits: Limits, tables: Tables, space: Space) -> None:
        self.setup = setup
        self.limits = limits
        self.tables = tables
        self.space = space
        self._chunks: dict[int, tuple[Chunk, ...] | None] = {}
        self._windows: dict[int, tuple[Window, ...]] = {}
        self._tables: dict[tuple[int, int | None], ActivationProfile] = {}
        self._edges: frozenset[EdgeKey] | None = None
        self._simulated: dict[Candidate, tuple[Candidate, SimResult]] = {}
        st = setup.structure
        self.state_bytes_per_element = 8 if setup.optimizer == "adamw" else (4 if setup.sgd_momentum else 0)
        self.num_layers = st.num_layers

    # -- pieces ---------------------------------------------------------------------------------------
    def k_choices(self) -> list[int]:
        return [self.space.num_chunks] if self.space.num_chunks else list(K_CHOICES)

    def chunks(self, k: int) -> tuple[Chunk, ...] | None:
        if k not in self._chunks:
            try:
                self._chunks[k] = partition(
                    list(self.setup.structure.specs),
                    num_chunks=k,
                    state_bytes_per_element=self.state_bytes_per_element,
                    keep_whole=frozenset(self.setup.structure.unsliceable),  # the executor refuses cuts
                )
            except ValueError:
                self._chunks[k] = None
        return self._chunks[k]

    def windows(self, k: int) -> tuple[Window, ...] | None:
        """K's windows, shared by every checkpointing and placement of that K (None: no partition)."""
        chunks = self.chunks(k)
        if chunks is None:
            return None
        if k not in self._windows:
            st = self.setup.structure
            self._windows[k] = windows_of(st, st.specs, chunks)
        return self._windows[k]

    def edges(self) -> frozenset[EdgeKey]:
        """The window-edge patterns of every K the search may try, and of the dense baseline (K=1)."""
        if self._edges is None:
            found: set[EdgeKey] = set()
            for k in {1, *self.k_choices()}:
                ws = self.windows(k)
                if ws is not None:
                    found |= edge_patterns(ws, self.num_layers)
            self._edges = frozenset(found)
        return self._edges

    def table(self, micro: int, chunk_tokens: int | None = None) -> ActivationProfile:
        """The activation table of every candidate with this micro-batch and loss."""
        key = (micro, chunk_tokens)
        if key not in self._tables:
            self._tables[key] = self.tables(micro, chunk_tokens, self.edges())
        return self._tables[key]

    def candidate(
        self,
        k: int,
        ckpt: tuple[int, ...],
        micro: int,
        accum: int,
        placement: tuple[str, str, bool],
        synchronous: bool = False,
        chunk_tokens: int | None = None,
    ) -> Candidate | None:
        windows = self.windows(k)
        if windows is None:
            return None
        states_on, host_dtype, prefetch = placement
        return Candidate(
            windows=windows,
            sequence=rotation_sequence(self.space.rotation, k, self.space.rotation_seed),
            checkpoint_layers=ckpt,
            micro_batch=micro,
            grad_accum=accum,
            states_on=states_on,
            host_state_dtype=host_dtype,
            prefetch=prefetch and states_on == "host" and k > 1,
            layer_gpu=self.space.layer_gpu,
            ranks=self.space.ranks,
            layout=self.space.layout,
            synchronous_copies=synchronous,
            chunk_tokens=chunk_tokens,
        )

    def evaluate(self, label: str, cand: Candidate) -> Option:
        if cand not in self._simulated:  # a re-solve under other limits simulates nothing again
            act = self.table(cand.micro_batch, cand.chunk_tokens)
            chosen = cand
            if not cand.synchronous_copies:
                chosen = replace(cand, update_interval=self.update_interval(cand, act))
            self._simulated[cand] = (chosen, simulate(self.setup, chosen, act))
        cand, res = self._simulated[cand]
        ok = (
            res.budget_needed_bytes <= self.limits.gpu_budget_bytes
            and res.host_machine_bytes <= self.limits.host_budget_bytes  # all the machine's ranks
        )
        return Option(label, cand, res, len(cand.windows), ok, self.num_layers)

    def update_interval(self, cand: Candidate, act: ActivationProfile) -> int:
        """The user's, or choose_update_interval's choice for this candidate."""
        if self.space.update_interval is not None:
            return self.space.update_interval
        return choose_update_interval(
            len(cand.windows), self.space.total_steps, hiding_interval(self.setup, cand, act)
        )

    # -- search ---------------------------------------------------------------------------------------
    def loss_options(self, micro: int) -> list[int | None]:
        """Chunk sizes of cross-entropy to try (None: the plain loss). auto tries chunked cross-entropy
        where the executor supports it and the full fp32 logits of a micro-batch are at least
        CHUNKED_CE_MIN_SHARE of the budget: below that it cannot change the plan much, and each loss
        option doubles the search."""
        mode = self.space.cross_entropy
        if mode == "full":
            return [None]
        # Sharded weights: chunked cross-entropy calls the decoder around the root FSDP module, whose
        # weights would stay sharded (executor/loss.py), so chunkft-run refuses the pair.
        supported = self.table(micro).chunked_loss_supported and self.space.layout != "shard"
        if mode == "chunked":
            if self.space.layout == "shard":
                raise ValueError(
                    "--cross-entropy chunked: not with sharded weights (chunkft-run calls the decoder "
                    "around FSDP's root); use --cross-entropy full or --parallel data"
                )
            if not supported:
                st = self.setup.structure
                raise ValueError(
                    f"--cross-entropy chunked: the executor has no chunked cross-entropy for "
                    f"{st.model_type} ({st.task}); use --cross-entropy full"
                )
            return [DEFAULT_CHUNK_TOKENS]
        st = self.setup.structure
        logits = micro * self.setup.seq_len * st.vocab_size * 4
        big = logits >= CHUNKED_CE_MIN_SHARE * self.limits.gpu_budget_bytes
        pieces = micro * self.setup.seq_len > DEFAULT_CHUNK_TOKENS  # one piece would be the full logits
        return [None, DEFAULT_CHUNK_TOKENS] if supported and big and pieces else [None]

    def _ckpt_options(
        self,
        k: int,
        micro: int,
        accum: int,
        placement: tuple[str, str, bool],
        chunk_tokens: int | None = None,
    ) -> list[Option]:
        L = self.num_layers
        mode = self.space.checkpointing
        out: list[Option] = []

        def opt(n: int) -> Option | None:
            cand = self.candidate(k, tuple(range(n)), micro, accum, placement, chunk_tokens=chunk_tokens)
            return None if cand is None else self.evaluate(f"K={k}", cand)

        if mode in ("none", "auto"):
            o = opt(0)
            if o is None:
                return []
            out.append(o)
            if o.feasible or mode == "none":
                return out
        full = opt(L)
        if full is None:
            return out
        out.append(full)
        if mode == "all" or not full.feasible:
            return out
        lo, hi = 0, L  # infeasible at lo (when known), feasible at hi
        best = full
        while hi - lo > 1:
            mid = (lo + hi) // 2
            o = opt(mid)
            assert o is not None
            if o.feasible:
                hi, best = mid, o
            else:
                lo = mid
        if best is not full:
            out.append(best)
        return out

    def solve(self) -> Solution:
        with _imports_frozen():
            return self._solve()

    def _solve(self) -> Solution:
        ks = self.k_choices()
        options: list[Option] = []
        fastest = float("inf")  # best feasible rotation seconds per token so far
        for micro, accum in batch_splits(self.space):
            floor = forward_seconds_per_token(self.setup, micro)
            for chunk_tokens in self.loss_options(micro):
                for placement in self.space.placements:
                    for k in ks:
                        # K steps of at least a full forward each: once that alone is slower than a
                        # feasible option, no larger K can win (K ascends); infeasible runs prune nothing
                        if k * floor > fastest * (1 + TIE_TOLERANCE):
                            break
                        found = self._ckpt_options(k, micro, accum, placement, chunk_tokens)
                        options.extend(found)
                        fastest = min([fastest, *(o.rotation_seconds_per_token for o in found if o.feasible)])
        feasible = sorted(
            (o for o in options if o.feasible),
            key=lambda o: (o.rotation_seconds_per_token, o.result.step.peak_bytes),
        )
        best = None
        if feasible:
            # Least time per token to update every parameter once (K x seconds per token); TIE_RULE.
            fastest = min(o.rotation_seconds_per_token for o in feasible)
            best = min(
                (o for o in feasible if o.rotation_seconds_per_token <= fastest * (1 + TIE_TOLERANCE)),
                key=lambda o: (o.num_chunks, o.result.step.peak_bytes, o.rotation_seconds_per_token),
            )
        runners: list[Option] = []
        seen = set()
        for o in feasible:
            if o is best:
                continue
            key = (o.num_chunks, o.checkpoint_mode, o.placement_text(), o.candidate.chunk_tokens)
            if key in seen or (
                best
                and key
                == (best.num_chunks, best.checkpoint_mode, best.placement_text(), best.candidate.chunk_tokens)
            ):
                continue
            seen.add(key)
            runners.append(o)
            if len(runners) == 3:
                break
        smallest = min(
            options, key=lambda o: (o.result.budget_needed_bytes, o.seconds_per_token), default=None
        )
        ref = best or smallest
        baselines = self._baselines(ref) if ref is not None else ()
        return Solution(best, tuple(runners), baselines, smallest)

    def _baselines(self, ref: Option) -> tuple[Option, ...]:
        """Dense AdamW (one window, everything on the GPU), ChunkFT with states on the GPU, and
        offloading with synchronous copies (what the reference implementation does)."""
        c = ref.candidate
        ck = c.checkpoint_layers
        out = []
        ce = c.chunk_tokens
        dense = self.candidate(1, ck, c.micro_batch, c.grad_accum, ("gpu", "float32", False), chunk_tokens=ce)
        if dense is not None:
            out.append(replace(self.evaluate("baseline: dense AdamW, no offload", dense)))
        gpu = self.candidate(
            ref.num_chunks, ck, c.micro_batch, c.grad_accum, ("gpu", "float32", False), chunk_tokens=ce
        )
        if gpu is not None:
            out.append(self.evaluate("baseline: ChunkFT, states on GPU", gpu))
        sync = self.candidate(
            ref.num_chunks,
            ck,
            c.micro_batch,
            c.grad_accum,
            ("host", "float32", False),
            synchronous=True,
            chunk_tokens=ce,
        )
        if sync is not None:
            out.append(self.evaluate("baseline: offload everything, synchronous copies", sync))
        return tuple(out)


@contextlib.contextmanager
def _imports_frozen() -> Iterator[None]:
    """The garbage collector leaves what exists before a solve alone during it (gc.freeze): a solve
    makes millions of short-lived objects, and each full collection would otherwise also walk the
    ~400k objects importing torch and transformers left (0.1-0.2 s each, a few per solve). Collection
    of new objects is unchanged, and everything is collectable again afterwards (gc.unfreeze). Nothing
    is done when the caller froze objects itself or disabled the collector."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@dataclass(frozen=True)
class Contender:
    """What the summary knows of an option: enough to say why it was not chosen."""

    k: int
    step_seconds: float  # per optimizer step (every option trains the same tokens per step)
    peak_bytes: int
    feasible: bool


def why_not_chosen(alt: Contender, chosen: Contender) -> str:
    """Why the solver passed over `alt` for `chosen`, by TIE_RULE (one clause, for the summary)."""
    if not alt.feasible:
        return "does not fit the budget"
    alt_rotation, chosen_rotation = alt.k * alt.step_seconds, chosen.k * chosen.step_seconds
    if alt_rotation > chosen_rotation:
        return (
            f"slower to update every parameter once: K={alt.k} x {alt.step_seconds * 1000:.1f} ms = "
            f"{alt_rotation * 1000:.1f} ms, the chosen K={chosen.k} x {chosen.step_seconds * 1000:.1f} ms = "
            f"{chosen_rotation * 1000:.1f} ms"
        )
    tie = f"within {TIE_TOLERANCE:.0%} of the chosen plan"
    if alt.k > chosen.k:
        return f"{tie}: the chosen plan has fewer chunks (K={chosen.k}, not {alt.k})"
    if alt.peak_bytes > chosen.peak_bytes:
        gib = 2**30
        return (
            f"{tie}: the chosen plan needs less memory ({chosen.peak_bytes / gib:.2f} GiB peak, "
            f"not {alt.peak_bytes / gib:.2f} GiB)"
        )
    return f"{tie}: equal on chunks and peak; the solver keeps the first it found"


def make_setup(
    structure: ModelStructure,
    cost: CostModel,
    *,
    weight_dtype: str,
    optimizer: str,
    sgd_momentum: bool,
    seq_len: int,
    on_gpu: bool,
    context_bytes: int | None = None,
    fragmentation: float | None = None,
    headroom: Headroom | None = None,
) -> Setup:
    """The request's shared simulator inputs; None takes the default reserve and headroom (on a GPU:
    CUDA_CONTEXT_BYTES + FRAGMENTATION of the peak, DEFAULT_HEADROOM; none on the host CPU)."""
    from chunkft.planner.simulator import CUDA_CONTEXT_BYTES, FRAGMENTATION

    if headroom is None:
        headroom = DEFAULT_HEADROOM if on_gpu else NO_HEADROOM
    if weight_dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown weight dtype {weight_dtype}")
    return Setup(
        structure=structure,
        cost=cost,
        weight_dtype=weight_dtype,
        optimizer=optimizer,
        sgd_momentum=sgd_momentum,
        seq_len=seq_len,
        context_bytes=(CUDA_CONTEXT_BYTES if on_gpu else 0) if context_bytes is None else context_bytes,
        fragmentation=(FRAGMENTATION if on_gpu else 0.0) if fragmentation is None else fragmentation,
        headroom_fixed_bytes=headroom.fixed_bytes,
        headroom_fraction=headroom.fraction,
    )


# ------------------------------------------------------------------------------------------ the plan


def build_plan(
    req,
    preset,
    gpu,
    dtype: str,
    structure: ModelStructure,
    setup: Setup,
    sol: Solution,  # type: ignore[no-untyped-def]
    budget: int,
    host_budget: int,
    measured=None,  # planner.costs.MeasuredRates of --calibrate, recorded in the plan's hardware
):
    """The v1 plan of the solver's best option (req: planner.cli.Request)."""
    from chunkft import plan_format as P
    from chunkft.planner.graph import prefetch_schedule
    from chunkft.planner.profile_model import default_padded, model_identity

    best = sol.best
    assert best is not None
    cand, res = best.candidate, best.result
    # the meta-device model profiles.build_model builds, as profile_model builds it (cached on disk)
    identity = model_identity(preset.config, preset.task, dtype)
    all_specs = identity.specs
    num_params = identity.num_params
    chunks = solver_chunks(structure, best.num_chunks, 8 if req.optimizer == "adamw" else 4)
    slots = 2 if cand.prefetch else 1
    ops = ()
    if cand.states_on == "host" and cand.prefetch:
        per_elt = (4 if dtype != "float32" else 0) + (8 if req.optimizer == "adamw" else 4)
        numel = {w.index: w.numel for w in cand.windows}
        ops = tuple(
            P.PrefetchOp(p.chunk, p.issue_after, p.needed_by, numel[p.chunk] * per_elt)
            for p in prefetch_schedule(cand.sequence, slots)
        )
    ck_mode = best.checkpoint_mode
    step = res.step
    o = P.OptimizerSettings(
        name=req.optimizer,
        lr=req.lr,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=req.weight_decay,
        momentum=0.9 if req.optimizer == "sgd" else 0.0,
        nesterov=False,
        max_grad_norm=req.max_grad_norm,
        weight_decay_mode=req.weight_decay_mode,
    )
    run = P.RunSettings(
        seq_len=req.seq_len,
        micro_batch_size=cand.micro_batch,
        grad_accum_steps=cand.grad_accum,
        total_steps=req.steps,
        seed=0,
        weight_dtype=dtype,
        compute_dtype=dtype,
        master_dtype="float32",
        attn_implementation=req.attn,
        chunked_cross_entropy=cand.chunk_tokens is not None,
        optimizer=o,
        schedule=P.ScheduleSettings(req.schedule, req.warmup_steps, req.steps, 0.0),
        eval_every=0,
        checkpoint_every=0,
        cuda_alloc_conf=CUDA_ALLOC_CONF if gpu.pcie_gen is not None else "",
        # what the activation profiles were traced with (chunkft-plan resolves None to the task's default)
        padded_batches=default_padded(preset.task) if req.padded_batches is None else req.padded_batches,
        cross_entropy=req.cross_entropy,
    )
    alts = tuple(
        P.Alternative(
            label=a.label if a.label.startswith("baseline") else f"runner-up: {a.placement_text()}",
            k=a.num_chunks,
            checkpointing=a.checkpoint_mode,
            placement=a.placement_text(),
            peak_bytes=a.result.step.peak_bytes,
            step_seconds=a.result.step.step_seconds,
            tokens_per_second=a.result.step.tokens_per_second,
            feasible=a.feasible,
        )
        for a in (*sol.runners_up, *sol.baselines)
    )
    return P.Plan(
        schema_version=P.SCHEMA_VERSION,
        created_by=P.CREATED_BY,
        model=P.ModelIdentity(
            name=req.model if preset.source != "hf-dir" else os.path.basename(os.path.normpath(preset.path)),
            source=preset.source,
            path=preset.path,
            task=preset.task,
            num_labels=int(preset.config.num_labels) if preset.task == "sequence-classification" else None,
            architecture=identity.architecture,
            num_params=num_params,
            fingerprint=P.fingerprint(all_specs),
        ),
        hardware=P.Hardware(
            gpu=gpu.key,
            gpu_name=gpu.name,
            num_gpus=req.num_gpus,
            memory_total_bytes=gpu.memory_total_bytes,
            budget_bytes=budget,
            reserve_bytes=step.reserve_bytes,
            host_budget_bytes=host_budget,
            headroom_bytes=res.headroom_bytes,
            measured_flops_per_s=0 if measured is None else measured.flops_per_s,
            measured_memory_bytes_per_s=0 if measured is None else measured.memory_bytes_per_s,
            reserve_given=req.reserve is not None,
            headroom_given="" if req.headroom is None else req.headroom.text(),
        ),
        run=run,
        chunk_table=P.ChunkTable("rows", 8 if req.optimizer == "adamw" else 4, structure.specs, chunks),
        rotation=P.Rotation(req.rotation, 0, cand.update_interval, cand.sequence),
        placement=P.Placement(
            optimizer_states=cand.states_on,
            host_state_dtype=cand.host_state_dtype,
            weights="resident",
            prefetch=cand.prefetch,
            layer_gpu=cand.layer_gpu,
        ),
        checkpointing=P.Checkpointing(ck_mode, cand.checkpoint_layers if ck_mode == "selected" else ()),
        prefetch=ops,
        predictions=P.Predictions(
            peak_bytes=step.peak_bytes,
            peak_by_category=step.peak_by_category,
            peak_cause=step.peak_cause,
            reserve_bytes=step.reserve_bytes,
            host_bytes=step.host_bytes,
            step_seconds=step.step_seconds,
            tokens_per_second=step.tokens_per_second,
            compute_efficiency=setup.cost.efficiency,
            host_peak_bytes=res.host_peak_bytes,
        ),
        alternatives=alts,
    )


def solver_chunks(structure: ModelStructure, k: int, state_bytes: int) -> tuple[Chunk, ...]:
    return partition(
        list(structure.specs),
        num_chunks=k,
        state_bytes_per_element=state_bytes,
        keep_whole=frozenset(structure.unsliceable),
    )


# ------------------------------------------------------------------------------------- budget sweep


@dataclass(frozen=True)
class BudgetPoint:
    """The solver's answer for one (GPU profile, per-GPU budget): its best option, or None if nothing fits."""

    gpu: str
    budget_bytes: int
    best: Option | None


def sweep(
    setups: Sequence[tuple[str, Setup]],
    space: Space,
    tables: Tables,
    budgets: Callable[[str], Sequence[int]] | Sequence[int],
    host_budget_bytes: int,
) -> tuple[BudgetPoint, ...]:
    """Re-solve the same request for every budget on every GPU profile: what the plan would be elsewhere.

    setups: (GPU label, Setup) pairs, e.g. one make_setup per GPU profile (the cost model and the
    reserve are what differ). budgets: the per-GPU budgets to try, or a function of the GPU label.
    Each point is a full Solver.solve(), so the curve is exactly what chunkft-plan would choose.

    Fast because nothing is profiled or partitioned twice: one Solver per GPU (its partition cache)
    re-solves with each budget's limits; one activation table per (micro-batch, loss, edges) is shared
    by every GPU and budget (it does not depend on either), and the simulator's compute profiles are
    cached per (setup, table). Budgets are solved from the largest down; once nothing fits, nothing fits below
    either (every candidate's need is independent of the budget, and the checkpointing search stops at
    "all layers" when that does not fit), so the rest are recorded as infeasible without solving.
    """
    built: dict[tuple[int, int | None, frozenset[EdgeKey]], ActivationProfile] = {}

    def shared(micro_batch: int, chunk_tokens: int | None, edges: frozenset[EdgeKey]) -> ActivationProfile:
        key = (micro_batch, chunk_tokens, edges)
        if key not in built:
            built[key] = tables(*key)
        return built[key]

    out: list[BudgetPoint] = []
    for label, setup in setups:
        wanted = budgets(label) if callable(budgets) else budgets
        points: dict[int, Option | None] = {}
        nothing_fits = False
        solver = Solver(setup, Limits(1, host_budget_bytes), shared, space)  # one per GPU: its partitions
        for budget in sorted(set(wanted), reverse=True):
            if budget <= 0:
                raise ValueError(f"sweep budgets must be positive, got {budget}")
            best = None
            if not nothing_fits:
                solver.limits = Limits(budget, host_budget_bytes)
                best = solver.solve().best
                nothing_fits = best is None
            points[budget] = best
        out.extend(BudgetPoint(label, b, points[b]) for b in sorted(points))
    return tuple(out)
