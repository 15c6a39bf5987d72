"""The transfer engine's asynchronous path on the CPU, with stand-in streams as adversarial as a GPU.

A run with LateStreams (side-stream copies as late as the waits allow) and with EarlyStreams (as early as
they allow) must equal the synchronous run bit for bit; and removing any one of the engine's four waits
must make one of them differ, so these tests are not vacuous.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from tiny_models import VOCAB, tiny_llama

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec, SGDHparams
from chunkft.executor.measure import StepClock
from chunkft.executor.stream_standins import EarlyStreams, LateStreams, standin_streams
from chunkft.executor.streams import PAGE_BYTES, PinnedMemoryError, SyncStreams, host_block, pin_in_place
from chunkft.executor.transfer import KindSpec, TransferEngine

K = 4


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, VOCAB, (2, 10), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


def new_driver(
    streams, *, slots: int, host_dtype: str, interval: int, order: str, hparams=None, states_on: str = "host"
):
    # bf16 weights: the fp32 master rows travel through the slots too
    model = tiny_llama(torch.bfloat16).to(streams.device)
    driver = ChunkFT(
        model,
        partition(param_specs(model), num_chunks=K),
        hparams=hparams or AdamWHparams(lr=1e-2, weight_decay=0.1),
        schedule=ScheduleSpec("cosine", warmup_steps=2, total_steps=40),
        rotation=RotationSpec(order, update_interval=interval, seed=5),
        host_state_dtype=host_dtype,
        states_on=states_on,
        max_grad_norm=1.0,
        state_slots=slots,
        streams=streams,
    )
    return model, driver


def train(make_streams, *, steps: int, resume_at: int | None = None, **config):
    """Losses and final weights of `steps` steps; with resume_at, the run stops there and a fresh model
    and driver (new streams) continue from its state_dict, as chunkft-run's resume does."""
    model, driver = new_driver(make_streams(), **config)
    losses = []
    for i, batch in enumerate(batches(steps)):
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if i == resume_at:
            state, weights = driver.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            model, driver = new_driver(make_streams(), **config)
            model.load_state_dict(weights)
            driver.load_state_dict(state)
        loss = model(**batch).loss
        driver.backward(loss)
        driver.step()
        losses.append(float(loss.detach()))
    driver.close()
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def same_run(a, b) -> bool:
    (la, wa), (lb, wb) = a, b
    return la == lb and all(torch.equal(wa[k], wb[k]) for k in wa)


CONFIGS = [
    dict(slots=s, host_dtype=d, interval=u, order=o)
    for s, d, u, o in itertools.product(
        (1, 2), ("float32", "bfloat16", "reset"), (1, 3), ("bottom-up", "random")
    )
] + [  # states kept on the device: fp32 ones are used in place, bf16 ones are staged through the slots
    dict(slots=s, host_dtype=d, interval=2, order="random", states_on="gpu")
    for s, d in itertools.product((1, 2), ("float32", "bfloat16"))
]


def steps_for(config) -> int:
    return 2 * K * config["interval"] + 1  # every window written back and fetched again at least once


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_late_and_early_streams_equal_the_synchronous_run(config):
    steps = steps_for(config)
    reference = train(SyncStreams, steps=steps, **config)
    assert all(math.isfinite(x) for x in reference[0])
    early: list[EarlyStreams] = []

    def new_early() -> EarlyStreams:
        early.append(EarlyStreams())
        return early[-1]

    assert same_run(train(LateStreams, steps=steps, **config), reference)
    assert same_run(train(new_early, steps=steps, **config), reference)
    assert early and not any(s.races for s in early)


@pytest.mark.parametrize("name", ["late", "early"])
@pytest.mark.parametrize("slots", [1, 2])
def test_resume_with_stand_in_streams_equals_the_uninterrupted_run(name, slots):
    config = dict(slots=slots, host_dtype="float32", interval=2, order="random")
    steps = steps_for(config)
    reference = train(SyncStreams, steps=steps, **config)
    for at in (4, 7):  # right after a window change (copies pending) and in the middle of a visit
        assert same_run(train(lambda: standin_streams(name), steps=steps, resume_at=at, **config), reference)


def test_sgd_with_momentum_on_stand_in_streams():
    config = dict(slots=2, host_dtype="bfloat16", interval=1, order="top-down", hparams=SGDHparams(lr=0.05))
    reference = train(SyncStreams, steps=9, **config)
    assert same_run(train(LateStreams, steps=9, **config), reference)
    assert same_run(train(EarlyStreams, steps=9, **config), reference)


# ----- each wait is necessary ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wait", "config"),
    [
        # compute -> side before a write-back: the copy would read the slot while the update writes it
        ("_side_waits_for_update", dict(slots=1, host_dtype="float32", interval=1, order="bottom-up")),
        # a new slot's first fill reads device stores the compute stream zeroed: it must wait for that
        (
            "_side_waits_for_allocation",
            dict(slots=1, host_dtype="bfloat16", interval=1, order="bottom-up", states_on="gpu"),
        ),
    ],
)
def test_without_a_side_stream_wait_early_streams_race(monkeypatch, wait, config):
    reference = train(SyncStreams, steps=9, **config)
    monkeypatch.setattr(TransferEngine, wait, lambda self: None)
    streams = EarlyStreams()
    run = train(lambda: streams, steps=9, **config)
    assert streams.races and not same_run(run, reference)


def test_without_the_fill_wait_late_streams_give_wrong_updates(monkeypatch):
    """side -> compute before an update: the update would read a slot the fill has not reached."""
    config = dict(slots=2, host_dtype="float32", interval=1, order="bottom-up")
    reference = train(SyncStreams, steps=9, **config)
    monkeypatch.setattr(TransferEngine, "_host_waits_for_fill", lambda self, slot: 0.0)
    assert not same_run(train(LateStreams, steps=9, **config), reference)


def test_without_the_sync_before_state_dict_a_resume_goes_wrong(monkeypatch):
    """The host reads the stores for a checkpoint: pending write-backs must have landed."""
    config = dict(slots=1, host_dtype="float32", interval=1, order="bottom-up")
    reference = train(SyncStreams, steps=9, **config)
    original = TransferEngine.state_dict

    def without_sync(self):
        monkeypatch.setattr(self, "synchronize", lambda: None)
        return original(self)

    monkeypatch.setattr(TransferEngine, "state_dict", without_sync)
    assert not same_run(train(LateStreams, steps=9, resume_at=4, **config), reference)


# ----- the step clock ------------------------------------------------------------------------------------


def test_the_step_clock_does_not_wait_for_the_state_copies():
    """StepClock times steps on the compute stream: the copies a window change issues stay in flight
    across the step boundary (a device-wide synchronize would run them serially)."""
    streams = LateStreams()
    model, driver = new_driver(streams, slots=1, host_dtype="float32", interval=1, order="bottom-up")
    clock = StepClock(streams)
    for batch in batches(3):
        clock.start()
        driver.backward(model(**batch).loss)
        stats = driver.step()
        clock.stop(tokens=20, transfer_wait_s=stats.transfer_wait_s, exclude=False)
        assert streams.pending > 0  # the write-back and the next window's fill are still queued
    assert len(clock.seconds) == 3 and all(s > 0 for s in clock.seconds)
    driver.close()
    assert streams.pending == 0


# ----- pinning -------------------------------------------------------------------------------------------


class FakeCudart:
    """cudaHostRegister that fails (a locked-memory limit) or succeeds, recording what was asked."""

    def __init__(self, error: int) -> None:
        self.error = error
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:
        self.registered.append((ptr, size))
        return self.error

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, err: int) -> str:
        return "out of memory"


def test_host_stores_are_views_of_one_page_aligned_block_pinned_once():
    """cudaHostRegister refuses a range sharing a page with a registered one: small stores allocated one by
    one share heap pages, so all of an engine's host stores are carved from one block of whole pages."""
    pieces = [(3, torch.float32), (1000, torch.bfloat16), (0, torch.float32), (7, torch.float32)]
    block, views = host_block(pieces)
    assert block.data_ptr() % PAGE_BYTES == 0 and block.numel() % PAGE_BYTES == 0
    spans = sorted((v.data_ptr(), v.data_ptr() + v.numel() * v.element_size()) for v in views)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))  # no two views overlap
    assert [(v.numel(), v.dtype) for v in views] == pieces and all(not v.any() for v in views)
    assert all(v.data_ptr() % 512 == 0 for v in views if v.numel())
    cudart = FakeCudart(0)
    pin_in_place(block, cudart)
    assert cudart.registered == [(block.data_ptr(), block.numel())]
    engine = TransferEngine([5, 9], [KindSpec("a", "host"), KindSpec("b", "host", torch.bfloat16)],
                            device=torch.device("cpu"))  # fmt: skip
    stores = engine.store_tensors("host")
    assert len({t.untyped_storage().data_ptr() for t in stores}) == 1  # one block for the whole engine


def test_pinning_registers_exactly_the_tensor_and_unregisters_when_it_is_collected():
    cudart = FakeCudart(0)
    t = torch.zeros(1000)
    ptr = t.data_ptr()
    pin_in_place(t, cudart)
    assert cudart.registered == [(ptr, 4000)]
    del t
    assert cudart.unregistered == [ptr]


def test_a_failed_pin_raises_in_words_instead_of_leaving_a_cuda_error_pending():
    with pytest.raises(PinnedMemoryError, match=r"page-locking 0\.00 GiB .* \(out of memory\).*--host-mem"):
        pin_in_place(torch.zeros(10), FakeCudart(2))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[-1], dict(slots=2, host_dtype="bfloat16", interval=1,
                                    order="random")], ids=["1-slot", "gpu-bf16", "2-slots-bf16"])  # fmt: skip
def test_cuda_streams_equal_synchronous_copies_on_the_gpu(config):
    """The real side stream, events and pinned stores against synchronous copies on the same GPU (the
    kernels are the same; only the copies' timing differs). `pytest -m gpu` on a machine with a GPU."""
    from chunkft.executor.streams import CudaStreams

    gpu = torch.device("cuda", torch.cuda.current_device())
    reference = train(lambda: SyncStreams(gpu), steps=steps_for(config), **config)
    run = train(lambda: CudaStreams(gpu), steps=steps_for(config), **config)
    torch.testing.assert_close(run[0], reference[0], rtol=1e-4, atol=0)  # a missed wait is O(1)
    for k in reference[1]:
        torch.testing.assert_close(run[1][k], reference[1][k], rtol=1e-2, atol=1e-3, msg=k)
