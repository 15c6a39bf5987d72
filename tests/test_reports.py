"""Reports: figures decode and are not blank, report.html embeds and names every figure, trace.json is
valid trace-event JSON whose compute track adds up to the simulated step, bad input fails cleanly.

Simulations here are hand-made (a forward/backward/update schedule with a prefetch and a write-back) over
the parameters of real Hugging Face models built from config on the meta device.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from matplotlib.image import imread
from transformers import LlamaConfig

from chunkft.chunks import DTYPE_BYTES, ParamSpec, chunk_numel, param_specs, partition
from chunkft.plan_format import load_plan, plan_digest, plan_to_json
from chunkft.profiles import build_model, load_model
from chunkft.reports import (
    ReportData,
    ReportError,
    RunRecord,
    load_run,
    render,
    trace_events,
    write_report_data,
)
from chunkft.reports.cli import main as report_cli
from chunkft.reports.data import Alternative
from chunkft.reports.inputs import report_data, sweep_from_alternatives
from chunkft.reports.layers import activations_by_layer, chunk_spans, layer_groups, layer_of, per_layer_bytes
from chunkft.reports.runfile import RunFileError, run_from_dict
from chunkft.reports.writer import write_report
from chunkft.timeline import CATEGORIES, LaneEvent, MemorySample, StepSimulation

GOLDEN_PLAN = Path(__file__).parent / "golden" / "plan_v1.json"
FIGURES = ("memory", "lanes", "per_layer", "chunk_map", "sweep")
GIB = 1 << 30


def synthetic_step(
    params: list[ParamSpec], chunks, active: int, *, act_per_layer: int, layer_s: float, h2d_s: float,
    reserve: int = 0, tokens: int = 1024,
) -> StepSimulation:
    """A consistent one-step schedule: prefetch of the next window while forward/backward run, the update
    (waiting for the prefetch if it is late), then the write-back of the active window."""
    layers = sorted({n for p in params if (n := layer_of(p.name)) is not None})
    cn = chunk_numel(chunks[active], params)
    nxt = (active + 1) % len(chunks)
    state = dict.fromkeys(CATEGORIES, 0)
    state["weights"] = sum(p.numel * DTYPE_BYTES[p.dtype] for p in params)
    events: list[LaneEvent] = []
    mem: list[MemorySample] = []

    def sample(t: float, name: str) -> None:
        mem.append(MemorySample(t, tuple((c, state[c]) for c in CATEGORIES), name))

    events.append(LaneEvent("h2d", f"prefetch chunk {nxt}", 0.0, h2d_s, chunk=nxt))
    state["prefetch"] = cn * 12
    sample(0.0, f"prefetch chunk {nxt}")
    t = 0.0
    for i in layers:
        events.append(LaneEvent("compute", f"fwd layers.{i}", t, t + layer_s, layer=i))
        t += layer_s
        state["activations"] += act_per_layer
        sample(t, f"fwd layers.{i}")
    for i in reversed(layers):
        events.append(LaneEvent("compute", f"bwd layers.{i}", t, t + 2 * layer_s, layer=i))
        t += 2 * layer_s
        state["activations"] -= act_per_layer
        state["gradients"] = cn * 4
        sample(t, f"bwd layers.{i}")
    t = max(t, h2d_s)
    state.update(optimizer_states=cn * 8, master=cn * 4, prefetch=0)
    events.append(LaneEvent("compute", f"update chunk {active}", t, t + layer_s, chunk=active))
    t += layer_s
    sample(t, f"update chunk {active}")
    wb = cn * 12 / 26e9
    events.append(LaneEvent("d2h", f"write back chunk {active}", t, t + wb, chunk=active))
    t += wb
    state.update(gradients=0, optimizer_states=0, master=0)
    sample(t, f"write back chunk {active}")
    peak = max(mem, key=lambda s: s.total_bytes)
    return StepSimulation(
        events=tuple(events), memory=tuple(mem), peak_bytes=peak.total_bytes,
        peak_by_category=peak.bytes_by_category, peak_time_s=peak.time_s, peak_cause=peak.event,
        reserve_bytes=reserve, host_bytes=sum(p.numel for p in params) * 12, step_seconds=t,
        tokens_per_step=tokens, timeline_seconds=t,
    )


def model_data(preset: str, k: int, *, h2d_s: float, run: RunRecord | None = None) -> ReportData:
    specs = tuple(param_specs(build_model(load_model(preset), device="meta")))
    chunks = partition(specs, num_chunks=k)
    weights = sum(p.numel * DTYPE_BYTES[p.dtype] for p in specs)
    sim = synthetic_step(list(specs), chunks, 0, act_per_layer=weights // 40, layer_s=1e-3, h2d_s=h2d_s,
                         reserve=weights // 10)
    alts = (
        Alternative("dense AdamW", 1, weights * 8, sim.step_seconds * 0.8, 1.0, False),
        Alternative("offload everything", k, weights, sim.step_seconds * 5, 1.0, True),
    )
    budget = (sim.peak_bytes + sim.reserve_bytes) * 5 // 4
    sweep = sweep_from_alternatives(
        alts + (Alternative("chosen", k, sim.peak_bytes, sim.step_seconds, 1.0, True),),
        gpu="test GPU", reserve_bytes=sim.reserve_bytes,
        budgets=[budget * i // 10 for i in range(2, 80)],
    )
    return ReportData(
        model_name=preset, gpu_name="test GPU", budget_bytes=budget, reserve_bytes=sim.reserve_bytes,
        memory_total_bytes=budget * 11 // 10, num_chunks=k, checkpointing="none", grad_bytes_per_element=4,
        state_bytes_per_element=8, master_bytes_per_element=4, params=specs, chunks=chunks,
        rotation=tuple(range(k)), simulation=sim, alternatives=alts, sweep=sweep, run=run,
    )


def a_run(sim: StepSimulation) -> RunRecord:
    return RunRecord(
        peak_bytes=sim.peak_bytes * 21 // 20,
        peak_by_category=tuple((c, b * 21 // 20) for c, b in sim.peak_by_category),
        step_seconds=sim.step_seconds * 1.3, tokens_per_second=1000.0,
        train_losses=tuple((s, 4.0 / s**0.3) for s in range(1, 60)),
        eval_losses=tuple((s, 4.2 / s**0.3) for s in (20, 40, 60)),
    )


def check_report_dir(out: Path, figures: tuple[str, ...]) -> None:
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == len(figures)
    for stem in figures:
        assert f"href='{stem}.png'" in html and f"id='{stem}'" in html
        img = imread(out / f"{stem}.png")
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
        assert float(np.std(img[..., :3])) > 0.05, f"{stem}.png is (nearly) blank"
    assert "src='http" not in html and "src=\"http" not in html  # opens offline
    assert sorted(p.name for p in out.iterdir()) == sorted([*(f"{s}.png" for s in figures), "report.html",
                                                            "trace.json"])


@pytest.fixture(scope="module")
def tiny() -> ReportData:
    return model_data("tiny-llama", 4, h2d_s=0.02)


def test_tiny_report_with_run(tmp_path: Path, tiny: ReportData) -> None:
    data = dataclasses.replace(tiny, run=a_run(tiny.simulation))
    path = write_report_data(data, tmp_path / "rep")
    assert path == tmp_path / "rep" / "report.html"
    check_report_dir(tmp_path / "rep", (*FIGURES, "measured"))
    html = path.read_text(encoding="utf-8")
    for text in ("tiny-llama", "dense AdamW", "offload everything", "Headroom", "Host memory",
                 "Measured peak", "(predicted -4.8% off)"):
        assert text in html, text


def test_llama3_8b_report(tmp_path: Path) -> None:
    """The full-size layout: 32 blocks, 64 windows (a sanity check that labels scale, not the planner)."""
    data = model_data("llama-3-8b", 64, h2d_s=0.01)
    write_report_data(data, tmp_path / "rep")
    check_report_dir(tmp_path / "rep", FIGURES)
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert html.count("<tr><td class='num'>") == 64  # one chunk-table row per window


def test_trace_compute_adds_up_to_step(tiny: ReportData) -> None:
    # the prefetch (20 ms) outlasts forward+backward (12 ms): compute waits. The rotation's mean step
    # differs from the drawn one's length: the trace must follow the drawn step, not the mean.
    sim = dataclasses.replace(tiny.simulation, step_seconds=tiny.simulation.timeline_seconds * 0.6)
    events = trace_events(sim)
    json.loads(json.dumps(events))
    slices = [e for e in events if e["ph"] == "X"]
    assert all(set(e) >= {"name", "ph", "ts", "dur", "pid", "tid"} and e["dur"] >= 0 for e in slices)
    by_tid: dict[int, list[dict]] = {}
    for e in slices:
        by_tid.setdefault(e["tid"], []).append(e)
    assert len(by_tid) == 3
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    compute = by_tid[next(t for t, n in names.items() if n == "compute")]
    assert sum(e["dur"] for e in compute) == pytest.approx(sim.timeline_seconds * 1e6, rel=1e-9)
    idle = [e for e in compute if e["name"].startswith("idle")]
    wb = next(e for e in sim.events if e.lane == "d2h")  # nothing computes during the final write-back
    assert [e["dur"] for e in idle] == pytest.approx([(0.02 - 0.012) * 1e6, (wb.end_s - wb.start_s) * 1e6])
    assert {e["name"] for e in idle} == {"idle (waiting on copy)"}
    real = [e for e in compute if not e["name"].startswith("idle")]
    assert sum(e["dur"] for e in real) == pytest.approx(
        sum(e.end_s - e.start_s for e in sim.events if e.lane == "compute") * 1e6)
    counters = [e for e in events if e["ph"] == "C"]
    assert len(counters) == len(sim.memory)
    top = max(counters, key=lambda e: sum(v for k, v in e["args"].items() if k != "reserve"))
    assert sum(v for k, v in top["args"].items() if k != "reserve") == sim.peak_bytes
    late = dataclasses.replace(sim, timeline_seconds=sim.timeline_seconds / 2)
    with pytest.raises(ValueError, match="end after the drawn step"):
        trace_events(late)


def test_trace_file_is_the_json_object_format(tmp_path: Path, tiny: ReportData) -> None:
    files = render(tiny)
    doc = json.loads(files["trace.json"])
    assert doc["displayTimeUnit"] == "ms" and isinstance(doc["traceEvents"], list)
    assert {e["ph"] for e in doc["traceEvents"]} == {"M", "X", "C"}


def test_layer_accounting(tiny: ReportData) -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_of("bert.encoder.layer.5.output.dense.weight") == 5
    assert layer_of("model.embed_tokens.weight") is None
    groups = layer_groups(tiny.params)
    assert groups[0] == "embed" and groups[-1] == "head" and "L3" in groups
    rows = per_layer_bytes(tiny.params, tiny.simulation, grad_bytes_per_element=4, state_bytes_per_element=8,
                           master_bytes_per_element=4)
    assert [r.label for r in rows] == ["embed", "L0", "L1", "L2", "L3", "head"]
    assert sum(r.weight_bytes for r in rows) == sum(p.numel * 4 for p in tiny.params)
    assert sum(r.numel for r in rows) == sum(p.numel for p in tiny.params)
    assert all(r.state_bytes == 12 * r.numel and r.grad_bytes == 4 * r.numel for r in rows)
    act = tiny.simulation.memory[1].bytes_by_category[1][1]  # after fwd layers.0
    assert activations_by_layer(tiny.simulation) == dict.fromkeys(range(4), act)


def test_chunk_spans_tile_the_stream(tiny: ReportData) -> None:
    spans = chunk_spans(tiny.params, tiny.chunks)
    assert spans[0].start_bytes == 0
    assert all(a.end_bytes == b.start_bytes for a, b in zip(spans, spans[1:], strict=False))
    assert spans[-1].end_bytes == sum(p.numel * DTYPE_BYTES[p.dtype] for p in tiny.params)
    assert spans[0].first == "model.embed_tokens.weight"


def test_sweep_from_alternatives() -> None:
    alts = (Alternative("a", 1, 10 * GIB, 1.0, 1.0, True), Alternative("b", 8, 4 * GIB, 2.0, 1.0, True))
    pts = sweep_from_alternatives(alts, gpu="g", reserve_bytes=GIB, budgets=[4 * GIB, 6 * GIB, 12 * GIB])
    assert [p.feasible for p in pts] == [False, True, True]
    assert [p.k for p in pts] == [None, 8, 1]
    assert pts[1].peak_bytes == 5 * GIB and pts[2].step_seconds == 1.0


def test_report_from_the_golden_plan(tmp_path: Path) -> None:
    """write_report on a real v1 plan file (hand-made simulation: the simulator is another module)."""
    plan = load_plan(GOLDEN_PLAN)
    ct = plan.chunk_table
    sim = synthetic_step(list(ct.params), ct.chunks, 0, act_per_layer=1 << 16, layer_s=1e-4, h2d_s=1e-4,
                         reserve=plan.hardware.reserve_bytes)
    data = report_data(plan, sim)
    assert data.num_chunks == ct.num_chunks and data.master_bytes_per_element == 4
    assert any(p.feasible for p in data.sweep) and data.notes
    with pytest.raises(ReportError, match="cannot sweep the plan's budgets: unknown model 'llama-tiny-2l'"):
        write_report(plan, tmp_path / "rep", simulation=sim)  # the solver sweep needs the model's preset
    assert list(tmp_path.iterdir()) == []
    write_report(plan, tmp_path / "rep", simulation=sim, sweep=data.sweep)
    check_report_dir(tmp_path / "rep", FIGURES)
    assert "full fine-tuning (AdamW, states on GPU)" in (tmp_path / "rep" / "report.html").read_text()


def executor_run_doc() -> dict:
    """run.json as executor/train.py writes it (the keys this module reads, with their real nesting)."""
    return {
        "plan": {"model_fingerprint": "abc123", "num_chunks": 4},
        "measured": {"device": "cpu", "memory_method": "memtracker", "peak_bytes": 100,
                     "reserved_bytes": None, "peak_by_category": {"weights": 60, "activations": 40},
                     "step_seconds": 0.5, "tokens_per_second": 2048.0},
        "losses": {"train": [3.0, 2.5, None], "final_train": 2.5,
                   "eval": [{"step": 0, "eval_loss": 3.1, "eval_accuracy": None},
                            {"step": 2, "eval_loss": 2.7, "eval_accuracy": None}]},
    }


def test_run_json_parsing() -> None:
    doc = executor_run_doc()
    r = run_from_dict(doc, fingerprint="abc123")
    assert r.peak_by_category == (("weights", 60), ("activations", 40))
    assert r.train_losses == ((1, 3.0), (2, 2.5)) and r.eval_losses == ((0, 3.1), (2, 2.7))
    assert (r.device, r.memory_method, r.reserved_bytes) == ("cpu", "memtracker", None)
    unmeasured = run_from_dict({**doc, "measured": {**doc["measured"], "peak_bytes": None}})
    assert unmeasured.peak_bytes is None
    for bad, msg in (({"measured": {}}, "missing measured.peak_bytes"),
                     ({**doc, "measured": {**doc["measured"], "peak_bytes": -1}}, "non-negative integer"),
                     ({**doc, "measured": {**doc["measured"], "peak_by_category": {"vram": 1}}}, "unknown"),
                     ({**doc, "losses": {"train": ["x"]}}, "losses.train[0]"),
                     ({**doc, "losses": {"eval": [{"loss": 1.0}]}}, "losses.eval[0]"),
                     ({**doc, "losses": [1.0]}, "losses must be an object")):
        with pytest.raises(RunFileError, match=re.escape(msg)):
            run_from_dict(bad)
    with pytest.raises(RunFileError, match="different model"):
        run_from_dict(doc, fingerprint="ffff")


def test_run_json_of_another_plan_is_refused() -> None:
    """plan.sha256 must be the plan's digest; an older run.json without it passes with a note."""
    from chunkft.reports.runfile import NO_PLAN_HASH_NOTE, plan_sha256

    doc = executor_run_doc()
    ours, theirs = "cd34" * 16, "ab12" * 16
    mine = {**doc, "plan": {**doc["plan"], "sha256": ours}}
    assert run_from_dict(mine, plan_digest=ours).notes == ()
    other = {**doc, "plan": {**doc["plan"], "sha256": theirs}}
    with pytest.raises(RunFileError) as info:
        run_from_dict(other, "runs/run.json", "abc123", plan_digest=ours, plan_where="plan.json")
    assert str(info.value) == (
        "runs/run.json was made from another plan (sha256 ab12ab12ab12..., plan.json cd34cd34cd34...); "
        "pass the plan the run replayed, or the run.json of this plan"
    )
    older = run_from_dict(doc, plan_digest=ours)  # executor_run_doc has no plan.sha256
    assert older.notes == (NO_PLAN_HASH_NOTE,)
    assert NO_PLAN_HASH_NOTE in report_data(load_plan(GOLDEN_PLAN), tiny_sim(), run=older).notes
    golden = load_plan(GOLDEN_PLAN)
    assert plan_sha256(golden) == (plan_digest(golden),  # what executor/train.py records
                                   hashlib.sha256(plan_to_json(golden).encode()).hexdigest())  # and did
    assert run_from_dict(mine, plan_digest=(theirs, ours)).notes == ()


def tiny_sim() -> StepSimulation:
    plan = load_plan(GOLDEN_PLAN)
    ct = plan.chunk_table
    return synthetic_step(list(ct.params), ct.chunks, 0, act_per_layer=1 << 16, layer_s=1e-4, h2d_s=1e-4,
                          reserve=plan.hardware.reserve_bytes)


def test_unwritable_destination_leaves_nothing(tmp_path: Path, tiny: ReportData) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ReportError, match="not a directory"):
        write_report_data(tiny, blocker)
    with pytest.raises(ReportError, match="does not exist"):
        write_report_data(tiny, tmp_path / "missing" / "rep")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(ReportError, match="writable"):
            write_report_data(tiny, ro / "rep")
        ro.chmod(0o755)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] + (["ro"] if os.geteuid() != 0 else [])


def test_report_into_existing_dir_is_all_or_nothing(tmp_path: Path, tiny: ReportData) -> None:
    """A report name taken by a directory is refused before any old file is replaced; a failed write
    (disk full) leaves neither the report nor its temporary directory."""
    out = tmp_path / "rep"
    write_report_data(tiny, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "trace.json").unlink()
    (out / "trace.json").mkdir()
    with pytest.raises(ReportError, match="trace.json there is a directory"):
        write_report_data(dataclasses.replace(tiny, model_name="another"), out)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        k: v for k, v in before.items() if k != "trace.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_a_rename_failing_half_way_says_which_files_are_new(
    tmp_path: Path, tiny: ReportData, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: "nothing was written" although some files of the previous report were already replaced."""
    out = tmp_path / "rep"
    write_report_data(tiny, out)
    real, calls = os.replace, []

    def fail_third(src: object, dst: object) -> None:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", fail_third)
    with pytest.raises(ReportError) as info:
        write_report_data(dataclasses.replace(tiny, model_name="another"), out)
    message = str(info.value)
    assert "nothing was written" not in message and "still the previous report's" in message, message
    first, second = (Path(str(c)).name for c in calls[:2])
    assert f"{first}, {second} are new" in message


def test_disk_full_leaves_nothing(tmp_path: Path, tiny: ReportData, disk_full_after_one_file: None) -> None:
    with pytest.raises(ReportError, match="No space left on device; nothing was written"):
        write_report_data(tiny, tmp_path / "rep")
    assert list(tmp_path.iterdir()) == []


def test_new_report_dir_honours_umask(tmp_path: Path, tiny: ReportData) -> None:
    old = os.umask(0o027)
    try:
        write_report_data(tiny, tmp_path / "rep")
    finally:
        os.umask(old)
    assert (tmp_path / "rep").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "rep" / "report.html").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ("missing-plan", "cannot read it"),
        ("bad-json-plan", "not valid JSON"),
        ("bad-run", "missing measured.peak_bytes"),
        ("out-is-file", "not a directory"),
    ],
)
def test_cli_bad_input(tmp_path: Path, setup: str, expected: str) -> None:
    plan, run, out = tmp_path / "plan.json", None, tmp_path / "out"
    plan.write_text(GOLDEN_PLAN.read_text())
    if setup == "missing-plan":
        plan = tmp_path / "nope.json"
    elif setup == "bad-json-plan":
        plan.write_text('{"schema_version": 1,')
    elif setup == "bad-run":
        run = tmp_path / "run.json"
        run.write_text('{"measured": {}}')
    else:
        out = tmp_path / "plan.json"
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [str(plan)] + ([str(run)] if run else []) + ["-o", str(out)]
    result = CliRunner().invoke(report_cli, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chunkft-report: error:") and expected in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def check_trace_matches_simulator(trace_path: Path, plan_path: Path) -> None:
    """Busy compute + waiting == the drawn step's length, which is the simulator's own timeline_seconds;
    the busy part is exactly the simulator's compute events; the mean step is the plan's prediction."""
    from chunkft.planner.simulator import simulate_plan

    plan = load_plan(plan_path)
    sim = simulate_plan(plan)
    doc = json.loads(trace_path.read_text())
    threads = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    compute = [e for e in doc["traceEvents"] if e["ph"] == "X" and threads[e["tid"]] == "compute"]
    busy = [e for e in compute if not e["name"].startswith("idle")]
    assert sum(e["dur"] for e in compute) == pytest.approx(sim.timeline_seconds * 1e6, rel=1e-9)
    assert [e["name"] for e in busy] == [e.name for e in sim.events if e.lane == "compute"]
    assert sum(e["dur"] for e in busy) == pytest.approx(
        sum(e.end_s - e.start_s for e in sim.events if e.lane == "compute") * 1e6, rel=1e-9)
    assert doc["otherData"]["drawn_step_seconds"] == sim.timeline_seconds
    assert doc["otherData"]["mean_step_seconds_over_rotation"] == plan.predictions.step_seconds
    counters = [e for e in doc["traceEvents"] if e["ph"] == "C"]
    assert max(sum(v for k, v in e["args"].items() if k != "reserve") for e in counters) == sim.peak_bytes


def test_real_plan_run_report_tiny(tmp_path: Path) -> None:
    """The real path, small: chunkft-plan, chunkft-run for 3 steps, chunkft-report with that run.json."""
    from chunkft.executor.cli import main as run_cli
    from chunkft.planner.cli import main as plan_cli

    plan = tmp_path / "plan.json"
    r = CliRunner().invoke(plan_cli, ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--batch-size", "2",
                                      "--steps", "3", "-o", str(plan)])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(run_cli, [str(plan), "--data", str(SHAKESPEARE), "--output", str(tmp_path / "run"),
                                     "--quiet"])
    assert r.exit_code == 0, r.output
    run_json = tmp_path / "run" / "run.json"
    r = CliRunner().invoke(report_cli, [str(plan), str(run_json), "-o", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    check_report_dir(tmp_path / "rep", (*FIGURES, "measured"))
    check_trace_matches_simulator(tmp_path / "rep" / "trace.json", plan)
    run_doc = json.loads((tmp_path / "run" / "run.json").read_text())
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Measured peak" in html and "(mean over the rotation)" in html
    assert "baseline: dense AdamW" in html and "offload everything" in html
    run = load_run(tmp_path / "run" / "run.json")
    assert [v for _, v in run.train_losses] == run_doc["losses"]["train"]
    assert run.peak_bytes == run_doc["measured"]["peak_bytes"]


def test_solver_sweep_reproduces_the_plan(tmp_path: Path) -> None:
    """Every sweep point is a real solve: at the plan's own budget it is the plan; below the smallest
    feasible budget nothing fits (the early stop agrees with solving there)."""
    from chunkft.planner.cli import main as plan_cli
    from chunkft.planner.profile_model import tables_for
    from chunkft.planner.simulator import setup_and_candidate
    from chunkft.planner.solver import Limits, Solver, Space, make_setup
    from chunkft.reports.sweep import solver_sweep

    plan_path = tmp_path / "plan.json"
    r = CliRunner().invoke(plan_cli, ["tiny-llama", "--gpu", "4090", "--seq-len", "64", "-o", str(plan_path)])
    assert r.exit_code == 0, r.output
    plan = load_plan(plan_path)
    pts = solver_sweep(plan, gpus=("a100-80gb",), points_per_gpu=6)
    assert {p.gpu for p in pts} == {plan.hardware.gpu_name, "NVIDIA A100-SXM4-80GB"}
    hw = plan.hardware
    mine = next(p for p in pts if p.gpu == hw.gpu_name and p.budget_bytes == hw.budget_bytes)
    assert (mine.k, mine.step_seconds) == (plan.chunk_table.num_chunks, plan.predictions.step_seconds)
    pr = plan.predictions
    assert mine.peak_bytes == pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes  # what meets the budget
    for gpu in {p.gpu for p in pts}:
        row = sorted((p for p in pts if p.gpu == gpu), key=lambda p: p.budget_bytes)
        flags = [p.feasible for p in row]
        assert flags == sorted(flags) and flags[-1] and not flags[0]  # infeasible, then feasible
        assert all(p.peak_bytes <= p.budget_bytes for p in row if p.feasible)
    no = max(p.budget_bytes for p in pts if p.gpu == hw.gpu_name and not p.feasible)
    fixed, _, _ = setup_and_candidate(plan)
    setup = make_setup(fixed.structure, fixed.cost, weight_dtype=fixed.weight_dtype,
                       optimizer=fixed.optimizer, sgd_momentum=fixed.sgd_momentum, seq_len=fixed.seq_len,
                       on_gpu=True)
    preset = load_model(plan.model.name)
    tables = tables_for(preset.config, preset.task, fixed.seq_len, plan.run.compute_dtype)
    solver = Solver(setup, Limits(no, hw.host_budget_bytes), tables, Space(global_batch=1))
    assert solver.solve().best is None


WIDE_SEQ = 1024


@pytest.fixture(scope="module")
def chunked_plans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """chunkft-plan's chunked cross-entropy plans (issue 17: llama-3-8b on a 4090, in miniature) of a
    Llama whose vocabulary dwarfs its width: chosen by auto (the full logits do not fit 60 MiB), and
    forced where auto would not have tried it (4 GiB)."""
    from chunkft.planner.cli import main as plan_cli

    tmp = tmp_path_factory.mktemp("chunked")
    LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=2 * WIDE_SEQ).save_pretrained(tmp / "model")
    plans = {}
    for how, extra in (("auto", ["--budget", "60MiB"]),
                       ("forced", ["--budget", "4GiB", "--cross-entropy", "chunked"])):
        plans[how] = tmp / f"{how}.json"
        r = CliRunner().invoke(plan_cli, [str(tmp / "model"), "--gpu", "cpu", "--seq-len", str(WIDE_SEQ),
                                          "--steps", "100", *extra, "-o", str(plans[how])])
        assert r.exit_code == 0, r.output
        assert load_plan(plans[how]).run.chunked_cross_entropy
    return plans


@pytest.mark.parametrize("how", ["auto", "forced"])
def test_chunked_cross_entropy_plan_sweeps(chunked_plans: dict[str, Path], how: str) -> None:
    """The sweep, after the plan's own (chunked) table was built as write_report builds it, solves; at
    the plan's own budget it is the plan, chunked cross-entropy included (kept where it was forced)."""
    from chunkft.planner.simulator import setup_and_candidate
    from chunkft.reports.sweep import solver_sweep

    plan = load_plan(chunked_plans[how])
    setup, _, act = setup_and_candidate(plan)
    assert act.chunk_tokens is not None
    pts = solver_sweep(plan, structure=setup.structure, gpus=(), points_per_gpu=4)
    assert any(p.feasible for p in pts) and not all(p.feasible for p in pts)
    mine = next(p for p in pts if p.budget_bytes == plan.hardware.budget_bytes)
    assert (mine.k, mine.step_seconds) == (plan.chunk_table.num_chunks, plan.predictions.step_seconds)
    assert "chunked CE" in mine.choice


def test_chunked_cross_entropy_plan_report_has_its_sweep(chunked_plans: dict[str, Path],
                                                         tmp_path: Path) -> None:
    """write_report on such a plan (the chunkft-plan --report path) draws the solver's sweep."""
    html = write_report(load_plan(chunked_plans["auto"]), tmp_path / "rep").read_text(encoding="utf-8")
    check_report_dir(tmp_path / "rep", FIGURES)
    assert "No budget sweep" not in html and "derived from the alternatives" not in html


def test_a_failed_sweep_fails_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No report error passes silently: a sweep that raises fails write_report, and nothing is written."""
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("activation profile has chunk_tokens 256,\nthe candidate None")

    monkeypatch.setattr("chunkft.reports.sweep.solver_sweep", broken)
    with pytest.raises(ReportError) as info:
        write_report(load_plan(GOLDEN_PLAN), tmp_path / "rep", simulation=tiny_sim())
    assert "the budget sweep failed (ValueError: activation profile has chunk_tokens 256, the candidate " \
        "None)" in str(info.value) and "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_solver_sweep_keeps_the_plans_padding(tmp_path: Path) -> None:
    """A --padded-batches plan is swept padded: at its own budget the sweep's peak is the plan's."""
    from chunkft.planner.cli import main as plan_cli
    from chunkft.reports.sweep import solver_sweep

    path = tmp_path / "plan.json"
    r = CliRunner().invoke(plan_cli, ["tiny-llama", "--gpu", "cpu", "--seq-len", "128", "--batch-size", "2",
                                      "--padded-batches", "--steps", "10", "-o", str(path)])
    assert r.exit_code == 0, r.output
    plan = load_plan(path)
    assert plan.run.padded_batches
    pts = solver_sweep(plan, gpus=(), points_per_gpu=3)
    mine = next(p for p in pts if p.budget_bytes == plan.hardware.budget_bytes)
    pr = plan.predictions
    assert mine.peak_bytes == pr.peak_bytes + pr.reserve_bytes + plan.hardware.headroom_bytes


@pytest.mark.slow
@pytest.mark.parametrize(("model", "extra"), [("llama-3-8b", ["--seq-len", "1024", "--host-mem", "128GiB"])])
def test_real_plan_end_to_end(tmp_path: Path, model: str, extra: list[str]) -> None:
    """chunkft-plan on --gpu 4090, then chunkft-report on its plan: the real solver and simulator."""
    from chunkft.planner.cli import main as plan_cli

    plan = tmp_path / "plan.json"
    result = CliRunner().invoke(plan_cli, [model, "--gpu", "4090", *extra, "-o", str(plan)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(report_cli, [str(plan), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    check_report_dir(tmp_path / "rep", FIGURES)
    check_trace_matches_simulator(tmp_path / "rep" / "trace.json", plan)
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert html.count("<tr><td class='num'>") == load_plan(plan).chunk_table.num_chunks


def test_a_data_parallel_plan_draws_the_collective_lane_and_one_ranks_memory(tmp_path: Path) -> None:
    """Issue 13 step 4: the lanes figure and trace.json show the reduce-scatter and all-gather between the
    GPUs; the memory axis is one GPU's (every rank holds the whole model), not the GPUs' sum."""
    from chunkft.planner.cli import main as plan_main
    from chunkft.planner.simulator import simulate_plan
    from chunkft.reports.figures import lanes_figure
    from chunkft.reports.trace import trace_events

    args = ["tiny-llama", "--gpu", "h100-80gb", "--seq-len", "32", "--batch-size", "2", "--micro-batch",
            "1", "--grad-accum", "2", "--chunks", "4", "--host-mem", "4GiB", "--num-gpus", "2"]  # fmt: skip
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = load_plan(tmp_path / "p.json")
    sim = simulate_plan(plan)
    data = report_data(plan, sim)
    assert data.memory_total_bytes == plan.hardware.memory_total_bytes and "per rank" in data.gpu_name
    ax = lanes_figure(data).axes[0]
    ticks = zip(ax.get_yticklabels(), ax.get_yticks(), strict=True)
    rows = {t.get_text().split("\n")[0]: y for t, y in ticks}
    assert sorted(rows, key=rows.get) == ["device → host", "host → device", "between GPUs", "compute"]
    events = trace_events(sim)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    between = [e["name"] for e in events if e["ph"] == "X" and names[e["tid"]].startswith("between GPUs")]
    assert [n.split(" chunk")[0] for n in between] == ["reduce-scatter", "all-gather"]


def test_a_shard_plan_draws_the_gathers_between_gpus_and_one_ranks_memory(tmp_path: Path) -> None:
    """Sharded weights (--parallel shard): the lanes figure and trace.json show every block's all-gather and
    the gradients' reduce-scatters between the GPUs besides the window's collectives; memory is one rank's."""
    from chunkft.planner.cli import main as plan_main
    from chunkft.planner.simulator import simulate_plan
    from chunkft.reports.figures import lanes_figure
    from chunkft.reports.trace import trace_events

    args = ["tiny-llama", "--gpu", "h100-80gb", "--seq-len", "32", "--batch-size", "2", "--micro-batch",
            "1", "--grad-accum", "2", "--chunks", "4", "--host-mem", "4GiB", "--num-gpus", "2",
            "--parallel", "shard"]  # fmt: skip
    res = CliRunner().invoke(plan_main, [*args, "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = load_plan(tmp_path / "p.json")
    assert plan.hardware.parallel == "shard"
    sim = simulate_plan(plan)
    data = report_data(plan, sim)
    assert data.memory_total_bytes == plan.hardware.memory_total_bytes and "sharded weights" in data.gpu_name
    ax = lanes_figure(data).axes[0]
    rows = [t.get_text().split("\n")[0] for t in ax.get_yticklabels()]
    assert "between GPUs" in rows
    events = trace_events(sim)
    names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    between = [e["name"] for e in events if e["ph"] == "X" and names[e["tid"]].startswith("between GPUs")]
    assert "all-gather root" in between and "all-gather fwd layers.1" in between
    assert any(n.startswith("reduce-scatter grads bwd") for n in between)
    assert [n.split(" chunk")[0] for n in between if " chunk" in n][-2:] == ["reduce-scatter", "all-gather"]
