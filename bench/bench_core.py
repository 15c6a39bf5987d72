"""ChunkFT K=8 against dense torch.optim.AdamW on a >=20M-parameter tiny Llama, fp32, CPU, one process.

Two measurements, side by side on identical models and batches:
- tracked peak memory (torch.distributed._tools.mem_tracker.MemTracker), per category: one dense step
  (its states already exist) against one full ChunkFT cycle (every window once, the worst window counts);
- median seconds per training step (forward, backward, optimizer step), dense and ChunkFT interleaved
  repetition by repetition so machine load hits both alike.

What "device memory" means on a CPU-only machine: ChunkFT's host stores (every window's states) would be
pinned host memory on a GPU machine, so they are registered with the tracker up front (category Other,
constant for the whole run) and subtracted exactly; its fp32 state slots (the active and the prefetched
window) are counted as device memory. The result is what the GPU would hold.

    python bench/bench_core.py            # writes bench/results/core.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch.distributed._tools.mem_tracker import MemTracker

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec
from chunkft.profiles import build_model, load_model

REPO = Path(__file__).resolve().parents[1]

MIB = 2**20
CATEGORIES = ("Parameter", "Gradient", "Optstate", "Activation", "Temp", "Other")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_batches(n: int, vocab: int, batch: int, seq: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def dense_step(model, opt, ids) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def chunk_step(model, driver, ids) -> None:
    driver.backward(model(input_ids=ids, labels=ids).loss)
    driver.step()


def tracker_for_frozen_params(model: torch.nn.Module) -> MemTracker:
    """The project's one tracker (executor.measure.MemoryTracker: MemTracker that tolerates frozen
    parameters; see its docstring)."""
    from chunkft.executor.measure import MemoryTracker

    return MemoryTracker(model)


def peak(mt: MemTracker) -> dict[str, int]:
    snap = mt.get_tracker_snapshot("peak")
    dev = snap[torch.device("cpu")]
    return {k: int(v) for k, v in dev.items()}


def build(preset, checkpointing: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(preset, device="cpu", dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # transformers makes the input embeddings require grad for reentrant checkpointing; with
        # non-reentrant checkpointing that only forces backward below ChunkFT's window.
        model.disable_input_require_grads()
    return model


def chunkft_window_peaks(model, driver: ChunkFT, data, steps: int) -> list[dict[str, int]]:
    """Tracked peak of each of `steps` ChunkFT steps, host stores excluded (see the module docstring)."""
    host = driver.engine.store_tensors("host")
    host_bytes = sum(t.numel() * t.element_size() for t in host)
    out = []
    for i in range(steps):
        mt = tracker_for_frozen_params(model)
        mt.track_external(model, *host, *driver.engine.slot_tensors())
        with mt:
            chunk_step(model, driver, data[i % len(data)])
        snap = peak(mt)
        snap["Other"] -= host_bytes  # tracked from the start and constant: the subtraction is exact
        snap["Total"] -= host_bytes
        out.append(snap)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small-llama-20m")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=16, help="timed steps per side (2 cycles of K=8)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: a shared machine)")
    ap.add_argument(
        "--checkpointing", action="store_true", help="non-reentrant activation checkpointing in both models"
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "core.md")
    ap.add_argument("--append", action="store_true", help="add this run as a section to --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    preset = load_model(args.model)
    dense = build(preset, args.checkpointing)
    model = build(preset, args.checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    hp = AdamWHparams(lr=1e-4, weight_decay=0.01)
    opt = torch.optim.AdamW(dense.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    chunks = partition(param_specs(model), num_chunks=args.chunks)
    total = 2 * args.chunks + 2 * args.reps + 8
    make_driver = lambda m, **kw: ChunkFT(  # noqa: E731
        m,
        chunks,
        hparams=hp,
        schedule=ScheduleSpec("constant", 0, total),
        rotation=RotationSpec("bottom-up"),
        states_on="host",
        **kw,
    )
    driver = make_driver(model)
    data = make_batches(args.chunks + 2, vocab, args.batch, args.seq)

    # Warm-up: dense states exist, ChunkFT slots allocated (one full cycle), kernels warm.
    dense_step(dense, opt, data[0])
    for i in range(args.chunks):
        chunk_step(model, driver, data[i % len(data)])

    # ---- memory ----
    mt = MemTracker()
    mt.track_external(dense, opt)
    with mt:
        dense_step(dense, opt, data[1])
    dense_peak = peak(mt)

    host_bytes = driver.host_state_bytes()
    windows = chunkft_window_peaks(model, driver, data, args.chunks)
    chunk_peak = max(windows, key=lambda w: w["Total"])

    # The same with a second state slot (the window after next prefetched a step earlier).
    model_two = build(preset, args.checkpointing)
    driver_two = make_driver(model_two, state_slots=2)
    for i in range(args.chunks):
        chunk_step(model_two, driver_two, data[i % len(data)])
    two_peak = max(chunkft_window_peaks(model_two, driver_two, data, args.chunks), key=lambda w: w["Total"])
    driver_two.close()
    del model_two, driver_two

    # ---- time: interleaved repetitions ----
    load_before = os.getloadavg()[0]
    dense_s, chunk_s, waits = [], [], []
    for r in range(args.reps):
        ids = data[r % len(data)]
        t0 = time.perf_counter()
        dense_step(dense, opt, ids)
        t1 = time.perf_counter()
        driver.backward(model(input_ids=ids, labels=ids).loss)
        stats = driver.step()
        t2 = time.perf_counter()
        dense_s.append(t1 - t0)
        chunk_s.append(t2 - t1)
        waits.append(stats.transfer_wait_s)
    load_after = os.getloadavg()[0]
    driver.close()

    mem_ratio = chunk_peak["Total"] / dense_peak["Total"]
    time_ratio = statistics.median(chunk_s) / statistics.median(dense_s)
    cmd = "python bench/bench_core.py" + "".join(f" {a}" for a in sys.argv[1:])
    lines = [
        f"## Core: ChunkFT K={args.chunks} vs dense AdamW ({args.model}, fp32, CPU"
        + (", activation checkpointing in both)" if args.checkpointing else ")"),
        "",
        f"- command: `{cmd}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), shared; load average {load_before:.1f} before"
        f" and {load_after:.1f} after the timed part; torch intra-op threads: {args.threads}",
        f"- versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- model: {args.model}, {n_params:,} parameters; batch {args.batch} x seq {args.seq};"
        f" ChunkFT: {args.chunks} row-cut windows, AdamW, states_on=host (fp32), one state slot, bottom-up",
        "",
        "Tracked peak memory (MemTracker; dense: one step with existing states; ChunkFT: the worst"
        " window over a full cycle of K steps; ChunkFT's host stores, "
        f"{host_bytes / MIB:.1f} MiB, are host memory and not counted; 'Other' = its fp32 state slot(s)):",
        "",
        "| MiB | " + " | ".join(CATEGORIES) + " | Total |",
        "|---|" + "---:|" * (len(CATEGORIES) + 1),
    ]
    for name, snap in (
        ("dense AdamW", dense_peak),
        (f"ChunkFT K={args.chunks}", chunk_peak),
        (f"ChunkFT K={args.chunks}, state_slots=2", two_peak),
    ):
        cells = " | ".join(f"{snap.get(c, 0) / MIB:.1f}" for c in CATEGORIES)
        lines.append(f"| {name} | {cells} | {snap['Total'] / MIB:.1f} |")
    d_mib, c_mib, t_mib = dense_peak["Total"] / MIB, chunk_peak["Total"] / MIB, two_peak["Total"] / MIB
    d_med, c_med = statistics.median(dense_s), statistics.median(chunk_s)

    def met(ok: bool) -> str:
        return "yes" if ok else "NO"

    lines += [
        "",
        "ChunkFT tracked peak per window (MiB, windows 0..K-1 bottom-up): "
        + ", ".join(f"{w['Total'] / MIB:.1f}" for w in windows)
        + (
            "."
            if args.checkpointing
            else ". The lowest windows back-propagate through the whole model and keep every activation."
        ),
        "",
        "| measure | dense AdamW | ChunkFT | ratio | goal | met |",
        "|---|---:|---:|---:|---:|---|",
        f"| tracked peak (MiB) | {d_mib:.1f} | {c_mib:.1f} | {mem_ratio:.3f} | <= 0.40 |"
        f" {met(mem_ratio <= 0.4)} |",
        f"| tracked peak, state_slots=2 (MiB) | {d_mib:.1f} | {t_mib:.1f} | {t_mib / d_mib:.3f} | <= 0.40 |"
        f" {met(t_mib <= 0.4 * d_mib)} |",
        f"| median s/step ({args.reps} interleaved steps) | {d_med:.3f} | {c_med:.3f} | {time_ratio:.3f} |"
        f" <= 0.80 | {met(time_ratio <= 0.8)} |",
        "",
        f"Seconds per step (min/median/max): ChunkFT {min(chunk_s):.3f} / {c_med:.3f} / {max(chunk_s):.3f},"
        f" dense {min(dense_s):.3f} / {d_med:.3f} / {max(dense_s):.3f}. ChunkFT transfer_wait_s total"
        f" {sum(waits):.4f} s (on CPU the copies are synchronous and happen in prefetch()).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    before = args.out.read_text() + "\n" if args.append and args.out.exists() else ""
    tmp.write_text(before + "\n".join(lines))
    os.replace(tmp, args.out)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
