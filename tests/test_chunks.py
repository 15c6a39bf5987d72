"""The ChunkFT partition (chunkft/chunks.py): coverage, balance, policies and refusals."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunkft.chunks import (
    Chunk,
    ParamSlice,
    ParamSpec,
    chunk_numel,
    element_cost_bytes,
    param_specs,
    partition,
)


def random_specs(rng: random.Random, n: int) -> list[ParamSpec]:
    specs = []
    for i in range(n):
        shape = rng.choice([(rng.randint(1, 50), rng.randint(1, 40)), (rng.randint(1, 300),), ()])
        specs.append(ParamSpec(f"p{i}", shape, rng.choice(["float32", "bfloat16", "float16"])))
    return specs


def stream(chunks: tuple[Chunk, ...]) -> list[tuple[str, int]]:
    """Every (tensor, row) the windows cover, in window order."""
    return [(sl.name, r) for c in chunks for sl in c.slices for r in range(sl.row_start, sl.row_end)]


def window_bytes(chunk: Chunk, specs: list[ParamSpec], state: int) -> int:
    by_name = {s.name: s for s in specs}
    return sum(
        sl.num_rows * by_name[sl.name].row_numel * element_cost_bytes(by_name[sl.name], state)
        for sl in chunk.slices
    )


def total_bytes(specs: list[ParamSpec], state: int) -> int:
    return sum(s.numel * element_cost_bytes(s, state) for s in specs)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("policy", ["rows", "whole"])
def test_windows_cover_every_row_once_in_stream_order(seed: int, policy: str) -> None:
    rng = random.Random(seed)
    specs = random_specs(rng, rng.randint(1, 12))
    expected = [(s.name, r) for s in specs for r in range(s.rows)]
    for k in range(1, 9):
        try:
            chunks = partition(specs, num_chunks=k, policy=policy)
        except ValueError as e:
            assert "fewer chunks" in str(e)
            assert k > 1
            continue
        assert len(chunks) == k
        assert [c.index for c in chunks] == list(range(k))
        assert stream(chunks) == expected  # no gap, no overlap, in order
        for c in chunks:
            assert c.slices, "empty window"
            assert len({sl.name for sl in c.slices}) == len(c.slices)
            assert all(0 <= sl.row_start < sl.row_end for sl in c.slices)
        if policy == "whole":
            rows = {s.name: s.rows for s in specs}
            assert all(sl.row_start == 0 and sl.row_end == rows[sl.name] for c in chunks for sl in c.slices)


@pytest.mark.parametrize("seed", range(25))
@pytest.mark.parametrize("state", [0, 4, 8])
def test_row_windows_have_near_equal_bytes(seed: int, state: int) -> None:
    """Each cut lands within half a row of its target, so a window is off by at most one row's bytes."""
    rng = random.Random(seed)
    specs = random_specs(rng, rng.randint(3, 12))
    total = total_bytes(specs, state)
    max_row = max(s.row_numel * element_cost_bytes(s, state) for s in specs)
    for k in (2, 3, 5, 8):
        try:
            chunks = partition(specs, num_chunks=k, state_bytes_per_element=state)
        except ValueError:
            continue
        sizes = [window_bytes(c, specs, state) for c in chunks]
        assert sum(sizes) == total
        assert all(abs(b - total / k) <= max_row for b in sizes), (sizes, total / k, max_row)


def test_whole_windows_cut_at_the_nearest_tensor_boundary() -> None:
    specs = [ParamSpec(f"p{i}", (10, 10), "float32") for i in range(6)]  # 6 equal tensors
    chunks = partition(specs, num_chunks=3, policy="whole")
    assert [[sl.name for sl in c.slices] for c in chunks] == [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
    uneven = [ParamSpec("a", (100, 10), "float32"), ParamSpec("b", (10, 10), "float32"),
              ParamSpec("c", (90, 10), "float32")]  # fmt: skip
    # target at half of 200 rows lands 10 rows into b: its start is nearer than its end
    assert [[sl.name for sl in c.slices] for c in partition(uneven, num_chunks=2, policy="whole")] == [
        ["a"], ["b", "c"]]  # fmt: skip


def test_rows_policy_cuts_inside_a_tensor() -> None:
    specs = [ParamSpec("w", (100, 4), "float32")]
    chunks = partition(specs, num_chunks=4)
    assert [c.slices for c in chunks] == [(ParamSlice("w", 25 * k, 25 * k + 25),) for k in range(4)]
    assert all(chunk_numel(c, specs) == 100 for c in chunks)


def test_state_bytes_weight_the_cut() -> None:
    """A bf16 tensor costs 2 + 8 bytes per element against 4 + 8 for fp32 (Adam states)."""
    specs = [ParamSpec("a", (12, 1), "bfloat16"), ParamSpec("b", (10, 1), "float32")]
    # 12*10 = 120 and 10*12 = 120 bytes: the halfway cut falls exactly between them
    assert partition(specs, num_chunks=2)[0].slices == (ParamSlice("a", 0, 12),)
    # with no state bytes: 24 + 40 = 64 bytes, the cut at 32 is 2 rows into b
    assert partition(specs, num_chunks=2, state_bytes_per_element=0)[1].slices == (ParamSlice("b", 2, 10),)


def test_bytes_per_chunk_sets_the_window_count() -> None:
    rng = random.Random(0)
    specs = random_specs(rng, 10)
    total = total_bytes(specs, 8)
    for per in (total // 7, total // 3 + 1, total, 10 * total):
        chunks = partition(specs, bytes_per_chunk=per)
        assert len(chunks) == max(1, math.ceil(total / per))
        assert chunks == partition(specs, num_chunks=len(chunks))
    one = partition(specs, bytes_per_chunk=10 * total)
    assert stream(one) == [(s.name, r) for s in specs for r in range(s.rows)]


def test_partition_is_a_pure_function_of_its_inputs() -> None:
    specs = random_specs(random.Random(3), 9)
    assert partition(specs, num_chunks=4) == partition(list(specs), num_chunks=4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"num_chunks": 2, "bytes_per_chunk": 100}, "exactly one"),
        ({"num_chunks": 0}, "num_chunks must be >= 1"),
        ({"bytes_per_chunk": 0}, "bytes_per_chunk must be positive"),
        ({"num_chunks": 50}, "fewer chunks"),
        ({"num_chunks": 3, "policy": "whole"}, "fewer chunks"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs: dict, match: str) -> None:
    specs = [ParamSpec("a", (20, 2), "float32"), ParamSpec("b", (2,), "float32")]
    with pytest.raises(ValueError, match=match):
        partition(specs, **kwargs)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="no trainable parameters"):
        partition([], num_chunks=1)
    dup = [ParamSpec("a", (2,), "float32"), ParamSpec("a", (3,), "float32")]
    with pytest.raises(ValueError, match="unique"):
        partition(dup, num_chunks=1)
    with pytest.raises(ValueError, match="empty"):
        partition([ParamSpec("a", (0, 4), "float32")], num_chunks=1)


def test_param_specs_of_a_real_model() -> None:
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=40, tie_word_embeddings=True)  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    specs = param_specs(model)
    names = [s.name for s in specs]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    assert "lm_head.weight" not in names  # tied: once, under the embedding's name
    assert "model.layers.1.mlp.up_proj.weight" not in names  # frozen by the user
    assert names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert specs[0] == ParamSpec("model.embed_tokens.weight", (40, 16), "float32")
    with torch.device("meta"):
        meta = LlamaForCausalLM(cfg).to(torch.bfloat16)
    assert {s.dtype for s in param_specs(meta)} == {"bfloat16"}
    chunks = partition(specs, num_chunks=5)
    assert sum(chunk_numel(c, specs) for c in chunks) == sum(s.numel for s in specs)


def test_rows_keeps_the_named_tensors_whole() -> None:
    """A tensor whose module cannot be sliced (executor.slicegrad unsliceable/foreign_uses) is never cut:
    a cut that would land in it moves to its nearer boundary; the others are still cut between rows."""
    from chunkft.chunks import ParamSpec, partition

    specs = [ParamSpec("a", (10, 4), "float32"), ParamSpec("b", (10, 4), "float32"),
             ParamSpec("c", (10, 4), "float32")]  # fmt: skip
    free = partition(specs, num_chunks=4)
    assert any(sl.name == "b" and (sl.row_start, sl.row_end) != (0, 10) for ch in free for sl in ch.slices)
    kept = partition(specs, num_chunks=4, keep_whole=frozenset({"b"}))
    for ch in kept:
        for sl in ch.slices:
            if sl.name == "b":
                assert (sl.row_start, sl.row_end) == (0, 10)
    cut = [sl.name for ch in kept for sl in ch.slices if (sl.row_start, sl.row_end) != (0, 10)]
    assert cut and set(cut) <= {"a", "c"}
    assert sum(sl.row_end - sl.row_start for ch in kept for sl in ch.slices) == 30
