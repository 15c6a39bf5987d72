"""From a Plan (chunkft/plan_format.py, v1) and the simulated step to the ReportData the figures draw."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chunkft.plan_format import Plan
from chunkft.timeline import StepSimulation

from .data import Alternative, ReportData, RunRecord, SweepPoint

GRAD_BYTES_PER_ELEMENT = 4  # the window's gradient buffers are fp32 (ARCHITECTURE: SliceGradients)


def checkpointing_text(plan: Plan) -> str:
    c = plan.checkpointing
    if c.mode == "selected":
        return f"selected layers {', '.join(map(str, c.layers))}"
    return {"none": "none", "all": "all layers"}.get(c.mode, c.mode)


def alternatives_of(plan: Plan) -> tuple[Alternative, ...]:
    return tuple(
        Alternative(a.label, a.k, a.peak_bytes, a.step_seconds, a.tokens_per_second, a.feasible)
        for a in plan.alternatives
    )


def sweep_from_alternatives(
    alternatives: Sequence[Alternative], *, gpu: str, reserve_bytes: int, budgets: Sequence[int]
) -> tuple[SweepPoint, ...]:
    """For each budget, the fastest alternative whose peak plus reserve fits it (infeasible when none).

    A stand-in for the solver's own sweep on one GPU: it only knows the alternatives the plan recorded.
    """
    points = []
    for budget in budgets:
        fits = [a for a in alternatives if a.peak_bytes + reserve_bytes <= budget and a.step_seconds > 0]
        best = min(fits, key=lambda a: a.step_seconds, default=None)
        if best is None:
            points.append(SweepPoint(gpu, budget, None, 0, 0.0, False))
        else:
            points.append(
                SweepPoint(gpu, budget, best.k, best.peak_bytes + reserve_bytes, best.step_seconds, True)
            )
    return tuple(points)


def report_data(
    plan: Plan,
    simulation: StepSimulation,
    *,
    run: RunRecord | None = None,
    sweep: Sequence[SweepPoint] | None = None,
) -> ReportData:
    """Collect what the report shows; without a solver sweep, derive one from the plan's alternatives."""
    hw, ct = plan.hardware, plan.chunk_table
    alts = alternatives_of(plan)
    notes: list[str] = list(run.notes) if run is not None else []
    # data parallel or sharded weights: one rank per GPU, so memory is one GPU's (the simulation is one
    # rank's: the whole model, or its 1/N shard of the weights and the blocks gathered in flight)
    per_rank = hw.parallel in ("data", "shard")
    gpus_pooled = 1 if per_rank else hw.num_gpus
    gpu_label = hw.gpu_name + (f" × {hw.num_gpus}" if hw.num_gpus > 1 else "")
    gpu_label += {"data": " (data parallel, per rank)", "shard": " (sharded weights, per rank)"}.get(
        hw.parallel, ""
    )
    if sweep is None:
        lo = min([a.peak_bytes for a in alts] + [simulation.peak_bytes]) + hw.reserve_bytes
        hi = hw.memory_total_bytes * gpus_pooled
        n = 40
        budgets = sorted(
            {int(lo * 0.8 + (hi - lo * 0.8) * i / (n - 1)) for i in range(n)} | {hw.budget_bytes}
        )
        sweep = sweep_from_alternatives(alts, gpu=gpu_label, reserve_bytes=hw.reserve_bytes, budgets=budgets)
        notes.append(
            "The budget sweep is derived from the alternatives recorded in the plan, for this GPU only "
            "(no solver sweep was given)."
        )
    return ReportData(
        model_name=plan.model.name,
        gpu_name=gpu_label,
        budget_bytes=hw.budget_bytes,
        reserve_bytes=hw.reserve_bytes,
        headroom_bytes=hw.headroom_bytes,
        memory_total_bytes=hw.memory_total_bytes * gpus_pooled,
        num_chunks=ct.num_chunks,
        checkpointing=checkpointing_text(plan),
        grad_bytes_per_element=GRAD_BYTES_PER_ELEMENT,
        state_bytes_per_element=ct.state_bytes_per_element,
        master_bytes_per_element=0 if plan.run.weight_dtype == "float32" else 4,
        params=ct.params,
        chunks=ct.chunks,
        rotation=plan.rotation.sequence,
        simulation=simulation,
        alternatives=alts,
        sweep=tuple(sweep),
        run=run,
        notes=tuple(notes),
    )


def default_simulator() -> Callable[[Plan], StepSimulation]:
    """planner.simulator.simulate_plan, imported only when a report needs it."""
    from chunkft.planner.simulator import simulate_plan

    return simulate_plan
