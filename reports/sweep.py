"""Budget sweep through the real solver: the plan's request re-solved per budget and per GPU profile.

planner.solver.sweep runs a full Solver.solve() for every point, so each point is what chunkft-plan
would choose there (K, checkpointing, micro-batch, placement and, unless the plan forced it, the
cross-entropy all free; the model, dtype, global batch, sequence length, padding, optimizer, rotation
and host memory are the plan's). This module only builds the solver's inputs from the plan and turns
its answers into SweepPoints.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from chunkft.plan_format import Plan
from chunkft.planner.profile_model import ModelStructure

from .data import SweepPoint

if TYPE_CHECKING:
    from chunkft.planner.simulator import Setup
    from chunkft.planner.solver import Space, Tables

DEFAULT_GPUS = ("rtx-4090", "a100-80gb", "h100-80gb")
POINTS_PER_GPU = 10


def budget_grid(low_bytes: int, high_bytes: int, points: int = POINTS_PER_GPU) -> list[int]:
    """Geometric budgets from low to high: dense where plans start to fit, sparse where all fit."""
    if low_bytes <= 0 or high_bytes <= low_bytes or points < 2:
        return [high_bytes]
    ratio = math.log(high_bytes / low_bytes)
    return sorted({int(low_bytes * math.exp(ratio * i / (points - 1))) for i in range(points)} | {high_bytes})


def solver_sweep(
    plan: Plan,
    *,
    structure: ModelStructure | None = None,
    gpus: Sequence[str] = DEFAULT_GPUS,
    points_per_gpu: int = POINTS_PER_GPU,
) -> tuple[SweepPoint, ...]:
    """SweepPoints for the plan's GPU (its budget included) and each of `gpus`, up to each one's memory.

    structure: the plan's, when the caller already has it. Nothing is traced twice either way: the
    activation tables are kept per process (planner.profile_model.activation_profile).
    """
    from chunkft import profiles
    from chunkft.planner.costs import cost_model, with_measured_rates
    from chunkft.planner.profile_model import model_structure, tables_for
    from chunkft.planner.simulator import CUDA_CONTEXT_BYTES, FRAGMENTATION
    from chunkft.planner.solver import DEFAULT_HEADROOM, NO_HEADROOM, Headroom, Space, make_setup, sweep

    run, hw = plan.run, plan.hardware
    preset = profiles.load_model(plan.model.path or plan.model.name, task=plan.model.task)
    if structure is None:
        structure = model_structure(preset.config, preset.task, run.weight_dtype)

    tables = tables_for(
        preset.config,
        preset.task,
        run.seq_len,
        run.compute_dtype,
        run.attn_implementation,
        padded=run.padded_batches,  # the plan's padding: it changes the attention path
    )
    plan_gpu = profiles.load_gpu(hw.gpu)
    plan_on_gpu = plan_gpu.pcie_gen is not None
    pred = plan.predictions
    default_reserve = (
        CUDA_CONTEXT_BYTES + int(FRAGMENTATION * pred.peak_bytes) if plan_on_gpu else 0
    ) == hw.reserve_bytes
    default = DEFAULT_HEADROOM if plan_on_gpu else NO_HEADROOM
    default_headroom = hw.headroom_bytes == default.fixed_bytes + int(default.fraction * pred.peak_bytes)
    weights = sum(s.numel * _dtype_bytes(s.dtype) for s in structure.specs)
    setups, budgets = [], {}
    for key in dict.fromkeys([hw.gpu, *gpus]):
        gpu = profiles.load_gpu(key)
        on_gpu = gpu.pcie_gen is not None
        label = hw.gpu_name if key == hw.gpu else gpu.name
        cost = cost_model(gpu, run.compute_dtype, pred.compute_efficiency)
        if key == hw.gpu:  # a --calibrate plan's measured rates are this machine's, not the profile's
            cost = with_measured_rates(cost, hw)
        setup = make_setup(
            structure,
            cost,
            weight_dtype=run.weight_dtype,
            optimizer=run.optimizer.name,
            sgd_momentum=run.optimizer.momentum > 0,
            seq_len=run.seq_len,
            on_gpu=on_gpu,
            # A reserve the user fixed stays fixed on every GPU; the default one is each GPU's default.
            context_bytes=None if default_reserve else hw.reserve_bytes,
            fragmentation=None if default_reserve else 0.0,
            # Likewise the headroom: each GPU's default, or the plan's bytes when the user chose them.
            headroom=None if default_headroom else Headroom(hw.headroom_bytes),
        )
        setups.append((label, setup))
        shared_by = 1 if hw.parallel == "data" else hw.num_gpus  # data parallel: whole weights per GPU
        # (layers split or sharded: about 1/N each)
        grid = budget_grid(weights // shared_by, gpu.memory_total_bytes, points_per_gpu)
        budgets[label] = sorted(set(grid) | ({hw.budget_bytes} if key == hw.gpu else set()))
    space = Space(
        global_batch=run.micro_batch_size * run.grad_accum_steps,
        rotation=plan.rotation.order,
        rotation_seed=plan.rotation.seed,
        layer_gpu=tuple(plan.placement.layer_gpu),
        ranks=hw.num_gpus if hw.parallel in ("data", "shard") else 1,
        layout="shard" if hw.parallel == "shard" else "data",
    )
    plan_setup = setups[0][1]  # the plan's GPU comes first
    space = replace(space, cross_entropy=cross_entropy_mode(plan, plan_setup, tables, space))
    points = sweep(setups, space, tables, lambda label: budgets[label], hw.host_budget_bytes)
    out = []
    for p in points:
        b = p.best
        if b is None:
            out.append(SweepPoint(p.gpu, p.budget_bytes, None, 0, 0.0, False))
            continue
        c = b.candidate
        choice = (
            f"K={b.num_chunks}, checkpointing {b.checkpoint_mode}, {b.placement_text()}, "
            f"micro-batch {c.micro_batch}x{c.grad_accum}"
        )
        out.append(
            SweepPoint(
                p.gpu,
                p.budget_bytes,
                b.num_chunks,
                b.result.budget_needed_bytes,
                b.result.step.step_seconds,
                True,
                checkpointing=b.checkpoint_mode,
                choice=choice,
            )
        )
    return tuple(out)


def cross_entropy_mode(plan: Plan, setup: Setup, tables: Tables, space: Space) -> str:
    """The sweep's --cross-entropy: what the plan's user forced (run.cross_entropy), else "auto".

    Kept where forced, so the sweep's point at the plan's budget is the plan; otherwise the loss is free
    like K: pinning "chunked" would show slower chunked plans where the full logits fit, and pinning
    "full" would show budgets as infeasible that chunkft-plan fits with chunked cross-entropy. A file
    written before run.cross_entropy existed reads "auto"; a chunked one whose own budget would not have
    made auto try chunked cross-entropy (the logits are small there) was forced, and is kept.
    """
    from chunkft.executor.loss import DEFAULT_CHUNK_TOKENS
    from chunkft.planner.solver import Limits, Solver

    if plan.run.cross_entropy != "auto":
        return plan.run.cross_entropy
    if not plan.run.chunked_cross_entropy:
        return "auto"
    hw = plan.hardware
    probe = Solver(setup, Limits(hw.budget_bytes, hw.host_budget_bytes), tables, space)
    auto_tries = DEFAULT_CHUNK_TOKENS in probe.loss_options(plan.run.micro_batch_size)
    return "auto" if auto_tries else "chunked"


def _dtype_bytes(dtype: str) -> int:
    from chunkft.chunks import DTYPE_BYTES

    return DTYPE_BYTES[dtype]
