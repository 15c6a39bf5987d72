"""The report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot, no display).

Each function takes typed report data and returns a Figure; png_bytes renders one. Values stay in
bytes and seconds until the axis: GiB (MiB/KiB for tiny models) and ms.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from chunkft.timeline import CATEGORIES, LANES

from .data import Alternative, ReportData, RunRecord, drawn_step_seconds
from .layers import chunk_spans, group_boundaries, per_layer_bytes
from .units import byte_scale, ms

CATEGORY_COLORS = {
    "reserve": "#bdbdbd",
    "weights": "#4c72b0",
    "activations": "#dd8452",
    "gradients": "#c44e52",
    "optimizer_states": "#55a868",
    "master": "#8172b3",
    "prefetch": "#64b5cd",
    "temporaries": "#937860",
}
CATEGORY_LABELS = {
    "reserve": "reserve (CUDA context + fragmentation)",
    "weights": "weights",
    "activations": "activations kept",
    "gradients": "gradients (active window)",
    "optimizer_states": "optimizer states (active window)",
    "master": "fp32 master (active window)",
    "prefetch": "prefetch buffer (next window)",
    "temporaries": "temporaries",
}
BUDGET_COLOR = "#d62728"


def png_bytes(fig: Figure, dpi: int = 110) -> bytes:
    """Render a figure to PNG bytes with the Agg canvas."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def memory_figure(data: ReportData) -> Figure:
    """1. GPU memory over one step, stacked by category, with the budget line and the peak's cause."""
    sim = data.simulation
    div, unit = byte_scale(sim.peak_bytes + sim.reserve_bytes)
    fig = Figure(figsize=(12, 5.5), layout="constrained")
    ax = fig.add_subplot()
    samples = sorted(sim.memory, key=lambda s: s.time_s)
    end_s = drawn_step_seconds(sim)
    times = [ms(s.time_s) for s in samples] + [ms(end_s)]
    base = [sim.reserve_bytes / div] * len(times)
    ax.fill_between(times, 0, base, step="post", color=CATEGORY_COLORS["reserve"], lw=0)
    handles = [
        Patch(color=CATEGORY_COLORS["reserve"], label=_cat_label("reserve", sim.reserve_bytes, div, unit))
    ]
    peak_by_cat = dict(sim.peak_by_category)
    for cat in CATEGORIES:
        vals = [dict(s.bytes_by_category).get(cat, 0) / div for s in samples]
        vals.append(vals[-1] if vals else 0.0)
        top = [b + v for b, v in zip(base, vals, strict=True)]
        if any(v > 0 for v in vals):
            ax.fill_between(times, base, top, step="post", color=CATEGORY_COLORS[cat], lw=0)
            handles.append(
                Patch(color=CATEGORY_COLORS[cat], label=_cat_label(cat, peak_by_cat.get(cat, 0), div, unit))
            )
        base = top
    peak = (sim.peak_bytes + sim.reserve_bytes) / div
    # A budget far above the peak (a tiny model on a big card) would flatten the plot: draw lines only
    # for limits within a few times the peak and name the others in the corner.
    off_scale = []
    for limit, label, style in (
        (data.budget_bytes, "budget", {"color": BUDGET_COLOR, "ls": "--", "lw": 1.5}),
        (data.memory_total_bytes, "GPU total", {"color": "black", "ls": ":", "lw": 1.0}),
    ):
        if not limit or (label == "GPU total" and limit == data.budget_bytes):
            continue
        if limit / div > 4 * peak:
            times_peak = limit / div / peak
            off_scale.append(f"{label} {limit / div:.2f} {unit} ({times_peak:.0f}x the peak, off scale)")
            continue
        ax.axhline(limit / div, **style)
        ax.text(0, limit / div, f" {label} {limit / div:.2f} {unit}", color=style["color"], va="bottom",
                ha="left", fontsize=9)
    if off_scale:
        ax.text(0.01, 0.99, "\n".join(off_scale), transform=ax.transAxes, va="top", ha="left", fontsize=9,
                color=BUDGET_COLOR)
    peak = (sim.peak_bytes + sim.reserve_bytes) / div
    ax.plot([ms(sim.peak_time_s)], [peak], marker="v", color="black", ms=9)
    ax.annotate(
        f"peak {peak:.2f} {unit} (with reserve)\nat {ms(sim.peak_time_s):.1f} ms: {sim.peak_cause}",
        xy=(ms(sim.peak_time_s), peak),
        xytext=(0.5, 0.97),
        textcoords="axes fraction",
        ha="center",
        va="top",
        fontsize=9,
        bbox={"boxstyle": "round", "fc": "white", "ec": "0.5"},
        arrowprops={"arrowstyle": "->", "color": "0.3"},
    )
    limits = [b / div for b in (data.budget_bytes, data.memory_total_bytes) if b and b / div <= 4 * peak]
    ax.set_ylim(0, max([peak, *limits]) * 1.3)
    ax.set_xlim(0, ms(end_s))
    ax.set_xlabel("time in the step (ms)")
    ax.set_ylabel(f"GPU memory ({unit})")
    ax.set_title(
        f"GPU memory over one optimizer step: {data.model_name} on {data.gpu_name}, K={data.num_chunks}"
    )
    ax.legend(
        handles=handles[::-1],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
        title=f"category (at the peak, {unit})",
        title_fontsize=8,
    )
    ax.grid(axis="y", alpha=0.3)
    return fig


def _cat_label(cat: str, num_bytes: int, div: int, unit: str) -> str:
    return f"{CATEGORY_LABELS[cat]}: {num_bytes / div:.2f}"


_COMPUTE_KINDS = (
    ("recompute", "#8172b3", "backward + recompute (checkpointed block)"),
    ("fwd", "#4c72b0", "forward"),
    ("bwd", "#dd8452", "backward"),
    ("update", "#55a868", "optimizer update"),
)


def _compute_kind(name: str) -> tuple[str, str]:
    for key, color, label in _COMPUTE_KINDS:
        if key in name:
            return color, label
    return "#9e9e9e", "other compute"


def lanes_figure(data: ReportData) -> Figure:
    """2. Compute, host-to-device and device-to-host lanes over one step, transfers labelled by chunk."""
    sim = data.simulation
    end_s = drawn_step_seconds(sim)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    ax = fig.add_subplot()
    # the interconnect lane (data parallel's collectives) only where the plan has ranks to talk to
    drawn = [lane for lane in LANES if lane != "interconnect" or any(e.lane == lane for e in sim.events)]
    rows = {lane: len(drawn) - 1 - i for i, lane in enumerate(("compute", "interconnect", "h2d", "d2h"))
            if lane in drawn}  # fmt: skip
    lane_titles = {"compute": "compute", "h2d": "host → device", "d2h": "device → host",
                   "interconnect": "between GPUs"}  # fmt: skip
    legend: dict[str, str] = {}
    labelled = 0
    for lane in drawn:
        events = sorted((e for e in sim.events if e.lane == lane), key=lambda e: e.start_s)
        y = rows[lane]
        if lane == "compute":
            gaps = _gaps(events, end_s)
            if gaps:
                ax.broken_barh(
                    [(ms(a), ms(b - a)) for a, b in gaps],
                    (y - 0.35, 0.7),
                    facecolor="none",
                    edgecolor="#c44e52",
                    hatch="///",
                    lw=0.5,
                )
                legend.setdefault("compute idle (waiting)", "none")
        for i, e in enumerate(events):
            if lane == "compute":
                color, label = _compute_kind(e.name)
            elif lane == "h2d":
                color, label = "#64b5cd", "prefetch (host → device)"
            elif lane == "interconnect":
                color, label = "#8172b3", "reduce-scatter / all-gather (between GPUs)"
            else:
                color, label = "#937860", "write-back (device → host)"
            legend.setdefault(label, color)
            width = ms(e.end_s - e.start_s)
            ax.broken_barh([(ms(e.start_s), width)], (y - 0.35, 0.7), color=color, ec="white", lw=0.3)
            if lane != "compute" and labelled < 80:
                kind = {"h2d": "prefetch", "d2h": "write-back"}.get(lane)
                text = f"{kind} chunk {e.chunk}" if kind and e.chunk is not None else e.name
                wide = width > 0.12 * ms(end_s)
                if wide:
                    ax.text(
                        ms(e.start_s) + width / 2,
                        y,
                        text,
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white",
                        clip_on=True,
                    )
                else:  # above the bar, from its start, staggered so neighbours do not overprint
                    ax.text(
                        ms(e.start_s),
                        y + 0.42 + 0.17 * (i % 2),
                        text,
                        ha="left",
                        va="center",
                        fontsize=7,
                        clip_on=True,
                    )
                labelled += 1
    ticks = []
    for lane in drawn:
        busy = sum(e.end_s - e.start_s for e in sim.events if e.lane == lane)
        ticks.append((rows[lane], f"{lane_titles[lane]}\n{100 * busy / end_s:.0f}% busy" if end_s else lane))
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks])
    ax.set_ylim(-0.6, len(drawn) - 0.2)
    ax.set_xlim(0, ms(end_s))
    ax.set_xlabel("time in the step (ms)")
    window = next((e.chunk for e in sim.events if e.name.startswith("update")), None)
    drawn = f"window {window}'s step" if window is not None else "the drawn step"
    ax.set_title(
        f"What runs when: {drawn} (the one with the highest memory) lasts {ms(end_s):.1f} ms; "
        f"the mean step over the rotation is {ms(sim.step_seconds):.1f} ms\n"
        "copies of the previous window's states (write-back) and the next one's (prefetch) should hide "
        "under compute",
        fontsize=10,
    )
    handles = [
        Patch(facecolor="none", edgecolor="#c44e52", hatch="///", label=lb)
        if c == "none"
        else Patch(color=c, label=lb)
        for lb, c in legend.items()
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _gaps(events: Sequence, end_s: float) -> list[tuple[float, float]]:
    """Idle intervals of a lane (events sorted by start) between 0 and end_s."""
    gaps, cursor = [], 0.0
    for e in events:
        if e.start_s > cursor:
            gaps.append((cursor, e.start_s))
        cursor = max(cursor, e.end_s)
    if cursor < end_s:
        gaps.append((cursor, end_s))
    return [(a, b) for a, b in gaps if b - a > 1e-4 * end_s]


def per_layer_figure(data: ReportData) -> Figure:
    """3. Per layer: resident weights, activations kept, and gradients/optimizer state of its window."""
    rows = per_layer_bytes(
        data.params,
        data.simulation,
        grad_bytes_per_element=data.grad_bytes_per_element,
        state_bytes_per_element=data.state_bytes_per_element,
        master_bytes_per_element=data.master_bytes_per_element,
    )
    series = [
        ("weights (always on GPU)", [r.weight_bytes for r in rows], CATEGORY_COLORS["weights"]),
        (
            "activations kept for backward",
            [r.activation_bytes or 0 for r in rows],
            CATEGORY_COLORS["activations"],
        ),
        (
            "gradients (on GPU only while in the active window)",
            [r.grad_bytes for r in rows],
            CATEGORY_COLORS["gradients"],
        ),
        (
            "optimizer states + fp32 master (GPU while active, else host)",
            [r.state_bytes for r in rows],
            CATEGORY_COLORS["optimizer_states"],
        ),
    ]
    window = _largest_window_bytes(data)
    div, unit = byte_scale(max([window] + [v for _, vals, _ in series for v in vals]))
    fig = Figure(figsize=(max(8, 0.42 * len(rows) + 3), 5), layout="constrained")
    ax = fig.add_subplot()
    width = 0.2
    xs = range(len(rows))
    for j, (label, vals, color) in enumerate(series):
        ax.bar([x + (j - 1.5) * width for x in xs], [v / div for v in vals], width, label=label, color=color)
    ax.axhline(
        window / div,
        color="black",
        ls="--",
        lw=1,
        label=f"one window's gradients + states + master on GPU (largest): {window / div:.2f} {unit}",
    )
    ax.set_xticks(list(xs), [r.label for r in rows], rotation=90 if len(rows) > 20 else 0, fontsize=8)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    positive = [v for _, vals, _ in series for v in vals if v > 0]
    if positive and max(positive) > 30 * min(positive):
        ax.set_yscale("log")
        ax.set_ylabel(f"{unit} (log scale)")
    else:
        ax.set_ylabel(unit)
    ax.set_xlabel("parameter group in stream order (embed, block L0 … Ln, head)")
    missing = all(r.activation_bytes is None for r in rows if r.label.startswith("L"))
    title = (
        "Per layer: what each part of the model costs; gradients and optimizer states are on the GPU "
        "only while the part is in the active window"
    )
    if missing:
        title += " (activations: not broken down by layer in the simulation)"
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.grid(axis="y", alpha=0.3)
    return fig


def _largest_window_bytes(data: ReportData) -> int:
    from chunkft.chunks import chunk_numel

    per_elem = data.grad_bytes_per_element + data.state_bytes_per_element + data.master_bytes_per_element
    return max((chunk_numel(c, data.params) * per_elem for c in data.chunks), default=0)


def chunk_map_figure(data: ReportData) -> Figure:
    """4. The chunk map: the stretch of the parameter stream each chunk covers, in rotation order."""
    spans = {s.index: s for s in chunk_spans(data.params, data.chunks)}
    order = list(dict.fromkeys(data.rotation)) or sorted(spans)
    order += [i for i in sorted(spans) if i not in order]
    groups = group_boundaries(data.params)
    total = groups[-1][2] if groups else 1
    div, unit = byte_scale(total)
    n = len(order)
    fig = Figure(figsize=(12, min(14, max(4.0, 2.2 + 0.28 * n))), layout="constrained")
    ax = fig.add_subplot()
    cmap = ["#4c72b0", "#55a868", "#dd8452", "#8172b3"]
    for pos, idx in enumerate(order):
        s = spans[idx]
        ax.broken_barh(
            [(s.start_bytes / div, (s.end_bytes - s.start_bytes) / div)],
            (pos - 0.4, 0.8),
            color=cmap[idx % len(cmap)],
        )
    step = max(1, len(groups) // 24)
    for j, (label, start, end) in enumerate(groups):
        ax.axvline(start / div, color="0.75", lw=0.6, zorder=0)
        if j % step == 0 or label in ("embed", "head"):
            ax.text((start + end) / 2 / div, -0.9, label, ha="center", va="bottom", fontsize=7, color="0.3")
    if n <= 16:  # few windows: name the first and last slice of each, to the row
        for pos, idx in enumerate(order):
            s = spans[idx]
            text = f"{s.first}  →  {s.last}"
            right = s.end_bytes < 0.55 * total
            x = (s.end_bytes if right else s.start_bytes) / div
            ax.text(
                x, pos, f"  {text}  ", ha="left" if right else "right", va="center", fontsize=7, color="0.2"
            )
    labels = []
    for pos, idx in enumerate(order):
        s = spans[idx]
        labels.append(f"#{pos + 1}  chunk {idx}  {_group_range(s.start_bytes, s.end_bytes, groups)}")
    ytick_step = max(1, n // 48)
    ax.set_yticks(range(0, n, ytick_step), labels[::ytick_step], fontsize=7 if n > 24 else 8)
    ax.set_ylim(n - 0.4, -1.2)
    ax.set_xlim(0, total / div)
    ax.set_xlabel(f"position in the parameter stream, weight bytes ({unit}); grey lines: layer boundaries")
    ax.set_ylabel("visiting order")
    ax.set_title(
        f"Chunk map: K={data.num_chunks} windows, visited top to bottom, one per optimizer step", pad=16
    )
    return fig


def _group_range(start: int, end: int, groups: Sequence[tuple[str, int, int]]) -> str:
    inside = [label for label, a, b in groups if a < end and b > start]
    if not inside:
        return ""
    return f"({inside[0]})" if len(inside) == 1 else f"({inside[0]}–{inside[-1]})"


def sweep_figure(data: ReportData) -> Figure:
    """5. Budget sweep: step time and peak of the solver's best plan per budget and GPU profile, the
    chosen plan marked, the budgets where nothing fits shaded; alternatives on the plan's GPU beside."""
    fig = Figure(figsize=(15, 6.2), layout="constrained")
    ax_t, ax_p, ax_a = fig.subplots(1, 3, width_ratios=[1.15, 1.0, 1.0])
    points = list(data.sweep)
    div, unit = byte_scale(max([data.budget_bytes] + [p.budget_bytes for p in points] + [1]))
    gpus = list(dict.fromkeys(p.gpu for p in points))
    budgets = [p.budget_bytes for p in points] + [data.budget_bytes]
    log_x = bool(points) and max(budgets) > 12 * min(budgets)
    span = _pos(max(budgets) / div, log_x) - _pos(min(budgets) / div, log_x) if points else 1.0
    gap = 0.07 * span  # annotations closer than this overprint
    for g in gpus:
        pts = sorted((p for p in points if p.gpu == g), key=lambda p: p.budget_bytes)
        ok = [p for p in pts if p.feasible]
        mine = g == data.gpu_name
        style = {"lw": 2.4, "zorder": 4} if mine else {"lw": 1.3, "alpha": 0.85}
        line = ax_t.plot(
            [p.budget_bytes / div for p in ok],
            [ms(p.step_seconds) for p in ok],
            marker="o",
            ms=4,
            label=g + (" (this plan's GPU)" if mine else ""),
            **style,
        )[0]
        color = line.get_color()
        ax_p.plot(
            [p.budget_bytes / div for p in ok], [p.peak_bytes / div for p in ok], marker="o", ms=4,
            color=color, **style,
        )
        last = None
        placed: list[float] = []
        for p in ok:  # name the solver's choice where it changes, so the steps in the curve are explained
            now = (p.k, p.checkpointing)
            x = p.budget_bytes / div
            if now != last and (not placed or abs(_pos(x, log_x) - _pos(placed[-1], log_x)) > gap):
                ckpt = p.checkpointing not in ("", "none")
                text = f"K={p.k}" + (f", ckpt {p.checkpointing}" if ckpt else "")
                ax_t.annotate(
                    text, (x, ms(p.step_seconds)), fontsize=6.5, color=color,
                    xytext=(3, 4), textcoords="offset points", rotation=25,
                )
                last = now
                placed.append(x)
        bad = [p for p in pts if not p.feasible]
        if bad:
            lo = min(p.budget_bytes for p in pts) / div
            hi = min(p.budget_bytes for p in ok) / div if ok else max(p.budget_bytes for p in bad) / div
            for ax in (ax_t, ax_p):
                if mine:
                    ax.axvspan(lo, hi, color="0.85", zorder=0, label="nothing fits on this GPU")
                else:
                    ax.axvline(hi, color=color, ls=":", lw=1)
    sim = data.simulation
    chosen_peak = (sim.peak_bytes + sim.reserve_bytes) / div
    for ax, y in ((ax_t, ms(sim.step_seconds)), (ax_p, chosen_peak)):
        ax.plot(
            [data.budget_bytes / div], [y], marker="*", ms=17, color=BUDGET_COLOR, ls="none",
            label=f"this plan (K={data.num_chunks}, budget {data.budget_bytes / div:.2f} {unit})", zorder=6,
        )
        ax.axvline(data.budget_bytes / div, color=BUDGET_COLOR, ls=":", lw=1)
        ax.set_xlabel(f"memory budget per GPU ({unit}{', log scale' if log_x else ''})")
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3, which="both")
    if points:
        lo_b, hi_b = min(budgets) / div, max(budgets) / div
        ax_p.plot([lo_b, hi_b], [lo_b, hi_b], color="0.5", ls="--", lw=0.8, label="peak = budget (the limit)")
        if log_x:  # budgets over decades: peaks and times over decades too, or small ones vanish
            ax_p.set_yscale("log")
            ax_t.set_yscale("log")
    else:
        for ax in (ax_t, ax_p):
            ax.text(0.5, 0.5, "no sweep data", transform=ax.transAxes, ha="center", color="0.4")
    ax_t.set_ylabel(f"predicted step time (ms{', log scale' if points and log_x else ''})")
    ax_t.set_title("Step time of the solver's best plan at each budget", fontsize=10)
    ax_p.set_ylabel(f"predicted peak incl. reserve ({unit}{', log scale' if points and log_x else ''})")
    ax_p.set_title("Its peak memory (must stay under the dashed line)", fontsize=10)
    ax_t.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    ax_p.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    _alternatives_panel(ax_a, data.alternatives, data, div, unit)
    fig.suptitle(
        f"Budget sweep: {data.model_name}, the same training re-planned by the solver for every budget "
        "and GPU (dotted lines: below them nothing fits on that GPU).\nWith more memory the solver uses "
        "fewer windows K: each step then updates a larger part of the model (a full pass takes K steps), "
        "so a step may take longer.",
        fontsize=11,
    )
    return fig


def _pos(x: float, log: bool) -> float:
    return math.log(x) if log and x > 0 else x


def _alternatives_panel(ax, alts: Sequence[Alternative], data: ReportData, div: int, unit: str) -> None:
    for i, a in enumerate(alts, 1):
        color = "#55a868" if a.feasible else "#c44e52"
        x = (a.peak_bytes + data.reserve_bytes) / div
        ax.plot(
            [x],
            [ms(a.step_seconds)],
            marker="o" if a.feasible else "x",
            color=color,
            ls="none",
            label=f"{i}: {a.label} (K={a.k})",
        )
        ax.annotate(
            str(i),
            (x, ms(a.step_seconds)),
            fontsize=8,
            xytext=(4, 2 + 7 * (i % 2)),
            textcoords="offset points",
        )
    sim = data.simulation
    ax.plot(
        [(sim.peak_bytes + sim.reserve_bytes) / div],
        [ms(sim.step_seconds)],
        marker="*",
        ms=16,
        color=BUDGET_COLOR,
        ls="none",
        zorder=5,
    )
    ax.axvline(data.budget_bytes / div, color=BUDGET_COLOR, ls="--", lw=1)
    right = max([data.budget_bytes] + [a.peak_bytes + data.reserve_bytes for a in alts]) / div * 1.1
    ax.axvspan(data.budget_bytes / div, right, color="0.85", zorder=0)
    ax.set_xlim(0, right)
    ax.set_xlabel(f"predicted peak incl. reserve ({unit}); shaded: over budget")
    ax.set_ylabel("predicted step time (ms)")
    ax.set_title(f"Alternatives on {data.gpu_name}\n(o fits, x does not; star: chosen)", fontsize=10)
    if alts:
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1)
    ax.grid(alpha=0.3)
    if not alts:
        ax.text(0.5, 0.5, "no alternatives recorded", transform=ax.transAxes, ha="center", color="0.4")


def measured_figure(data: ReportData, run: RunRecord) -> Figure:
    """6. Predicted against measured: peak memory by category, step time, and the loss curves."""
    sim = data.simulation
    fig = Figure(figsize=(13.5, 4.8), layout="constrained")
    ax_m, ax_t, ax_l = fig.subplots(1, 3, width_ratios=[1.1, 0.7, 1.5])
    measured_peak = run.peak_bytes or 0
    div, unit = byte_scale(max(sim.peak_bytes, measured_peak))
    pred, meas = dict(sim.peak_by_category), dict(run.peak_by_category)
    bottoms = [0.0, 0.0]
    for cat in CATEGORIES:
        vals = [pred.get(cat, 0) / div, meas.get(cat, 0) / div]
        if any(vals):
            ax_m.bar(
                [0, 1], vals, 0.6, bottom=bottoms, color=CATEGORY_COLORS[cat], label=CATEGORY_LABELS[cat]
            )
            bottoms = [b + v for b, v in zip(bottoms, vals, strict=True)]
    if run.peak_bytes is not None and not meas:  # the CUDA allocator gives a total, no breakdown
        ax_m.bar([1], [measured_peak / div], 0.6, color="0.6", label="measured total (no breakdown)")
    ax_m.text(0, sim.peak_bytes / div, f"{sim.peak_bytes / div:.2f}", ha="center", va="bottom", fontsize=9)
    if run.peak_bytes is None:
        ax_m.text(1, 0, "no step\nmeasured", ha="center", va="bottom", fontsize=9, color="0.4")
        ax_m.set_title("Peak memory (not measured in this run)", fontsize=10)
    else:
        ax_m.text(1, measured_peak / div, f"{measured_peak / div:.2f}", ha="center", va="bottom", fontsize=9)
        ax_m.set_title(f"Peak memory: prediction {_off_text(sim.peak_bytes, measured_peak)}", fontsize=10)
    how = ", ".join(x for x in (run.device, run.memory_method) if x)
    ax_m.set_xticks([0, 1], ["predicted", "measured" + (f"\n({how})" if how else "")])
    ax_m.set_ylabel(f"allocated peak, without reserve ({unit})")
    ax_m.set_ylim(0, max(bottoms + [sim.peak_bytes / div, measured_peak / div]) * 1.3)
    ax_m.legend(fontsize=6, loc="upper center", ncol=2)
    vals = [ms(sim.step_seconds), ms(run.step_seconds)]
    ax_t.bar([0, 1], vals, 0.6, color=["#4c72b0", "#dd8452"])
    for x, v, tps in ((0, vals[0], sim.tokens_per_second), (1, vals[1], run.tokens_per_second)):
        ax_t.text(x, v, f"{v:.1f} ms\n{tps:,.0f} tok/s", ha="center", va="bottom", fontsize=8)
    ax_t.set_xticks([0, 1], ["predicted\n(mean over rotation)", "measured\n(mean over windows)"], fontsize=8)
    ax_t.set_ylabel("step time (ms)")
    ax_t.set_ylim(0, max(vals) * 1.3 if max(vals) > 0 else 1)
    timed = _off_text(sim.step_seconds, run.step_seconds) if run.step_seconds else "(no step timed)"
    ax_t.set_title(f"Step time: prediction {timed}", fontsize=10)
    if run.train_losses:
        ax_l.plot(
            [s for s, _ in run.train_losses], [v for _, v in run.train_losses], lw=1, label="train (per step)"
        )
    if run.eval_losses:
        ax_l.plot(
            [s for s, _ in run.eval_losses], [v for _, v in run.eval_losses], marker="o", lw=1.5,
            label="eval (held-out)",
        )
    if not (run.train_losses or run.eval_losses):
        ax_l.text(0.5, 0.5, "no losses in run.json", transform=ax_l.transAxes, ha="center", color="0.4")
    ax_l.xaxis.get_major_locator().set_params(integer=True)
    ax_l.set_xlabel("optimizer step")
    ax_l.set_ylabel("loss")
    ax_l.set_title(f"Loss (one window of K={data.num_chunks} updated per step)", fontsize=10)
    ax_l.grid(alpha=0.3)
    if run.train_losses or run.eval_losses:
        ax_l.legend(fontsize=8)
    fig.suptitle(f"Predicted against measured: {data.model_name}")
    return fig


def _off_text(predicted: float, measured: float) -> str:
    """'10.1% below the measurement' or 'within 0.5%'."""
    err = _rel_err(predicted, measured)
    if abs(err) < 0.005:
        return "within 0.5% of the measurement"
    return f"{abs(err):.1%} {'below' if err < 0 else 'above'} the measurement"


def _rel_err(predicted: float, measured: float) -> float:
    """How far the prediction is from the measurement, relative to the measurement."""
    return (predicted - measured) / measured if measured else 0.0


def all_figures(data: ReportData) -> list[tuple[str, str, Figure]]:
    """(file stem, caption, figure) for every figure the data supports, in report order."""
    figs = [
        ("memory", "GPU memory over one step, stacked by category", memory_figure(data)),
        ("lanes", "Compute and transfer lanes over one step", lanes_figure(data)),
        (
            "per_layer",
            "Per layer: weights, activations, gradients and optimizer state",
            per_layer_figure(data),
        ),
        ("chunk_map", "Chunk map in rotation order", chunk_map_figure(data)),
        ("sweep", "Budget sweep", sweep_figure(data)),
    ]
    if data.run is not None:
        figs.append(("measured", "Predicted against measured", measured_figure(data, data.run)))
    return figs
