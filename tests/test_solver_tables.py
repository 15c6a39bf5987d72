"""The simulator and the solver on made-up activation tables: nothing traced (issue 15, item 11).

The table is complete before solving and the simulator reads nothing else, so the solver's choices can
be checked against numbers a reader can follow: blocks that keep X bytes each until their backward, a
checkpointed block that keeps X/16 and recomputes the rest.
"""

from dataclasses import replace

import pytest

from chunkft import profiles
from chunkft.chunks import partition
from chunkft.planner.costs import CostModel
from chunkft.planner.profile_model import (
    ZERO_SEGMENT,
    ActivationProfile,
    BlockMemory,
    EdgeKey,
    IncompleteTableError,
    Segment,
    model_structure,
    with_full_edges,
)
from chunkft.planner.simulator import Candidate, edge_patterns, simulate, windows_of
from chunkft.planner.solver import K_CHOICES, Limits, Solver, Space, make_setup

MIB = 2**20
GIB = 2**30
SEQ = 256
COST = CostModel(100 * 10**12, 0.5, 10**12, 10**10, 10**10, 10**10)  # a made-up GPU


def made_up_table(
    block_bytes: int, micro: int = 1, chunk_tokens: int | None = None, edges: frozenset[EdgeKey] = frozenset()
) -> ActivationProfile:
    """Every block keeps block_bytes per sequence from its forward to its backward (checkpointed: 1/16
    of it, the rest recomputed inside its backward); the embedding and head keep nothing; an edge pattern
    keeps what the whole block keeps (its block-alone traces are equal)."""
    x = block_bytes * micro
    keep = BlockMemory(Segment(x, x), Segment(-x, 0))
    small = x // 16
    ckpt = BlockMemory(Segment(small, small), Segment(-small, x))
    below = BlockMemory(Segment(0, x), ZERO_SEGMENT)  # forward only: nothing kept
    blocks = {"full": keep, "first": keep, "input": keep, "none": below, "last-none": below}
    blocks |= {"first-none": below, "ckpt-full": ckpt, "ckpt-first": ckpt, "ckpt-input": ckpt}
    heads = tuple((m, ZERO_SEGMENT) for m in ("full", "input", "weight"))
    alone = BlockMemory(Segment(x, x), Segment(-x, 0))
    return ActivationProfile(
        micro_batch=micro,
        seq_len=SEQ,
        dtype="float32",
        attn_implementation="sdpa",
        embed_fwd=ZERO_SEGMENT,
        embed_bwd_trainable=ZERO_SEGMENT,
        blocks=tuple(blocks.items()),
        head_fwd=heads,
        head_bwd=heads,
        hidden_bytes=micro * SEQ * 64 * 4,
        chunk_tokens=chunk_tokens,
        edges=tuple((k, alone) for k in sorted(with_full_edges(edges))),
    )


@pytest.fixture(scope="module")
def setup():  # type: ignore[no-untyped-def]
    preset = profiles.load_model("tiny-llama")
    st = model_structure(preset.config, preset.task, "float32")
    return make_setup(
        st, COST, weight_dtype="float32", optimizer="adamw", sgd_momentum=False, seq_len=SEQ, on_gpu=True
    )


def _candidate(setup, k: int, ckpt: tuple[int, ...] = ()) -> Candidate:  # type: ignore[no-untyped-def]
    st = setup.structure
    chunks = partition(list(st.specs), num_chunks=k, state_bytes_per_element=8)
    windows = windows_of(st, st.specs, chunks)
    return Candidate(windows, tuple(range(k)), ckpt, 1, 1, "gpu", "float32", False)


def test_the_peak_moves_by_exactly_what_the_table_says(setup) -> None:  # type: ignore[no-untyped-def]
    """One window, no checkpointing: every block's activations are live when the backward starts, so
    X more per block is L x X more at the peak, byte for byte. Checkpointing every block: the peak moves
    to block 0's backward (every gradient of the window exists by then), which holds its own X/16 and
    the X it recomputes."""
    L = setup.structure.num_layers
    cand = _candidate(setup, 1)
    base = simulate(setup, cand, made_up_table(8 * MIB)).step.peak_bytes
    more = simulate(setup, cand, made_up_table(16 * MIB)).step.peak_bytes
    assert more - base == L * 8 * MIB
    ck = replace(cand, checkpoint_layers=tuple(range(L)))
    ck_base = simulate(setup, ck, made_up_table(8 * MIB)).step.peak_bytes
    ck_more = simulate(setup, ck, made_up_table(16 * MIB)).step.peak_bytes
    assert ck_more - ck_base == MIB // 2 + 8 * MIB


def test_a_table_without_the_windows_edges_is_refused(setup) -> None:  # type: ignore[no-untyped-def]
    cand = _candidate(setup, 8)
    needed = edge_patterns(cand.windows, setup.structure.num_layers)
    assert needed  # 8 windows of tiny-llama cut inside blocks
    with pytest.raises(IncompleteTableError, match="window-edge patterns"):
        simulate(setup, cand, made_up_table(MIB))
    simulate(setup, cand, made_up_table(MIB, edges=needed))  # complete: simulates


def test_the_solver_builds_each_table_once_with_every_edge_it_may_need(setup) -> None:  # type: ignore[no-untyped-def]
    asked: list[tuple[int, int | None, frozenset[EdgeKey]]] = []

    def tables(micro: int, chunk_tokens: int | None, edges: frozenset[EdgeKey]) -> ActivationProfile:
        asked.append((micro, chunk_tokens, edges))
        return made_up_table(MIB, micro, chunk_tokens, edges)

    solver = Solver(setup, Limits(64 * GIB, 64 * GIB), tables, Space(global_batch=2, cross_entropy="full"))
    solver.solve()
    L = setup.structure.num_layers
    every = frozenset().union(*(edge_patterns(solver.windows(k), L) for k in K_CHOICES if solver.windows(k)))
    assert sorted(m for m, _, _ in asked) == [1, 2]  # one table per micro-batch, built once
    assert all(e == every for _, _, e in asked)


def test_large_activations_make_the_solver_checkpoint(setup) -> None:  # type: ignore[no-untyped-def]
    """At a budget between what checkpointing every block needs and what none needs (with one window),
    the solver checkpoints when the table says blocks keep a lot, and does not when they keep little."""
    L = setup.structure.num_layers
    big = 64 * MIB

    def tables(block_bytes: int):  # type: ignore[no-untyped-def]
        return lambda micro, ct, edges: made_up_table(block_bytes, micro, ct, edges)

    dense = _candidate(setup, 1)
    none = simulate(setup, dense, made_up_table(big)).budget_needed_bytes
    every = simulate(setup, replace(dense, checkpoint_layers=tuple(range(L))), made_up_table(big))
    budget = (none + every.budget_needed_bytes) // 2
    space = Space(global_batch=1, num_chunks=1, cross_entropy="full")
    heavy = Solver(setup, Limits(budget, 64 * GIB), tables(big), space).solve().best
    light = Solver(setup, Limits(budget, 64 * GIB), tables(big // 64), space).solve().best
    assert heavy is not None and heavy.candidate.checkpoint_layers  # fits only by checkpointing
    assert heavy.result.budget_needed_bytes <= budget
    assert light is not None and light.candidate.checkpoint_layers == ()  # recompute would only cost time


def test_inputs_the_decoder_hands_every_block_live_until_the_lowest_checkpointed_taker_ran_backward(
    setup,  # type: ignore[no-untyped-def]
) -> None:
    """planner.simulator.kept_inputs on a made-up table: masks "a" and "b" (alternating layer types, as
    Gemma-2's sliding and full attention) and one input both take. Only checkpointed blocks that run
    backward keep them; each is freed by the lowest of those that takes it."""
    from dataclasses import replace

    from chunkft.planner.simulator import kept_inputs

    act = replace(
        made_up_table(1000),
        kept_inputs=((("a",), 10), (("a", "b"), 5), (("b",), 20)),
        block_types=("a", "b", "a", "b"),
    )
    assert kept_inputs(act, frozenset({0, 1}), 0, 4) == (35, {0: 15, 1: 20})
    assert kept_inputs(act, frozenset({2, 3}), -1, 4) == (35, {2: 15, 3: 20})  # the embedding's window
    assert kept_inputs(act, frozenset({1}), 0, 4) == (25, {1: 25})  # "a" is taken by no checkpointed block
    assert kept_inputs(act, frozenset({0, 1}), 2, 4) == (0, {})  # below the window: no backward
    assert kept_inputs(act, frozenset(), 0, 4) == (0, {})
    plain = replace(act, block_types=())  # no layer types: every block takes what is listed for ""
    assert kept_inputs(replace(plain, kept_inputs=((("",), 7),)), frozenset({3}), 0, 4) == (7, {3: 7})
    # the simulator, every block checkpointed: the peak (block 0's backward, test above) holds what
    # block 0 frees, "a" and the shared input; "b" went with block 1's backward
    L = setup.structure.num_layers
    act = replace(
        act, **{f: getattr(made_up_table(8 * MIB), f) for f in ("blocks", "edges")},
        block_types=("a", "b") * (L // 2) + ("a",) * (L % 2),
    )  # fmt: skip
    cand = _candidate(setup, 1, tuple(range(L)))
    base = simulate(setup, cand, replace(act, kept_inputs=())).step.peak_bytes
    assert simulate(setup, cand, act).step.peak_bytes == base + 15
