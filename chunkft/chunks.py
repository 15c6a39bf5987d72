"""The ChunkFT partition: trainable parameters as one byte stream cut into K windows.

Pure functions of (parameter specs, K or bytes per chunk, policy). The planner calls them and writes
the result into the plan; the executor only reads the chunk table back. Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Bytes per element of the dtypes a plan may name.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}

# "rows": windows may cut a tensor between rows (dim 0); "whole": cuts only fall between tensors.
CutPolicy = Literal["rows", "whole"]


@dataclass(frozen=True)
class ParamSpec:
    """One trainable tensor, in forward execution order."""

    name: str  # as in model.named_parameters()
    shape: tuple[int, ...]
    dtype: str  # key of DTYPE_BYTES

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Length of dim 0 (a 0-d tensor is one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return self.numel // self.rows if self.rows else 0


@dataclass(frozen=True)
class ParamSlice:
    """Rows [row_start, row_end) of one parameter; the whole tensor when they span dim 0."""

    name: str
    row_start: int
    row_end: int

    @property
    def num_rows(self) -> int:
        return self.row_end - self.row_start


@dataclass(frozen=True)
class Chunk:
    """One window of the stream: whole tensors plus row ranges of the tensors at its edges."""

    index: int
    slices: tuple[ParamSlice, ...]


def element_cost_bytes(spec: ParamSpec, state_bytes_per_element: int) -> int:
    """What one element costs in the stream: its weight bytes plus its optimizer-state bytes."""
    return DTYPE_BYTES[spec.dtype] + state_bytes_per_element


def chunk_numel(chunk: Chunk, specs: Sequence[ParamSpec]) -> int:
    """Number of parameter elements a chunk covers."""
    by_name = {s.name: s for s in specs}
    return sum(sl.num_rows * by_name[sl.name].row_numel for sl in chunk.slices)


def partition(
    specs: Sequence[ParamSpec],
    *,
    num_chunks: int | None = None,
    bytes_per_chunk: int | None = None,
    state_bytes_per_element: int = 8,
    policy: CutPolicy = "rows",
    keep_whole: frozenset[str] = frozenset(),
) -> tuple[Chunk, ...]:
    """Cut the parameter stream into windows of near-equal bytes.

    Give exactly one of num_chunks (K) or bytes_per_chunk. bytes_per_chunk is a target, not a cap: it
    sets K = ceil(total / bytes_per_chunk) and the windows are then cut as for K (a "rows" window can
    exceed total/K by less than one row; a "whole" window by up to its largest tensor). The planner
    sizes memory from the windows it gets back, never from the target. Cut k lands on the row
    boundary nearest to byte k*total/K ("rows") or on the tensor boundary nearest to it ("whole",
    greedy: it may refuse a K that a cleverer cut could satisfy). keep_whole names tensors that "rows"
    must not cut either (their modules cannot be sliced: executor.slicegrad unsliceable / foreign_uses):
    a cut landing in one moves to its nearer boundary. Raises ValueError when the stream cannot hold K
    non-empty windows.
    """
    if (num_chunks is None) == (bytes_per_chunk is None):
        raise ValueError("give exactly one of num_chunks or bytes_per_chunk")
    if not specs:
        raise ValueError("no trainable parameters to partition")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError("parameter names must be unique")
    if any(s.numel == 0 for s in specs):
        raise ValueError("empty parameters cannot be partitioned")

    row_bytes = [s.row_numel * element_cost_bytes(s, state_bytes_per_element) for s in specs]
    tensor_bytes = [rb * s.rows for rb, s in zip(row_bytes, specs, strict=True)]
    total = sum(tensor_bytes)
    if bytes_per_chunk is not None:
        if bytes_per_chunk <= 0:
            raise ValueError(f"bytes_per_chunk must be positive, got {bytes_per_chunk}")
        num_chunks = max(1, math.ceil(total / bytes_per_chunk))
    assert num_chunks is not None
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")

    # Cut points as (tensor index, row) positions in stream order; (i, 0) is the start of tensor i.
    starts = [0]
    for tb in tensor_bytes:
        starts.append(starts[-1] + tb)
    cuts: list[tuple[int, int]] = [(0, 0)]
    for k in range(1, num_chunks):
        target = k * total / num_chunks
        i = _tensor_at(starts, target)
        if policy == "whole" or specs[i].name in keep_whole:
            at_start = target - starts[i] <= starts[i + 1] - target
            cut = (i, 0) if at_start else (i + 1, 0)
        else:
            row = min(specs[i].rows, max(0, round((target - starts[i]) / row_bytes[i])))
            cut = (i + 1, 0) if row == specs[i].rows else (i, row)
        if cut <= cuts[-1]:
            whole = f" ({len(keep_whole)} tensors kept whole)" if keep_whole and policy == "rows" else ""
            raise ValueError(
                f"cannot cut {total} bytes into {num_chunks} non-empty windows with policy "
                f"{policy!r}{whole}; use fewer chunks"
            )
        cuts.append(cut)
    cuts.append((len(specs), 0))
    if cuts[-1] <= cuts[-2]:
        raise ValueError(f"cannot cut the stream into {num_chunks} non-empty windows; use fewer chunks")

    chunks = []
    for k in range(num_chunks):
        (i0, r0), (i1, r1) = cuts[k], cuts[k + 1]
        slices = []
        for i in range(i0, i1 + 1):
            if i == len(specs):
                break
            lo = r0 if i == i0 else 0
            hi = r1 if i == i1 else specs[i].rows
            if hi > lo:
                slices.append(ParamSlice(specs[i].name, lo, hi))
        chunks.append(Chunk(index=k, slices=tuple(slices)))
    return tuple(chunks)


def _tensor_at(starts: list[int], offset: float) -> int:
    """Index of the tensor whose byte range holds offset (the last tensor for the very end)."""
    lo, hi = 0, len(starts) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= offset:
            lo = mid
        else:
            hi = mid - 1
    return lo


def param_specs(model: object) -> list[ParamSpec]:
    """The trainable parameters of a torch module as specs, in registration order.

    Hugging Face models register modules in forward execution order (embedding, layers, final norm,
    head), so registration order is the stream order; a tied head weight appears once, under the
    embedding's name. Works on meta-device models (no storage is touched).
    """
    return [
        ParamSpec(name, tuple(p.shape), str(p.dtype).removeprefix("torch."))
        for name, p in model.named_parameters()  # type: ignore[attr-defined]
        if p.requires_grad
    ]
