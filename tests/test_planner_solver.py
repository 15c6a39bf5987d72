"""Solver golden cases on a hand-built cost model: slack, binding and infeasible budgets; monotonicity."""

import pytest

from chunkft import profiles
from chunkft.planner.costs import CostModel
from chunkft.planner.profile_model import model_structure, tables_for
from chunkft.planner.solver import Limits, Solver, Space, balance_layers, batch_splits, make_setup

GIB = 2**30
# A made-up GPU: 100 TFLOP/s, 1 TB/s memory, 10 GB/s each way to the host.
COST = CostModel(100 * 10**12, 0.5, 10**12, 10**10, 10**10, 10**10)


@pytest.fixture(scope="module")
def tiny():  # type: ignore[no-untyped-def]
    preset = profiles.load_model("tiny-llama")
    st = model_structure(preset.config, preset.task, "float32")
    setup = make_setup(
        st,
        COST,
        weight_dtype="float32",
        optimizer="adamw",
        sgd_momentum=False,
        seq_len=256,
        on_gpu=True,
        context_bytes=1 << 20,
        fragmentation=0.0,
    )
    return preset, setup


def _solve(tiny, budget: int, **space):  # type: ignore[no-untyped-def]
    preset, setup = tiny
    sp = Space(global_batch=space.pop("global_batch", 2), **space)
    solver = Solver(
        setup,
        Limits(budget, 64 * GIB),
        tables_for(preset.config, preset.task, 256, "float32"),
        sp,
    )
    return solver.solve()


def test_slack_budget_takes_fastest_full_update(tiny) -> None:  # type: ignore[no-untyped-def]
    sol = _solve(tiny, 64 * GIB)
    assert sol.best is not None and sol.best.feasible
    # with room to spare: one window (plain full fine-tuning), no checkpointing (recompute only costs time)
    assert sol.best.num_chunks == 1
    assert sol.best.checkpoint_mode == "none"
    fastest = min(o.rotation_seconds_per_token for o in sol.runners_up)
    assert sol.best.rotation_seconds_per_token <= fastest * 1.01
    # more windows look faster per step (backward stops higher) but each step trains less of the model
    assert min(o.seconds_per_token for o in sol.runners_up) < sol.best.seconds_per_token
    labels = [b.label for b in sol.baselines]
    assert any("dense" in x for x in labels) and any("synchronous" in x for x in labels)


def test_binding_budget_uses_memory_savers_and_fits(tiny) -> None:  # type: ignore[no-untyped-def]
    slack = _solve(tiny, 64 * GIB).best
    assert slack is not None
    budget = slack.result.budget_needed_bytes - 1  # the fastest plan no longer fits
    sol = _solve(tiny, budget)
    assert sol.best is not None
    assert sol.best.result.budget_needed_bytes <= budget
    assert sol.best.seconds_per_token * 1.01 >= slack.seconds_per_token  # 1%: the solver's tie margin


def test_infeasible_budget_reports_smallest_that_fits(tiny) -> None:  # type: ignore[no-untyped-def]
    sol = _solve(tiny, 4 << 20)
    assert sol.best is None and sol.smallest is not None
    need = sol.smallest.result.budget_needed_bytes
    assert need > 4 << 20
    again = _solve(tiny, need)
    assert again.best is not None and again.best.result.budget_needed_bytes <= need


def test_smaller_budget_never_predicts_larger_peak(tiny) -> None:  # type: ignore[no-untyped-def]
    top = _solve(tiny, 64 * GIB).best
    low = _solve(tiny, 1 << 30).smallest
    assert top is not None and low is not None
    hi_need, lo_need = top.result.budget_needed_bytes, low.result.budget_needed_bytes
    last_peak = None
    for i in range(6):
        budget = hi_need - (hi_need - lo_need) * i // 5
        sol = _solve(tiny, budget)
        assert sol.best is not None
        assert sol.best.result.budget_needed_bytes <= budget
        peak = sol.best.result.step.peak_bytes
        if last_peak is not None:
            assert peak <= last_peak
        last_peak = peak


def test_batch_splits_and_layer_balance() -> None:
    assert batch_splits(Space(global_batch=4)) == [(1, 4), (2, 2), (4, 1)]
    assert batch_splits(Space(global_batch=4, grad_accum=2)) == [(2, 2)]
    placement = balance_layers([10] * 8, 2)
    assert placement == (0, 0, 0, 0, 1, 1, 1, 1)
    assert balance_layers([10] * 8, 1) == ()


def test_random_rotation_in_the_plan_is_the_one_the_executor_runs() -> None:
    from chunkft.executor.rotation import Rotation, RotationSpec
    from chunkft.planner.solver import rotation_sequence

    for k, seed in ((4, 0), (7, 3), (16, 11)):
        rot = Rotation(RotationSpec(order="random", seed=seed), k)
        first_cycle = []
        for _ in range(k):
            first_cycle.append(rot.current())
            rot.advance()
        assert rotation_sequence("random", k, seed) == tuple(first_cycle)


def test_update_interval_rule() -> None:
    """Hand-made cases of choose_update_interval: VISIT_STEPS when the run is long, at least what hides
    the copies, never fewer than MIN_CYCLES visits of every window."""
    from chunkft.planner.solver import MIN_CYCLES, VISIT_STEPS, choose_update_interval

    assert choose_update_interval(1, 1000, 5) == 1  # one window: nothing rotates
    assert choose_update_interval(4, 10_000, 1) == VISIT_STEPS
    assert choose_update_interval(4, 10_000, 25) == 25  # copies take 25 steps of compute to hide
    assert choose_update_interval(4, 40, 1) == 40 // (4 * MIN_CYCLES)  # short run: windows revisited
    assert choose_update_interval(64, 10, 1) == 1
    assert choose_update_interval(4, 0, 3) == max(3, VISIT_STEPS)  # run length unknown


def test_headroom_is_kept_free_on_top_of_peak_and_reserve(tiny) -> None:  # type: ignore[no-untyped-def]
    from dataclasses import replace

    preset, setup = tiny
    bare = replace(setup, headroom_fixed_bytes=0, headroom_fraction=0.0)
    slack = _solve((preset, bare), 64 * GIB).best
    budget = slack.result.budget_needed_bytes - 1  # binding: memory savers needed
    tight = _solve((preset, bare), budget).best
    assert tight is not None
    exact = tight.result.budget_needed_bytes  # fits with nothing to spare
    assert _solve((preset, bare), exact).best.candidate == tight.candidate
    margin = replace(setup, headroom_fixed_bytes=64 << 10, headroom_fraction=0.02)
    kept = _solve((preset, margin), exact).best
    assert kept is None or kept.candidate != tight.candidate  # the same choice no longer fits
    if kept is not None:
        r = kept.result
        assert r.headroom_bytes == (64 << 10) + int(0.02 * r.step.peak_bytes)
        assert r.step.peak_bytes + r.step.reserve_bytes + r.headroom_bytes == r.budget_needed_bytes <= exact


def test_the_host_budget_covers_a_checkpoint_not_only_the_state_stores(tiny) -> None:  # type: ignore[no-untyped-def]
    preset, setup = tiny
    best = _solve(tiny, 64 * GIB).best
    states = best.result.step.host_bytes
    assert best.result.host_peak_bytes > states
    sp = Space(global_batch=2, num_chunks=best.num_chunks)
    tables = tables_for(preset.config, preset.task, 256, "float32")
    for host, fits in ((best.result.host_peak_bytes, True), (best.result.host_peak_bytes - 1, False)):
        sol = Solver(setup, Limits(64 * GIB, host), tables, sp).solve()
        ok = [o.candidate for o in (sol.best, *sol.runners_up) if o is not None]
        assert (best.candidate in ok) == fits


def test_why_not_chosen_follows_the_tie_rule() -> None:
    """The summary's reason for each alternative faster per step than the chosen plan (issue 17)."""
    from chunkft.planner.solver import TIE_RULE, TIE_TOLERANCE, Contender, why_not_chosen

    assert f"within {TIE_TOLERANCE:.0%} of the fastest" in TIE_RULE
    chosen = Contender(k=2, step_seconds=0.100, peak_bytes=2**30, feasible=True)
    assert why_not_chosen(Contender(1, 0.05, 2**29, False), chosen) == "does not fit the budget"
    slower = why_not_chosen(Contender(4, 0.060, 2**29, True), chosen)  # faster step, 240 ms per rotation
    assert slower.startswith("slower to update every parameter once: K=4 x 60.0 ms = 240.0 ms"), slower
    assert slower.endswith("the chosen K=2 x 100.0 ms = 200.0 ms")
    fewer = why_not_chosen(Contender(4, 0.0498, 2**29, True), chosen)  # 199.2 ms: a tie
    assert fewer == "within 1% of the chosen plan: the chosen plan has fewer chunks (K=2, not 4)"
    memory = why_not_chosen(Contender(2, 0.0995, 2**31, True), chosen)
    assert memory == (
        "within 1% of the chosen plan: the chosen plan needs less memory (1.00 GiB peak, not 2.00 GiB)"
    )
