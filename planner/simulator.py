"""The one step simulator: every plan the solver considers, and every plan written, goes through here.

It replays one optimizer step of each window of the rotation on three lanes (compute, host-to-device,
device-to-host) with every allocation and free, in the memory categories the runner measures:

- weights: resident model weights (per GPU when layers are placed across GPUs);
- master / optimizer_states / prefetch: the executor's fp32 state slots (one for the active window, one
  for the prefetched next window, both sized for the largest window), or every window's states when they
  stay on the GPU;
- gradients: the active window's fp32 gradient buffers, created by the first backward that reaches each
  tensor and freed after the update;
- activations / temporaries: segments of the activation table (planner/profile_model.py, traced before
  solving) composed block by block.

The peak is the maximum over windows (the bottom window keeps every block's activations; others keep
less), the step time the mean over the rotation. Data parallel (Candidate.ranks > 1) replays one rank:
its share of the micro-batches, its shard of the slots and stores, the DP step's buffers (step_temps)
and the collectives on a fourth lane, "interconnect"; with sharded weights (Candidate.layout "shard",
FSDP2) also 1/N of the weights, the blocks gathered whole in flight and their gathers and gradient
reduce-scatters on that lane, overlapped with compute block by block (see "sharded weights"). Copies
follow the executor's transfer engine: one FIFO copy stream, the write-back of the previous window then
the fill of the one after next.

Pure: simulate(setup, candidate, table) reads its arguments only (nothing is traced here; a table that
lacks an edge pattern the candidate's windows need is refused, see edge_patterns), so the solver can be
tested on made-up tables. The caches below memoise by identity and never change a result.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate

from chunkft.chunks import DTYPE_BYTES, Chunk, ParamSpec
from chunkft.executor.distributed import NORM_PIECE
from chunkft.executor.safetensors_stream import PIECE_BYTES
from chunkft.planner.costs import CostModel
from chunkft.planner.graph import StepNode, step_order
from chunkft.planner.profile_model import (
    ActivationProfile,
    BlockMode,
    EdgeKey,
    EdgeMode,
    IncompleteTableError,
    ModelStructure,
    Segment,
    block_flops,
    group_positions,
    head_flops,
)
from chunkft.timeline import CATEGORIES, LaneEvent, MemorySample, StepSimulation

GIB = 2**30
MIB = 2**20
CUDA_CONTEXT_BYTES = 512 * MIB  # CUDA context + cuBLAS workspace, outside torch's allocated bytes
FRAGMENTATION = 0.05  # caching-allocator slack, as a fraction of the allocated peak

# The default safety margin on GPUs (--headroom), on top of peak + reserve; neither part was measured on
# a GPU (none was available), so both are allowances for what is known to be unknown:
# - HEADROOM_FRACTION of the predicted peak: the tested prediction bound. Predicted peaks are within 3%
#   of a FakeTensor trace of the executor's own step for every tested window (BENCHMARKS.md), on CPU.
# - HEADROOM_FIXED_BYTES for what no CPU trace sees and the reserve's two constants may not cover:
#   cuBLAS/cuBLASLt workspaces (up to 32 MiB each per handle and stream on Hopper, allocated through
#   torch's allocator), the granularity of expandable segments (2 MiB pages in the small pool, 20 MiB
#   in the large one, per stream: compute and the copy stream), SDPA/flash-attention and cuDNN
#   workspaces, a CUDA context larger than CUDA_CONTEXT_BYTES (it varies with the driver and lazy module
#   loading). Data parallel's NCCL communicators allocate their buffers outside torch's allocator (tens
#   to hundreds of MiB, never measured here): not in the peak, and not allowed for beyond this margin.
# For the 8B plan on a 4090 the two add up to 0.89 GiB of 23.99 GiB: 7 more checkpointed layers and 2.5%
# more time per step, against an OOM on the first real run (the plan without it left 40 MiB). The host
# CPU gets none (planner.solver.NO_HEADROOM): no CUDA allocator, workspaces or context there.
HEADROOM_FRACTION = 0.03
HEADROOM_FIXED_BYTES = 256 * MIB


@dataclass(frozen=True)
class Window:
    """One chunk as the simulator sees it."""

    index: int
    numel: int
    low: int  # lowest group with trainable rows: -1 embedding side, 0..L-1 block, L head side
    high: int
    max_slice_numel: int
    numel_by_group: tuple[tuple[int, int], ...]  # (group, elements of the window in that group)
    low_skip: int = 0  # tensors of group `low` before the window's first (0: from the group's start)
    high_skip: int = 0  # tensors of group `high` after the window's last (0: to the group's end)


def windows_of(
    structure: ModelStructure, specs: Sequence[ParamSpec], chunks: Sequence[Chunk]
) -> tuple[Window, ...]:
    """Windows from a chunk table; the groups come from the structure's parameter positions."""
    group = dict(zip((s.name for s in structure.specs), structure.spec_layer, strict=True))
    position = dict(zip((s.name for s in structure.specs), group_positions(structure), strict=True))
    group_size: dict[int, int] = {}
    for g in structure.spec_layer:
        group_size[g] = group_size.get(g, 0) + 1
    by_name = {s.name: s for s in specs}
    out = []
    for c in chunks:
        per: dict[int, int] = {}
        biggest = 0
        for sl in c.slices:
            n = sl.num_rows * by_name[sl.name].row_numel
            g = group[sl.name]
            per[g] = per.get(g, 0) + n
            biggest = max(biggest, n)
        first, last = c.slices[0].name, c.slices[-1].name
        out.append(
            Window(
                c.index,
                sum(per.values()),
                min(per),
                max(per),
                biggest,
                tuple(sorted(per.items())),
                low_skip=position[first],
                high_skip=group_size[group[last]] - 1 - position[last],
            )
        )
    return tuple(out)


@dataclass(frozen=True)
class Setup:
    """Everything about one planning request that the candidates share."""

    structure: ModelStructure
    cost: CostModel
    weight_dtype: str
    optimizer: str  # "adamw" | "sgd"
    sgd_momentum: bool
    seq_len: int
    context_bytes: int  # CUDA context per GPU (0 on the host CPU)
    fragmentation: float
    headroom_fixed_bytes: int = 0  # safety margin per GPU: this many bytes ...
    headroom_fraction: float = 0.0  # ... plus this fraction of the peak (see headroom_bytes)


@dataclass(frozen=True)
class Candidate:
    """The choices the solver makes, and the simulator checks."""

    windows: tuple[Window, ...]
    sequence: tuple[int, ...]  # rotation: window indices, one cycle
    checkpoint_layers: tuple[int, ...]
    micro_batch: int
    grad_accum: int
    states_on: str  # "host" | "gpu"
    host_state_dtype: str  # "float32" | "bfloat16"
    prefetch: bool  # two slots (next window fetched a step ahead) or one
    layer_gpu: tuple[int, ...] = ()  # GPU per block; empty: all on GPU 0
    synchronous_copies: bool = False  # baseline: copies exposed at the update, no overlap
    update_interval: int = 1  # optimizer steps per visit; the state copies happen once per visit
    chunk_tokens: int | None = None  # chunked cross-entropy in pieces of this many tokens; None: plain loss
    # data-parallel ranks (hardware.parallel "data"): each runs grad_accum // ranks of the step's
    # micro-batches on the whole model and owns 1/ranks of every window's flat elements (slots, stores)
    ranks: int = 1
    # how the ranks hold the weights: "data" every rank the whole model; "shard" (hardware.parallel
    # "shard", FSDP2 fully_shard per decoder layer and the root) 1/ranks of every tensor's rows, each
    # block gathered whole around its forward and backward (see shard_* below)
    layout: str = "data"

    @property
    def sharded(self) -> bool:
        """FSDP2-sharded weights on more than one rank."""
        return self.layout == "shard" and self.ranks > 1

    @property
    def num_gpus(self) -> int:
        return max(self.layer_gpu, default=0) + 1

    @property
    def rank_accum(self) -> int:
        """Micro-batches one rank runs per optimizer step (the executor keeps every ranks-th)."""
        return self.grad_accum // self.ranks


@dataclass(frozen=True)
class SimResult:
    """The simulation the plan records plus what the solver compares."""

    step: StepSimulation  # the worst window's timeline (on the GPU with the highest peak)
    per_gpu_peak_bytes: tuple[int, ...]
    worst_window: int
    budget_needed_bytes: int  # per GPU: peak + reserve + headroom of the worst GPU
    state_slot_bytes: int = 0
    headroom_bytes: int = 0  # the safety margin inside budget_needed_bytes
    host_peak_bytes: int = 0  # host_bytes + checkpoint_host_bytes (per rank: rank 0's)
    host_machine_bytes: int = 0  # every rank's host bytes together (host_machine_bytes): the host limit
    notes: tuple[str, ...] = field(default=())


def reserve_bytes(setup: Setup, peak: int) -> int:
    return setup.context_bytes + int(setup.fragmentation * peak)


def headroom_bytes(setup: Setup, peak: int) -> int:
    """The safety margin a plan keeps free on top of peak + reserve, because the peak is a prediction
    (tested to 3% on CPU) and the reserve two unmeasured constants (HEADROOM_FRACTION, HEADROOM_FIXED_BYTES
    say what the default covers)."""
    return setup.headroom_fixed_bytes + int(setup.headroom_fraction * peak)


# ------------------------------------------------------------------------------------------ helpers


def _state_kinds(setup: Setup, cand: Candidate) -> tuple[bool, int]:
    """(needs fp32 master, number of fp32 optimizer states per element). Sharded weights keep an fp32
    master even when they are fp32 (executor.optimizer: the update runs on the window's flat shard, and
    each rank then writes the rows its FSDP shard holds)."""
    master = setup.weight_dtype != "float32" or cand.sharded
    states = 2 if setup.optimizer == "adamw" else (1 if setup.sgd_momentum else 0)
    return master, states


def _gpu_of_group(cand: Candidate, group: int, num_layers: int) -> int:
    if not cand.layer_gpu:
        return 0
    if group < 0:
        return cand.layer_gpu[0]
    if group >= num_layers:
        return cand.layer_gpu[-1]
    return cand.layer_gpu[group]


def shard_numel(numel: int, ranks: int) -> int:
    """Elements of one rank's shard of a window: the executor pads every shard to ceil(numel / N)
    (executor.distributed.shard_bounds), so the last rank's is as long as the others'."""
    return -(-numel // ranks)


def host_bytes(setup: Setup, cand: Candidate) -> int:
    """Host memory one rank holds for the inactive windows' master copies and states (pinned on CUDA):
    its shard of every window under data parallel."""
    if cand.states_on == "gpu":
        return 0
    master, states = _state_kinds(setup, cand)
    total = sum(shard_numel(w.numel, cand.ranks) for w in cand.windows)
    state_bytes = DTYPE_BYTES[cand.host_state_dtype]
    return total * ((4 if master else 0) + states * state_bytes)


def checkpoint_host_bytes(setup: Setup, cand: Candidate) -> int:
    """Host bytes a checkpoint (or the final export) adds on top of host_bytes, at its highest point, on
    one rank.

    The executor streams tensors to disk one at a time (executor/safetensors_stream.py), and the states
    go to torch.distributed.checkpoint as they are (executor/checkpoint.py: aliases of the host stores,
    each rank its own rows, nothing gathered), so a save holds on the host:
    - the weight bytes in flight from the GPU to the file: the largest single model tensor in its weight
      dtype (a tied tensor is one parameter, counted once), at most the writer's reused PIECE_BYTES buffer;
    - states on the host: the fp32 contents of the device state slot not yet written back to its host
      stores (the active window's shard; a prefetched slot is clean): the largest window's shard x the
      staged fp32 kinds (master when the weights are not fp32; exp_avg and exp_avg_sq for AdamW,
      momentum_buffer for SGD with momentum) x 4 bytes;
    - states on the GPU: every window's states live in device stores (no slots), and the checkpoint
      copies this rank's shard of each of them to the host: every window's shard x the same kinds x 4.
    A shard is the whole window on one rank, ceil(numel / N) under data parallel.
    """
    largest_tensor = min(max(s.numel * DTYPE_BYTES[s.dtype] for s in setup.structure.specs), PIECE_BYTES)
    master, states = _state_kinds(setup, cand)
    kinds = (1 if master else 0) + states
    shards = [shard_numel(w.numel, cand.ranks) for w in cand.windows]
    if cand.states_on == "gpu":
        return largest_tensor + sum(shards) * kinds * 4
    # Only the active window's slot can hold updates not yet written back: a prefetched second slot is
    # clean (its store has the same values), and TransferEngine.state_dict copies dirty slots only.
    return largest_tensor + max(shards) * kinds * 4


def host_peak_bytes(setup: Setup, cand: Candidate) -> int:
    """What the host must hold for one rank at the worst moment of the run: its state stores plus a
    checkpoint."""
    return host_bytes(setup, cand) + checkpoint_host_bytes(setup, cand)


# ------------------------------------------------------------------------------- disk tier
# `--state-store disk` (executor/state_store.py, executor/state_files.py): the host tier's stores live in
# files, one per (window, kind); the host keeps only pinned staging for (slots + 2) of the largest window,
# and a checkpoint writes the states from fresh mappings of those files, one file's pages at a time.


def _host_element_bytes(setup: Setup, cand: Candidate) -> int:
    """Host-tier bytes per element of a window: fp32 master (when the weights are not fp32) + states."""
    master, states = _state_kinds(setup, cand)
    return (4 if master else 0) + states * DTYPE_BYTES[cand.host_state_dtype]


def disk_host_bytes(setup: Setup, cand: Candidate) -> int:
    """Host bytes the disk tier holds on one rank instead of host_bytes: executor.state_store.
    staging_host_bytes, (slots + 2) x the largest window's shard x the host-tier bytes per element."""
    if cand.states_on == "gpu":
        return 0
    slots = 2 if cand.prefetch else 1
    largest = max(shard_numel(w.numel, cand.ranks) for w in cand.windows)
    return (slots + 2) * largest * _host_element_bytes(setup, cand)


def disk_checkpoint_host_bytes(setup: Setup, cand: Candidate) -> int:
    """checkpoint_host_bytes plus the one state file whose pages a disk-tier save holds at a time (the
    largest window's shard of its largest kind): the states are not held in memory to be saved."""
    master, states = _state_kinds(setup, cand)
    largest_file = max(shard_numel(w.numel, cand.ranks) for w in cand.windows) * max(
        4 if master else 0, DTYPE_BYTES[cand.host_state_dtype] if states else 0
    )
    return checkpoint_host_bytes(setup, cand) + largest_file


def disk_lane_seconds(
    setup: Setup, cand: Candidate, read_bytes_per_s: int, write_bytes_per_s: int
) -> float:
    """Seconds of the disk tier's one I/O thread per visit: read the next window's host-tier states and
    write the previous one back (the largest window for both: the slowest visit)."""
    if cand.states_on == "gpu":
        return 0.0
    nbytes = max(shard_numel(w.numel, cand.ranks) for w in cand.windows) * _host_element_bytes(setup, cand)
    return nbytes / read_bytes_per_s + nbytes / write_bytes_per_s


def disk_unhidden_seconds(lane_seconds: float, step_seconds: float, update_interval: int) -> float:
    """The part of a visit's disk lane that update_interval steps of compute do not hide (its read is
    started one visit early), spread over those steps: what each step's time grows by."""
    return max(0.0, lane_seconds - update_interval * step_seconds) / update_interval


def host_machine_bytes(setup: Setup, cand: Candidate) -> int:
    """What one machine needs for all its ranks together (the host limit is checked on this): every
    rank saves at the same time. One rank: host_peak_bytes."""
    return cand.ranks * host_peak_bytes(setup, cand)


# ------------------------------------------------------------------------------- sharded weights
# The "shard" layout (FSDP2, default reshard_after_forward): each rank holds ceil(rows / N) rows of every
# tensor (sharded_tensor_bytes); a block's whole weights are all-gathered before its forward and again
# before its backward (blocks from the head down to the window's lowest), freed after each, with the next
# block's gather prefetched during the current block's compute: two blocks whole at most. An untied causal
# LM's embedding and head are units of their own (executor.distributed.shard_model): the embedding like a
# block, the head whole from its forward through its backward. The root module (what is left: the final
# norm; a tied embedding and head; a classifier's head) stays whole from its forward to the end of the
# backward (FSDP2 overrides reshard_after_forward to False for the root at lazy init). The backward
# reduce-scatters the fp32
# gradient of each block's trainable tensors into the rank's 1/N; the executor all-gathers those shards
# into the window's whole fp32 gradient before its flat reduce-scatter. Modelled: the gradient buffers
# as under data parallel (whole, from the backward that makes them: an upper bound while only shards
# exist), plus the 1/N reduce-scatter output at that backward and all the shards while they are made
# whole (step_temps). Not modelled: FSDP2's all-gather input copies (1/N of a block while it is
# gathered), the bf16 gradient before its cast to the fp32 reduce dtype, the reduce-scatter buffers of
# later micro-batches (their time is counted), NCCL's own buffers; slices' gradients are counted as if
# they went through FSDP (an upper bound).


def sharded_tensor_bytes(spec: ParamSpec, ranks: int) -> int:
    """One rank's bytes of a tensor under FSDP2: dim 0 padded to a multiple of ranks, ceil(rows/N)
    rows each (a 0-d tensor is one row)."""
    return -(-spec.rows // ranks) * spec.row_numel * DTYPE_BYTES[spec.dtype]


_GROUP_BYTES: dict[int, tuple[ModelStructure, tuple[int, ...]]] = {}


def group_weight_bytes(structure: ModelStructure) -> tuple[int, ...]:
    """Whole weight bytes per group, indexed by group + 1 (embedding side 0, blocks, head side L + 1),
    memoised by the structure's identity (hashing one costs more than the sum)."""
    hit = _GROUP_BYTES.get(id(structure))
    if hit is not None and hit[0] is structure:
        return hit[1]
    out = [0] * (structure.num_layers + 2)
    for spec, grp in zip(structure.specs, structure.spec_layer, strict=True):
        out[min(max(grp, -1), structure.num_layers) + 1] += spec.numel * DTYPE_BYTES[spec.dtype]
    if len(_GROUP_BYTES) > 256:
        _GROUP_BYTES.clear()
    _GROUP_BYTES[id(structure)] = (structure, tuple(out))
    return tuple(out)


def _block_bytes(structure: ModelStructure, group: int) -> int:
    """Whole bytes of FSDP unit `group`: decoder block `group`; for -1 and L an untied causal LM's
    embedding and head, units of their own (executor.distributed.shard_model); 0 for anything else (the
    root is counted apart)."""
    if 0 <= group < structure.num_layers:
        return group_weight_bytes(structure)[group + 1]
    embedding, head = untied_unit_bytes(structure)
    return embedding if group == -1 else head if group == structure.num_layers else 0


def untied_unit_bytes(structure: ModelStructure) -> tuple[int, int]:
    """(input embedding, head) bytes of an untied causal LM, which the executor shards as FSDP units of
    their own (the vocab-row matrices of the embedding and head sides); (0, 0) when they stay in the
    root (tied: one parameter; classifiers)."""
    if structure.tied_embeddings or structure.task != "causal-lm":
        return 0, 0

    def vocab_matrix(group: int) -> int:
        pairs = zip(structure.specs, structure.spec_layer, strict=True)
        return next(
            (s.numel * DTYPE_BYTES[s.dtype] for s, g in pairs
             if g == group and len(s.shape) == 2 and s.shape[0] == structure.vocab_size),
            0,
        )  # fmt: skip

    return vocab_matrix(-1), vocab_matrix(structure.num_layers)


def root_bytes(structure: ModelStructure) -> int:
    """Whole bytes of the root module's own tensors, whole through the step: the embedding and head
    sides less the units of their own (an untied LM's root keeps the final norm)."""
    b = group_weight_bytes(structure)
    return b[0] + b[-1] - sum(untied_unit_bytes(structure))


def shard_inflight_bytes(setup: Setup, cand: Candidate, forward: bool, group: int, lowest: int) -> int:
    """Whole (gathered) weight bytes alive during one compute node under "shard", besides the rank's
    shards: the root throughout, the node's own block and the one whose gather is prefetched during it
    (forward: the block above; backward: the block below, if the backward reaches it, i.e. >= lowest)."""
    if not cand.sharded:
        return 0
    st = setup.structure
    nxt = group + 1 if forward else group - 1
    ahead = _block_bytes(st, nxt) if forward or nxt >= lowest else 0
    return root_bytes(st) + _block_bytes(st, group) + ahead


def shard_gather_bytes(setup: Setup, cand: Candidate, forward: bool, group: int) -> int:
    """Whole bytes all-gathered for one node: its unit, with the root before the embedding's forward
    (FSDP2 sets reshard_after_forward=False on the root, and shard_model on an untied head: they stay
    whole until their post-backward, no re-gather)."""
    if not cand.sharded:
        return 0
    st = setup.structure
    if forward and group < 0:
        return root_bytes(st) + _block_bytes(st, -1)  # the root, then the embedding unit
    if not forward and group >= st.num_layers:
        return 0  # the head unit is not resharded after its forward (shard_model): no gather again
    return _block_bytes(st, group)


def ring_seconds(setup: Setup, cand: Candidate, whole_bytes: int) -> float:
    """A ring all-gather or reduce-scatter of a whole_bytes buffer: each rank sends (N-1)/N of it."""
    n = cand.ranks
    return setup.cost.peer_seconds((n - 1) * whole_bytes // n)


def gather_seconds(
    setup: Setup, cand: Candidate, kinds: Sequence[bool], groups: Sequence[int]
) -> list[float]:
    """Interconnect seconds of each node's all-gather (shard_gather_bytes) of one micro-batch."""
    return [
        ring_seconds(setup, cand, shard_gather_bytes(setup, cand, f, g))
        for f, g in zip(kinds, groups, strict=True)
    ]


def node_durations(
    setup: Setup, cand: Candidate, kinds: Sequence[bool], groups: Sequence[int], dts: Sequence[float]
) -> tuple[float, list[float]]:
    """(exposed seconds before the first node, each node's seconds) of one micro-batch: under "shard" the
    gather of node i+1 runs on the interconnect lane during node i, so a node lasts the longer of its
    compute and the next gather; node 0's gather (the root) is not hidden. Else the compute alone."""
    if not cand.sharded:
        return 0.0, list(dts)
    gathers = gather_seconds(setup, cand, kinds, groups)
    out = [max(dt, nxt) for dt, nxt in zip(dts, gathers[1:] + [0.0], strict=True)]
    return gathers[0], out


def shard_grad_numel(w: Window, cand: Candidate) -> int:
    """Elements of the rank's FSDP gradient shards of window w: ceil(G/N) of each group's G elements (the
    window's rows counted as whole tensors: slices' gradients do not go through FSDP, an upper bound)."""
    return sum(shard_numel(n, cand.ranks) for _, n in w.numel_by_group) if cand.sharded else 0


def shard_grad_seconds(setup: Setup, cand: Candidate, w: Window) -> float:
    """Interconnect seconds of one micro-batch's FSDP gradient reduce-scatters (fp32) of window w."""
    if not cand.sharded:
        return 0.0
    n = cand.ranks
    return sum(ring_seconds(setup, cand, 4 * n * shard_numel(g, n)) for _, g in w.numel_by_group)


def shard_lane_seconds(
    setup: Setup, cand: Candidate, w: Window, kinds: Sequence[bool], groups: Sequence[int]
) -> float:
    """Every interconnect second of one micro-batch under "shard": the gathers and w's reduce-scatters."""
    if not cand.sharded:
        return 0.0
    return sum(gather_seconds(setup, cand, kinds, groups)) + shard_grad_seconds(setup, cand, w)


def shard_fb_seconds(setup: Setup, cand: Candidate, w: Window, fb: float) -> float:
    """Forward/backward seconds of window w's step: the profile's (compute bounded by the gathers node by
    node) or, when longer, every micro-batch's lane work, the serial interconnect lane being the bound."""
    if not cand.sharded:
        return fb
    kinds, groups, _ = _node_plan(setup.structure.num_layers, max(w.low, -1))
    return max(fb, cand.rank_accum * shard_lane_seconds(setup, cand, w, kinds, groups))


def _persistent(setup: Setup, cand: Candidate) -> tuple[list[dict[str, int]], int]:
    """Bytes held on each GPU for the whole step, by category; and one slot's bytes."""
    st = setup.structure
    L = st.num_layers
    gpus = [dict.fromkeys(CATEGORIES, 0) for _ in range(cand.num_gpus)]
    for spec, grp in zip(st.specs, st.spec_layer, strict=True):
        whole = spec.numel * DTYPE_BYTES[spec.dtype]
        held = sharded_tensor_bytes(spec, cand.ranks) if cand.sharded else whole
        gpus[_gpu_of_group(cand, grp, L)]["weights"] += held
    master, states = _state_kinds(setup, cand)
    slot = 0
    if cand.states_on == "gpu":
        for w in cand.windows:
            g = gpus[_gpu_of_group(cand, w.low, L)]
            n = shard_numel(w.numel, cand.ranks)
            g["master"] += 4 * n if master else 0
            g["optimizer_states"] += 4 * states * n
    else:
        for gi, g in enumerate(gpus):
            # data parallel: the TransferEngine's slots are sized for the largest shard, not window
            mine = [w for w in cand.windows if _gpu_of_group(cand, w.low, L) == gi]
            owned = [shard_numel(w.numel, cand.ranks) for w in mine]
            if not owned:
                continue
            n = max(owned)
            g["master"] += 4 * n if master else 0
            g["optimizer_states"] += 4 * states * n
            if cand.prefetch and not cand.synchronous_copies:
                g["prefetch"] += 4 * n * (states + (1 if master else 0))
            slot = max(slot, 4 * n * (states + (1 if master else 0)))
    return gpus, slot


def _block_mode(group: int, w: Window) -> BlockMode | EdgeMode:
    """How block `group` takes part in window w's step (see planner/profile_model.py)."""
    if group < w.low:
        return "none"
    low_edge = w.low_skip if group == w.low else 0
    high_edge = w.high_skip if group == w.high else 0
    if group > w.high:
        return "input"
    if low_edge == 0 and high_edge == 0:
        # the lowest block: nothing below the window needs a gradient, so neither does this block's input
        return "first" if group == w.low else "full"
    return ("edge", low_edge, high_edge, group > w.low)


@functools.lru_cache(maxsize=64)
def edge_patterns(windows: tuple[Window, ...], num_layers: int) -> frozenset[EdgeKey]:
    """The window-edge patterns (profile_model.EdgeMode) these windows' steps run, i.e. what their
    activation table must hold: a block at a window's lowest or highest group with only some of its
    tensors in the window. Every other block runs a whole-block mode."""
    found: set[EdgeKey] = set()
    for w in windows:
        for g in {w.low, w.high}:
            if 0 <= g < num_layers:
                mode = _block_mode(g, w)
                if isinstance(mode, tuple):
                    found.add((mode[1], mode[2], mode[3]))
    return frozenset(found)


def _head_mode(w: Window, num_layers: int, tied: bool = False) -> str:
    if w.low >= num_layers:
        return "weight"
    if w.high >= num_layers or (tied and w.low < 0):  # a tied head's weight is the embedding's
        return "full"
    return "input"


def _grads_made_at(w: Window, num_layers: int, tied: bool) -> dict[int, int]:
    """Elements of the window's gradient buffers by the group whose backward creates them: a group's
    own, except a tied embedding's, which the head's backward (the first use in backward) creates."""
    out = dict(w.numel_by_group)
    if tied and -1 in out:
        out[num_layers] = out.get(num_layers, 0) + out.pop(-1)
    return out


def _tied_rows_bytes(w: Window, tied: bool) -> int:
    """fp32 bytes of the tied embedding's rows in the window. The head's backward makes their gradient
    at its very end (the sliced matmul's weight gradient, after the cross-entropy's excursion has been
    freed), so they count at the node's end level, not through its peak: counted through the peak,
    Qwen3-0.6B's window 0 was 4.7% and Gemma-2-2B's 6.1% over the executor's traced step."""
    return 4 * dict(w.numel_by_group).get(-1, 0) if tied else 0


_FLOPS: dict[tuple[int, int, int], tuple[ModelStructure, tuple[tuple[int, int, int], int]]] = {}


def _flops(structure: ModelStructure, micro_batch: int, seq_len: int) -> tuple[tuple[int, int, int], int]:
    """Block (forward, backward input, backward full) and head FLOPs, memoised by the structure's
    identity: hashing a structure hashes every parameter spec, which cost more than the simulation."""
    key = (id(structure), micro_batch, seq_len)
    hit = _FLOPS.get(key)
    if hit is not None and hit[0] is structure:
        return hit[1]
    if len(_FLOPS) > 4096:
        _FLOPS.clear()
    bf = block_flops(structure, 0, micro_batch, seq_len)
    out = (bf.forward, bf.backward_input, bf.backward_full), head_flops(structure, micro_batch, seq_len)
    _FLOPS[key] = (structure, out)
    return out


def forward_seconds_per_token(setup: Setup, micro_batch: int) -> float:
    """Seconds per token of the model's forward pass alone: every ChunkFT step runs the whole forward,
    whatever its window, so no step can be faster (a lower bound the solver prunes with)."""
    (f_fwd, _, _), f_head = _flops(setup.structure, micro_batch, setup.seq_len)
    flops = setup.structure.num_layers * f_fwd + f_head
    return setup.cost.compute_seconds(flops) / (micro_batch * setup.seq_len)


@dataclass
class _Walk:
    """Mutable state of one window's replay (private)."""

    mem: list[dict[str, int]]
    record: bool
    now: float = 0.0
    peak: list[int] = field(default_factory=list)
    peak_at: list[tuple[float, str, tuple[tuple[str, int], ...]]] = field(default_factory=list)
    events: list[LaneEvent] = field(default_factory=list)
    samples: list[list[MemorySample]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.peak = [sum(m.values()) for m in self.mem]
        self.peak_at = [(0.0, "step start", _cats(m)) for m in self.mem]
        self.samples = [[MemorySample(0.0, _cats(m), "step start")] if self.record else [] for m in self.mem]

    def note(self, gpu: int, name: str, extra_temp: int = 0, t: float | None = None) -> None:
        m = self.mem[gpu]
        total = sum(m.values()) + extra_temp
        when = self.now if t is None else t
        if total > self.peak[gpu]:
            self.peak[gpu] = total
            snap = dict(m)
            snap["temporaries"] += extra_temp
            self.peak_at[gpu] = (when, name, _cats(snap))
        if self.record:
            snap = dict(m)
            snap["temporaries"] += extra_temp
            self.samples[gpu].append(MemorySample(when, _cats(snap), name))

    def segment(self, gpu: int, seg: Segment, name: str, duration: float) -> None:
        """Apply a traced segment: its excursion (gradient buffers included: a backward creates them one
        by one while it frees saved activations, so the highest point need not hold all of them) is the
        peak inside it; its delta changes activations and gradients. Drawn as the state after the segment
        plus the rest of the excursion as temporaries."""
        m = self.mem[gpu]
        start = sum(m.values())
        m["gradients"] += seg.grad_bytes
        m["activations"] = max(0, m["activations"] + seg.delta_bytes - seg.grad_bytes)
        after = sum(m.values())
        extra = max(start + seg.excursion_bytes - after, 0)
        self.note(gpu, name, extra_temp=extra, t=self.now + duration / 2)
        self.now += duration
        if self.record:
            self.samples[gpu].append(MemorySample(self.now, _cats(m), name))


def _cats(m: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((c, m[c]) for c in CATEGORIES)


# --------------------------------------------------------------------------------------- simulation


def _replay(
    setup: Setup, cand: Candidate, act: ActivationProfile, w: Window, record: bool
) -> tuple[_Walk, float, float]:
    """One optimizer step with window w active; returns the walk, compute seconds, step seconds."""
    st = setup.structure
    L = st.num_layers
    persistent, slot_bytes = _persistent(setup, cand)
    walk = _Walk([dict(m) for m in persistent], record)
    (f_fwd, f_bwd_in, f_bwd_full), f_head = _flops(st, cand.micro_batch, setup.seq_len)
    c = setup.cost
    ckpt = set(cand.checkpoint_layers)
    grads_by_group = _grads_made_at(w, L, st.tied_embeddings)
    tied_rows = _tied_rows_bytes(w, st.tied_embeddings)
    order: tuple[StepNode, ...] = step_order(L, max(w.low, -1))
    hidden = act.hidden_bytes
    head_mode = _head_mode(w, L, st.tied_embeddings)
    head_fwd, head_bwd = act.head(head_mode)  # type: ignore[arg-type]
    kept, freed = kept_inputs(act, frozenset(ckpt), w.low, L)
    head_fwd = Segment(head_fwd.delta_bytes + kept, head_fwd.excursion_bytes + kept, head_fwd.grad_bytes)
    grads_done: set[int] = set()
    compute_s = 0.0

    def add_event(
        lane: str, name: str, start: float, end: float, chunk: int | None = None, layer: int | None = None
    ) -> None:
        if record:
            walk.events.append(LaneEvent(lane, name, start, end, chunk, layer))  # type: ignore[arg-type]

    kinds = [n.kind == "fwd" for n in order]
    gathers = gather_seconds(setup, cand, kinds, [n.group for n in order]) if cand.sharded else []
    lane = 0.0  # the interconnect lane's cursor (shard)
    for _micro in range(cand.rank_accum):
        prev_gpu = _gpu_of_group(cand, -1, L)
        if cand.sharded:  # the root's gather before the embedding: nothing to hide it behind
            add_event("interconnect", "all-gather root", walk.now, walk.now + gathers[0])
            lane = walk.now = walk.now + gathers[0]
        for i, node in enumerate(order):
            grp = node.group
            gpu = _gpu_of_group(cand, grp, L)
            if gpu != prev_gpu:  # activation (forward) or its gradient (backward) crosses GPUs
                dt = c.peer_seconds(hidden)
                add_event("compute", f"send {node.kind} to gpu{gpu}", walk.now, walk.now + dt)
                walk.now += dt
                compute_s += dt
                prev_gpu = gpu
            if node.kind == "fwd":
                if grp < 0:
                    seg, flops = act.embed_fwd, 0
                elif grp >= L:
                    seg, flops = head_fwd, f_head
                else:
                    mode = _block_mode(grp, w)
                    seg = act.block(  # type: ignore[arg-type]
                        mode, grp in ckpt, grp == L - 1, grp == 0 and head_mode == "weight"
                    ).fwd
                    flops = f_fwd
            else:
                if grp < 0:
                    seg, flops = act.embed_bwd_trainable, 0
                elif grp >= L:
                    seg = head_bwd
                    # backward of the head (input, and weight when in the window); chunked cross-entropy
                    # runs the head's forward again piece by piece
                    flops = f_head * ((2 if head_mode == "full" else 1) + (1 if act.chunk_tokens else 0))
                else:
                    mode = _block_mode(grp, w)
                    recompute = grp in ckpt
                    seg = act.block(mode, recompute).bwd  # type: ignore[arg-type]
                    if grp in freed:  # the decoder's inputs the checkpointed blocks kept (kept_inputs)
                        seg = Segment(seg.delta_bytes - freed[grp], seg.excursion_bytes, seg.grad_bytes)
                    flops = (f_bwd_in if mode == "input" else f_bwd_full) + (f_fwd if recompute else 0)
                # The trace made fp32 buffers for whole tensors of the group; the window has its own
                # rows of the group (slices of straddling tensors): swap one for the other.
                new = 0
                if grp in grads_by_group and grp not in grads_done:
                    new = 4 * grads_by_group[grp]
                    grads_done.add(grp)
                top = seg.excursion_bytes - seg.grad_bytes + new
                if new and grp >= L and tied_rows:  # the tied rows' gradient: when the head's backward ends
                    top = max(top - tied_rows, seg.delta_bytes - seg.grad_bytes + new)
                seg = Segment(seg.delta_bytes - seg.grad_bytes + new, top, new)
                if cand.sharded and new:  # the FSDP reduce-scatter's 1/N output beside the gradient
                    shard = 4 * shard_numel(grads_by_group[grp], cand.ranks)
                    seg = Segment(seg.delta_bytes, seg.excursion_bytes + shard, seg.grad_bytes)
            if cand.sharded:
                inflight = shard_inflight_bytes(setup, cand, node.kind == "fwd", grp, max(w.low, 0))
                seg = Segment(seg.delta_bytes, seg.excursion_bytes + inflight, seg.grad_bytes)
            dt = c.compute_seconds(flops)
            if cand.sharded:  # the next node's gather runs during this one (FSDP2's prefetch)
                nxt = gathers[i + 1] if i + 1 < len(gathers) else 0.0
                if nxt:
                    start = max(lane, walk.now)
                    lane = start + nxt
                    add_event("interconnect", f"all-gather {order[i + 1].name}", start, lane)
                dt = max(dt, nxt)
            label = node.name + (" (recompute)" if node.kind == "bwd" and grp in ckpt else "")
            add_event("compute", label, walk.now, walk.now + dt, layer=grp if 0 <= grp < L else None)
            walk.segment(gpu, seg, label, dt)
            compute_s += dt
            if cand.sharded and node.kind == "bwd" and grp in grads_by_group:  # its gradients' reduce-scatter
                rs = ring_seconds(setup, cand, 4 * cand.ranks * shard_numel(grads_by_group[grp], cand.ranks))
                start = max(lane, walk.now)
                lane = start + rs
                add_event("interconnect", f"reduce-scatter grads {node.name}", start, lane)
        for m in walk.mem:  # everything of the micro-batch is freed by the end of its backward
            m["activations"] = 0
            m["temporaries"] = 0

    # Transfers on the copy stream, the update on the compute stream; under data parallel the collectives
    # (reduce-scatter and norm before the update, all-gather after it) on the interconnect lane.
    t_fb = shard_fb_seconds(setup, cand, w, walk.now)
    master, states = _state_kinds(setup, cand)
    upd_gpu = _gpu_of_group(cand, w.low, L)
    numel = shard_numel(w.numel, cand.ranks)
    t_upd = c.update_seconds(numel, setup.optimizer, DTYPE_BYTES[setup.weight_dtype])
    t_rs, t_ag = collective_seconds(setup, cand, w)
    ready = t_fb + t_rs  # this rank's reduced gradient shard exists (one rank: at once)
    t0, tail = ready, 0.0
    if cand.states_on == "host":
        per_elt = (4 if master else 0) + states * DTYPE_BYTES[cand.host_state_dtype]
        moved = numel * per_elt
        wb, fill = c.d2h_seconds(moved), c.h2d_seconds(moved)
        if cand.synchronous_copies:  # fetch, update, write back: nothing overlaps
            add_event("h2d", f"fetch chunk {w.index}", ready, ready + fill, chunk=w.index)
            t0, tail = ready + fill, wb
            done = t0 + t_upd + t_ag
            add_event("d2h", f"write-back chunk {w.index}", done, done + wb, chunk=w.index)
        else:
            # Steady state of the FIFO copy stream: each step it writes the previous window back, then
            # fills the next one. Two slots: a fill has a whole step of slack, so the step lasts as long as
            # the longer of compute and copies; one slot: the fill must land before this step's update.
            if cand.prefetch:
                wait = max(ready + t_upd + t_ag, wb + fill) - ready - t_upd - t_ag
            else:
                wait = max(0.0, wb + fill - ready)
            prv = _previous_window(cand, w.index)
            add_event("d2h", f"write-back chunk {prv}", 0.0, wb, chunk=prv)
            nxt = _next_fill(cand, w.index)
            add_event("h2d", f"prefetch chunk {nxt}", wb, wb + fill, chunk=nxt)
            t0 = ready + wait
    temps = dict(step_temps(setup, cand, w))
    if cand.sharded:
        walk.note(upd_gpu, f"gradient all-gather chunk {w.index}", temps["gradient all-gather"], t=t_fb)
    if cand.ranks > 1:
        add_event("interconnect", f"reduce-scatter chunk {w.index}", t_fb, ready, chunk=w.index)
        walk.note(upd_gpu, f"reduce-scatter chunk {w.index}", temps["reduce-scatter"], t=t_fb + t_rs / 2)
        walk.note(upd_gpu, f"norm all-reduce chunk {w.index}", temps["norm"], t=ready)
    walk.now = t0
    add_event("compute", f"update chunk {w.index}", t0, t0 + t_upd, chunk=w.index)
    walk.note(upd_gpu, f"update chunk {w.index}", extra_temp=temps["update"], t=t0 + t_upd / 2)
    done = t0 + t_upd + t_ag
    if cand.ranks > 1:
        add_event("interconnect", f"all-gather chunk {w.index}", t0 + t_upd, done, chunk=w.index)
        walk.note(upd_gpu, f"all-gather chunk {w.index}", temps["all-gather"], t=t0 + t_upd + t_ag / 2)
    walk.now = done
    for m in walk.mem:
        m["gradients"] = 0
    for gi in range(len(walk.mem)):
        walk.note(gi, f"zero_grad chunk {w.index}")
    step_s = done + tail
    del slot_bytes
    return walk, compute_s, step_s


def _previous_window(cand: Candidate, window: int) -> int:
    """The window updated in the step before `window`'s: the one whose states are written back now."""
    seq = cand.sequence
    i = seq.index(window) if window in seq else 0
    return seq[i - 1]


def _next_fill(cand: Candidate, window: int) -> int:
    seq = cand.sequence
    i = seq.index(window) if window in seq else 0
    # One slot: the window's own states are copied in during its forward/backward (right after the
    # previous update); two slots: the copy runs a step ahead, for the window after this one.
    ahead = 1 if cand.prefetch else 0
    return seq[(i + ahead) % len(seq)]


@dataclass(frozen=True)
class _Profile:
    """Memory and time of the compute part of a step for one (lowest, highest) trainable group pair,
    without the window's gradient buffers (added per window by _window_peaks)."""

    node_gpu: tuple[int, ...]  # micro-batch 0 nodes
    node_peak: tuple[int, ...]  # highest live bytes above the persistent ones, inside each node
    bwd_index: tuple[tuple[int, int], ...]  # (group, node index) of micro-batch 0 backward nodes
    prefix_max: tuple[tuple[int, ...], ...]  # per GPU: max node_peak over nodes[:i] on that GPU
    later_max: tuple[int, ...]  # per GPU: max over micro-batches 1.. (all gradients exist then)
    fb_seconds: float  # forward + backward of all micro-batches
    node_top: tuple[int, ...] = ()  # the excursion's top inside each node (node_peak without the end state)
    node_end: tuple[int, ...] = ()  # live bytes above the persistent ones when each node ends


_PROFILES: dict[tuple, tuple[object, object, _Profile]] = {}


def _profile(setup: Setup, cand: Candidate, act: ActivationProfile, w: Window) -> _Profile:
    """The window's compute profile, shared by every candidate that runs the same nodes the same way:
    blocks below the window only run forward, unchanged by checkpointing, so only the checkpointed
    blocks from the window's lowest group up are part of the key (a checkpointing search over the
    bottom blocks re-uses the profiles of every window above them)."""
    low = max(w.low, 0)
    key = (
        id(setup),
        id(act),
        w.low,
        w.high,
        w.low_skip,
        w.high_skip,
        tuple(g for g in cand.checkpoint_layers if g >= low),
        cand.micro_batch,
        cand.rank_accum,
        cand.layer_gpu,
        cand.ranks if cand.sharded else 1,
    )
    hit = _PROFILES.get(key)
    if hit is not None and hit[0] is setup and hit[1] is act:
        return hit[2]
    if len(_PROFILES) > 50000:
        _PROFILES.clear()
    prof = _compute_profile(setup, cand, act, w)
    _PROFILES[key] = (setup, act, prof)
    return prof


@functools.lru_cache(maxsize=4096)
def _node_plan(
    num_layers: int, lowest: int
) -> tuple[tuple[bool, ...], tuple[int, ...], tuple[tuple[int, int], ...]]:
    """step_order as (is forward, group) per node, and (group, node index) of the backward nodes."""
    order = step_order(num_layers, lowest)
    bwd = tuple((n.group, i) for i, n in enumerate(order) if n.kind == "bwd")
    return tuple(n.kind == "fwd" for n in order), tuple(n.group for n in order), bwd


@functools.lru_cache(maxsize=256)
def _group_gpus(layer_gpu: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """The GPU of each group, indexed by group + 1 (embedding 0, blocks, head L + 1)."""
    cand = Candidate((), (), (), 1, 1, "gpu", "float32", False, layer_gpu=layer_gpu)
    return tuple(_gpu_of_group(cand, g, num_layers) for g in range(-1, num_layers + 1))


NodeValues = tuple[int, int, float]  # activation change, excursion (both less gradient buffers), seconds


def kept_inputs(act: ActivationProfile, ckpt: frozenset[int], low: int, L: int) -> tuple[int, dict[int, int]]:
    """(bytes still alive after the decoder returns, {block: bytes its backward frees}) of what the
    decoder hands every block (ActivationProfile.kept_inputs: attention masks, position ids). The traces
    free them when the decoder returns; a checkpointed block that runs backward (at or above the window's
    lowest block) keeps its arguments into its backward, so each lives until the lowest such block taking
    it has run its backward. Freed there, not before: the free happens inside that backward (after the
    recomputation; measured with weakref finalizers), so counting it through the node errs by at most
    one mask high, where freeing it at the node's start erred by one low (-3.3%) on a fully checkpointed
    Gemma-2. Gemma-2 with blocks 0 and 1 of 4 checkpointed: both masks, 3.9% of window 1 before."""
    types = act.block_types if len(act.block_types) == L else ("",) * L
    first = max(low, 0)
    kept, freed = 0, {}
    for taking, nbytes in act.kept_inputs:
        users = [g for g in ckpt if first <= g < L and types[g] in taking]
        if users:
            kept += nbytes
            g = min(users)
            freed[g] = freed.get(g, 0) + nbytes
    return kept, freed


def _compute_profile(setup: Setup, cand: Candidate, act: ActivationProfile, w: Window) -> _Profile:
    """_profile's work, bit-identical to replaying every micro-batch node by node (as _replay does)
    but faster: segments are looked up per run of blocks in one mode (below the window, inside it,
    above it), and one micro-batch is walked: each runs the same nodes from no activations, so the later
    ones peak where the first does (later_max) and only advance the clock again, by the same additions
    in the same order."""
    st = setup.structure
    L = st.num_layers
    low, high = w.low, w.high
    probe = Window(-1, 0, low, high, 0, (), w.low_skip, w.high_skip)
    (f_fwd, f_bwd_in, f_bwd_full), f_head = _flops(st, cand.micro_batch, setup.seq_len)
    c = setup.cost
    ckpt = frozenset(cand.checkpoint_layers)
    head_mode = _head_mode(probe, L, st.tied_embeddings)
    head_fwd, head_bwd = act.head(head_mode)  # type: ignore[arg-type]
    head_only = head_mode == "weight"
    seconds: dict[int, float] = {}  # compute_seconds by FLOPs: a handful of distinct values

    def values(seg: Segment, flops: int) -> NodeValues:
        # relative to the gradient buffers that exist before the node (_window_peaks adds the window's)
        dt = seconds.get(flops)
        if dt is None:
            dt = seconds[flops] = c.compute_seconds(flops)
        return seg.delta_bytes - seg.grad_bytes, seg.excursion_bytes - seg.grad_bytes, dt

    def fwd(mode: BlockMode | EdgeMode, ck: bool, g: int = -1) -> NodeValues:
        return values(act.block(mode, ck, g == L - 1, g == 0 and head_only).fwd, f_fwd)

    def bwd(mode: BlockMode | EdgeMode, ck: bool) -> NodeValues:
        flops = (f_bwd_in if mode == "input" else f_bwd_full) + (f_fwd if ck else 0)
        return values(act.block(mode, ck).bwd, flops)

    def run(make: Callable[[BlockMode, bool], NodeValues], mode: BlockMode, lo: int, hi: int) -> list:
        plain = make(mode, False)
        if not ckpt:
            return [plain] * (hi - lo)
        checkpointed = make(mode, True)
        return [checkpointed if g in ckpt else plain for g in range(lo, hi)]

    # Forward and backward values per group + 1. Below the window: "none" (forward only; checkpointing
    # changes nothing there), except where the head's neighbour or a head-only window makes it differ.
    below = min(max(low, 0), L)
    fv: list[NodeValues | None] = [values(act.embed_fwd, 0)]
    bv: list[NodeValues | None] = [values(act.embed_bwd_trainable, 0)]
    if below:
        none = [fwd("none", False)] * below
        for g in {0, L - 1} & set(range(below)):
            none[g] = fwd("none", False, g)
        fv += none
        bv += [None] * below  # no backward below the window
    g = below
    while g < L:
        if g in (low, high):  # the window's lowest and highest groups: "first", "full" or an edge
            mode = _block_mode(g, probe)
            fv.append(fwd(mode, g in ckpt, g))
            bv.append(bwd(mode, g in ckpt))
            g += 1
        else:  # inside the window ("full") up to its highest group, above it ("input") to the top
            mode, end = ("full", min(high, L)) if g < high else ("input", L)
            fv += run(fwd, mode, g, end)
            bv += run(bwd, mode, g, end)
            g = end
    fv.append(values(head_fwd, f_head))
    # the head's backward (input, and weight when in the window); chunked cross-entropy runs the head's
    # forward again piece by piece
    bv.append(values(head_bwd, f_head * ((2 if head_mode == "full" else 1) + (1 if act.chunk_tokens else 0))))
    kept, freed = kept_inputs(act, ckpt, low, L)
    if kept:
        d, e, dt = fv[L + 1]  # type: ignore[misc]
        fv[L + 1] = (d + kept, e + kept, dt)
        for g, n in freed.items():
            d, e, dt = bv[g + 1]  # type: ignore[misc]
            bv[g + 1] = (d - n, e, dt)

    is_fwd, groups, bwd_index = _node_plan(L, max(low, -1))
    vals = [fv[g + 1] if f else bv[g + 1] for f, g in zip(is_fwd, groups, strict=True)]
    first_gather = 0.0
    if cand.sharded:  # the gathered weights in flight, and the nodes' lengths under the gathers
        lowest = max(low, 0)
        first_gather, durations = node_durations(setup, cand, is_fwd, groups, [v[2] for v in vals])  # type: ignore[index]
        vals = [
            (d, e + shard_inflight_bytes(setup, cand, f, g, lowest), dt)
            for (d, e, _), f, g, dt in zip(vals, is_fwd, groups, durations, strict=True)  # type: ignore[misc]
        ]
    gpu_of = _group_gpus(cand.layer_gpu, L)
    n_gpu = cand.num_gpus
    node_gpu = [gpu_of[g + 1] for g in groups]
    node_peak: list[int] = []
    node_top: list[int] = []
    node_end: list[int] = []
    ticks: list[float] = [first_gather] if cand.sharded else []
    acts = [0] * n_gpu
    prev = gpu_of[0]
    peer = c.peer_seconds(act.hidden_bytes)
    for gpu, (d, e, dt) in zip(node_gpu, vals, strict=True):  # type: ignore[misc]
        if gpu != prev:  # the activation (or its gradient) crosses GPUs
            ticks.append(peer)
            prev = gpu
        ticks.append(dt)
        before = acts[gpu]
        after = before + d
        if after < 0:
            after = 0
        acts[gpu] = after
        peak = before + e
        node_top.append(peak)
        node_end.append(after)
        node_peak.append(peak if peak > after else after)
    now = 0.0
    for _micro in range(cand.rank_accum):
        for dt in ticks:
            now += dt
    prefix = []
    later = [0] * n_gpu
    for gi in range(n_gpu):
        mine = node_peak
        if n_gpu > 1:
            mine = [p if ng == gi else 0 for ng, p in zip(node_gpu, node_peak, strict=True)]
        prefix.append(tuple(accumulate(mine, max, initial=0)))  # peaks are >= 0
        if cand.rank_accum > 1:
            later[gi] = max(mine, default=0)
    return _Profile(
        tuple(node_gpu),
        tuple(node_peak),
        bwd_index,
        tuple(prefix),
        tuple(later),
        now,
        tuple(node_top),
        tuple(node_end),
    )


def _window_peaks(
    setup: Setup, cand: Candidate, prof: _Profile, w: Window, persistent: list[int]
) -> list[int]:
    """Per-GPU peak of one window: the compute profile plus its gradient buffers, and the update."""
    L = setup.structure.num_layers
    n_gpu = len(persistent)
    grads = _grads_made_at(w, L, setup.structure.tied_embeddings)
    tied_rows = _tied_rows_bytes(w, setup.structure.tied_embeddings)
    bwd = dict(prof.bwd_index)
    top = max(grads)
    first = bwd[top]
    rel = [prof.prefix_max[g][first] for g in range(n_gpu)]
    cum = [0] * n_gpu
    total = [0] * n_gpu
    for grp, n in grads.items():
        total[_gpu_of_group(cand, grp, L)] += 4 * n
    for grp in range(top, min(w.low, -1) - 1 if w.low < 0 else w.low - 1, -1):
        if grp in grads:
            cum[_gpu_of_group(cand, grp, L)] += 4 * grads[grp]
        i = bwd.get(grp)
        if i is None:
            continue
        g = prof.node_gpu[i]
        if grp == L and tied_rows:  # the tied rows' gradient appears when the head's backward ends
            rel[g] = max(rel[g], prof.node_peak[i] + cum[g] - tied_rows, prof.node_end[i] + cum[g])
        else:
            rel[g] = max(rel[g], prof.node_peak[i] + cum[g])
        if cand.sharded and grp in grads:  # the FSDP reduce-scatter's 1/N output beside the gradient
            rel[g] = max(rel[g], prof.node_top[i] + cum[g] + 4 * shard_numel(grads[grp], cand.ranks))
    if cand.rank_accum > 1:
        for g in range(n_gpu):
            rel[g] = max(rel[g], prof.later_max[g] + total[g])
    ug = _gpu_of_group(cand, w.low, L)
    rel[ug] = max(rel[ug], total[ug] + max(b for _, b in step_temps(setup, cand, w)))
    return [persistent[g] + rel[g] for g in range(n_gpu)]


def _update_temp(setup: Setup, piece_numel: int) -> int:
    """AdamW's per-slice update makes two fp32 temporaries (sqrt, then the division); SGD one."""
    return (2 if setup.optimizer == "adamw" else 1) * 4 * piece_numel


def step_temps(setup: Setup, cand: Candidate, w: Window) -> tuple[tuple[str, int], ...]:
    """(moment, bytes) the optimizer step holds above the persistent bytes and the window's fp32
    gradients (which stay until zero_grad). One rank: the update's per-slice temporaries. Data parallel
    (executor/chunkft.py _step_parallel, optimizer.update_shard and _gather_rows), per = ceil(numel/N):
    - reduce-scatter: the flat fp32 gradient, zero-padded to N*per, and this rank's reduced shard
      (per), alive inside distributed.reduce_scatter_mean (NCCL reduce-scatters it; on gloo, whose
      reduce-scatter would stage a copy of the whole input, it is all-reduced in place);
    - norm: the shard, and an fp64 copy of one NORM_PIECE of it and that copy squared (global_sq_norm);
    - update: the shard and the update's temporaries of one piece (a slice's part of the shard);
    - all-gather: the shard, this rank's rows in the weight dtype (per) and every rank's (N*per).
    The per-slice flags (4 bytes a slice) are left out."""
    if cand.ranks <= 1:
        return (("update", _update_temp(setup, w.max_slice_numel)),)
    n = cand.ranks
    per = shard_numel(w.numel, n)
    ws = DTYPE_BYTES[setup.weight_dtype]
    # shard: the FSDP gradient shards while they are all-gathered into the window's whole fp32 gradient
    # (the "gradients" bytes); afterwards as data parallel
    gathered = (("gradient all-gather", 4 * shard_grad_numel(w, cand)),) if cand.sharded else ()
    return gathered + (
        ("reduce-scatter", 4 * n * per + 4 * per),
        ("norm", 4 * per + 16 * min(per, NORM_PIECE)),
        ("update", 4 * per + _update_temp(setup, min(w.max_slice_numel, per))),
        ("all-gather", 4 * per + per * ws + n * per * ws),
    )


def collective_bytes(setup: Setup, cand: Candidate, w: Window) -> tuple[int, int]:
    """(before the update, after it): bytes one rank sends for window w's step. A ring reduce-scatter or
    all-gather sends (N-1)/N of its N*per-element buffer: the fp32 gradient, then the rows in the weight
    dtype; the fp64 norm's all-reduce (2(N-1)/N of 8 bytes) goes with the first. One rank: none."""
    n = cand.ranks
    if n <= 1:
        return 0, 0
    per = shard_numel(w.numel, n)
    gathered = (n - 1) * 4 * shard_grad_numel(w, cand)  # shard: the FSDP gradient shards made whole first
    before = gathered + (n - 1) * per * 4 + 2 * (n - 1) * 8 // n
    return before, (n - 1) * per * DTYPE_BYTES[setup.weight_dtype]


def collective_seconds(setup: Setup, cand: Candidate, w: Window) -> tuple[float, float]:
    """collective_bytes over the GPU profile's interconnect (NVLink, or PCIe peer; the CPU profile's
    figure on --gpu cpu). The executor waits for each, so neither overlaps compute."""
    before, after = collective_bytes(setup, cand, w)
    return setup.cost.peer_seconds(before), setup.cost.peer_seconds(after)


def _step_seconds(setup: Setup, cand: Candidate, w: Window, fb: float) -> float:
    """Mean seconds of one of the window's steps: forward/backward and the update every step, the state
    copies (write-back of the previous window, fill of the next) once per visit of update_interval steps
    (see _replay for the order on the lanes)."""
    master, states = _state_kinds(setup, cand)
    c = setup.cost
    numel = shard_numel(w.numel, cand.ranks)
    fb = shard_fb_seconds(setup, cand, w, fb)
    t_rs, t_ag = collective_seconds(setup, cand, w)
    t_opt = t_rs + c.update_seconds(numel, setup.optimizer, DTYPE_BYTES[setup.weight_dtype]) + t_ag
    if cand.states_on != "host":
        return fb + t_opt
    u = cand.update_interval
    moved = numel * ((4 if master else 0) + states * DTYPE_BYTES[cand.host_state_dtype])
    wb, fill = c.d2h_seconds(moved), c.h2d_seconds(moved)
    if cand.synchronous_copies:
        return fb + t_opt + (fill + wb) / u
    if cand.prefetch:  # the copies have the whole visit's compute to hide behind
        return max(u * (fb + t_opt), wb + fill) / u
    return fb + t_opt + max(0.0, wb + fill - fb - t_rs) / u


def hiding_interval(setup: Setup, cand: Candidate, act: ActivationProfile) -> int:
    """The fewest optimizer steps per visit whose compute hides every window's state copies (1 when the
    states stay on the GPU or one step already hides them)."""
    if cand.states_on != "host" or cand.synchronous_copies:
        return 1
    master, states = _state_kinds(setup, cand)
    c = setup.cost
    need = 1
    for w in cand.windows:
        numel = shard_numel(w.numel, cand.ranks)
        compute = (
            shard_fb_seconds(setup, cand, w, _profile(setup, cand, act, w).fb_seconds)
            + c.update_seconds(numel, setup.optimizer, DTYPE_BYTES[setup.weight_dtype])
            + sum(collective_seconds(setup, cand, w))
        )
        moved = numel * ((4 if master else 0) + states * DTYPE_BYTES[cand.host_state_dtype])
        copies = c.d2h_seconds(moved) + c.h2d_seconds(moved)
        need = max(need, math.ceil(copies / compute) if compute > 0 else 1)
    return need


def check_ranks(cand: Candidate) -> None:
    """Data parallel splits each step's micro-batches evenly over whole-model ranks."""
    if cand.ranks < 1:
        raise ValueError(f"ranks must be >= 1, got {cand.ranks}")
    if cand.layout not in ("data", "shard"):
        raise ValueError(f"layout must be 'data' or 'shard', got {cand.layout!r}")
    if cand.layout == "shard" and cand.ranks < 2:
        raise ValueError("sharded weights need at least 2 ranks (one rank holds the whole model)")
    if cand.ranks > 1 and cand.layer_gpu:
        raise ValueError("data parallel ranks hold the whole model: give ranks or layer_gpu, not both")
    if cand.grad_accum % cand.ranks:
        raise ValueError(
            f"data parallel splits each step's {cand.grad_accum} micro-batches over {cand.ranks} ranks; "
            f"use an accumulation that is a multiple of {cand.ranks}"
        )


def simulate(setup: Setup, cand: Candidate, act: ActivationProfile) -> SimResult:
    """Replay every window of the rotation; the timeline of the worst one, the mean step time.

    Windows share compute profiles by their (lowest, highest) trainable group; each window adds its own
    gradient buffers, update temporaries and copies. The worst window is then replayed event by event
    and must reach exactly the same peak (checked).
    """
    if not cand.windows:
        raise ValueError("a plan needs at least one window")
    check_ranks(cand)
    if cand.micro_batch != act.micro_batch:
        raise ValueError(f"activation profile is for micro-batch {act.micro_batch}, not {cand.micro_batch}")
    if cand.chunk_tokens != act.chunk_tokens:
        raise ValueError(
            f"activation profile has chunk_tokens {act.chunk_tokens}, the candidate {cand.chunk_tokens}"
        )
    missing = edge_patterns(cand.windows, setup.structure.num_layers) - act.edge_keys()
    if missing:
        raise IncompleteTableError(
            f"the activation table lacks the window-edge patterns {sorted(missing)} of this candidate; "
            "build it with edges=edge_patterns(windows, num_layers)"
        )
    pers_cats, slot = _persistent(setup, cand)
    persistent = [sum(m.values()) for m in pers_cats]
    total_s = 0.0
    worst, worst_peak = cand.windows[0], -1
    per_gpu = [0] * cand.num_gpus
    for w in cand.windows:
        prof = _profile(setup, cand, act, w)
        peaks = _window_peaks(setup, cand, prof, w, persistent)
        total_s += _step_seconds(setup, cand, w, prof.fb_seconds)
        for g, p in enumerate(peaks):
            per_gpu[g] = max(per_gpu[g], p)
        if max(peaks) > worst_peak:
            worst, worst_peak = w, max(peaks)
    mean_step = total_s / len(cand.windows)
    walk, _compute, timeline_s = _replay(setup, cand, act, worst, record=True)
    g = max(range(len(walk.peak)), key=lambda i: walk.peak[i])
    t_peak, cause, breakdown = walk.peak_at[g]
    peak = walk.peak[g]
    if peak != worst_peak:
        raise AssertionError(f"simulator self-check: event replay peak {peak} != window peak {worst_peak}")
    sim = StepSimulation(
        events=tuple(walk.events),
        memory=tuple(walk.samples[g]),
        peak_bytes=peak,
        peak_by_category=breakdown,
        peak_time_s=t_peak,
        peak_cause=f"{cause} (window {worst.index})",
        reserve_bytes=reserve_bytes(setup, peak),
        host_bytes=host_bytes(setup, cand),
        step_seconds=mean_step,
        tokens_per_step=cand.micro_batch * cand.grad_accum * setup.seq_len,
        timeline_seconds=timeline_s,
    )
    margin = headroom_bytes(setup, peak)
    return SimResult(
        step=sim,
        per_gpu_peak_bytes=tuple(per_gpu),
        worst_window=worst.index,
        budget_needed_bytes=peak + reserve_bytes(setup, peak) + margin,
        state_slot_bytes=slot,
        headroom_bytes=margin,
        host_peak_bytes=host_peak_bytes(setup, cand),
        host_machine_bytes=host_machine_bytes(setup, cand),
    )


# ---------------------------------------------------------------------------------------- from a plan


def setup_and_candidate(plan: object) -> tuple[Setup, Candidate, ActivationProfile]:
    """Rebuild the simulator inputs from a plan alone (model and GPU from profiles, activations traced)."""
    from chunkft import profiles
    from chunkft.executor.loss import DEFAULT_CHUNK_TOKENS
    from chunkft.planner.costs import cost_model, with_measured_rates
    from chunkft.planner.profile_model import activation_profile, model_structure

    p = plan  # chunkft.plan_format.Plan; typed loosely to keep this module free of the format's imports
    run = p.run  # type: ignore[attr-defined]
    preset = profiles.load_model(p.model.path or p.model.name, task=p.model.task)  # type: ignore[attr-defined]
    structure = model_structure(preset.config, preset.task, run.weight_dtype)
    gpu = profiles.load_gpu(p.hardware.gpu)  # type: ignore[attr-defined]
    pred = p.predictions  # type: ignore[attr-defined]
    setup = Setup(
        structure=structure,
        # a --calibrate plan's measured rates in place of the profile's (0: the profile's)
        cost=with_measured_rates(cost_model(gpu, run.compute_dtype, pred.compute_efficiency), p.hardware),  # type: ignore[attr-defined]
        weight_dtype=run.weight_dtype,
        optimizer=run.optimizer.name,
        sgd_momentum=run.optimizer.momentum > 0,
        seq_len=run.seq_len,
        # The plan stores the reserve and headroom the solver computed (fractions of its peak included).
        context_bytes=p.hardware.reserve_bytes,  # type: ignore[attr-defined]
        fragmentation=0.0,
        headroom_fixed_bytes=p.hardware.headroom_bytes,  # type: ignore[attr-defined]
    )
    ct = p.chunk_table  # type: ignore[attr-defined]
    pl = p.placement  # type: ignore[attr-defined]
    ck = p.checkpointing  # type: ignore[attr-defined]
    L = structure.num_layers
    layers = tuple(range(L)) if ck.mode == "all" else tuple(ck.layers)
    cand = Candidate(
        windows=windows_of(structure, ct.params, ct.chunks),
        sequence=tuple(p.rotation.sequence),  # type: ignore[attr-defined]
        checkpoint_layers=layers,
        micro_batch=run.micro_batch_size,
        grad_accum=run.grad_accum_steps,
        states_on=pl.optimizer_states,
        host_state_dtype=pl.host_state_dtype,
        prefetch=pl.prefetch,
        layer_gpu=tuple(pl.layer_gpu),
        update_interval=p.rotation.update_interval,  # type: ignore[attr-defined]
        chunk_tokens=DEFAULT_CHUNK_TOKENS if run.chunked_cross_entropy else None,
        ranks=p.hardware.num_gpus if p.hardware.parallel in ("data", "shard") else 1,  # type: ignore[attr-defined]
        layout="shard" if p.hardware.parallel == "shard" else "data",  # type: ignore[attr-defined]
    )
    act = activation_profile(
        preset.config,
        preset.task,
        run.micro_batch_size,
        run.seq_len,
        run.compute_dtype,
        run.attn_implementation,
        padded=run.padded_batches,  # padding changes the attention path (and its saved tensors)
        chunk_tokens=cand.chunk_tokens,
        edges=edge_patterns(cand.windows, L),
    )
    return setup, cand, act


def simulate_plan(plan: object) -> StepSimulation:
    """The simulation of a saved plan (what reports draw and what the CLI verifies before writing)."""
    setup, cand, act = setup_and_candidate(plan)
    return simulate(setup, cand, act).step


def window_peaks(setup: Setup, cand: Candidate, act: ActivationProfile) -> tuple[int, ...]:
    """Allocated peak (max over GPUs) of each window's step, in window order (for accuracy checks)."""
    pers_cats, _ = _persistent(setup, cand)
    persistent = [sum(m.values()) for m in pers_cats]
    return tuple(
        max(_window_peaks(setup, cand, _profile(setup, cand, act, w), w, persistent)) for w in cand.windows
    )
