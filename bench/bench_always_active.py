"""Issue 14, study 1: always-active parameters (task head, norms, biases) on top of the rotating window,
side by side with the current default (every parameter in the windows), at equal steps.

Two experiments, each the setting of an existing benchmark:

- `sst2`: all-MiniLM-L6-v2 + a fresh 2-way head on SST-2, as bench/bench_sst2.py runs it (rows [0, 2000)
  train, [2000, 3000) held-out test, [3000, 3500) validation; seq 32, batch 16, 250 steps, linear schedule
  with 10% warm-up, no clipping, no weight decay); ChunkFT K=4, bottom-up.
- `sst2-peers`: the same model and task as bench/bench_sst2_peers.py (4,000 training rows from the first 90%
  of train.tsv, 256 held-out and 256 validation rows from its last 10%; seq 64, micro-batch 16, 60 steps,
  constant lr, clip 1.0); ChunkFT K=4, 7 steps per visit (the planner's choice there).
- `causal`: small-llama-20m pre-trained 100 steps on the SST-2 sentences, then fine-tuned on tinyshakespeare
  as bench/bench_causal_lm.py's recorded run (seq 64, micro-batch 4, 120 steps, constant lr, clip 1.0;
  64 held-out and 64 validation blocks); ChunkFT K=4, 10 steps per visit (the planner's choice there).

Every configuration starts from the same weights and sees the same batches; the always-active tensors are
taken out of the partition (the other parameters are cut into the same number K of equal-byte windows).
Per always-active set the lr with the best validation score (accuracy, then loss; for the causal LM the
loss) is the one whose held-out score is compared. Writes its section of --out.

    python -m bench.bench_always_active sst2 --sets none,head,head+norms+biases --lrs 1e-4,3e-4
    python -m bench.bench_always_active causal --sets none,norms,head+norms --lrs 1e-3,3e-3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench import peers
from bench.bench_sst2 import splits
from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT
from chunkft.executor.data import Batches, TokenData
from chunkft.executor.rotation import RotationSpec
from chunkft.executor.schedule import ScheduleSpec, lr_factor
from chunkft.executor.train import evaluate

OUT = Path("bench/results/always_active.md")
SET_PARTS = ("none", "head", "norms", "biases", "dense")


def members(model: nn.Module, set_name: str) -> list[str]:
    """The parameter names of an always-active set: `+`-joined parts of head, norms, biases ("none":
    the current default, every parameter in the windows)."""
    parts = set(set_name.split("+"))
    bad = parts - set(SET_PARTS)
    if bad or ("none" in parts and len(parts) > 1) or ("dense" in parts and len(parts) > 1):
        raise peers.BenchError(f"set {set_name!r}: use none, dense, or head/norms/biases joined by +")
    out = []
    for name, _ in model.named_parameters():
        head = name.startswith(("classifier.", "bert.pooler.", "lm_head."))
        norm = "LayerNorm" in name or name.endswith("norm.weight")
        bias = name.endswith(".bias")
        if ("head" in parts and head) or ("norms" in parts and norm) or ("biases" in parts and bias):
            out.append(name)
    return out


def train_one(model: nn.Module, set_name: str, lr: float, batches: Batches, *, steps: int, k: int, ui: int,
              schedule: ScheduleSpec, clip: float | None) -> tuple[float, int]:
    """Train in place; returns (seconds, always-active elements)."""
    if set_name == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(schedule, s))
        t0 = time.perf_counter()
        for _ in range(steps):
            model(**batches.next()).loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        return time.perf_counter() - t0, 0
    names = members(model, set_name) if set_name != "none" else []
    specs = [s for s in param_specs(model) if s.name not in names]
    chunks = partition(specs, num_chunks=k, state_bytes_per_element=8)
    driver = ChunkFT(model, chunks, hparams=AdamWHparams(lr=lr, weight_decay=0.0), schedule=schedule,
                     rotation=RotationSpec("bottom-up", update_interval=ui), max_grad_norm=clip,
                     always_active=names)
    params = dict(model.named_parameters())
    t0 = time.perf_counter()
    for i in range(steps):
        loss = model(**batches.next()).loss
        driver.backward(loss)
        driver.step()
        if (i + 1) % 50 == 0:
            print(f"  {set_name} lr={lr:g}: step {i + 1}/{steps} loss {float(loss.detach()):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    driver.close()
    return time.perf_counter() - t0, sum(params[n].numel() for n in names)


def score(model: nn.Module, data: TokenData, task: str) -> tuple[float, float | None]:
    loss, acc = evaluate(model, data, 64, torch.device("cpu"), contextlib.nullcontext(), task)
    model.train()
    return loss, acc


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_always_active",
                                description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=("sst2", "sst2-peers", "causal"))
    p.add_argument("--sets", default="none,head,head+norms+biases",
                   help="always-active sets, comma-separated: none, dense (AdamW), head+norms+biases")
    p.add_argument("--lrs", default=None, help="lr grid (default 1e-4,3e-4 for sst2, 1e-3,3e-3 for causal)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--update-interval", type=int, default=None, help="default 1 for sst2, 10 for causal")
    p.add_argument("--steps", type=int, default=None, help="default 250 for sst2, 120 for causal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--ledger", type=Path, default=peers.DEFAULT_CACHE / "always_active_runs.jsonl")
    p.add_argument("--cache-dir", type=Path, default=peers.DEFAULT_CACHE)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    torch.set_num_threads(a.threads)
    sst2 = a.experiment.startswith("sst2")
    steps = a.steps or {"sst2": 250, "sst2-peers": 60, "causal": 120}[a.experiment]
    ui = a.update_interval or {"sst2": 1, "sst2-peers": 7, "causal": 10}[a.experiment]
    lrs = [float(x) for x in (a.lrs or ("1e-4,3e-4" if sst2 else "1e-3,3e-3")).split(",")]
    sets = [s.strip() for s in a.sets.split(",") if s.strip()]
    try:
        if sst2:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(peers.minilm_dir()))
            if a.experiment == "sst2":
                train, test, val = splits(tok, 32, 2000, 1000, 500)
                schedule = ScheduleSpec("linear", warmup_steps=steps // 10, total_steps=steps)
                clip = None
            else:
                d = peers.sst2_classification(tok, 64, 4000, 256)
                train, test, val = d.train, d.held_out, d.validation
                schedule = ScheduleSpec("constant", warmup_steps=0, total_steps=steps)
                clip = 1.0

            def build() -> nn.Module:
                return peers.minilm_classifier(a.seed).train()

            task, batch = "sequence-classification", 16
        else:
            data = peers.shakespeare_lm(64, 64)
            train, test, val = data.train, data.held_out, data.validation
            base = peers.pretrained_causal_lm("small-llama-20m", seq_len=64, micro_batch=4, steps=100,
                                              lr=1e-3, seed=a.seed, cache_dir=a.cache_dir,
                                              log=lambda m: print(m, file=sys.stderr))
            build = peers.copy_model(base)
            schedule = ScheduleSpec("constant", warmup_steps=0, total_steps=steps)
            task, batch, clip = "causal-lm", 4, 1.0
        for s in sets:
            if s not in ("none", "dense"):
                members(build(), s)  # refuse a bad set name before any training
        rows = []
        t_all = time.perf_counter()
        for s in sets:
            for lr in lrs:
                torch.manual_seed(a.seed)
                model = build()
                secs, n = train_one(model, s, lr, Batches(train, batch, seed=a.seed), steps=steps, k=a.chunks,
                                    ui=ui, schedule=schedule, clip=clip)
                vl, va = score(model, val, task)
                tl, ta = score(model, test, task)
                row = {"experiment": a.experiment, "set": s, "lr": lr, "steps": steps, "K": a.chunks,
                       "ui": ui, "seed": a.seed, "always_elements": n, "val_loss": vl, "val_acc": va,
                       "test_loss": tl, "test_acc": ta, "seconds": secs}
                print(json.dumps(row), file=sys.stderr, flush=True)
                a.ledger.parent.mkdir(parents=True, exist_ok=True)
                with a.ledger.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
    except (peers.BenchError, ValueError, OSError) as e:
        print(f"bench_always_active: {e}", file=sys.stderr)
        return 1
    env = peers.environment()
    total = sum(p.numel() for p in build().parameters())
    head = ["always-active set", "elements (share)", "lr", "val loss"] + (["val acc"] if sst2 else []) + \
        ["held-out loss"] + (["held-out acc"] if sst2 else []) + ["train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["set"] if r["set"] != "dense" else "dense AdamW (reference)",
                 f"{r['always_elements']:,} ({r['always_elements'] / total:.2%})", f"{r['lr']:g}",
                 f"{r['val_loss']:.4f}"] + ([f"{r['val_acc']:.4f}"] if sst2 else []) + \
            [f"{r['test_loss']:.4f}"] + ([f"{r['test_acc']:.4f}"] if sst2 else []) + [f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    chosen = []
    for s in sets:
        mine = [r for r in rows if r["set"] == s]
        key = (lambda r: (r["val_acc"], -r["val_loss"])) if sst2 else (lambda r: -r["val_loss"])
        best = max(mine, key=key)
        what = f"held-out acc {best['test_acc']:.4f}, loss {best['test_loss']:.4f}" if sst2 else \
            f"held-out loss {best['test_loss']:.4f}"
        chosen.append(f"- {s}: lr {best['lr']:g} chosen on validation; {what}")
    title = ("SST-2, all-MiniLM-L6-v2 + fresh head" if sst2 else
             "causal LM, small-llama-20m (SST-2 sentences pre-training, then tinyshakespeare)")
    body = [
        f"### {title}: K={a.chunks}, {ui} step(s) per visit, {steps} steps, seed {a.seed}", "",
        f"- command: `python -m bench.bench_always_active {shlex.join(argv)}`",
        f"- date: {env['date']}; wall time {time.perf_counter() - t_all:.0f} s",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- model: {total:,} parameters; schedule {schedule.kind} (warm-up {schedule.warmup_steps}), clip "
        f"{clip}, no weight decay; windows: the other parameters in K={a.chunks} equal-byte windows, "
        "bottom-up",
        "", *lines, "", *chosen, "",
    ]
    marker = f"always-active-{a.experiment}-K{a.chunks}-ui{ui}-steps{steps}-seed{a.seed}"
    peers.write_section(a.out, marker, "\n".join(body))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
