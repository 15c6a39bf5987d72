"""The disk tier on the CPU (issue 16 step 1): host-tier vs disk-tier chunkft-run of the same plan, side by
side: step time, peak RSS of the process (VmHWM, from wait4), the host bytes each keeps for the inactive
windows (pinned stores vs staging buffers, run.json), and whether the two trained the same weights.

Plans small-llama-20m for the CPU (K windows, fp32 weights or bf16 with --dtype bf16: then the fp32
master rows go to disk too), runs it with `--state-store host` and `--state-store disk` (OMP_NUM_THREADS=1,
a checkpoint every --checkpoint-every steps, the files under a temporary directory on this machine's
disk), and prints one line per tier.

    python bench/bench_disk_tier.py [--steps 24] [--chunks 8] [--seq-len 64] [--dtype fp32]

On a shared machine the runs' step times drift with the load (+-15% between two runs of the same tier
here), so `--interleaved` measures the step-time ratio in one process instead: two drivers on two copies
of the model, one per tier, taking turns by blocks of whole visits on the same batches (one thread), and
prints the median step of each tier, the mean of the per-block ratios and the trained weights' equality.

    python bench/bench_disk_tier.py --interleaved [--blocks 6] [--chunks 8] [--update-interval 10]
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


def interleaved(a: argparse.Namespace) -> None:
    import statistics
    import time

    import torch

    from chunkft.chunks import param_specs, partition
    from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec
    from chunkft.executor.state_files import DiskTier
    from chunkft.profiles import build_model, load_model

    torch.set_num_threads(1)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    preset = load_model("small-llama-20m")
    torch.manual_seed(0)
    base = build_model(preset, device="cpu").to(dtype)
    vocab = preset.config.vocab_size
    g = torch.Generator().manual_seed(0)
    visit = a.update_interval
    steps = a.blocks * visit * 2  # every block: two visits per tier
    ids = [torch.randint(0, vocab, (4, a.seq_len), generator=g) for _ in range(steps)]
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as d:
        runs = {}
        for store in ("host", "disk"):
            model = build_model(preset, device="cpu").to(dtype)
            model.load_state_dict(base.state_dict())
            driver = ChunkFT(
                model,
                partition(param_specs(model), num_chunks=a.chunks),
                hparams=AdamWHparams(lr=1e-3),
                schedule=ScheduleSpec("constant", 0, steps),
                rotation=RotationSpec("bottom-up", update_interval=visit),
                state_slots=a.slots,
                disk=DiskTier(Path(d) / "states", fsync=not a.no_fsync) if store == "disk" else None,
            )
            runs[store] = (model, driver, [])
        for b in range(a.blocks):
            for store in ("host", "disk") if b % 2 == 0 else ("disk", "host"):  # alternate who goes first
                model, driver, times = runs[store]
                for i in range(b * 2 * visit, (b + 1) * 2 * visit):
                    t0 = time.perf_counter()
                    driver.backward(model(input_ids=ids[i], labels=ids[i]).loss)
                    driver.step()
                    times.append(time.perf_counter() - t0)
        for _, driver, _ in runs.values():
            driver.close()
        med = {k: statistics.median(v[2]) for k, v in runs.items()}
        mean = {k: statistics.fmean(v[2]) for k, v in runs.items()}
        span = 2 * visit
        per_block = [
            statistics.fmean(runs["disk"][2][i : i + span]) / statistics.fmean(runs["host"][2][i : i + span])
            for i in range(0, steps, span)
        ]
        pairs = zip(runs["host"][0].parameters(), runs["disk"][0].parameters(), strict=True)
        same = all(torch.equal(p, q) for p, q in pairs)
        states = runs["disk"][1].engine.store_bytes("disk")
        staging = runs["disk"][1].engine.staging_bytes()
        print(f"small-llama-20m {a.dtype}, K={a.chunks}, {visit} step(s) per visit, batch 4 x {a.seq_len}, "
              f"fsync {'off' if a.no_fsync else 'on'}, {a.slots} slot(s), "
              f"{steps} steps per tier in {a.blocks} interleaved blocks, 1 thread")
        print(f"host: median step {med['host'] * 1e3:.1f} ms, mean {mean['host'] * 1e3:.1f} ms")
        print(f"disk: median step {med['disk'] * 1e3:.1f} ms, mean {mean['disk'] * 1e3:.1f} ms "
              f"(state files {states / MIB:.1f} MiB, staging {staging / MIB:.1f} MiB)")
        print(f"disk/host: mean step {mean['disk'] / mean['host']:.3f}, per block "
              f"{' '.join(f'{r:.3f}' for r in per_block)}; same weights: {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--update-interval", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=8)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=1, help="alternate host/disk runs this many times")
    ap.add_argument("--interleaved", action="store_true", help="step-time ratio in one process (see above)")
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--no-fsync", action="store_true", help="--interleaved: DiskTier(fsync=False)")
    ap.add_argument("--slots", type=int, default=1, help="--interleaved: fp32 state slots (1 or 2)")
    a = ap.parse_args()
    if a.interleaved:
        interleaved(a)
        return
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
