"""Data parallel and sharded weights on the CPU: 1 rank vs 2 ranks x 1 thread, step time and per-rank memory
(issue 13).

Plans tiny-llama for 1 and for 2 ranks with the same global batch (micro-batch 1, accumulation 4: the two
ranks take 2 micro-batches each; for 2 ranks once data parallel and once with sharded weights, FSDP2),
runs each with chunkft-run (`--nproc 2` for the pairs, OMP_NUM_THREADS=1 everywhere) and prints what rank
0's run.json measured: the step time, the tracked peak (the project's MemoryTracker, executor/measure.py),
the host states that rank keeps (1/N of the masters and optimizer states), each beside the plan's
prediction, and the tracked peak while a checkpoint is written (every 4 steps; each rank saves its own
rows, so it is lower, not higher, on 2).

    python bench/bench_dp.py [--steps 24] [--seq-len 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def plan(out: Path, n: int, seq_len: int, steps: int, parallel: str = "auto") -> None:
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", str(seq_len), "--batch-size", "4",
            "--micro-batch", "1", "--grad-accum", "4", "--chunks", "4", "--dtype", "fp32",
            "--checkpointing", "none", "--host-mem", "4GiB", "--steps", str(steps),
            "--checkpoint-every", "4", "--num-gpus", str(n), "--parallel", parallel,
            "-o", str(out)]  # fmt: skip
    subprocess.run([sys.executable, "-m", "chunkft.planner.cli", *args], check=True, capture_output=True)


def run(plan_path: Path, data: Path, out: Path, n: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "chunkft.executor.cli", str(plan_path), "--data", str(data),
           "--output", str(out), "--quiet"] + (["--nproc", str(n)] if n > 1 else [])  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    return json.loads((out / "run.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--seq-len", type=int, default=64)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        data = tmp / "data.txt"
        data.write_text(DATA.read_text()[:200_000])
        print("ranks        step ms (plan)  tokens/s  tracked peak MiB (plan, ratio)  host states/rank MiB  "
              "checkpoint peak MiB  final loss")
        for n, parallel in ((1, "auto"), (2, "data"), (2, "shard")):
            name = f"{n}-{parallel}"
            plan(tmp / f"p{name}.json", n, a.seq_len, a.steps, parallel)
            r = run(tmp / f"p{name}.json", data, tmp / f"o{name}", n)
            m, p = r["measured"], r["predicted"]  # the plan's per-rank predictions (issue 13 step 4)
            layout = "" if n == 1 else f" {parallel}"
            print(
                f"{r['world_size']:>5}{layout:<6}  "
                f"{m['step_seconds'] * 1e3:7.1f} ({p['step_seconds'] * 1e3:5.1f})  "
                f"{m['tokens_per_second']:8.0f}  {m['peak_bytes'] / 2**20:6.2f} "
                f"({p['peak_bytes'] / 2**20:.2f}, {m['peak_bytes'] / p['peak_bytes']:.3f})          "
                f"{m['host_state_bytes'] / 2**20:20.2f}  "
                f"{m['phase_peaks'].get('checkpoint', 0) / 2**20:19.2f}  {r['losses']['train'][-1]:.4f}"
            )


if __name__ == "__main__":
    main()
