"""The ChunkFT driver and the transfer engine on real tiny Hugging Face models (CPU)."""

from __future__ import annotations

import io

import pytest
import torch
from tiny_models import VOCAB, tiny_bert, tiny_llama
from transformers import LlamaForCausalLM

from chunkft.chunks import Chunk, ParamSlice, param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec, SGDHparams
from chunkft.executor.transfer import KindSpec, TransferEngine


def batches(n: int, model: torch.nn.Module) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (2, 12), generator=g)
        if isinstance(model, LlamaForCausalLM):
            out.append({"input_ids": ids, "labels": ids})
        else:
            out.append({"input_ids": ids, "labels": torch.randint(0, 2, (2,), generator=g)})
    return out


def make_driver(model, num_chunks=3, **kw) -> ChunkFT:
    kw.setdefault("hparams", AdamWHparams(lr=1e-2, weight_decay=0.01))
    kw.setdefault("schedule", ScheduleSpec("linear", warmup_steps=2, total_steps=20))
    kw.setdefault("rotation", RotationSpec("bottom-up"))
    return ChunkFT(model, partition(param_specs(model), num_chunks=num_chunks), **kw)


def straddling(model, chunks) -> list[ParamSlice]:
    params = dict(model.named_parameters())
    return [s for c in chunks for s in c.slices if s.num_rows < params[s.name].shape[0]]


# ----- issue tests 3 and 4 ------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_weights_outside_the_window_are_bit_identical_after_a_step(make):
    """Issue test 3, including the rows of a straddling tensor that lie outside the window."""
    model = make()
    # constant: a warmup would give step 0 the learning rate 0
    driver = make_driver(model, num_chunks=3, max_grad_norm=1.0, schedule=ScheduleSpec("constant", 0, 10))
    assert straddling(model, driver.chunks), "the partition must cut a tensor for this test to mean anything"
    for batch in batches(4, model):  # more than one full cycle
        window = driver.active_chunk
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        driver.backward(model(**batch).loss)
        driver.step()
        inside = {s.name: s for s in window.slices}
        for name, p in model.named_parameters():
            now, old = p.detach(), before[name]
            s = inside.get(name)
            if s is None:
                assert torch.equal(now, old), name
                continue
            assert torch.equal(now[: s.row_start], old[: s.row_start]), name
            assert torch.equal(now[s.row_end :], old[s.row_end :]), name
            assert not torch.equal(now[s.row_start : s.row_end], old[s.row_start : s.row_end]), name
    driver.close()


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_no_parameter_ever_holds_a_grad(make):
    """Issue test 4: after every backward (two micro-batches) and every step, all .grad are None."""
    model = make()
    driver = make_driver(model, num_chunks=4, rotation=RotationSpec("random", seed=1))
    data = batches(8, model)
    for i in range(0, 8, 2):
        for b in data[i : i + 2]:
            driver.backward(model(**b).loss / 2)
            assert all(p.grad is None for p in model.parameters())
        driver.step()
        assert all(p.grad is None for p in model.parameters())
    driver.close()


# ----- resume -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "host_state_dtype"),
    [
        (torch.float32, "float32"),
        (torch.float32, "bfloat16"),
        (torch.float32, "reset"),
        (torch.bfloat16, "float32"),
    ],
)
def test_resume_after_7_steps_equals_an_uninterrupted_15_step_run(weights, host_state_dtype):
    """Random order and update_interval=2, so the save lands mid-window with live, un-written-back states."""
    kw = dict(
        num_chunks=3,
        rotation=RotationSpec("random", update_interval=2, seed=5),
        host_state_dtype=host_state_dtype,
        max_grad_norm=0.5,
    )
    data = batches(15, tiny_llama())
    straight = tiny_llama(weights)
    d = make_driver(straight, **kw)
    for b in data:
        d.backward(straight(**b).loss)
        d.step()

    first = tiny_llama(weights)
    d1 = make_driver(first, **kw)
    for b in data[:7]:
        d1.backward(first(**b).loss)
        d1.step()
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "driver": d1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)  # what executor/checkpoint.py does

    torch.manual_seed(123)  # a fresh model with other weights: everything must come from the checkpoint
    resumed = LlamaForCausalLM(straight.config).to(weights)
    resumed.load_state_dict(saved["model"])
    d2 = make_driver(resumed, **kw)
    d2.load_state_dict(saved["driver"])
    assert d2.schedule_step == 7 and d2.active_chunk == d1.active_chunk
    for b in data[7:]:
        d2.backward(resumed(**b).loss)
        d2.step()
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), n


def test_state_dict_does_not_change_the_running_trajectory():
    data = batches(6, tiny_llama())
    runs = []
    for take_state in (False, True):
        model = tiny_llama()
        d = make_driver(
            model, host_state_dtype="bfloat16", rotation=RotationSpec("bottom-up", update_interval=2)
        )
        for b in data:
            d.backward(model(**b).loss)
            d.step()
            if take_state:
                d.state_dict()
        runs.append(model)
    assert all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True))


# ----- equivalent configurations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variant",
    [
        {"states_on": "gpu"},  # stores on the compute device: used in place, no copies
        {"prefetch_order": ()},  # no prefetch: every copy synchronous at the update
        {"state_slots": 2},  # the window after next is prefetched a step earlier
        {"state_slots": 2, "prefetch_order": (0, 2, 1)},  # a wrong order: discarded, never used stale
        {"tied": True},
    ],
    ids=["states-on-device", "no-prefetch", "two-slots", "wrong-prefetch-order", "tied-embeddings"],
)
def test_storage_and_prefetch_choices_do_not_change_the_result(variant):
    variant = dict(variant)
    tied = variant.pop("tied", False)
    data = batches(7, tiny_llama())
    results = []
    for kw in ({}, variant):
        model = tiny_llama(tied=tied)
        d = make_driver(model, num_chunks=3, hparams=SGDHparams(lr=0.1, momentum=0.9), **kw)
        for b in data:
            d.backward(model(**b).loss)
            d.step()
        d.close()
        results.append(model)
    pairs = zip(results[0].parameters(), results[1].parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(results[0].lm_head.weight, tiny_llama(tied=tied).lm_head.weight)


def test_states_on_gpu_keeps_no_host_memory_and_host_mode_uses_state_slots_windows():
    model = tiny_llama()
    d_dev = make_driver(model, states_on="gpu")
    assert d_dev.host_state_bytes() == 0 and d_dev.engine_slot_bytes == 0
    d_dev.close()
    for slots in (1, 2):
        model = tiny_llama()
        d = make_driver(model, num_chunks=4, state_slots=slots)
        numel = sum(p.numel() for p in model.parameters())
        assert d.host_state_bytes() == 2 * 4 * numel  # exp_avg + exp_avg_sq, fp32, every chunk
        for b in batches(5, model):
            d.backward(model(**b).loss)
            d.step()
        params = dict(model.named_parameters())
        biggest = max(sum(s.num_rows * params[s.name][0].numel() for s in c.slices) for c in d.chunks)
        assert d.engine_slot_bytes == slots * 2 * 4 * biggest


def test_active_chunk_follows_the_rotation_and_close_restores_the_model():
    model = tiny_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    d = make_driver(model, num_chunks=3, rotation=RotationSpec("top-down", update_interval=2))
    seen = []
    for b in batches(7, model):
        seen.append(d.active_chunk.index)
        d.backward(model(**b).loss)
        assert d.step().chunk == seen[-1]
    assert seen == [2, 2, 1, 1, 0, 0, 2]
    d.close()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all("forward" not in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="closed"):
        d.step()


# ----- bad input: one clear error, before anything changes ----------------------------------------------


def test_bad_input_is_refused_with_one_clear_error():
    model = tiny_llama()
    chunks = partition(param_specs(model), num_chunks=2)
    common = dict(
        hparams=AdamWHparams(lr=1e-3),
        schedule=ScheduleSpec("constant", 0, 10),
        rotation=RotationSpec("bottom-up"),
    )
    cases = [
        (dict(chunks=()), "at least one chunk"),
        (dict(chunks=(chunks[1], chunks[0])), "index order"),
        (dict(chunks=(Chunk(0, (ParamSlice("nope.weight", 0, 1),)),)), "not a parameter"),
        (dict(chunks=(Chunk(0, (ParamSlice("lm_head.weight", 0, 10**6),)),)), "outside"),
        (
            dict(
                chunks=(
                    Chunk(0, (ParamSlice("lm_head.weight", 0, 8),)),
                    Chunk(1, (ParamSlice("lm_head.weight", 4, 9),)),
                )
            ),
            "more than one chunk",
        ),
        (dict(host_state_dtype="fp8"), "host_state_dtype"),
        (dict(states_on="disk"), "states_on"),
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(prefetch_order=(0, 5)), "prefetch_order"),
        (dict(state_slots=3), "state_slots"),
    ]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for override, message in cases:
        kw = {"chunks": chunks, **common, **override}
        with pytest.raises(ValueError, match=message):
            ChunkFT(model, kw.pop("chunks"), **kw)
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(TypeError, match="hparams"):
        ChunkFT(model, chunks, **{**common, "hparams": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="betas"):
        AdamWHparams(lr=1e-3, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="nesterov"):
        SGDHparams(lr=0.1, momentum=0.0, nesterov=True)

    d2 = ChunkFT(model, chunks, **common)
    other = ChunkFT(tiny_llama(), partition(param_specs(model), num_chunks=3), **common)
    with pytest.raises(ValueError, match="different chunk table"):
        d2.load_state_dict(other.state_dict())
    sgd = ChunkFT(tiny_llama(), chunks, **{**common, "hparams": SGDHparams(lr=0.1)})
    with pytest.raises(ValueError, match="SGDHparams"):
        d2.load_state_dict(sgd.state_dict())


# ----- the transfer engine's CPU path -------------------------------------------------------------------


def engine(kinds, numels=(4, 6, 5), slots=2) -> TransferEngine:
    return TransferEngine(list(numels), kinds, device=torch.device("cpu"), max_slots=slots)


def test_engine_round_trip_slot_reuse_and_the_dirty_slot_guard():
    e = engine([KindSpec("m", "host")])
    for c, n in enumerate(e.chunk_numels):
        e.store(c, "m").copy_(torch.arange(n) + 10.0 * c)
    e.prefetch(0, 1)
    assert e.slot_bytes() == 2 * 6 * 4
    t0 = e.wait(0).tensors["m"]
    assert torch.equal(t0, torch.arange(4.0)) and t0.data_ptr() != e.store(0, "m").data_ptr()
    t0.add_(1)
    assert torch.equal(e.store(0, "m"), torch.arange(4.0))  # not written back yet
    t1 = e.wait(1).tensors["m"]
    t1.mul_(2)
    with pytest.raises(RuntimeError, match="write_back"):
        e.wait(2)  # both slots hold updated windows
    e.write_back(0)
    assert torch.equal(e.store(0, "m"), torch.arange(4.0) + 1)
    e.prefetch(0)  # fp32 store: the clean slot still holds chunk 0, nothing is copied
    assert torch.equal(e.wait(0).tensors["m"], torch.arange(4.0) + 1)
    e.write_back(0)
    e.write_back(1)
    assert torch.equal(e.wait(2).tensors["m"], torch.arange(5.0) + 20)
    assert e.slot_bytes() == 2 * 6 * 4  # never more than max_slots


def test_engine_single_slot_serves_the_active_window_first():
    """With one slot, prefetch(new, old) must evict the clean old window for the new one."""
    e = engine([KindSpec("m", "host")], slots=1)
    e.store(1, "m").fill_(5.0)
    e.prefetch(0, 1)  # only chunk 0 fits
    e.wait(0).tensors["m"].fill_(2.0)
    e.write_back(0)
    e.prefetch(1, 0)
    e.store(1, "m").fill_(9.0)  # a probe: the copy already happened at prefetch(), not at wait()
    assert e.slot_bytes() == 6 * 4
    assert torch.equal(e.store(0, "m"), torch.full((4,), 2.0))
    assert torch.equal(e.wait(1).tensors["m"], torch.full((6,), 5.0))


def test_engine_transient_and_bf16_kinds_are_refetched_after_write_back():
    e = engine([KindSpec("s", "none"), KindSpec("b", "host", torch.bfloat16)], slots=1)
    assert e.store_bytes("host") == (4 + 6 + 5) * 2
    t = e.wait(0).tensors
    assert torch.equal(t["s"], torch.zeros(4))
    t["s"].fill_(3.0)
    t["b"].fill_(1.0 + 2**-12)  # not representable in bf16
    e.write_back(0)
    again = e.wait(0).tensors
    assert torch.equal(again["s"], torch.zeros(4))  # transient: dropped
    assert torch.equal(again["b"], torch.ones(4))  # rounded through the bf16 store


def test_engine_direct_kinds_are_used_in_place_and_state_dict_keeps_live_slots():
    e = engine([KindSpec("d", "device"), KindSpec("h", "host")])
    fetched = e.wait(1).tensors
    assert fetched["d"].data_ptr() == e.store(1, "d").data_ptr()
    fetched["h"].fill_(7.0)
    state = e.state_dict()
    assert [s["chunk"] for s in state["live_slots"]] == [1]
    assert torch.equal(state["stores"][1]["h"], torch.zeros(6))  # the store is stale, the live slot is not
    fresh = engine([KindSpec("d", "device"), KindSpec("h", "host")])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.wait(1).tensors["h"], torch.full((6,), 7.0))
    with pytest.raises(ValueError, match="chunks"):
        engine([KindSpec("d", "device"), KindSpec("h", "host")], numels=(4, 6)).load_state_dict(state)


def test_a_parameter_the_backward_never_reaches_is_left_alone_like_torch() -> None:
    """K=1 with weight decay: a layer unused in the forward keeps its weights in torch (its .grad is None)
    and must in ChunkFT too (no decay, no Adam step on a zero gradient)."""

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Linear(6, 6)
            self.used = torch.nn.Linear(6, 2)
            self.unused = torch.nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(torch.tanh(self.body(x)))

    torch.manual_seed(0)
    ours, ref = TwoHeads(), TwoHeads()
    ref.load_state_dict(ours.state_dict())
    hp = AdamWHparams(lr=1e-2, weight_decay=0.1)
    driver = ChunkFT(
        ours,
        partition(param_specs(ours), num_chunks=1),
        hparams=hp,
        schedule=ScheduleSpec(kind="constant", warmup_steps=0, total_steps=5),
        rotation=RotationSpec(order="bottom-up"),
    )
    opt = torch.optim.AdamW(ref.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    for _ in range(5):
        x = torch.randn(4, 6)
        driver.backward(ours(x).square().mean())
        driver.step()
        ref(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    driver.close()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    assert torch.equal(ours.unused.weight, ref.unused.weight)
