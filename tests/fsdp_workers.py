"""Worker for tests/test_fsdp2.py: one of 2 gloo processes (spawned) running FSDP2 on the CPU."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
from tiny_models import VOCAB, tiny_llama
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from chunkft.chunks import Chunk, ParamSlice
from chunkft.executor.slicegrad import SliceGradients

# two windows of whole tensors, then one of a whole tensor and a row slice (what SliceGradients cuts)
WINDOWS = [
    (("model.layers.0.self_attn.q_proj.weight", 0, 32), ("model.layers.0.mlp.up_proj.weight", 0, 64)),
    (("model.layers.1.mlp.down_proj.weight", 0, 32), ("lm_head.weight", 0, VOCAB)),
    (("model.layers.1.mlp.down_proj.weight", 0, 32), ("model.layers.1.mlp.up_proj.weight", 8, 24)),
]


def global_batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(5))


def dense_window_grads(window: tuple) -> dict[str, torch.Tensor]:
    """One process, no sharding: the window's rows of the gradient of the mean loss on the whole batch."""
    model = tiny_llama()
    names = {n for n, _, _ in window}
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    ids = global_batch()
    model(input_ids=ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    return {n: params[n].grad[a:b].clone() for n, a, b in window}


def fsdp_worker(rank: int, size: int, port: int, out: str) -> None:
    """fully_shard per decoder layer and the root; the windows activated one after another by
    SliceGradients (requires_grad toggled after sharding); each rank on its half of the batch. Rank 0
    saves, per window, the tensors that got gradients and each window gradient made whole: whole
    tensors arrive from FSDP reduce-scattered (a DTensor of this rank's rows, averaged over ranks), row
    slices from SliceGradients' own Function on the unsharded weight (this rank's batch: averaged here)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        mesh = init_device_mesh("cpu", (size,))
        model = tiny_llama()
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        per = 4 // size
        ids = global_batch()[rank * per : (rank + 1) * per]
        sg = SliceGradients(model)
        results = []
        for i, window in enumerate(WINDOWS):
            sg.activate(Chunk(i, tuple(ParamSlice(n, a, b) for n, a, b in window)))
            model(input_ids=ids, labels=ids).loss.backward()
            got = {}
            for name, g in sg.window_grads().items():
                if hasattr(g, "full_tensor"):  # FSDP's reduce-scattered shard
                    got[name] = ("sharded", tuple(g.to_local().shape), g.full_tensor())
                else:
                    g = g.clone()
                    dist.all_reduce(g)
                    got[name] = ("local", tuple(g.shape), g / size)
            trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
            stray = sorted(n for n, p in model.named_parameters() if p.grad is not None)
            results.append({"got": got, "trainable": trainable, "stray": stray})
            sg.zero_grad()
        if rank == 0:
            torch.save(results, Path(out) / "fsdp.pt")
        dist.barrier()  # no rank leaves while another's collectives are in flight (gloo aborts the process)
    finally:
        dist.destroy_process_group()



def chunkft_fsdp_worker(rank: int, size: int, port: int, out: str) -> None:
    """ChunkFT on a model sharded by fully_shard (per decoder layer and the root), every case of
    dp_workers.CASES, each rank on its share of every step's micro-batches; rank 0 saves the weights made
    whole and the clip norms. test_fsdp2 compares them with one unsharded rank accumulating them all."""
    from dp_workers import CASES, STEPS, _init, train

    world = _init(rank, size, port)
    try:
        for case in CASES:
            model, _, norms = train(case, world, STEPS, shard=True)
            whole = {n: p.full_tensor() for n, p in model.named_parameters()}
            if world.is_main:
                torch.save({"params": whole, "norms": norms}, Path(out) / f"{case[0]}-fsdp.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()
