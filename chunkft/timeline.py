"""What the step simulator produces: lane events and a memory timeline of one training step.

The simulator (planner/simulator.py) writes these; the solver reads the figures, reports draw them and
trace.json replays them. Times are float seconds from the start of the step, sizes integer bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# "interconnect": data parallel's collectives between the ranks (reduce-scatter, all-gather)
Lane = Literal["compute", "h2d", "d2h", "interconnect"]
LANES: tuple[Lane, ...] = ("compute", "h2d", "d2h", "interconnect")

# Memory categories, in stacking order, shared by the simulator, the runner's measurements and reports.
CATEGORIES: tuple[str, ...] = (
    "weights",
    "activations",
    "gradients",
    "optimizer_states",
    "master",
    "prefetch",
    "temporaries",
)


@dataclass(frozen=True)
class LaneEvent:
    """One piece of work on one lane: a layer's forward or backward, a copy, an optimizer update."""

    lane: Lane
    name: str  # e.g. "fwd layers.3", "bwd layers.3", "update chunk 5", "prefetch chunk 6"
    start_s: float
    end_s: float
    chunk: int | None = None  # chunk index for transfers and updates
    layer: int | None = None  # block index for compute on a block


@dataclass(frozen=True)
class MemorySample:
    """Bytes held on the GPU by category right after an event (every allocation and free is one)."""

    time_s: float
    bytes_by_category: tuple[tuple[str, int], ...]  # (category, bytes) in CATEGORIES order
    event: str  # what changed the memory here

    @property
    def total_bytes(self) -> int:
        return sum(b for _, b in self.bytes_by_category)


@dataclass(frozen=True)
class StepSimulation:
    """One simulated training step (the worst chunk for memory, timing averaged over the rotation)."""

    events: tuple[LaneEvent, ...]
    memory: tuple[MemorySample, ...]
    peak_bytes: int  # allocated peak, without the reserve
    peak_by_category: tuple[tuple[str, int], ...]  # the breakdown at the peak
    peak_time_s: float
    peak_cause: str  # the event at the peak, e.g. "bwd layers.31 (recompute)"
    reserve_bytes: int  # CUDA context + allocator fragmentation, counted against the budget
    host_bytes: int  # host memory the plan needs (states of inactive chunks, pinned buffers)
    step_seconds: float  # one optimizer step, averaged over the rotation: all micro-batches and the update
    tokens_per_step: int
    timeline_seconds: float = 0.0  # length of the drawn step (the worst window's), which events cover

    @property
    def tokens_per_second(self) -> float:
        return self.tokens_per_step / self.step_seconds if self.step_seconds > 0 else 0.0
