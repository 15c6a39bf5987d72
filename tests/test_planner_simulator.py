"""Simulator invariants and accuracy against a FakeTensor + MemTracker trace of a full step."""

import pytest

import profiles
from executor.chunks import Chunk, ParamSlice, partition
from planner.costs import cost_model
from planner.profile_model import activation_profile, model_structure, reference_step_peak
from planner.simulator import Candidate, simulate, window_peaks, windows_of
from planner.solver import make_setup
from planner.timeline import CATEGORIES


def _case(
    k: int,
    ckpt: tuple[int, ...] = (),
    states_on: str = "host",
    micro: int = 1,
    accum: int = 1,
    seq: int = 128,
    dtype: str = "float32",
):  # type: ignore[no-untyped-def]
    preset = profiles.load_model("tiny-llama")
    st = model_structure(preset.config, preset.task, dtype)
    act = activation_profile(preset.config, preset.task, micro, seq, dtype)
    setup = make_setup(
        st,
        cost_model(profiles.load_gpu("cpu"), dtype),
        weight_dtype=dtype,
        optimizer="adamw",
        sgd_momentum=False,
        seq_len=seq,
        on_gpu=False,
    )
    chunks = partition(list(st.specs), num_chunks=k, policy="rows", state_bytes_per_element=8)
    cand = Candidate(
        windows_of(st, st.specs, chunks), tuple(range(k)), ckpt, micro, accum, states_on, "float32", True
    )
    return preset, st, setup, chunks, cand, act


@pytest.mark.parametrize("accum", [1, 2])
def test_everything_allocated_in_a_step_is_freed(accum: int) -> None:
    _, st, setup, _, cand, act = _case(4, accum=accum)
    sim = simulate(setup, cand, act).step
    first, last = dict(sim.memory[0].bytes_by_category), dict(sim.memory[-1].bytes_by_category)
    assert first == last
    assert last["activations"] == last["gradients"] == last["temporaries"] == 0
    weights = sum(s.numel * 4 for s in st.specs)
    assert last["weights"] == weights
    assert sim.peak_bytes >= weights
    assert max(m.total_bytes for m in sim.memory) == sim.peak_bytes
    assert sum(b for _, b in sim.peak_by_category) == sim.peak_bytes
    assert [c for c, _ in sim.peak_by_category] == list(CATEGORIES)
    compute = [e for e in sim.events if e.lane == "compute"]
    assert all(a.end_s <= b.start_s + 1e-12 for a, b in zip(compute, compute[1:], strict=False))
    assert sim.step_seconds > 0 and sim.tokens_per_step == 128 * accum


def test_bottom_window_needs_more_than_top_window() -> None:
    _, _, setup, _, cand, act = _case(4)
    peaks = window_peaks(setup, cand, act)
    # the bottom window keeps every block's activations, the top one almost none
    assert peaks[-1] < peaks[0]


def test_checkpointing_and_host_states_lower_the_peak() -> None:
    _, _, setup, _, cand, act = _case(4)
    base = simulate(setup, cand, act).step.peak_bytes
    _, _, setup2, _, ck, act2 = _case(4, ckpt=(0, 1, 2, 3))
    assert simulate(setup2, ck, act2).step.peak_bytes < base
    _, _, setup3, _, gpu, act3 = _case(4, states_on="gpu")
    assert simulate(setup3, gpu, act3).step.peak_bytes > base


def _traced(preset, chunks, micro: int, accum: int, ckpt: tuple[int, ...]) -> list[int]:  # type: ignore[no-untyped-def]
    return [
        reference_step_peak(
            preset.config, preset.task, chunks, w, micro_batch=micro, grad_accum=accum, seq_len=128,
            dtype="float32", checkpoint_layers=ckpt, state_slots=2,
        )[0]
        for w in range(len(chunks))
    ]  # fmt: skip


@pytest.mark.parametrize(("k", "ckpt", "micro", "accum"), [(4, (), 1, 1), (4, (0, 1), 2, 2)])
def test_every_window_within_three_percent_of_trace(
    k: int, ckpt: tuple[int, ...], micro: int, accum: int
) -> None:
    """Against the executor's own step (SliceGradients + ChunkedOptimizer, row-sliced windows) traced
    under FakeTensorMode by executor.measure.MemoryTracker (equal to a real-tensor trace: test_measure)."""
    preset, _, setup, chunks, cand, act = _case(k, ckpt=ckpt, micro=micro, accum=accum)
    predicted = window_peaks(setup, cand, act)
    traced = _traced(preset, chunks, micro, accum, ckpt)
    # Measured: worst window +1.2% / -0.0%, single windows -1.5 .. +2.6%. What remains is windows that
    # start or end inside a block (composed as a whole trainable block; bench/results/accuracy.md).
    assert abs(max(predicted) - max(traced)) <= 0.03 * max(traced)
    for p, t in zip(predicted, traced, strict=True):
        assert abs(p - t) <= 0.03 * t


def test_block_aligned_windows_match_trace_to_the_kilobyte() -> None:
    """Windows of whole groups (embedding, each block, head) with checkpointing and accumulation: the
    composition (first block of a window, the top block, the embedding held by the decoder, gradient
    buffers made during the backward) reproduces the full-depth trace exactly but for a few bytes."""
    preset, st, setup, _, _, act = _case(4, ckpt=(0, 1), micro=2, accum=2)
    groups = sorted(set(st.spec_layer))
    pairs = list(zip(st.specs, st.spec_layer, strict=True))
    chunks = [
        Chunk(i, tuple(ParamSlice(s.name, 0, s.shape[0]) for s, g in pairs if g == grp))
        for i, grp in enumerate(groups)
    ]
    cand = Candidate(
        windows_of(st, st.specs, chunks), tuple(range(len(chunks))), (0, 1), 2, 2, "host", "float32", True
    )
    predicted = window_peaks(setup, cand, act)
    traced = _traced(preset, chunks, 2, 2, (0, 1))
    for p, t in zip(predicted, traced, strict=True):
        assert abs(p - t) <= 4096, (p, t)
