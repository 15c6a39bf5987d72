"""Data parallel on 2 gloo processes (CPU): equal to one rank, refusals, a dead rank (issue 13 step 1).

Tolerance: the two ranks sum their micro-batch gradients in another order than one rank accumulating
them (reduce-scatter SUM / 2 vs. a running sum of 1/4-scaled losses) and the clip norm is an fp64 sum of
squares instead of torch's norm of norms, so the results agree to fp32 rounding, not bit for bit. The
noise floor, measured: ONE rank accumulating the same 4 micro-batches in reverse order differs from the
forward order by up to 7.6e-6 on weights after 6 steps (AdamW at lr 1e-2 magnifies rounding where a
gradient is near zero: q_proj/k_proj). So: |difference| <= 2e-5 + 1e-5 * |value| on weights and states
(2e-3 of one AdamW step), gradient norms to relative 1e-5. Dropping the divide by the world size fails it
by orders of magnitude (norms off by 2x).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from dp_workers import CASES, close, equality_worker, free_port, reference, release_worker

sys.path.insert(0, str(Path(__file__).parent))  # spawned children import dp_workers by module name


@pytest.fixture(scope="module")
def equality(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dp")
    mp.spawn(equality_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    reference(out)
    return out


def test_collectives_give_each_rank_its_rows_and_free_their_tensors_on_return(tmp_path) -> None:
    """The reduce-scatter's input and the all-gather's tensors are freed by the step itself, not left to
    gloo's thread, which may hold them past the collective; on gloo the reduce-scatter all-reduces in
    place, because gloo's reduce_scatter_tensor copies the whole input into its work object, which its
    thread freed late enough, pinned to one CPU, to lift rank 0's measured peak 12% above the plan."""
    mp.spawn(release_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        res = torch.load(tmp_path / f"release-{rank}.pt", weights_only=True)
        assert res.pop("gathered bytes left") == (4, 0)  # 2 steps' inputs and outputs, all freed
        assert res.pop(("peak", True)) == 4 * (1 << 16) * 3 // 2  # the input, this rank's half
        assert res.pop(("peak", None)) == 4 * (1 << 16) * 3 // 2  # gloo's default: in place
        assert res.pop(("peak", False)) == 4 * (1 << 16) * 5 // 2  # and gloo's copy of the input
        assert len(res) == 4
        for (numel, _in_place), (shard, input_bytes) in res.items():
            mean = torch.arange(numel, dtype=torch.float32) * 1.5  # (1x + 2x) / 2
            per = -(-numel // 2)
            mine = torch.zeros(2 * per)
            mine[:numel] = mean
            assert torch.equal(shard, mine[rank * per : (rank + 1) * per]), (numel, rank, shard)
            assert input_bytes == 0, (numel, input_bytes)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_ranks_on_a_and_b_equal_one_rank_on_a_plus_b(equality: Path, case: str) -> None:
    """Whole tensors, slices, tied embeddings (AdamW) and SGD, with accumulation and clipping."""
    dp = torch.load(equality / f"{case}-dp.pt", weights_only=True)
    ref = torch.load(equality / f"{case}-ref.pt", weights_only=True)
    assert dp["ranks_agree"], "the ranks' weights differ after the all-gather"
    assert ref["norms"] == pytest.approx(dp["norms"], rel=1e-5)
    assert any(n > 0.3 for n in ref["norms"]), "clipping never happened; the test would not cover it"
    for n, p in ref["params"].items():
        assert close(p, dp["params"][n]), (n, (p - dp["params"][n]).abs().max().item())
    # the gathered data-parallel state is one rank's state (same format, same values): rank-count free
    eng_ref, eng_dp = ref["state"]["optimizer"]["engine"], dp["state"]["optimizer"]["engine"]
    assert ref["state"]["optimizer"]["steps"] == dp["state"]["optimizer"]["steps"]
    for s_ref, s_dp in zip(eng_ref["stores"], eng_dp["stores"], strict=True):
        assert s_ref.keys() == s_dp.keys()
        for k in s_ref:
            assert s_ref[k].shape == s_dp[k].shape and close(s_ref[k], s_dp[k]), k


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_two_rank_resume_from_a_saved_state_continues_exactly(equality: Path, case: str) -> None:
    dp = torch.load(equality / f"{case}-dp.pt", weights_only=True)
    res = torch.load(equality / f"{case}-res.pt", weights_only=True)
    for n, p in dp["params"].items():
        assert torch.equal(p, res[n]), n


# ------------------------------------------------------------------ the CUDA branch of the process group


def test_a_cuda_plan_starts_nccl_on_its_local_gpu_and_init_failures_are_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No GPU here: torch.distributed and torch.cuda are stand-ins that record what init_from_env asks of
    them (the backend, the device, the timeout), and then fail as a broken NCCL would."""
    import torch.distributed as dist

    from chunkft.executor import distributed as d

    calls: list[tuple] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))

    def init(backend: str, timeout: object) -> None:
        calls.append(("init", backend, timeout.total_seconds()))  # type: ignore[attr-defined]
        raise RuntimeError("NCCL error: unhandled system error\nlong detail")

    monkeypatch.setattr(dist, "init_process_group", init)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(d.DistributedError) as e:
        d.init_from_env("cuda", timeout_s=7)
    assert calls == [("set_device", 1), ("init", "nccl", 7.0)]
    msg = str(e.value)
    assert "\n" not in msg and "nccl" in msg and "NCCL error: unhandled system error" in msg
    calls.clear()
    with pytest.raises(d.DistributedError):
        d.init_from_env("cpu", timeout_s=7)
    assert calls == [("init", "gloo", 7.0)]  # the CPU never picks a GPU
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(d.DistributedError, match="MASTER_PORT is not set; launch with torchrun"):
        d.init_from_env("cuda")


def test_checkpoints_collect_over_a_patient_gloo_group_even_when_training_uses_nccl(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host states are CPU tensors (DCP over nccl would copy them to the GPU), and writing a large
    checkpoint keeps rank 0 away longer than a step's collectives may wait: init_from_env adds a gloo
    group with CHECKPOINT_TIMEOUT_FACTOR x the timeout. Stand-ins record it, as above."""
    import torch.distributed as dist

    from chunkft.executor import distributed as d

    calls: list[tuple] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)

    def new_group(backend: str, timeout: object) -> str:
        calls.append(("new_group", backend, timeout.total_seconds()))  # type: ignore[attr-defined]
        return "the gloo group"

    monkeypatch.setattr(dist, "new_group", new_group)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    world = d.init_from_env("cuda", timeout_s=7)
    assert calls == [("init", "nccl"), ("new_group", "gloo", 7.0 * d.CHECKPOINT_TIMEOUT_FACTOR)]
    assert world.rank == 1 and world.size == 2 and world.group is None
    assert d.group_for(world, checkpoint=True) == "the gloo group" and d.group_for(world) is None


def test_each_cuda_rank_trains_on_its_own_gpu_and_one_rank_keeps_the_device_it_asked_for() -> None:
    """The device choice of chunkft-run's CUDA branch, without a GPU: data parallel on CUDA takes the GPU
    init_from_env made current (LOCAL_RANK's), even over --device cuda; one rank, or the CPU, keeps
    --device (None: resolve_device picks)."""
    from chunkft.executor.train import rank_device, wants_cuda

    assert wants_cuda(None, True) and wants_cuda("cuda:1", False)
    assert not wants_cuda(None, False) and not wants_cuda("cpu", True)
    local_rank = lambda: 3  # noqa: E731 - torch.cuda.current_device after set_device(LOCAL_RANK=3)
    assert rank_device(None, True, True, local_rank) == "cuda:3"
    assert rank_device("cuda", True, True, local_rank) == "cuda:3"
    assert rank_device("cuda:0", False, True, local_rank) == "cuda:0"
    assert rank_device(None, False, True, local_rank) is None
    assert rank_device("cpu", True, False, local_rank) == "cpu"
