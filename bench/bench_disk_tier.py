"""The disk tier on the CPU (issue 16 step 1): host-tier vs disk-tier chunkft-run of the same plan, side by
side: step time, peak RSS of the process (VmHWM, from wait4), the host bytes each keeps for the inactive
windows (pinned stores vs staging buffers, run.json), and whether the two trained the same weights.

Plans small-llama-20m for the CPU (K windows, fp32 weights or bf16 with --dtype bf16: then the fp32
master rows go to disk too), runs it with `--state-store host` and `--state-store disk` (OMP_NUM_THREADS=1,
a checkpoint every --checkpoint-every steps, the files under a temporary directory on this machine's
disk), and prints one line per tier.

    python bench/bench_disk_tier.py [--steps 24] [--chunks 8] [--seq-len 64] [--dtype fp32]
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
MIB = 2**20


def plan(out: Path, a: argparse.Namespace) -> None:
    args = ["small-llama-20m", "--gpu", "cpu", "--seq-len", str(a.seq_len), "--batch-size", "4",
            "--micro-batch", "4", "--chunks", str(a.chunks), "--dtype", a.dtype, "--checkpointing", "none",
            "--host-mem", "8GiB", "--steps", str(a.steps), "--update-interval", str(a.update_interval),
            "--checkpoint-every", str(a.checkpoint_every), "--lr", "1e-3", "-o", str(out)]  # fmt: skip
    subprocess.run([sys.executable, "-m", "chunkft.planner.cli", *args], check=True, capture_output=True)


def run(plan_path: Path, data: Path, out: Path, store: str) -> tuple[dict, int]:
    """run.json and the process's peak RSS in bytes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "chunkft.executor.cli", str(plan_path), "--data", str(data),
           "--output", str(out), "--quiet", "--state-store", store]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{store} run failed: {proc.stderr.read().decode()[-2000:]}")
    return json.loads((out / "run.json").read_text()), usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--update-interval", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=8)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="alternate host/disk runs this many times")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as d:  # on this machine's disk, not a tmpfs
        tmp = Path(d)
        data = tmp / "data.txt"
        data.write_text(DATA.read_text()[:200_000])
        plan(tmp / "plan.json", a)
        print("tier  step ms  transfer wait ms/step  peak RSS MiB  host states MiB  staging MiB  "
              "state files MiB  final loss")
        weights = {}
        for i in range(a.repeats):
            for store in ("host", "disk"):
                r, rss = run(tmp / "plan.json", data, tmp / f"{store}{i}", store)
                m = r["measured"]
                weights[store] = (tmp / f"{store}{i}" / "model" / "model.safetensors").read_bytes()
                print(
                    f"{store:4}  {m['step_seconds'] * 1e3:7.1f}  {m['transfer_wait_s'] * 1e3:21.2f}  "
                    f"{rss / MIB:12.1f}  {m['host_state_bytes'] / MIB:15.1f}  "
                    f"{m['staging_bytes'] / MIB:11.1f}  "
                    f"{m['state_file_bytes'] / MIB:15.1f}  {r['losses']['train'][-1]:.4f}"
                )
        print(f"same exported weights: {weights['host'] == weights['disk']}")


if __name__ == "__main__":
    main()
