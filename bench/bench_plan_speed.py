"""How long `chunkft-plan` takes to answer "will it fit": cold (empty trace cache) and warm (cache filled
by an earlier identical run), median of N runs per case, each a fresh process as a user runs it.

    python bench/bench_plan_speed.py                 # 8B/4090 and 70B/2xH800, 5 runs each
    python bench/bench_plan_speed.py --runs 3 --case 8b

Why both: a cold run traces the model (planner/profile_model.py), a warm one reads the traces and the
model structure from planner/trace_cache.py; the plans must be byte-identical either way (checked).
The machine's load (os.getloadavg) is printed before and after: on a shared machine it moves the numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES: dict[str, list[str]] = {
    "8b": ["llama-3-8b", "--gpu", "4090"],
    "70b": ["llama-3-70b", "--gpu", "h800", "--num-gpus", "2"],
}


def planner_command() -> list[str]:
    """The console script installed beside this Python, else the same entry point through -c."""
    script = Path(sys.executable).parent / "chunkft-plan"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from chunkft.planner.cli import main; main()"]


def timed_run(cmd: list[str], cache: Path, out: Path) -> tuple[float, bytes]:
    """Seconds of one planning process (start to exit) and the plan it wrote."""
    env = {**os.environ, "CHUNKFT_CACHE_DIR": str(cache)}
    t = time.perf_counter()
    r = subprocess.run([*cmd, "-o", str(out)], env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return dt, out.read_bytes()


def bench_case(name: str, runs: int, base: list[str], work: Path) -> dict[str, object]:
    cmd = [*base, *CASES[name]]
    plans: set[bytes] = set()
    cold = []
    for i in range(runs):  # every cold run gets an empty cache of its own
        dt, plan = timed_run(cmd, work / f"{name}-cold-{i}", work / f"{name}.json")
        cold.append(dt)
        plans.add(plan)
    warm_cache = work / f"{name}-cold-0"  # filled by the first cold run
    warm = []
    for _ in range(runs):
        dt, plan = timed_run(cmd, warm_cache, work / f"{name}.json")
        warm.append(dt)
        plans.add(plan)
    return {"case": " ".join(CASES[name]), "cold": cold, "warm": warm, "identical": len(plans) == 1}


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=5, help="runs per case and cache state (default 5)")
    p.add_argument("--case", choices=sorted(CASES), action="append", help="default: all")
    args = p.parse_args()
    base = planner_command()
    import torch
    import transformers

    print(f"command: {' '.join(base)}; torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"cpus: {os.cpu_count()}; load average (1/5/15 min) before: {load()}")
    work = Path(tempfile.mkdtemp(prefix="chunkft-plan-speed-"))
    try:
        rows = [bench_case(c, args.runs, base, work) for c in (args.case or sorted(CASES))]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"load average after: {load()}\n")
    print("| case | runs | cold median s (min-max) | warm median s (min-max) | plans identical |")
    print("|---|---|---|---|---|")
    for r in rows:
        cells = []
        for key in ("cold", "warm"):
            xs: list[float] = r[key]  # type: ignore[assignment]
            cells.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})")
        same = "yes" if r["identical"] else "NO"
        print(f"| `chunkft-plan {r['case']}` | {args.runs} | {cells[0]} | {cells[1]} | {same} |")


if __name__ == "__main__":
    main()
