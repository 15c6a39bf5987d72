"""What a report draws, as typed data: the plan's figures, the simulated step, the sweep and a run.

Figures and the HTML read only these types, so they can be built and tested from hand-made values and
fed from the real planner (reports.inputs) without depending on the plan's exact field layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from chunkft.chunks import Chunk, ParamSpec
from chunkft.timeline import StepSimulation


@dataclass(frozen=True)
class Alternative:
    """One plan the solver considered (or a baseline such as dense AdamW), as the plan records it."""

    label: str
    k: int
    peak_bytes: int  # allocated peak, without the reserve (as in the plan)
    step_seconds: float
    tokens_per_second: float
    feasible: bool


@dataclass(frozen=True)
class SweepPoint:
    """The solver's best plan for one (GPU, budget); infeasible when nothing fits."""

    gpu: str
    budget_bytes: int
    k: int | None
    peak_bytes: int  # allocated peak plus reserve and headroom: what is compared with the budget
    step_seconds: float
    feasible: bool
    checkpointing: str = ""  # the solver's choice there: "none" | "selected" | "all" ("" when unknown)
    choice: str = ""  # the whole choice in words, e.g. "K=256, checkpointing none, states host ..."


@dataclass(frozen=True)
class RunRecord:
    """What chunkft-run measured (run.json): the numbers the plan predicted, and the loss curves."""

    peak_bytes: int | None  # allocated peak over the measured steps; None when no step was measured
    peak_by_category: tuple[tuple[str, int], ...]  # empty when the method gives no breakdown (CUDA)
    step_seconds: float
    tokens_per_second: float
    train_losses: tuple[tuple[int, float], ...]  # (optimizer step, loss)
    eval_losses: tuple[tuple[int, float], ...]
    memory_method: str = ""  # "cuda-allocator" | "memtracker" (CPU)
    device: str = ""
    reserved_bytes: int | None = None  # the CUDA caching allocator's reserve at the peak
    notes: tuple[str, ...] = ()  # what could not be checked about the run (e.g. no plan sha256)


@dataclass(frozen=True)
class ReportData:
    """Everything one report shows."""

    model_name: str
    gpu_name: str
    budget_bytes: int  # what the plan may use, reserve included
    reserve_bytes: int  # CUDA context + fragmentation, counted against the budget
    memory_total_bytes: int
    num_chunks: int
    checkpointing: str  # e.g. "none", "full", "every 2nd block"
    grad_bytes_per_element: int  # the window's gradient buffers (fp32)
    state_bytes_per_element: int  # optimizer states, e.g. 8 for AdamW in fp32
    master_bytes_per_element: int  # fp32 master copy of the window (0 when the weights are fp32)
    params: tuple[ParamSpec, ...]
    chunks: tuple[Chunk, ...]
    rotation: tuple[int, ...]  # chunk indices in visiting order
    simulation: StepSimulation
    alternatives: tuple[Alternative, ...] = ()
    sweep: tuple[SweepPoint, ...] = ()
    run: RunRecord | None = None
    notes: tuple[str, ...] = ()  # what the report could not show and why
    headroom_bytes: int = 0  # the plan's safety margin, kept free on top of peak + reserve


def drawn_step_seconds(sim: StepSimulation) -> float:
    """Length of the step the events describe (the worst-memory window's), not the rotation mean.

    Older simulations without timeline_seconds: the last event's end.
    """
    if sim.timeline_seconds > 0:
        return sim.timeline_seconds
    return max([e.end_s for e in sim.events] + [s.time_s for s in sim.memory] + [0.0])
