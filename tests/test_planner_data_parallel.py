"""The simulator's data-parallel terms on hand-made inputs (issue 13 step 4): each rank's shard of the
slots and stores, the DP step's buffers moment by moment, the collectives on the interconnect lane, the
per-rank share of the micro-batches, and the solver choosing under the per-rank peak. Nothing traced:
made-up activation tables (tests/test_solver_tables.py)."""

from dataclasses import replace

import pytest
from test_solver_tables import COST, SEQ, made_up_table

from chunkft import profiles
from chunkft.chunks import partition
from chunkft.executor.distributed import World, shard_bounds
from chunkft.planner.profile_model import model_structure
from chunkft.planner.simulator import (
    Candidate,
    Window,
    check_ranks,
    checkpoint_host_bytes,
    collective_bytes,
    collective_seconds,
    edge_patterns,
    host_bytes,
    host_machine_bytes,
    shard_numel,
    simulate,
    step_temps,
    windows_of,
)
from chunkft.planner.solver import Limits, Solver, Space, batch_splits, make_setup

GIB = 2**30


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    st = model_structure(profiles.load_model("tiny-llama").config, "causal-lm", "float32")
    return make_setup(
        st, COST, weight_dtype="float32", optimizer="adamw", sgd_momentum=False, seq_len=SEQ, on_gpu=True
    )


def _cand(setup, k: int, ranks: int, accum: int = 2, states_on: str = "host", prefetch: bool = True):  # type: ignore[no-untyped-def]
    st = setup.structure
    windows = windows_of(st, st.specs, partition(list(st.specs), num_chunks=k, state_bytes_per_element=8))
    return Candidate(windows, tuple(range(k)), (), 1, accum, states_on, "float32", prefetch, ranks=ranks)


def _table(cand: Candidate, setup):  # type: ignore[no-untyped-def]
    return made_up_table(1024, edges=edge_patterns(cand.windows, setup.structure.num_layers))


def test_shards_are_padded_like_the_executors() -> None:
    for numel in (1, 5, 1000, 1001, 791_393):
        for n in (1, 2, 3, 8):
            assert shard_numel(numel, n) == shard_bounds(numel, World(n - 1, n))[2]
    assert shard_numel(1001, 2) == 501 and shard_numel(5, 4) == 2


def test_step_temps_count_what_each_moment_of_the_dp_step_holds(setup) -> None:  # type: ignore[no-untyped-def]
    w = Window(0, 1001, 0, 0, 600, ((0, 1001),))
    one = replace(_cand(setup, 2, 1), windows=(w,))
    assert step_temps(setup, one, w) == (("update", 2 * 4 * 600),)  # AdamW: sqrt and division, per slice
    two = replace(one, ranks=2)
    per = 501
    assert dict(step_temps(setup, two, w)) == {
        "reduce-scatter": 4 * 2 * per + 4 * per,  # the flat gradient padded to 2*per, own shard
        "norm": 4 * per + 8 * per + 8 * per,  # shard, its fp64 copy, squared (per < NORM_PIECE)
        "update": 4 * per + 2 * 4 * per,  # shard + the update's temporaries of one piece (<= per)
        "all-gather": 4 * per + 4 * per + 4 * 2 * per,  # shard, own rows, every rank's rows (fp32)
    }
    bf16 = dict(step_temps(replace(setup, weight_dtype="bfloat16"), two, w))
    assert bf16["all-gather"] == 4 * per + 2 * per + 2 * 2 * per  # the rows travel in the weight dtype


def test_collectives_move_a_rings_share_over_the_interconnect(setup) -> None:  # type: ignore[no-untyped-def]
    w = Window(0, 1001, 0, 0, 600, ((0, 1001),))
    two = replace(_cand(setup, 2, 2), windows=(w,))
    assert collective_bytes(setup, replace(two, ranks=1), w) == (0, 0)
    assert collective_bytes(setup, two, w) == (501 * 4 + 8, 501 * 4)  # (N-1)/N of 2x501, + the fp64 norm
    four = replace(two, ranks=4, grad_accum=4)
    assert collective_bytes(setup, four, w) == (3 * 251 * 4 + 12, 3 * 251 * 4)
    before, after = collective_seconds(setup, two, w)
    assert (before, after) == (
        pytest.approx((501 * 4 + 8) / COST.interconnect_bytes_per_s),
        pytest.approx(501 * 4 / COST.interconnect_bytes_per_s),
    )
    slow = replace(setup, cost=replace(COST, interconnect_bytes_per_s=COST.interconnect_bytes_per_s // 10))
    assert collective_seconds(slow, two, w)[0] == pytest.approx(10 * before)  # PCIe vs NVLink


def test_two_ranks_hold_shards_of_slots_and_stores_and_the_dp_buffers_at_the_peak(setup) -> None:  # type: ignore[no-untyped-def]
    one, two = _cand(setup, 4, 1), _cand(setup, 4, 2)
    act = _table(one, setup)
    r1, r2 = simulate(setup, one, act), simulate(setup, two, act)
    shards = [shard_numel(w.numel, 2) for w in two.windows]
    assert r2.state_slot_bytes == 2 * 4 * max(shards)  # exp_avg + exp_avg_sq of the largest shard
    assert r1.state_slot_bytes == 2 * 4 * max(w.numel for w in one.windows)
    assert r2.step.host_bytes == host_bytes(setup, two) == 8 * sum(shards)
    assert r2.host_machine_bytes == 2 * (r2.step.host_bytes + checkpoint_host_bytes(setup, two))  # all save
    assert host_machine_bytes(setup, one) == r1.host_peak_bytes
    # the made-up blocks keep 1 KiB: the peak is the optimizer step of the window with the most
    # elements: weights + two prefetch slots + its fp32 gradients + the DP buffers of its largest moment
    # (here the norm: a shard below NORM_PIECE is squared in fp64 whole, 20 bytes an element, above the
    # reduce-scatter's padded gradient and shard, 12)
    weights = sum(s.numel * 4 for s in setup.structure.specs)
    worst = max(two.windows, key=lambda w: w.numel)
    moment, temps = max(step_temps(setup, two, worst), key=lambda m: m[1])
    assert moment == "norm"
    assert r2.step.peak_bytes == weights + 2 * r2.state_slot_bytes + 4 * worst.numel + temps
    assert r2.step.peak_cause.startswith("norm all-reduce chunk")
    assert r1.step.peak_cause.startswith("update chunk")
    assert dict(r2.step.peak_by_category)["temporaries"] == temps


def test_a_rank_runs_its_share_of_the_micro_batches_and_waits_for_the_collectives(setup) -> None:  # type: ignore[no-untyped-def]
    one = _cand(setup, 4, 1, states_on="gpu", prefetch=False)
    two = _cand(setup, 4, 2, states_on="gpu", prefetch=False)
    half = replace(one, grad_accum=1)  # one rank with one micro-batch: the forward/backward of a rank
    act = _table(one, setup)
    r1, r2, rh = simulate(setup, one, act), simulate(setup, two, act), simulate(setup, half, act)
    assert r2.step.tokens_per_step == r1.step.tokens_per_step == 2 * SEQ
    upd = {w.index: COST.update_seconds(w.numel, "adamw", 4) for w in one.windows}
    shard_upd = {w.index: COST.update_seconds(shard_numel(w.numel, 2), "adamw", 4) for w in two.windows}
    coll = {w.index: sum(collective_seconds(setup, two, w)) for w in two.windows}
    # the step of a rank: its micro-batch's forward/backward, the update of its shard and the collectives
    expected = rh.step.step_seconds + sum(shard_upd[i] + coll[i] - upd[i] for i in upd) / len(upd)
    assert r2.step.step_seconds == pytest.approx(expected, rel=1e-12)
    lanes = [e for e in r2.step.events if e.lane == "interconnect"]
    assert [e.name.split(" chunk")[0] for e in lanes] == ["reduce-scatter", "all-gather"]
    w = next(w for w in two.windows if w.index == lanes[0].chunk)
    before, after = collective_seconds(setup, two, w)
    assert [e.end_s - e.start_s for e in lanes] == [pytest.approx(before), pytest.approx(after)]
    update = next(e for e in r2.step.events if e.name.startswith("update"))
    assert lanes[0].end_s <= update.start_s and lanes[1].start_s >= update.end_s  # the update waits
    assert not [e for e in r1.step.events if e.lane == "interconnect"]


def test_ranks_refuse_what_data_parallel_cannot_run(setup) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="3 micro-batches over 2 ranks"):
        check_ranks(_cand(setup, 4, 2, accum=3))
    with pytest.raises(ValueError, match="not both"):
        check_ranks(replace(_cand(setup, 4, 2), layer_gpu=(0, 1)))
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        check_ranks(_cand(setup, 4, 0))


def test_the_solver_splits_batches_evenly_and_fits_the_per_rank_peak(setup) -> None:  # type: ignore[no-untyped-def]
    assert batch_splits(Space(global_batch=4, ranks=2)) == [(1, 4), (2, 2)]
    assert batch_splits(Space(global_batch=3, ranks=2)) == []

    def tables(micro, chunk_tokens, edges):  # type: ignore[no-untyped-def]
        return made_up_table(1024, micro, chunk_tokens, edges)

    space = Space(global_batch=4, checkpointing="none", ranks=2)
    best = Solver(setup, Limits(4 * GIB, 64 * GIB), tables, space).solve().best
    assert best is not None and best.candidate.ranks == 2 and best.candidate.grad_accum % 2 == 0
    assert best.result == simulate(setup, best.candidate, _table(best.candidate, setup))  # the DP model
    tight = Limits(best.result.budget_needed_bytes - 1, 64 * GIB)
    again = Solver(setup, tight, tables, space).solve().best
    assert again is None or again.candidate != best.candidate
    # the host limit holds every rank's stores on the machine, not one rank's
    roomy = Solver(setup, Limits(4 * GIB, best.result.host_machine_bytes), tables, space).solve().best
    assert roomy is not None and roomy.result.host_machine_bytes <= best.result.host_machine_bytes
