"""Budget sweep with the real simulator: the plan's model and batch, every K, on several GPU profiles.

For each GPU and K the simulator gives (peak + reserve, step time); the best plan for a budget is the
fastest K whose peak plus reserve fits it. Checkpointing, micro-batch and placement stay the plan's, so
this is the plan's family across budgets, not a fresh solver search per budget.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from executor.chunks import partition
from planner.plan import Plan

from .data import SweepPoint

DEFAULT_GPUS = ("rtx-4090", "a100-80gb", "h100-80gb")
K_CHOICES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def simulated_sweep(
    plan: Plan, gpus: Sequence[str] = DEFAULT_GPUS, ks: Sequence[int] = K_CHOICES, points_per_gpu: int = 40
) -> tuple[SweepPoint, ...]:
    """SweepPoints per GPU profile (the plan's own GPU first) over budgets up to each GPU's memory."""
    import profiles
    from planner.costs import cost_model
    from planner.simulator import simulate, windows_of
    from planner.solver import rotation_sequence

    setup, cand, act = _setup_and_candidate(plan)
    st = setup.structure
    keys = list(dict.fromkeys([plan.hardware.gpu, *gpus]))
    out: list[SweepPoint] = []
    for key in keys:
        gpu = profiles.load_gpu(key)
        if gpu.pcie_gen is None:  # the host CPU profile has no budget to sweep
            continue
        s = dataclasses.replace(
            setup, cost=cost_model(gpu, plan.run.compute_dtype, plan.predictions.compute_efficiency)
        )
        options = []
        for k in ks:
            try:
                chunks = partition(
                    st.specs, num_chunks=k, state_bytes_per_element=plan.chunk_table.state_bytes_per_element
                )
            except ValueError:
                continue
            c = dataclasses.replace(
                cand,
                windows=windows_of(st, st.specs, chunks),
                sequence=rotation_sequence(plan.rotation.order, k, plan.rotation.seed),
                prefetch=cand.prefetch and k > 1,
            )
            r = simulate(s, c, act)
            options.append((k, r.budget_needed_bytes, r.step.step_seconds))
        label = gpu.name if key != plan.hardware.gpu else plan.hardware.gpu_name
        total = gpu.memory_total_bytes
        lo = min(b for _, b, _ in options) * 3 // 4 if options else total // 4
        budgets = sorted({lo + (total - lo) * i // (points_per_gpu - 1) for i in range(points_per_gpu)})
        for budget in budgets:
            fits = [o for o in options if o[1] <= budget]
            if fits:
                k, need, secs = min(fits, key=lambda o: (o[2], o[0]))
                out.append(SweepPoint(label, budget, k, need, secs, True))
            else:
                out.append(SweepPoint(label, budget, None, 0, 0.0, False))
    return tuple(out)


def _setup_and_candidate(plan: Plan):  # type: ignore[no-untyped-def]
    from planner.simulator import setup_and_candidate

    return setup_and_candidate(plan)
