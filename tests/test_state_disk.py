"""The disk tier (issue 16 step 1): cold windows' master rows and optimizer states in files under a state
directory, read ahead into pinned staging buffers and written back after each visit.

A disk-tier run must equal the host-tier run bit for bit (weights and every state), with the synchronous
streams and with both stand-ins (executor/stream_standins.py) and with every way the files move (the I/O
thread, inline, and "late": each file job only when something waits for it); removing any one of the
engine's staging waits must make a run differ, so these tests are not vacuous. Files are replaced
atomically: a full disk is one StateFileError naming it, and the previous file is left as it was.
"""

from __future__ import annotations

import errno
import itertools
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, tiny_llama

from chunkft.chunks import param_specs, partition
from chunkft.executor import state_files
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec, SGDHparams
from chunkft.executor.state_files import DiskTier, StateFileError
from chunkft.executor.stream_standins import EarlyStreams, LateStreams
from chunkft.executor.streams import SyncStreams
from chunkft.executor.transfer import TransferEngine

K = 4


def batches(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, VOCAB, (2, 10), generator=g) for _ in range(n)]
    return [{"input_ids": x, "labels": x} for x in ids]


def new_driver(
    streams,
    disk: DiskTier | None,
    *,
    slots: int = 1,
    interval: int = 1,
    order: str = "bottom-up",
    dtype: torch.dtype = torch.bfloat16,  # bf16 weights: the fp32 master rows go to disk too
    policy: str = "rows",  # rows: windows cut inside tensors (slices); whole: whole tensors only
    hparams=None,
    host_dtype: str = "float32",
):
    model = tiny_llama(dtype)
    driver = ChunkFT(
        model,
        partition(param_specs(model), num_chunks=K, policy=policy),
        hparams=hparams or AdamWHparams(lr=1e-2, weight_decay=0.1),
        schedule=ScheduleSpec("cosine", warmup_steps=2, total_steps=40),
        rotation=RotationSpec(order, update_interval=interval, seed=5),
        host_state_dtype=host_dtype,
        max_grad_norm=1.0,
        state_slots=slots,
        streams=streams,
        disk=disk,
    )
    return model, driver


def train(make_streams, disk, *, steps: int, resume_at: int | None = None, resume_disk=None, **config):
    """Losses, final weights and every window's final states of `steps` steps; with resume_at the run
    stops there and a fresh model and driver continue from its state_dict (on `resume_disk`, default the
    same state directory, whose files the new driver recreates)."""
    model, driver = new_driver(make_streams(), disk, **config)
    losses = []
    for i, batch in enumerate(batches(steps)):
        if i == resume_at:
            state, weights = driver.state_dict(), {k: v.clone() for k, v in model.state_dict().items()}
            model, driver = new_driver(make_streams(), resume_disk or disk, **config)
            model.load_state_dict(weights)
            driver.load_state_dict(state)
            del state
        loss = model(**batch).loss
        driver.backward(loss)
        driver.step()
        losses.append(float(loss.detach()))
    driver.close()
    engine = driver.engine
    states = {
        (c, k.name): engine.read_store(c, k.name)
        for c in range(len(engine.chunk_numels))
        for k in engine.kinds
        if k.store != "none"
    }
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return losses, weights, states, driver


def same_run(a, b) -> bool:
    (la, wa, sa, _), (lb, wb, sb, _) = a, b
    return (
        la == lb
        and all(torch.equal(wa[k], wb[k]) for k in wa)
        and sa.keys() == sb.keys()
        and all(torch.equal(sa[k], sb[k]) for k in sa)
    )


def steps_for(interval: int) -> int:
    return 2 * K * interval + 1  # every window written back and read again at least once


STREAMS = {"sync": SyncStreams, "late": LateStreams, "early": EarlyStreams}

CONFIGS = [
    dict(slots=s, interval=u, order=o, policy=p)
    for s, u, o, p in itertools.product((1, 2), (1, 3), ("bottom-up", "random"), ("rows", "whole"))
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_a_disk_tier_run_equals_the_host_run_bit_for_bit(tmp_path, config):
    steps = steps_for(config["interval"])
    reference = train(SyncStreams, None, steps=steps, **config)
    assert reference[3].engine.store_bytes("disk") == 0
    for (name, make), io in itertools.product(STREAMS.items(), ("thread", "late")):
        disk = DiskTier(tmp_path / f"{name}-{io}", io=io)
        run = train(make, disk, steps=steps, **config)
        assert same_run(run, reference), (name, io)
        engine = run[3].engine
        assert engine.store_bytes("host") == 0
        assert engine.store_bytes("disk") == reference[3].host_state_bytes()
        if name == "early":
            assert not run[3].engine.streams.races


def test_a_surviving_slot_is_not_updated_while_its_write_back_still_reads_it():
    """An fp32 slot keeps its window after the write-back; at the window's next visit the update must
    wait for that copy (LateStreams runs it as late as allowed), or the store gets the newer values."""
    config = dict(slots=2, interval=3, order="random")
    reference = train(SyncStreams, None, steps=steps_for(3), **config)
    assert same_run(train(LateStreams, None, steps=steps_for(3), **config), reference)


@pytest.mark.parametrize("staging", [1, 2, 5])
def test_any_number_of_staging_buffers_gives_the_same_run(tmp_path, staging):
    config = dict(slots=2, interval=2, order="random")
    reference = train(SyncStreams, None, steps=steps_for(2), **config)
    for io in ("thread", "late", "inline"):
        disk = DiskTier(tmp_path / io, io=io, staging_buffers=staging)
        assert same_run(train(LateStreams, disk, steps=steps_for(2), **config), reference)


@pytest.mark.parametrize(
    "config",
    [
        dict(hparams=SGDHparams(lr=0.05), order="top-down"),  # momentum buffer (and master) on disk
        dict(hparams=SGDHparams(lr=0.05, momentum=0.0), dtype=torch.float32),  # nothing to store at all
        dict(dtype=torch.float32, policy="whole"),  # fp32 weights: their own master, moments only
        dict(host_dtype="bfloat16", slots=2),  # bf16 files: the slot is refetched after a write-back
        dict(host_dtype="reset", interval=2),  # master on disk, moments dropped at rotation
    ],
    ids=["sgd", "sgd-no-momentum", "fp32-whole", "bf16-states", "reset"],
)
def test_sgd_fp32_weights_and_lossy_states_on_disk_equal_the_host_run(tmp_path, config):
    steps = steps_for(config.get("interval", 1))
    reference = train(SyncStreams, None, steps=steps, **config)
    for name, make in STREAMS.items():
        assert same_run(train(make, DiskTier(tmp_path / name, io="late"), steps=steps, **config), reference)


@pytest.mark.parametrize("name", ["sync", "late", "early"])
def test_resume_of_a_disk_tier_run_equals_the_uninterrupted_run(tmp_path, name):
    config = dict(slots=2, interval=2, order="random")
    steps = steps_for(2)
    reference = train(SyncStreams, None, steps=steps, **config)
    for at in (4, 7):  # right after a window change (copies and file writes pending) and mid-visit
        # the same state directory: the new driver recreates every file while the state holds mappings
        # of the old ones, which a replaced file must not change
        disk = DiskTier(tmp_path / f"{name}{at}", io="late")
        run = train(STREAMS[name], disk, steps=steps, resume_at=at, **config)
        assert same_run(run, reference)


def test_a_host_run_state_resumes_on_the_disk_tier_and_back(tmp_path):
    config = dict(slots=1, interval=2, order="bottom-up")
    steps = steps_for(2)
    reference = train(SyncStreams, None, steps=steps, **config)
    disk = DiskTier(tmp_path / "a")
    to_disk = train(SyncStreams, None, steps=steps, resume_at=5, resume_disk=disk, **config)
    assert same_run(to_disk, reference) and to_disk[3].engine.store_bytes("disk") > 0


# ----- each staging wait is necessary ----------------------------------------------------------------------


def _broken(monkeypatch, wait: str) -> None:
    if wait == "_host_waits_for_io":  # keep the read wait inside it: drop only the wait for a file write
        original = TransferEngine._host_waits_for_read
        monkeypatch.setattr(TransferEngine, wait, lambda self, buf: original(self, buf))
    else:
        monkeypatch.setattr(TransferEngine, wait, lambda self, buf: None)


@pytest.mark.parametrize(
    ("wait", "streams", "io", "staging", "config"),
    [
        # the host writes a buffer's files before the slot -> staging copy reached it: stale files
        ("_host_waits_for_drain", "late", "inline", 1, dict(slots=1)),
        # the staging -> slot copy is issued before the file read into the buffer ran
        ("_host_waits_for_read", "sync", "late", None, dict(slots=1)),
        # a buffer is refilled before the file write of its previous window ran: that file gets the
        # next window's bytes
        ("_host_waits_for_io", "sync", "late", None, dict(slots=1, order="random")),
    ],
)
def test_without_a_staging_wait_a_run_differs(tmp_path, monkeypatch, wait, streams, io, staging, config):
    steps = steps_for(1)
    reference = train(SyncStreams, None, steps=steps, **config)
    ok = DiskTier(tmp_path / "ok", io=io, staging_buffers=staging)
    assert same_run(train(STREAMS[streams], ok, steps=steps, **config), reference)
    _broken(monkeypatch, wait)
    broken = DiskTier(tmp_path / "broken", io=io, staging_buffers=staging)
    try:
        run = train(STREAMS[streams], broken, steps=steps, **config)
    except StateFileError:
        return  # a file job saw a buffer changing under it: also a difference
    assert not same_run(run, reference)


@pytest.mark.parametrize("broken", [False, True])
def test_without_the_staging_use_wait_a_queued_fill_copies_other_states(tmp_path, monkeypatch, broken):
    """prefetch(0) then prefetch(1) with one staging buffer: window 1's file read must wait for the
    queued staging -> slot copy of window 0 (the driver's prefetch lists never ask this of one buffer,
    any caller may)."""
    from chunkft.executor.transfer import KindSpec

    engine = TransferEngine(
        [8, 8],
        [KindSpec("exp_avg", "disk")],
        device=torch.device("cpu"),
        max_slots=2,
        streams=LateStreams(),
        disk=DiskTier(tmp_path, io="inline", staging_buffers=1),
    )
    for c in range(2):
        engine.store(c, "exp_avg").fill_(c + 1.0)
    engine.synchronize()
    if broken:
        _broken(monkeypatch, "_host_waits_for_staging_use")
    engine.prefetch(0)
    engine.prefetch(1)
    got = engine.wait(0).tensors["exp_avg"]
    assert torch.equal(got, torch.full((8,), 2.0 if broken else 1.0))


def test_without_the_flush_before_state_dict_a_resume_goes_wrong(tmp_path, monkeypatch):
    """A checkpoint maps the files: synchronize() must write the changed staging buffers into them first
    (here the last write-back's copy is still queued, so its buffer was not written yet)."""
    config = dict(slots=1, interval=1, order="bottom-up")
    reference = train(SyncStreams, None, steps=9, **config)
    disk = DiskTier(tmp_path / "ok", io="late")
    assert same_run(train(LateStreams, disk, steps=9, resume_at=4, **config), reference)
    original = TransferEngine.state_dict

    def without_flush(self):
        monkeypatch.setattr(self, "synchronize", self.streams.synchronize)  # the copies, not the files
        return original(self)

    monkeypatch.setattr(TransferEngine, "state_dict", without_flush)
    disk = DiskTier(tmp_path / "broken", io="late")
    assert not same_run(train(LateStreams, disk, steps=9, resume_at=4, **config), reference)


# ----- files: atomic, a full disk is one clear error, nothing earlier lost ----------------------------------


def test_state_files_are_replaced_atomically_and_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    config = dict(slots=1, interval=1, order="bottom-up")
    model, driver = new_driver(SyncStreams(), DiskTier(tmp_path, io="thread"), **config)
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files[:3]] == [
        "chunk-00000.exp_avg.bin",
        "chunk-00000.exp_avg_sq.bin",
        "chunk-00000.master.bin",
    ]
    data = batches(6)
    for batch in data[:K]:  # one rotation: every window written back once
        driver.backward(model(**batch).loss)
        driver.step()
    driver.engine.synchronize()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def full(f, view):
        calls.append(f.name)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_files, "_write_all", full)
    with pytest.raises(StateFileError) as e:
        for batch in data[K:]:
            driver.backward(model(**batch).loss)
            driver.step()
        driver.engine.synchronize()
    assert e.value.disk_full and calls
    message = str(e.value)
    assert "\n" not in message and "No space left on device" in message and str(tmp_path) in message
    assert "free space" in message
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # the old files as they were, no temporary left beside them


def test_a_disk_kind_without_a_state_directory_is_refused():
    from chunkft.executor.transfer import KindSpec

    with pytest.raises(ValueError, match="state directory"):
        TransferEngine([4], [KindSpec("exp_avg", "disk")], device=torch.device("cpu"))
    with pytest.raises(ValueError, match="io 'fast' is unknown"):
        DiskTier(Path("x"), io="fast")  # type: ignore[arg-type]



# ----- checkpoints: a copy of the files, one file in memory at a time ---------------------------------------


def _rss_file_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile in /proc/self/status")


def test_a_checkpoint_copies_the_state_files_without_holding_them_in_memory(tmp_path):
    """The states of a disk-tier engine are mappings of its files (consistent: files are only replaced);
    the checkpoint writer gets each as a fresh mapping released after its file, so while the checkpoint's
    states are alive, the process holds none of their pages (measured: RssFile), and the copy is exact."""
    from chunkft.executor.checkpoint import _save_states, states_reader
    from chunkft.executor.distributed import FlatShard, World
    from chunkft.executor.transfer import KindSpec

    n = 4 << 20  # 16 MiB per file, 4 files
    kinds = [KindSpec("exp_avg", "disk"), KindSpec("exp_avg_sq", "disk")]
    engine = TransferEngine([n, n], kinds, device=torch.device("cpu"), disk=DiskTier(tmp_path / "s"))
    for c in range(2):
        for i, k in enumerate(("exp_avg", "exp_avg_sq")):
            engine.store(c, k).copy_(torch.arange(n, dtype=torch.float32) * (c + 1) + i)
    state = engine.state_dict()
    stores = state["stores"]
    shards = {
        f"store.{c}.{k}": FlatShard(v, v.numel(), 0) for c, s in enumerate(stores) for k, v in s.items()
    }
    before = _rss_file_bytes()
    _save_states(tmp_path / "ckpt" / "states", shards, World.single())
    held = _rss_file_bytes() - before
    assert held < 16 << 20, f"the checkpoint left {held / 2**20:.1f} MiB of state file pages in the process"
    back = {k: FlatShard(torch.zeros(n), n, 0) for k in shards}
    states_reader(tmp_path / "ckpt")(back)
    assert all(torch.equal(back[k].local, shards[k].local) for k in shards)
    # a resume fills new state files (mapped) from the checkpoint, one file's pages at a time
    other = TransferEngine([n, n], kinds, device=torch.device("cpu"), disk=DiskTier(tmp_path / "r"))
    targets = other.load_targets([])
    into = {
        f"store.{c}.{k}": FlatShard(v, n, 0) for c, s in enumerate(targets["stores"]) for k, v in s.items()
    }
    before = _rss_file_bytes()
    states_reader(tmp_path / "ckpt")(into)
    held = _rss_file_bytes() - before
    assert held < 16 << 20, f"the resume left {held / 2**20:.1f} MiB of state file pages in the process"
    other.load_state_dict(targets)
    names = ("exp_avg", "exp_avg_sq")
    assert all(torch.equal(other.read_store(c, k), engine.read_store(c, k)) for c in range(2) for k in names)
    engine.store(0, "exp_avg").zero_()  # the files change (replaced) after the snapshot...
    engine.synchronize()
    assert torch.equal(state["stores"][0]["exp_avg"], torch.arange(n, dtype=torch.float32))  # ...it does not
    assert state_files.fresh_mapping(state["stores"][0]["exp_avg"]) is None  # and is not remapped


def test_with_two_slots_the_second_window_is_read_ahead_without_blocking_the_prefetch(tmp_path, monkeypatch):
    """prefetch(active, upcoming) with 2 slots: the upcoming window's file read runs on the I/O thread and
    its fill follows at a later engine call once the read finished; the prefetch itself does not wait."""
    import threading
    import time

    from chunkft.executor.transfer import KindSpec

    kinds = [KindSpec("exp_avg", "disk")]
    disk = DiskTier(tmp_path, staging_buffers=2)
    engine = TransferEngine([8, 8, 8], kinds, device=torch.device("cpu"), max_slots=2, disk=disk)
    for c in range(3):
        engine.store(c, "exp_avg").fill_(c + 1.0)
    engine.synchronize()  # windows 1 and 2 are in the two staging buffers, window 0 only in its file
    gate = threading.Event()
    real = state_files.StateFiles._read

    def slow_for_window_0(self, chunk, targets):
        if chunk == 0:
            gate.wait(timeout=20)
        real(self, chunk, targets)

    monkeypatch.setattr(state_files.StateFiles, "_read", slow_for_window_0)
    t0 = time.perf_counter()
    engine.prefetch(1, 0)
    blocked = time.perf_counter() - t0
    gate.set()
    assert blocked < 10, f"prefetch blocked {blocked:.1f} s on the upcoming window's file read"
    assert torch.equal(engine.wait(1).tensors["exp_avg"], torch.full((8,), 2.0))
    engine.write_back(1)
    engine.prefetch(0)
    assert torch.equal(engine.wait(0).tensors["exp_avg"], torch.full((8,), 1.0))
