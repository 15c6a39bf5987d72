"""GPU check of the disk tier (issue 16 step 1), prepared for a session that has a GPU: on CUDA (the real
side stream, pinned staging buffers, non_blocking copies, the I/O thread) a ChunkFT run with
`disk=DiskTier(...)` must equal the host-tier run bit for bit, weights and every window's states, for a
tiny Llama with bf16 weights (fp32 master rows on disk too) over several rotations, with 1 and 2 state
slots, bottom-up and random order, and a resume from state_dict() half-way. Prints one line per case and
exits 1 if any differs. `--device cpu` is the dry run (the synchronous streams).

    python bench/gpu_check_disk_tier.py [--device cuda] [--steps 25]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec
from chunkft.executor.state_files import DiskTier

K = 4


def tiny(device: torch.device) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(cfg).to(torch.bfloat16).to(device)


def driver(model, disk: DiskTier | None, slots: int, order: str) -> ChunkFT:  # noqa: ANN001
    return ChunkFT(
        model,
        partition(param_specs(model), num_chunks=K),
        hparams=AdamWHparams(lr=1e-2, weight_decay=0.1),
        schedule=ScheduleSpec("cosine", warmup_steps=2, total_steps=100),
        rotation=RotationSpec(order, update_interval=2, seed=5),
        max_grad_norm=1.0,
        state_slots=slots,
        disk=disk,
    )


def run(
    device: torch.device, steps: int, disk_dir: Path | None, slots: int, order: str, resume_at: int | None
) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 64, (2, 16), generator=g).to(device) for _ in range(steps)]
    model = tiny(device)
    d = driver(model, DiskTier(disk_dir) if disk_dir else None, slots, order)
    for i, x in enumerate(batches):
        if i == resume_at:
            state, weights = d.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            d.close()
            model = tiny(device)
            model.load_state_dict(weights)
            d = driver(model, DiskTier(disk_dir) if disk_dir else None, slots, order)
            d.load_state_dict(state)
        d.backward(model(input_ids=x, labels=x).loss)
        d.step()
    d.close()
    e = d.engine
    states = {(c, k.name): e.read_store(c, k.name) for c in range(K) for k in e.kinds if k.store != "none"}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, states


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=25)
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        for slots in (1, 2):
            for order in ("bottom-up", "random"):
                for resume_at in (None, 9):
                    wh, sh = run(device, a.steps, None, slots, order, resume_at)
                    where = Path(tmp) / f"{slots}{order}{resume_at}"
                    wd, sd = run(device, a.steps, where, slots, order, resume_at)
                    same = all(torch.equal(wh[k], wd[k]) for k in wh)
                    same = same and all(torch.equal(sh[k], sd[k]) for k in sh)
                    failed += not same
                    print(f"{device} slots={slots} order={order} resume_at={resume_at}: "
                          f"{'PASS' if same else 'FAIL'} (weights and {len(sh)} state stores)")  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
