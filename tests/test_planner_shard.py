"""The simulator's sharded-weights terms (hardware.parallel "shard", FSDP2; issue 13 step 4) on hand-made
inputs: 1/N of every tensor's rows, the blocks gathered whole in flight, the FSDP gradient shards, the
gathers and reduce-scatters on the interconnect lane; and chunkft-plan choosing or forcing the layout.
Activations are a made-up table keeping nothing (tests/test_solver_tables.py), so every byte at the peak
is one of the terms under test."""

from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_solver_tables import COST, SEQ, made_up_table

from chunkft import profiles
from chunkft.chunks import DTYPE_BYTES, ParamSpec, partition
from chunkft.plan_format import load_plan
from chunkft.planner.cli import main
from chunkft.planner.profile_model import model_structure
from chunkft.planner.simulator import (
    Candidate,
    check_ranks,
    edge_patterns,
    node_durations,
    root_bytes,
    shard_inflight_bytes,
    shard_numel,
    sharded_tensor_bytes,
    simulate,
    simulate_plan,
    step_temps,
    untied_unit_bytes,
    windows_of,
)
from chunkft.planner.solver import make_setup


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    st = model_structure(profiles.load_model("tiny-llama").config, "causal-lm", "float32")
    return make_setup(
        st, COST, weight_dtype="float32", optimizer="adamw", sgd_momentum=False, seq_len=SEQ, on_gpu=True
    )


def _cand(setup, k: int, layout: str = "shard", ranks: int = 2, accum: int = 2):  # type: ignore[no-untyped-def]
    st = setup.structure
    windows = windows_of(st, st.specs, partition(list(st.specs), num_chunks=k, state_bytes_per_element=8))
    return Candidate(
        windows, tuple(range(k)), (), 1, accum, "gpu", "float32", False, ranks=ranks, layout=layout
    )


def _block(setup, g: int) -> int:  # type: ignore[no-untyped-def]
    st = setup.structure
    return sum(s.numel * 4 for s, grp in zip(st.specs, st.spec_layer, strict=True) if grp == g)


def test_a_rank_holds_ceil_rows_over_n_of_each_tensor() -> None:
    assert sharded_tensor_bytes(ParamSpec("w", (5, 3), "bfloat16"), 2) == 3 * 3 * 2  # dim 0 padded to 6
    assert sharded_tensor_bytes(ParamSpec("w", (8, 3), "float32"), 4) == 2 * 3 * 4
    assert sharded_tensor_bytes(ParamSpec("b", (), "float32"), 2) == 4  # a 0-d tensor is one row
    assert sharded_tensor_bytes(ParamSpec("w", (5, 3), "bfloat16"), 1) == 5 * 3 * 2


def test_blocks_in_flight_are_the_current_and_the_prefetched_one(setup) -> None:  # type: ignore[no-untyped-def]
    c = _cand(setup, 4)
    L = setup.structure.num_layers
    root = root_bytes(setup.structure)
    st = setup.structure
    embed_head = sum(s.numel * 4 for s, g in zip(st.specs, st.spec_layer, strict=True) if g in (-1, L))
    # tiny-llama is untied: its embedding and head are FSDP units of their own, the root keeps the norm
    e, h = untied_unit_bytes(st)
    assert e == h == st.vocab_size * st.hidden_size * 4 and root == embed_head - e - h > 0
    assert shard_inflight_bytes(setup, c, True, -1, 0) == root + e + _block(setup, 0)  # block 0 comes
    assert shard_inflight_bytes(setup, c, True, 0, 0) == root + _block(setup, 0) + _block(setup, 1)
    assert shard_inflight_bytes(setup, c, True, L - 1, 0) == root + _block(setup, L - 1) + h  # head comes
    assert shard_inflight_bytes(setup, c, True, L, 0) == root + h  # the head's forward: nothing above
    assert shard_inflight_bytes(setup, c, False, L, 0) == root + h + _block(setup, L - 1)  # its backward
    assert shard_inflight_bytes(setup, c, False, 1, 0) == root + _block(setup, 1) + _block(setup, 0)
    assert shard_inflight_bytes(setup, c, False, 1, 1) == root + _block(setup, 1)  # backward stops at 1
    assert shard_inflight_bytes(setup, replace(c, layout="data"), True, 0, 0) == 0


def test_the_peak_of_a_made_up_model_holds_shards_blocks_in_flight_and_gradient_shards(setup) -> None:  # type: ignore[no-untyped-def]
    """One window, the whole model, states on the GPU: the peak by hand is the persistent bytes (every
    tensor's ceil-rows shard, AdamW's two states for the window's shard) plus the highest moment of the
    step: a forward node's root + two blocks, a backward node's root + blocks + the gradients made so far
    + its FSDP 1/N output, or the optimizer step's buffers over the whole fp32 gradient."""
    st = setup.structure
    L = st.num_layers
    n = 2
    c = _cand(setup, 1)
    act = made_up_table(0, edges=edge_patterns(c.windows, L))
    r = simulate(setup, c, act)
    w = c.windows[0]
    weights = sum(-(-s.rows // n) * s.row_numel * DTYPE_BYTES[s.dtype] for s in st.specs)
    states = 3 * 4 * shard_numel(w.numel, n)  # AdamW's two and the fp32 master sharded rows keep
    root, blk = root_bytes(st), [_block(setup, g) for g in range(L)]
    grads = dict(w.numel_by_group)  # tiny-llama is untied: each group makes its own
    moments = [root + blk[0]] + [root + blk[g] + (blk[g + 1] if g + 1 < L else 0) for g in range(L)]
    made = 4 * grads[L]
    moments.append(root + blk[L - 1] + made + 4 * shard_numel(grads[L], n))  # the head's backward
    for g in range(L - 1, -1, -1):
        made += 4 * grads[g]
        moments.append(root + blk[g] + (blk[g - 1] if g else 0) + made + 4 * shard_numel(grads[g], n))
    made += 4 * grads[-1]
    moments.append(root + made + 4 * shard_numel(grads[-1], n))  # the embedding's backward
    step = 4 * w.numel + max(b for _, b in step_temps(setup, c, w))
    assert made == 4 * w.numel
    assert r.step.peak_bytes == weights + states + max([*moments, step])
    # the compute part alone (the step's buffers are the larger here): its highest sample, and the
    # forward's (two blocks in flight, nothing else above the persistent bytes)
    compute = max(m.total_bytes for m in r.step.memory if m.event.startswith(("fwd", "bwd")))
    assert compute == weights + states + max(moments)
    forward = max(m.total_bytes for m in r.step.memory if m.event.startswith("fwd"))
    assert forward == weights + states + max(moments[: L + 1])
    assert max(moments[: L + 1]) == root + max(blk[g] + blk[g + 1] for g in range(L - 1))
    assert dict(r.step.peak_by_category)["weights"] == weights
    shards = sum(shard_numel(x, n) for x in grads.values())
    assert dict(step_temps(setup, c, w))["gradient all-gather"] == 4 * shards
    # data parallel on the same window: whole weights, nothing in flight, no FSDP shards
    d = simulate(setup, replace(c, layout="data"), act)
    assert dict(d.step.peak_by_category)["weights"] == sum(s.numel * 4 for s in st.specs)
    assert "gradient all-gather" not in dict(step_temps(setup, replace(c, layout="data"), w))


def test_each_gather_hides_behind_the_previous_nodes_compute(setup) -> None:  # type: ignore[no-untyped-def]
    c = _cand(setup, 1)
    bw = COST.interconnect_bytes_per_s
    kinds, groups = [True, True, True], [-1, 0, 1]
    first, d = node_durations(setup, c, kinds, groups, [0.0, 0.0, 0.0])
    e, _ = untied_unit_bytes(setup.structure)
    assert first == pytest.approx((root_bytes(setup.structure) + e) / 2 / bw)  # the root and the embedding
    assert d == pytest.approx([_block(setup, 0) / 2 / bw, _block(setup, 1) / 2 / bw, 0.0])
    slow = [1.0, 1.0, 1.0]  # compute longer than every gather: the gathers are hidden
    assert node_durations(setup, c, kinds, groups, slow)[1] == slow
    assert node_durations(setup, replace(c, layout="data"), kinds, groups, [0.0] * 3) == (0.0, [0.0] * 3)


def test_a_slow_interconnect_bounds_the_step_by_the_lane(setup) -> None:  # type: ignore[no-untyped-def]
    """At 1 MB/s every collective dwarfs the compute: the step is the lane's serial work, per micro-batch
    the root and every unit gathered in forward, every block and the embedding again in backward (the
    window reaches down to the embedding; the head stays whole), the window's fp32 reduce-scatters; then
    the DP step's collectives."""
    st = setup.structure
    L = st.num_layers
    slow = replace(setup, cost=replace(COST, interconnect_bytes_per_s=10**6))
    c = _cand(slow, 1, accum=4)
    act = made_up_table(0, edges=edge_patterns(c.windows, L))
    r = simulate(slow, c, act)
    w = c.windows[0]
    blocks = sum(_block(setup, g) for g in range(L))
    e, h = untied_unit_bytes(st)  # the head is gathered once (whole from its forward to its backward)
    gathered = root_bytes(st) + 2 * e + h + 2 * blocks
    reduced = sum(4 * 2 * shard_numel(x, 2) for _, x in w.numel_by_group)
    lane = (gathered + reduced) / 2 / 10**6  # a ring sends (N-1)/N of each buffer
    per = shard_numel(w.numel, 2)
    dp = 4 * sum(shard_numel(x, 2) for _, x in w.numel_by_group) / 10**6  # FSDP shards made whole
    dp += (per * 4 + 8) / 10**6 + per * 4 / 10**6  # reduce-scatter (+ fp64 norm), all-gather of rows
    assert r.step.step_seconds == pytest.approx(2 * lane + dp, rel=1e-3)  # 2 micro-batches per rank
    fast = simulate(setup, c, act).step.step_seconds
    assert fast < r.step.step_seconds / 100
    assert any(e.lane == "interconnect" and e.name.startswith("all-gather bwd layers") for e in r.step.events)


def test_shard_needs_two_ranks(setup) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="at least 2 ranks"):
        check_ranks(_cand(setup, 2, ranks=1, accum=2))
    with pytest.raises(ValueError, match="layout"):
        check_ranks(_cand(setup, 2, layout="pipe"))


TINY = ["tiny-llama", "--gpu", "cpu", "--num-gpus", "2", "--seq-len", "32", "--batch-size", "4"]
TINY += ["--micro-batch", "1", "--grad-accum", "4", "--chunks", "4"]


def test_a_forced_shard_plan_on_cpu_is_valid_and_replays(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, [*TINY, "--parallel", "shard", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "sharded weights" in r.output
    plan = load_plan(out)
    assert plan.hardware.parallel == "shard" and plan.hardware.num_gpus == 2
    assert simulate_plan(plan).peak_bytes == plan.predictions.peak_bytes
    # auto on the same request picks data parallel (it fits one rank), with whole weights
    auto = tmp_path / "auto.json"
    r = CliRunner().invoke(main, [*TINY, "-o", str(auto)])
    assert r.exit_code == 0, r.output
    dp = load_plan(auto)
    assert dp.hardware.parallel == "data"
    weights = dict(plan.predictions.peak_by_category)["weights"]
    assert dict(dp.predictions.peak_by_category)["weights"] > weights


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num-gpus", "1", "--parallel", "shard"], "--parallel shard needs --num-gpus 2 or more"),
        (["--num-gpus", "2", "--parallel", "layers"], "--gpu cpu has nothing to split onto"),
        (["--num-gpus", "2", "--parallel", "shard", "--grad-accum", "3", "--batch-size", "3"], "sharded"),
        (["--num-gpus", "2", "--parallel", "shard", "--cross-entropy", "chunked"], "not with sharded"),
    ],
)
def test_an_invalid_forced_layout_is_one_line_and_writes_nothing(tmp_path: Path, args, message) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "plan.json"
    base = ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--micro-batch", "1"]
    if "--batch-size" not in args:
        base += ["--batch-size", "4", "--grad-accum", "4"]
    r = CliRunner().invoke(main, [*base, *args, "-o", str(out)])
    assert r.exit_code == 2, r.output
    assert message in r.output and not out.exists()


def test_70b_on_two_h800s_data_parallel_cannot_fit_and_shard_is_chosen(tmp_path: Path) -> None:
    """The paper's 70B on 2 x 80 GB: forced data parallel is refused in one line (131 GiB of bf16 weights
    per rank); auto plans sharded weights, with the default margins: the untied embedding and head are
    FSDP units of their own (executor.distributed.shard_model), so the root keeps only the final norm
    through the backward (with them in the root it needed 81.62 GiB of 79.65); the fp32 master of the
    window's sharded rows is counted."""
    common = ["llama-3-70b", "--gpu", "h800", "--num-gpus", "2", "--batch-size", "2", "--host-mem", "2TiB"]
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, [*common, "--parallel", "data", "-o", str(out)])
    assert r.exit_code == 3 and "with --parallel data" in r.output and not out.exists(), r.output
    one = [*common[:-4], "--batch-size", "1", "-o", str(out)]  # batch 1: cannot be dealt to 2 ranks
    r = CliRunner().invoke(main, one)
    assert r.exit_code == 0 and "the batch cannot be dealt out to 2 ranks" in r.output, r.output
    r = CliRunner().invoke(main, [*common, "-o", str(out)])
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    assert plan.hardware.parallel == "shard"
    whole = sum(s.numel for s in plan.chunk_table.params) * 2
    weights = dict(plan.predictions.peak_by_category)["weights"]
    assert whole // 2 <= weights < whole // 2 + 2**30  # 1/2 of the bf16 weights per GPU, padded
    pr = plan.predictions
    assert pr.peak_bytes + pr.reserve_bytes + plan.hardware.headroom_bytes <= plan.hardware.budget_bytes
