"""The simulated step as a Chrome trace-event file (opens in Perfetto and chrome://tracing).

Lanes become threads of one process ("X" complete events, microseconds); memory by category becomes a
counter track ("C" events). The trace is the step the simulator drew (its worst-memory window), which
lasts StepSimulation.timeline_seconds; gaps on the compute lane are written as explicit "idle (waiting
on copy)" slices, so busy compute plus waiting adds up to exactly that length and waiting for a transfer
is visible as such. The rotation's mean step time is in otherData.
"""

from __future__ import annotations

import json
from typing import Any

from chunkft.timeline import CATEGORIES, LANES, StepSimulation

from .data import drawn_step_seconds

_PID = 1
_TIDS = {"compute": 1, "h2d": 2, "d2h": 3, "interconnect": 4}
_THREAD_NAMES = {
    "compute": "compute",
    "h2d": "host → device (prefetch)",
    "d2h": "device → host (write-back)",
    "interconnect": "between GPUs (reduce-scatter, all-gather)",
}
IDLE_NAME = "idle (waiting on copy)"


def _us(seconds: float) -> float:
    return seconds * 1e6


def trace_events(sim: StepSimulation, title: str = "chunkft simulated step") -> list[dict[str, Any]]:
    """Trace events of one simulated step: metadata, lane slices, idle gaps, memory counters."""
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": _PID, "tid": 0, "name": "process_name", "args": {"name": title}},
    ]
    for lane in LANES:
        events.append(
            {
                "ph": "M",
                "pid": _PID,
                "tid": _TIDS[lane],
                "name": "thread_name",
                "args": {"name": _THREAD_NAMES[lane]},
            }
        )
        events.append(
            {
                "ph": "M",
                "pid": _PID,
                "tid": _TIDS[lane],
                "name": "thread_sort_index",
                "args": {"sort_index": _TIDS[lane]},
            }
        )
    end_s = drawn_step_seconds(sim)
    late = [e.name for e in sim.events if e.end_s > end_s * (1 + 1e-9) + 1e-12]
    if late:
        raise ValueError(f"events end after the drawn step ({end_s} s): {', '.join(late[:3])}")
    for lane in LANES:
        cursor = 0.0
        for e in sorted((e for e in sim.events if e.lane == lane), key=lambda e: (e.start_s, e.end_s)):
            if e.end_s < e.start_s:
                raise ValueError(f"event {e.name!r} ends before it starts ({e.start_s} > {e.end_s})")
            if lane == "compute" and e.start_s > cursor:
                events.append(_slice(lane, IDLE_NAME, cursor, e.start_s, {}))
            args: dict[str, Any] = {}
            if e.chunk is not None:
                args["chunk"] = e.chunk
            if e.layer is not None:
                args["layer"] = e.layer
            events.append(_slice(lane, e.name, e.start_s, e.end_s, args))
            cursor = max(cursor, e.end_s)
        if lane == "compute" and cursor < end_s:
            events.append(_slice(lane, IDLE_NAME, cursor, end_s, {}))
    for s in sorted(sim.memory, key=lambda s: s.time_s):
        by_cat = dict(s.bytes_by_category)
        args = {cat: by_cat.get(cat, 0) for cat in CATEGORIES}
        args["reserve"] = sim.reserve_bytes
        events.append(
            {"ph": "C", "pid": _PID, "name": "GPU memory (bytes)", "ts": _us(s.time_s), "args": args}
        )
    return events


def _slice(lane: str, name: str, start_s: float, end_s: float, args: dict[str, Any]) -> dict[str, Any]:
    return {
        "ph": "X",
        "pid": _PID,
        "tid": _TIDS[lane],
        "name": name,
        "cat": lane,
        "ts": _us(start_s),
        "dur": _us(end_s - start_s),
        "args": args,
    }


def trace_json(sim: StepSimulation, title: str = "chunkft simulated step") -> str:
    """The whole trace file: the JSON object format, timestamps in microseconds."""
    doc = {
        "traceEvents": trace_events(sim, title),
        "displayTimeUnit": "ms",
        "otherData": {
            "drawn_step_seconds": drawn_step_seconds(sim),
            "mean_step_seconds_over_rotation": sim.step_seconds,
            "peak_bytes": sim.peak_bytes,
            "peak_cause": sim.peak_cause,
            "reserve_bytes": sim.reserve_bytes,
        },
    }
    return json.dumps(doc, indent=1)
