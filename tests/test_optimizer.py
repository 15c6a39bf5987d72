"""The chunked optimizer against torch.optim on real (tiny) Hugging Face models, fp32 and bf16, on CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec, SGDHparams
from chunkft.executor.schedule import lr_factor


def batches(n: int, model: torch.nn.Module, batch: int = 2, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        if isinstance(model, LlamaForCausalLM):
            out.append({"input_ids": ids, "labels": ids})
        else:
            out.append({"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g)})
    return out


def max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((pa.float() - pb.float()).abs().max().item() for pa, pb in pairs)


def run_reference(model, data, opt, sched=None, max_norm=None, accum=1) -> None:
    for i in range(0, len(data), accum):
        for b in data[i : i + accum]:
            (model(**b).loss / accum).backward()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()


def run_driver(driver: ChunkFT, model, data, accum=1) -> list:
    stats = []
    for i in range(0, len(data), accum):
        for b in data[i : i + accum]:
            driver.backward(model(**b).loss / accum)
        stats.append(driver.step())
    return stats


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
@pytest.mark.parametrize("max_norm", [None, 0.05], ids=["noclip", "clip"])
def test_k1_reproduces_torch_adamw_for_20_steps(make, max_norm):
    """Issue test 2: K=1, weight decay, linear warmup schedule applied identically to both."""
    ref, model = make(), make()
    init = copy.deepcopy(model)
    data = batches(20, model)
    hp = AdamWHparams(lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    spec = ScheduleSpec("linear", warmup_steps=4, total_steps=20)
    opt = torch.optim.AdamW(
        ref.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
    run_reference(ref, data, opt, sched, max_norm)

    chunks = partition(param_specs(model), num_chunks=1)
    driver = ChunkFT(
        model, chunks, hparams=hp, schedule=spec, rotation=RotationSpec("bottom-up"), max_grad_norm=max_norm
    )
    stats = run_driver(driver, model, data)
    driver.close()
    assert [s.lr for s in stats] == [hp.lr * lr_factor(spec, i) for i in range(20)]
    assert max_diff(model, ref) <= 1e-5
    assert max_diff(model, init) > 1e-3  # the run really trained
    if max_norm is not None:
        assert any(s.grad_norm > max_norm for s in stats)  # clipping was exercised


@pytest.mark.parametrize("nesterov", [False, True])
def test_k1_reproduces_torch_sgd_momentum(nesterov):
    ref, model = tiny_llama(), tiny_llama()
    data = batches(12, model)
    hp = SGDHparams(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    spec = ScheduleSpec("cosine", warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    opt = torch.optim.SGD(ref.parameters(), lr=hp.lr, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
    run_reference(ref, data, opt, sched)
    driver = ChunkFT(
        model,
        partition(param_specs(model), num_chunks=1),
        hparams=hp,
        schedule=spec,
        rotation=RotationSpec("bottom-up"),
    )
    run_driver(driver, model, data)
    assert max_diff(model, ref) <= 1e-5
    assert max_diff(model, tiny_llama()) > 1e-3


@pytest.mark.parametrize("order", ["bottom-up", "random"])
def test_k_windows_equal_one_torch_adamw_per_window_with_accumulation(order):
    """With whole-tensor windows, ChunkFT is K torch AdamWs taking turns (per-tensor bias correction
    counts only that tensor's updates); gradient accumulation over 2 micro-batches in both."""
    ref, model = tiny_llama(), tiny_llama()
    chunks = partition(param_specs(model), num_chunks=4, policy="whole")
    hp = AdamWHparams(lr=1e-2, weight_decay=0.05)
    spec = ScheduleSpec("constant", warmup_steps=0, total_steps=100)
    rot = RotationSpec(order, update_interval=2, seed=3)
    data = batches(2 * 14, model)
    driver = ChunkFT(model, chunks, hparams=hp, schedule=spec, rotation=rot)
    visited = [s.chunk for s in run_driver(driver, model, data, accum=2)]
    driver.close()
    assert len(set(visited)) == 4

    named = dict(ref.named_parameters())
    opts = [torch.optim.AdamW([named[s.name] for s in c.slices], lr=hp.lr, weight_decay=0.05) for c in chunks]
    for step, k in enumerate(visited):
        for p in ref.parameters():
            p.requires_grad_(False)
        for s in chunks[k].slices:
            named[s.name].requires_grad_(True)
        for b in data[2 * step : 2 * step + 2]:
            (ref(**b).loss / 2).backward()
        opts[k].step()
        opts[k].zero_grad(set_to_none=True)
    assert max_diff(model, ref) <= 1e-5


def test_bf16_weights_with_fp32_master_accumulate_tiny_updates():
    """Issue test 6: each update is far below half a bf16 ulp of the weights, yet 50 steps move them."""
    model = tiny_llama(torch.bfloat16)
    init = copy.deepcopy(model)
    data = batches(50, model)
    hp = AdamWHparams(lr=2e-5)
    spec = ScheduleSpec("constant", warmup_steps=0, total_steps=50)
    chunks = partition(param_specs(model), num_chunks=2)
    driver = ChunkFT(model, chunks, hparams=hp, schedule=spec, rotation=RotationSpec("bottom-up"))
    run_driver(driver, model, data)
    master = driver.state_dict()["optimizer"]["engine"]["stores"]
    driver.close()

    # The same run with torch's AdamW directly on bf16 weights loses (almost) every update to rounding.
    naive = copy.deepcopy(init)
    opt = torch.optim.AdamW(naive.parameters(), lr=hp.lr, weight_decay=0.0)
    run_reference(naive, data, opt)

    def changed_fraction(m: torch.nn.Module) -> float:
        moved = sum((a != b).sum().item() for a, b in zip(m.parameters(), init.parameters(), strict=True))
        return moved / sum(p.numel() for p in init.parameters())

    assert changed_fraction(model) > 0.5
    assert changed_fraction(naive) < 0.5 * changed_fraction(model)
    # The weights are the master rows rounded to bf16.
    params = dict(model.named_parameters())
    for c, store in zip(chunks, master, strict=True):
        flat = store["master"]
        offset = 0
        for s in c.slices:
            p = params[s.name]
            n = s.num_rows * (p.numel() // p.shape[0])
            rows = p.detach().reshape(-1)[s.row_start * (p.numel() // p.shape[0]) :][:n]
            assert torch.equal(flat[offset : offset + n].to(torch.bfloat16), rows)
            offset += n


def test_non_finite_grad_norm_skips_the_step_and_keeps_window_and_schedule():
    model = tiny_llama()
    data = batches(3, model)
    spec = ScheduleSpec("linear", warmup_steps=2, total_steps=10)
    driver = ChunkFT(
        model,
        partition(param_specs(model), num_chunks=3),
        hparams=AdamWHparams(lr=1e-2),
        schedule=spec,
        rotation=RotationSpec("bottom-up"),
        max_grad_norm=1.0,
    )
    driver.backward(model(**data[0]).loss)
    driver.step()
    before = copy.deepcopy(model.state_dict())
    window, lr = driver.active_chunk, driver.lr()
    driver.backward(model(**data[1]).loss * float("inf"))
    stats = driver.step()
    assert stats.skipped and not torch.isfinite(torch.tensor(stats.grad_norm))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert driver.active_chunk == window and driver.lr() == lr and driver.schedule_step == 1
    assert all(p.grad is None for p in model.parameters())
    driver.backward(model(**data[2]).loss)  # the next step is clean: no inf left in the buffers
    assert not driver.step().skipped
    assert driver.schedule_step == 2


def test_bfloat16_host_states_are_lossy_but_close_and_stored_as_bf16():
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny_llama()
        data = batches(8, model)
        driver = ChunkFT(
            model,
            partition(param_specs(model), num_chunks=2),
            hparams=AdamWHparams(lr=1e-3),
            schedule=ScheduleSpec("constant", 0, 8),
            rotation=RotationSpec("bottom-up"),
            host_state_dtype=dtype,
        )
        run_driver(driver, model, data)
        stores = driver.state_dict()["optimizer"]["engine"]["stores"]
        assert {t.dtype for s in stores for t in s.values()} == {getattr(torch, dtype)}
        runs[dtype] = model
    assert 0 < max_diff(runs["float32"], runs["bfloat16"]) < 1e-3


@pytest.mark.parametrize("interval", [1, 2])
def test_reset_states_restart_like_a_fresh_adamw_per_visit(interval):
    """BAdam-style "reset": each visit of a window starts from zero states and step count 0."""
    ref, model = tiny_llama(), tiny_llama()
    chunks = partition(param_specs(model), num_chunks=2, policy="whole")
    hp = AdamWHparams(lr=1e-2)
    data = batches(8, model)
    driver = ChunkFT(
        model,
        chunks,
        hparams=hp,
        schedule=ScheduleSpec("constant", 0, 8),
        rotation=RotationSpec("bottom-up", update_interval=interval),
        host_state_dtype="reset",
    )
    visited = [s.chunk for s in run_driver(driver, model, data)]
    assert driver.host_state_bytes() == 0  # fp32 weights are their own master; states are dropped
    named = dict(ref.named_parameters())
    opt = None
    for step, k in enumerate(visited):
        if step % interval == 0:  # a new visit: fresh optimizer
            opt = torch.optim.AdamW([named[s.name] for s in chunks[k].slices], lr=hp.lr, weight_decay=0.0)
        for p in ref.parameters():
            p.requires_grad_(False)
        for s in chunks[k].slices:
            named[s.name].requires_grad_(True)
        ref(**data[step]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert max_diff(model, ref) <= 1e-5
