"""report.html: one self-contained page (figures as data URIs, inline CSS), readable offline."""

from __future__ import annotations

import base64
import html

from chunkft.chunks import chunk_numel

from .data import ReportData, drawn_step_seconds
from .layers import chunk_spans
from .units import fmt_bytes, fmt_seconds

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: left; font-size: 14px; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #b00020; font-weight: bold; } .ok { color: #1b5e20; font-weight: bold; }
figure { margin: 2em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-weight: bold; margin-bottom: 0.4em; }
details { margin: 1em 0; } .note { color: #555; }
"""


def render_html(data: ReportData, figures: list[tuple[str, str, bytes]]) -> str:
    """The page: summary table, comparison with the baselines, figures, chunk table, notes.

    figures: (file stem, caption, PNG bytes); each is embedded and also named by its PNG file.
    """
    e = html.escape
    sim = data.simulation
    total = sim.peak_bytes + sim.reserve_bytes
    left = data.budget_bytes - total - data.headroom_bytes
    fits = left >= 0
    rows = [
        ("Model", e(data.model_name)),
        ("GPU", e(data.gpu_name) + f" ({fmt_bytes(data.memory_total_bytes)})"),
        (
            "Memory budget",
            fmt_bytes(data.budget_bytes) + f" (of which reserve {fmt_bytes(sim.reserve_bytes)})",
        ),
        (
            "Predicted peak",
            f"{fmt_bytes(sim.peak_bytes)} allocated + {fmt_bytes(sim.reserve_bytes)} reserve "
            f"= {fmt_bytes(total)}; at: {e(sim.peak_cause)}",
        ),
        (
            "Headroom",
            f"{fmt_bytes(data.headroom_bytes)} kept free as a safety margin; "
            f"<span class='{'ok' if fits else 'bad'}'>{fmt_bytes(left)} left beyond it"
            f"{'' if fits else ' — does NOT fit'}</span>",
        ),
        ("Chunks K", str(data.num_chunks)),
        ("Activation checkpointing", e(data.checkpointing)),
        (
            "Step time",
            f"{fmt_seconds(sim.step_seconds)} (mean over the rotation); the step drawn in the figures and "
            f"trace.json (the highest-memory window's) lasts {fmt_seconds(drawn_step_seconds(sim))}",
        ),
        ("Tokens per second", f"{sim.tokens_per_second:,.0f} ({sim.tokens_per_step:,} tokens per step)"),
        ("Host memory", fmt_bytes(sim.host_bytes)),
    ]
    if data.run is not None:
        r = data.run
        rows.append(
            (
                "Measured peak",
                "not measured (no step in the measured span)"
                if r.peak_bytes is None
                else f"{fmt_bytes(r.peak_bytes)} allocated (predicted {_err(sim.peak_bytes, r.peak_bytes)})"
                + (f"; {e(r.device)}, {e(r.memory_method)}" if r.memory_method else ""),
            )
        )
        rows.append(
            (
                "Measured step time",
                f"{fmt_seconds(r.step_seconds)}, {r.tokens_per_second:,.0f} tokens/s "
                f"(predicted {_err(sim.step_seconds, r.step_seconds)})",
            )
        )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>chunkft plan: {e(data.model_name)} on {e(data.gpu_name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>chunkft plan: {e(data.model_name)} on {e(data.gpu_name)}</h1>",
        "<h2>Summary</h2><table>",
        *(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows),
        "</table>",
        _alternatives_table(data),
    ]
    if data.notes:
        parts.append("<ul class='note'>" + "".join(f"<li>{e(n)}</li>" for n in data.notes) + "</ul>")
    parts.append(
        "<p class='note'>The simulated step is also in <a href='trace.json'>trace.json</a> "
        "(open it in ui.perfetto.dev or chrome://tracing).</p>"
    )
    for stem, caption, png in figures:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure id='{stem}'><figcaption>{e(caption)} (<a href='{stem}.png'>{stem}.png</a>)"
            f"</figcaption><img src='{uri}' alt='{e(caption)}'></figure>"
        )
    parts.append(_chunk_table(data))
    parts.append("</body></html>")
    return "\n".join(parts)


def _err(predicted: float, measured: float) -> str:
    if not measured:
        return "n/a"
    return f"{(predicted - measured) / measured:+.1%} off"


def _alternatives_table(data: ReportData) -> str:
    """The chosen plan next to what else was considered, the baselines (dense AdamW, offload all) included."""
    if not data.alternatives:
        return "<p class='note'>The plan records no alternatives or baselines.</p>"
    e = html.escape
    sim = data.simulation
    head = (
        "<h2>Compared with the alternatives and baselines</h2><table><tr><th>plan</th><th>K</th>"
        "<th>predicted peak incl. reserve</th><th>step time</th><th>tokens/s</th>"
        "<th>fits the budget</th></tr>"
    )
    body = [
        f"<tr><td><b>chosen</b></td><td class='num'>{data.num_chunks}</td>"
        f"<td class='num'>{fmt_bytes(sim.peak_bytes + sim.reserve_bytes)}</td>"
        f"<td class='num'>{fmt_seconds(sim.step_seconds)}</td>"
        f"<td class='num'>{sim.tokens_per_second:,.0f}</td>"
        f"<td>{'yes' if sim.peak_bytes + sim.reserve_bytes <= data.budget_bytes else 'no'}</td></tr>"
    ]
    for a in data.alternatives:
        body.append(
            f"<tr><td>{e(a.label)}</td><td class='num'>{a.k}</td>"
            f"<td class='num'>{fmt_bytes(a.peak_bytes + data.reserve_bytes)}</td>"
            f"<td class='num'>{fmt_seconds(a.step_seconds)}</td>"
            f"<td class='num'>{a.tokens_per_second:,.0f}</td>"
            f"<td class='{'ok' if a.feasible else 'bad'}'>{'yes' if a.feasible else 'no'}</td></tr>"
        )
    return head + "".join(body) + "</table>"


def _chunk_table(data: ReportData) -> str:
    """Every chunk's first and last slice, so the chunk map can be read to the row."""
    e = html.escape
    spans = {s.index: s for s in chunk_spans(data.params, data.chunks)}
    order = list(dict.fromkeys(data.rotation)) + [
        c.index for c in data.chunks if c.index not in data.rotation
    ]
    by_index = {c.index: c for c in data.chunks}
    rows = "".join(
        f"<tr><td class='num'>{pos + 1}</td><td class='num'>{i}</td>"
        f"<td class='num'>{chunk_numel(by_index[i], data.params):,}</td>"
        f"<td class='num'>{len(by_index[i].slices)}</td>"
        f"<td><code>{e(spans[i].first)}</code></td><td><code>{e(spans[i].last)}</code></td></tr>"
        for pos, i in enumerate(order)
    )
    return (
        "<details><summary>Chunk table (every window, in visiting order)</summary><table><tr><th>#</th>"
        "<th>chunk</th><th>parameters</th><th>tensors</th><th>from</th><th>to</th></tr>"
        + rows
        + "</table></details>"
    )
