"""Per-layer and per-chunk byte accounting derived from the chunk table and the simulated step."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from chunkft.chunks import DTYPE_BYTES, Chunk, ParamSpec
from chunkft.timeline import StepSimulation

# Block index in the parameter names of the common Hugging Face families:
# model.layers.3. (Llama, Qwen, Mistral), transformer.h.3. (GPT-2), encoder.layer.3. (BERT), blocks.3.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The block index a parameter belongs to, or None for embeddings, final norms and heads."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_groups(params: Sequence[ParamSpec]) -> list[str]:
    """Group labels in stream order: "embed" before the first block, "L0".."Ln", "head" after the last."""
    labels = []
    seen_block = False
    for p in params:
        layer = layer_of(p.name)
        if layer is not None:
            seen_block = True
            labels.append(f"L{layer}")
        else:
            labels.append("head" if seen_block else "embed")
    return labels


@dataclass(frozen=True)
class LayerBytes:
    """What one group of parameters costs: resident weights, and what exists while its chunk is active."""

    label: str
    numel: int
    weight_bytes: int
    grad_bytes: int  # gradient buffers when the whole group is in the active window
    state_bytes: int  # optimizer states + fp32 master when the whole group is in the active window
    activation_bytes: int | None  # kept for backward after its forward (None: not in the simulation)


def per_layer_bytes(
    params: Sequence[ParamSpec],
    simulation: StepSimulation,
    *,
    grad_bytes_per_element: int,
    state_bytes_per_element: int,
    master_bytes_per_element: int,
) -> list[LayerBytes]:
    """One LayerBytes per group, in stream order."""
    acts = activations_by_layer(simulation)
    order: list[str] = []
    numel: dict[str, int] = {}
    weights: dict[str, int] = {}
    for label, p in zip(layer_groups(params), params, strict=True):
        if label not in numel:
            order.append(label)
            numel[label] = 0
            weights[label] = 0
        numel[label] += p.numel
        weights[label] += p.numel * DTYPE_BYTES[p.dtype]
    rows = []
    for label in order:
        layer = int(label[1:]) if label.startswith("L") else None
        rows.append(
            LayerBytes(
                label=label,
                numel=numel[label],
                weight_bytes=weights[label],
                grad_bytes=numel[label] * grad_bytes_per_element,
                state_bytes=numel[label] * (state_bytes_per_element + master_bytes_per_element),
                activation_bytes=acts.get(layer) if layer is not None else None,
            )
        )
    return rows


def activations_by_layer(simulation: StepSimulation) -> dict[int, int]:
    """Activation bytes each block adds during its (first) forward, read off the memory timeline.

    The simulator writes one memory sample per event; the growth of the "activations" category at the
    sample named like a block's forward event is what that block keeps for backward. Empty when the
    simulator does not name samples after forward events.
    """
    fwd_names = {
        e.name: e.layer
        for e in simulation.events
        if e.lane == "compute" and e.layer is not None and e.name.startswith("fwd")
    }
    out: dict[int, int] = {}
    prev = 0
    for sample in simulation.memory:
        act = dict(sample.bytes_by_category).get("activations", 0)
        layer = fwd_names.get(sample.event)
        if layer is not None and layer not in out:
            out[layer] = max(0, act - prev)
        prev = act
    return out


@dataclass(frozen=True)
class ChunkSpan:
    """A chunk's place in the parameter stream (weight bytes), for the chunk map."""

    index: int
    start_bytes: int
    end_bytes: int
    first: str  # first slice, e.g. "model.layers.3.mlp.up_proj.weight[0:4096]"
    last: str


def chunk_spans(params: Sequence[ParamSpec], chunks: Sequence[Chunk]) -> list[ChunkSpan]:
    """Where each chunk starts and ends in the weight-byte stream, by chunk index."""
    offset: dict[str, int] = {}
    row_bytes: dict[str, int] = {}
    pos = 0
    for p in params:
        offset[p.name] = pos
        row_bytes[p.name] = p.row_numel * DTYPE_BYTES[p.dtype]
        pos += p.numel * DTYPE_BYTES[p.dtype]
    spans = []
    for c in chunks:
        if not c.slices:
            raise ValueError(f"chunk {c.index} covers no parameters")
        a, b = c.slices[0], c.slices[-1]
        spans.append(
            ChunkSpan(
                index=c.index,
                start_bytes=offset[a.name] + a.row_start * row_bytes[a.name],
                end_bytes=offset[b.name] + b.row_end * row_bytes[b.name],
                first=_slice_label(a.name, a.row_start, a.row_end, params),
                last=_slice_label(b.name, b.row_start, b.row_end, params),
            )
        )
    return spans


def group_boundaries(params: Sequence[ParamSpec]) -> list[tuple[str, int, int]]:
    """(label, start_bytes, end_bytes) of each layer group in the weight-byte stream."""
    out: list[tuple[str, int, int]] = []
    pos = 0
    for label, p in zip(layer_groups(params), params, strict=True):
        size = p.numel * DTYPE_BYTES[p.dtype]
        if out and out[-1][0] == label:
            out[-1] = (label, out[-1][1], pos + size)
        else:
            out.append((label, pos, pos + size))
        pos += size
    return out


def _slice_label(name: str, start: int, end: int, params: Sequence[ParamSpec]) -> str:
    rows = next(p.rows for p in params if p.name == name)
    return name if (start, end) == (0, rows) else f"{name}[{start}:{end}]"
