"""Experiment 1: causal LM on CPU. A small Llama preset pre-trained briefly on the SST-2 sentences, then
fine-tuned on tinyshakespeare (last 10% held out) with dense AdamW, ChunkFT (planner's choice and fixed K),
LoRA, BAdam, LOMO, AdaLomo and GaLore for the same number of steps. Writes its section of --out.

    python -m bench.bench_causal_lm --model small-llama-20m
"""

from __future__ import annotations

import argparse
import shlex
import sys

from bench import peers
from chunkft.profiles import ProfileError


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_causal_lm", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small-llama-20m", help="causal-LM preset (byte vocabulary)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=60, help="fine-tuning optimizer steps per method")
    p.add_argument("--tune-steps", type=int, default=12, help="steps per lr-grid run; 0 = no tuning")
    p.add_argument("--eval-examples", type=int, default=64)
    peers.add_common_args(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    try:
        chunks, kinds = peers.common_setup(a)
        wl = peers.Workload(task="causal-lm", model_ref=a.model, seq_len=a.seq_len, micro_batch=a.micro_batch,
                            steps=a.steps, seed=a.seed, eval_examples=a.eval_examples)
        plan_dir = a.cache_dir / "plans" / a.model
        data = peers.shakespeare_lm(a.seq_len, a.eval_examples)
        base = peers.pretrained_causal_lm(a.model, seq_len=a.seq_len, micro_batch=a.micro_batch,
                                          steps=a.pretrain_steps, lr=a.pretrain_lr, seed=a.seed,
                                          cache_dir=a.cache_dir)
        budget = peers.half_dense_budget(wl, plan_dir) if "chunkft" in kinds else None
        specs = peers.method_specs(kinds, chunks, budget, peers.update_intervals(a.update_intervals))
        peers.run_experiment(
            title=f"Causal LM on CPU: {a.model}, SST-2 sentences pre-training then tinyshakespeare",
            marker=f"causal-lm-{a.model}",
            command="python -m bench.bench_causal_lm " + shlex.join(argv),
            out=a.out, build=peers.copy_model(base), specs=specs, wl=wl, data=data,
            tune_steps=a.tune_steps, plan_dir=plan_dir,
            notes=[f"pre-training: dense AdamW lr {a.pretrain_lr:g}, {a.pretrain_steps} steps on the SST-2 "
                   "sentences (newline-joined bytes), cached outside the repository",
                   "ChunkFT planner row: chunkft-plan --gpu cpu with --budget = half of its own K=1 plan "
                   "(peak + reserve); fixed-K rows with --checkpointing none like every peer",
                   "BAdam: blocks = embedding, each layer, norm+head, ascending, switch every "
                   "steps/blocks steps; GaLore: rank hidden/4, scale 0.25, projection update every "
                   "steps/4 on the blocks' 2-D weights; LoRA: all linear layers of the blocks"],
        )
    except (peers.BenchError, ProfileError, ValueError, OSError) as e:
        print(f"bench_causal_lm: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
