"""Plan a fixed set of cases and compare two sets: the check that a planner refactor changes no plan.

    python bench/plan_cases.py plan OUT_DIR           # every case, trace cache off, into OUT_DIR
    python bench/plan_cases.py compare DIR_A DIR_B    # which plans differ (the host budget ignored)

Run `plan` with the tree before the change and with the tree after it (each with its own installed
chunkft-plan), then `compare`. The host budget is this machine's available memory at the moment of
planning, so it is the one field allowed to differ; every other byte must be equal.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CASES = [
    "llama-3-8b --gpu 4090",
    "llama-3-70b --gpu h800 --num-gpus 2",
    "gemma-2-2b --gpu 4090",
    "qwen3-0.6b --gpu t4 --batch-size 4",
    "phi-3-mini --gpu rtx-3060-12gb",
    "mistral-nemo-12b --gpu rtx-5090",
    "tiny-llama --gpu cpu --seq-len 64 --batch-size 2 --steps 20",
    "tiny-llama-tied --gpu cpu --seq-len 64 --cross-entropy chunked --steps 20",
    "tiny-bert --gpu cpu --seq-len 32 --steps 20",
    "small-llama-20m --gpu cpu --seq-len 256 --batch-size 4 --steps 100",
    "llama-3.2-1b --gpu 4090 --budget 8GiB --checkpointing auto",
    "qwen2.5-7b --gpu a100-40gb --chunks 16",
]


def plan_all(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).parent / "chunkft-plan"
    env = {**os.environ, "CHUNKFT_CACHE_DIR": "off"}  # every case traced: the tracer is under test too
    for i, case in enumerate(CASES, 1):
        t = time.perf_counter()
        r = subprocess.run([str(script), *case.split(), "-o", str(out / f"p{i}.json")], env=env,
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{case}: exit {r.returncode}\n{r.stdout}{r.stderr}")
        print(f"{i:2d} {time.perf_counter() - t:6.1f} s  chunkft-plan {case}")


def _without_host_budget(path: Path) -> dict:
    doc = json.loads(path.read_text())
    doc["hardware"].pop("host_budget_bytes", None)
    return doc


def compare(a: Path, b: Path) -> int:
    differ = 0
    for i, case in enumerate(CASES, 1):
        same = _without_host_budget(a / f"p{i}.json") == _without_host_budget(b / f"p{i}.json")
        differ += not same
        print(f"{i:2d} {'same' if same else 'DIFFERS'}  {case}")
    return 1 if differ else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan").add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.cmd == "plan":
        plan_all(args.out)
    else:
        raise SystemExit(compare(args.a, args.b))


if __name__ == "__main__":
    main()
