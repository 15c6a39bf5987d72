"""The execution graph of a ChunkFT step and of a rotation, as networkx DiGraphs.

Why a graph: which backward nodes exist depends on the active window (nothing runs backward below the
lowest trainable layer), and when each window's optimizer states must be on the GPU depends on the
rotation. Both the simulator's event order and the plan's prefetch list are read off these graphs
(topological order, predecessors, successors), so neither is hard-coded.

Node names are the event names the simulator, the runner and reports share: "fwd embed",
"fwd layers.3", "fwd head", "bwd head", "bwd layers.3", "bwd embed", "update chunk 5",
"write-back chunk 5", "prefetch chunk 6", "step start".
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import networkx as nx


@dataclass(frozen=True)
class StepNode:
    """One compute node of a micro-batch: kind "fwd"/"bwd", group -1 embed, 0..L-1 block, L head."""

    name: str
    kind: str
    group: int


def group_name(group: int, num_layers: int) -> str:
    if group < 0:
        return "embed"
    if group >= num_layers:
        return "head"
    return f"layers.{group}"


def step_graph(num_layers: int, lowest_trainable: int) -> nx.DiGraph:
    """Forward through every group, then backward from the head down to the lowest trainable group.

    lowest_trainable: -1 when the window includes the embedding side, L when it is only in the head.
    Groups below it run forward only (no saved activations, no backward): the ChunkFT saving the
    reference implementation misses (it backpropagates to the embedding every step).
    """
    g = nx.DiGraph()
    groups = list(range(-1, num_layers + 1))
    prev = None
    for grp in groups:
        node = f"fwd {group_name(grp, num_layers)}"
        g.add_node(node, kind="fwd", group=grp)
        if prev is not None:
            g.add_edge(prev, node)
        prev = node
    for grp in reversed(groups):
        if grp < lowest_trainable:
            break
        node = f"bwd {group_name(grp, num_layers)}"
        g.add_node(node, kind="bwd", group=grp)
        g.add_edge(prev, node)
        # A block's backward needs its own forward's saved tensors.
        g.add_edge(f"fwd {group_name(grp, num_layers)}", node)
        prev = node
    return g


@functools.lru_cache(maxsize=4096)
def step_order(num_layers: int, lowest_trainable: int) -> tuple[StepNode, ...]:
    """The compute nodes of one micro-batch in execution (topological) order."""
    g = step_graph(num_layers, lowest_trainable)
    return tuple(
        StepNode(n, g.nodes[n]["kind"], g.nodes[n]["group"])
        for n in nx.lexicographical_topological_sort(g, key=lambda n: _rank(g, n))
    )


def _rank(g: nx.DiGraph, n: str) -> tuple[int, int]:
    kind, grp = g.nodes[n]["kind"], g.nodes[n]["group"]
    return (0, grp) if kind == "fwd" else (1, -grp)


@dataclass(frozen=True)
class Prefetch:
    """One host-to-GPU copy of a window's states, derived from the rotation graph."""

    chunk: int
    issue_after: str
    needed_by: str


def rotation_graph(sequence: Sequence[int], slots: int) -> nx.DiGraph:
    """Updates in rotation order, each window's write-back after its update, and each fill after the
    node that frees a slot for it; two cycles so the wrap-around is represented.

    With two slots the window two steps ahead is fetched after an update (the next one is already in
    the other slot); with one slot, the next window; copies share one FIFO stream, so a fill follows
    the previous write-back.
    """
    g = nx.DiGraph()
    seq = list(sequence) * 2
    for s, c in enumerate(seq):
        g.add_node(("update", s), name=f"update chunk {c}", chunk=c)
        g.add_node(("write-back", s), name=f"write-back chunk {c}", chunk=c)
        g.add_edge(("update", s), ("write-back", s))
        if s > 0:
            g.add_edge(("update", s - 1), ("update", s))
    ahead = 2 if slots >= 2 else 1
    for s in range(len(seq) - ahead):
        target = s + ahead
        c = seq[target]
        node = ("prefetch", target)
        g.add_node(node, name=f"prefetch chunk {c}", chunk=c)
        g.add_edge(("write-back", s), node)  # FIFO after the write-back that freed the slot
        g.add_edge(node, ("update", target))
    return g


def prefetch_schedule(sequence: Sequence[int], slots: int) -> tuple[Prefetch, ...]:
    """One copy per window of one rotation cycle, in issue order (what plan.prefetch lists)."""
    if len(sequence) < 2:
        return ()
    g = rotation_graph(sequence, slots)
    k = len(sequence)
    ahead = 2 if slots >= 2 else 1
    out = []
    for node in nx.lexicographical_topological_sort(g, key=str):
        if node[0] != "prefetch" or not ahead <= node[1] < ahead + k:
            continue
        wb = next(p for p in g.predecessors(node) if p[0] == "write-back")
        upd = next(u for u in g.predecessors(wb) if u[0] == "update")
        need = next(iter(g.successors(node)))
        out.append(Prefetch(g.nodes[node]["chunk"], g.nodes[upd]["name"], g.nodes[need]["name"]))
    return tuple(out)
