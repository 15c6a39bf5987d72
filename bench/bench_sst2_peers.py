"""Experiment 2: a real pretrained model on a real task, CPU. all-MiniLM-L6-v2 with a fresh 2-way head on
SST-2 (training rows from the first 90% of train.tsv, held-out rows from its last 10%), the same methods
where they apply. Writes its section of --out.

    python -m bench.bench_sst2_peers
"""

from __future__ import annotations

import argparse
import shlex
import sys

from bench import peers
from chunkft.profiles import ProfileError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_sst2_peers", description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--eval-examples", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tune-steps", type=int, default=10, help="steps per lr-grid run; 0 = no tuning")
    peers.add_common_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    try:
        from transformers import AutoTokenizer

        chunks, kinds = peers.common_setup(a)
        model_dir = peers.minilm_dir()
        wl = peers.Workload(task="sequence-classification", model_ref=str(model_dir), seq_len=a.seq_len,
                            micro_batch=a.micro_batch, steps=a.steps, seed=a.seed,
                            eval_examples=a.eval_examples)
        data = peers.sst2_classification(AutoTokenizer.from_pretrained(str(model_dir)), a.seq_len,
                                         a.train_examples, a.eval_examples)
        base = peers.minilm_classifier(a.seed)
        plan_dir = a.cache_dir / "plans" / "minilm-sst2"
        budget = peers.half_dense_budget(wl, plan_dir) if "chunkft" in kinds else None
        specs = peers.method_specs(kinds, chunks, budget, peers.update_intervals(a.update_intervals))
        peers.run_experiment(
            title="Real pretrained model, real task, CPU: all-MiniLM-L6-v2 + classification head on SST-2",
            marker="sst2-minilm",
            command="python -m bench.bench_sst2_peers " + shlex.join(argv),
            out=a.out, build=peers.copy_model(base), specs=specs, wl=wl, data=data,
            tune_steps=a.tune_steps, plan_dir=plan_dir,
            notes=[f"data: {a.train_examples} training rows from the first 90% of SST-2 train.tsv, the first "
                   f"{a.eval_examples} rows of its last 10% held out (accuracy reported on them)",
                   "the classification head is freshly initialised (seeded) for every method; LoRA trains it "
                   "in full (peft SEQ_CLS modules_to_save), adapters on all linear layers",
                   "ChunkFT planner row: chunkft-plan --gpu cpu with --budget = half of its own K=1 plan"],
        )
    except (peers.BenchError, ProfileError, ValueError, OSError) as e:
        print(f"bench_sst2_peers: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
