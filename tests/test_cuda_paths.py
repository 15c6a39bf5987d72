"""The CUDA branches of the executor, run on the CPU: device resolution, the allocator's peaks and
settings, host memory before pinning, chunkft-run's own loop on stand-in streams, evaluation after the
final save, weight decay and gradient accumulation over padded micro-batches."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from tiny_models import VOCAB, tiny_llama

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec
from chunkft.executor.devices import CudaInfo, DeviceError, configure_allocator, resolve_device, same_device
from chunkft.executor.loss import causal_lm_loss
from chunkft.executor.measure import CudaPeak
from chunkft.executor.train import RunError, RunOptions, check_host_memory, step_micro_batches, train
from chunkft.plan_format import load_plan

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
TWO_GPUS = CudaInfo(available=True, count=2, current=1)
NO_GPU = CudaInfo(available=False, count=0, current=0)


# ----- devices -------------------------------------------------------------------------------------------


def test_resolve_device_gives_every_cuda_device_its_index():
    assert resolve_device("cuda", TWO_GPUS) == torch.device("cuda", 1)  # the current GPU
    assert resolve_device("cuda:0", TWO_GPUS) == torch.device("cuda", 0)  # honoured
    assert resolve_device(None, TWO_GPUS) == torch.device("cuda", 1)
    assert resolve_device(torch.device("cuda"), TWO_GPUS) == torch.device("cuda", 1)
    assert resolve_device(None, NO_GPU) == torch.device("cpu")
    assert resolve_device("cpu:0", NO_GPU) == torch.device("cpu")
    with pytest.raises(DeviceError, match=r"2 GPU\(s\) \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2", TWO_GPUS)
    with pytest.raises(DeviceError, match="no CUDA GPU.*--device cpu"):
        resolve_device("cuda", NO_GPU)
    with pytest.raises(DeviceError, match="not a device name"):
        resolve_device("gpu0", TWO_GPUS)


def test_same_device_reads_a_missing_index_as_the_current_gpu():
    cuda, cuda0, cuda1 = torch.device("cuda"), torch.device("cuda", 0), torch.device("cuda", 1)
    assert cuda != cuda1  # what torch says, and why every comparison goes through same_device
    assert same_device(cuda, cuda1, TWO_GPUS) and same_device(cuda1, cuda, TWO_GPUS)
    assert not same_device(cuda, cuda0, TWO_GPUS) and not same_device(cuda0, cuda1, TWO_GPUS)
    assert same_device(torch.device("cpu", 0), torch.device("cpu"), TWO_GPUS)
    assert not same_device(torch.device("cpu"), cuda, TWO_GPUS)


def test_the_driver_accepts_a_device_written_with_or_without_an_index():
    """The bug a first GPU run hit: parameters report cuda:0, the run said cuda, and `!=` refused every
    parameter. cpu:0 against parameters on cpu is the same comparison on this machine."""
    model = tiny_llama()
    chunks = partition(param_specs(model), num_chunks=2)
    common = dict(hparams=AdamWHparams(lr=1e-3), schedule=ScheduleSpec("constant", 0, 5))
    common["rotation"] = RotationSpec("bottom-up")
    ChunkFT(model, chunks, device=torch.device("cpu", 0), **common).close()
    with pytest.raises(ValueError, match="is on cpu, not cuda:1; move the model"):
        ChunkFT(model, chunks, device="cuda", cuda=TWO_GPUS, **common)


# ----- the allocator -------------------------------------------------------------------------------------


class FakeAllocator:
    """torch.cuda's four peak functions over bytes the test allocates and frees."""

    def __init__(self) -> None:
        self.now = self.peak = 0

    def alloc(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)

    def free(self, n: int) -> None:
        self.now -= n

    def reset_peak_memory_stats(self, device) -> None:
        self.peak = self.now

    def max_memory_allocated(self, device) -> int:
        return self.peak

    def max_memory_reserved(self, device) -> int:
        return self.peak + 10


def test_the_cuda_peak_covers_the_training_steps_and_keeps_other_peaks_apart():
    fake, gpu = FakeAllocator(), torch.device("cuda", 0)
    peak = CudaPeak(gpu, allocator=fake)
    fake.alloc(500)  # model build and a warm-up step before the span: not the steps' peak
    fake.free(400)
    peak.start()
    fake.alloc(50)  # a step
    fake.free(50)
    with peak.phase("evaluation"):
        fake.alloc(70)
        fake.free(70)
    with peak.phase("forward"):
        fake.alloc(30)  # another step, after the evaluation
    fake.free(30)
    with peak.phase("checkpoint"):
        fake.alloc(200)
        fake.free(200)
    peak.stop()
    with peak.phase("export"):
        fake.alloc(300)
        fake.free(300)
    fake.alloc(1000)  # after everything: counted nowhere
    m = peak.result()
    assert m.peak_bytes == 150 and m.reserved_bytes == 160
    assert dict(m.phase_peaks) == {"evaluation": 170, "checkpoint": 300, "export": 400}


def test_the_plans_allocator_settings_apply_unless_the_user_chose_others():
    applied: list[str] = []
    env: dict[str, str] = {}
    gpu, conf = torch.device("cuda", 0), "expandable_segments:True"
    assert configure_allocator(conf, gpu, io.StringIO(), environ=env, apply=applied.append)
    assert applied == [conf] and env["PYTORCH_CUDA_ALLOC_CONF"] == conf
    log, env = io.StringIO(), {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}
    assert not configure_allocator(conf, gpu, log, environ=env, apply=applied.append)
    assert len(applied) == 1 and "keeping yours" in log.getvalue()
    assert not configure_allocator("", gpu, io.StringIO(), environ={}, apply=applied.append)
    assert not configure_allocator(conf, torch.device("cpu"), io.StringIO(), environ={}, apply=applied.append)


# ----- host memory ---------------------------------------------------------------------------------------


def _cpu_plan(tmp: Path, *extra: str, name: str = "plan") -> Path:
    from chunkft.planner.cli import main as plan_main

    path = tmp / f"{name}.json"
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "2",
            "--chunks", "4", "--lr", "2e-3", "--schedule", "constant", "--checkpointing", "none",
            *extra, "-o", str(path)]  # fmt: skip
    res = CliRunner().invoke(plan_main, args)
    assert res.exit_code == 0, res.output
    return path


@pytest.fixture(scope="module")
def bf16_plan(tmp_path_factory) -> Path:
    """K=4, two steps per visit, 17 steps: every window is written back and fetched again."""
    return _cpu_plan(
        tmp_path_factory.mktemp("plan"), "--dtype", "bf16", "--update-interval", "2", "--steps", "17",
        "--checkpoint-every", "6", "--eval-every", "8",
    )  # fmt: skip


@pytest.fixture(scope="module")
def rotation_plan(tmp_path_factory) -> Path:
    """bf16_plan without evaluations (the stand-in runs compare training, five times over)."""
    return _cpu_plan(
        tmp_path_factory.mktemp("plan"), "--dtype", "bf16", "--update-interval", "2", "--steps", "17",
        "--checkpoint-every", "6",
    )  # fmt: skip


def test_host_memory_is_checked_before_pinning_with_the_numbers_and_the_command(bf16_plan):
    plan = load_plan(bf16_plan)
    need, gpu = plan.predictions.host_peak_bytes, torch.device("cuda", 0)
    assert need > plan.predictions.host_bytes  # a checkpoint adds the state slot in flight
    check_host_memory(plan, need, gpu, Path("plan.json"))  # exactly enough
    with pytest.raises(RunError) as e:
        check_host_memory(plan, need - 1, gpu, Path("plan.json"))
    msg = str(e.value)
    assert "GiB of optimizer states in host memory" in msg and "available" in msg
    assert "chunkft-plan tiny-llama" in msg and f"--host-mem {(need - 1) // 2**20}MiB" in msg
    weights = plan.model.num_params * 2  # bf16: on the CPU the model lives in host memory too
    with pytest.raises(RunError, match=r"on the CPU, [0-9.]+ GiB of weights"):
        check_host_memory(plan, need + weights - 1, torch.device("cpu"), Path("plan.json"))
    check_host_memory(plan, need + weights, torch.device("cpu"), Path("plan.json"))


# ----- chunkft-run's own loop on stand-in streams --------------------------------------------------------


def _run(plan: Path, out: Path, **kw) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    result = train(RunOptions(plan, SHAKESPEARE, out, progress=False, **kw), log=io.StringIO())
    return json.loads(result.run_json.read_text()), load_file(result.model_dir / "model.safetensors")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data")
def test_chunkft_run_on_stand_in_streams_equals_the_synchronous_run(rotation_plan, tmp_path):
    ref_doc, ref_weights = _run(rotation_plan, tmp_path / "sync")
    assert ref_doc["steps"] == 17
    for name in ("late", "early"):
        doc, weights = _run(rotation_plan, tmp_path / name, streams=name)
        assert doc["losses"] == ref_doc["losses"], name
        assert weights.keys() == ref_weights.keys()
        assert all(torch.equal(weights[k], ref_weights[k]) for k in weights), name
    # resumed from the step-12 checkpoint on late streams: the same again
    resumed = tmp_path / "resumed"
    _run(rotation_plan, resumed, streams="late", max_steps=12)
    doc, weights = _run(rotation_plan, resumed, streams="late", resume=True)
    assert doc["losses"]["train"] == ref_doc["losses"]["train"]
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)


def test_stand_in_streams_are_refused_off_the_cpu_and_by_unknown_name(bf16_plan, tmp_path):
    with pytest.raises(RunError, match="unknown"):
        train(RunOptions(bf16_plan, SHAKESPEARE, tmp_path / "x", streams="lazy", device="cpu"), io.StringIO())


# ----- evaluation after the final save -------------------------------------------------------------------


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data")
def test_the_final_save_comes_first_and_an_evaluation_oom_keeps_every_weight(
    bf16_plan, tmp_path, monkeypatch
):
    import chunkft.executor.train as train_module
    seen: list[tuple[int, bool]] = []
    real = train_module.evaluate

    def evaluate(model, data, batch_size, *args, **kw):
        final_saved = (tmp_path / "out" / "checkpoints" / "step-000017").is_dir()
        seen.append((batch_size, final_saved))
        if len(seen) == 4:  # steps 0, 8, 16, then the final one
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, data, batch_size, *args, **kw)

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    plan = load_plan(bf16_plan)
    log = io.StringIO()
    result = train(RunOptions(bf16_plan, SHAKESPEARE, tmp_path / "out", progress=False), log=log)
    assert [b for b, _ in seen] == [plan.run.micro_batch_size] * 4  # micro-batches the plan counts
    assert seen[-1][1], "the final checkpoint must exist before the final evaluation"
    assert result.steps == 17 and (result.model_dir / "model.safetensors").is_file()
    assert "evaluation at step 17 ran out of GPU memory" in log.getvalue()
    lines = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 17, "eval_error": "out of memory"} in lines


# ----- weight decay --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["window", "compensated"])
def test_compensated_weight_decay_decays_like_dense_adamw_over_a_rotation(mode):
    """Zero gradients isolate the decay: after one rotation of K steps dense AdamW has multiplied every
    weight by (1 - lr*wd)**K; "compensated" ChunkFT does the same, "window" once per window only."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 3))
    dense = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 3))
    dense.load_state_dict(ours.state_dict())
    k, lr, wd = 4, 0.1, 0.5
    driver = ChunkFT(
        ours,
        partition(param_specs(ours), num_chunks=k),
        hparams=AdamWHparams(lr=lr, weight_decay=wd),
        schedule=ScheduleSpec("constant", 0, k),
        rotation=RotationSpec("bottom-up"),
        weight_decay_mode=mode,
    )
    opt = torch.optim.AdamW(dense.parameters(), lr=lr, weight_decay=wd)
    x = torch.randn(2, 6)
    for _ in range(k):
        driver.backward(ours(x).sum() * 0.0)
        driver.step()
        (dense(x).sum() * 0.0).backward()
        opt.step()
        opt.zero_grad()
    driver.close()
    pairs = zip(ours.parameters(), dense.parameters(), strict=True)
    close = all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in pairs)
    assert close == (mode == "compensated")
    with pytest.raises(ValueError, match="weight_decay_mode 'dense'"):
        ChunkFT(ours, partition(param_specs(ours), num_chunks=k), hparams=AdamWHparams(lr=lr),
                schedule=ScheduleSpec("constant", 0, k), rotation=RotationSpec("bottom-up"),
                weight_decay_mode="dense")  # fmt: skip


# ----- gradient accumulation over padded micro-batches ---------------------------------------------------


@pytest.mark.parametrize("chunk_tokens", [None, 8])
def test_accumulated_padded_micro_batches_give_the_gradient_of_one_big_batch(chunk_tokens):
    """Two micro-batches with 15 and 4 target tokens: each normalised by the step's 19 tokens, their
    gradients add up to the whole batch's; mean/accum (the old way) weights the short one's tokens more."""
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 10), generator=g)
    labels, mask = ids.clone(), torch.ones_like(ids)
    labels[1, 3:], mask[1, 3:] = -100, 0  # the second micro-batch is mostly padding
    whole = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    micro = [{k: v[i : i + 1] for k, v in whole.items()} for i in range(2)]

    def grads(batches: list[tuple[dict, float]]) -> list[torch.Tensor]:
        model.zero_grad()
        for b, scale in batches:
            (causal_lm_loss(model, b, chunk_tokens) * scale).backward()
        return [p.grad.clone() for p in model.parameters()]

    reference = grads([(whole, 1.0)])
    accumulated = grads(step_micro_batches(micro, "causal-lm"))
    for a, b in zip(accumulated, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    old = grads([(b, 0.5) for b in micro])
    assert not all(torch.allclose(a, b, rtol=1e-3) for a, b in zip(old, reference, strict=True))
    assert step_micro_batches(micro[:1], "causal-lm") == [(micro[0], 1.0)]
    assert [s for _, s in step_micro_batches(micro, "sequence-classification")] == [0.5, 0.5]


def test_the_planned_checkpoint_host_bytes_are_what_a_checkpoint_holds(bf16_plan):
    """planner.simulator.checkpoint_host_bytes against the driver's own state_dict in the middle of a
    visit (the active window's slot updated, not written back): the copies it makes beside the host
    stores are the planned bytes less the weight piece in flight (none for a CPU model)."""
    from chunkft.executor.safetensors_stream import PIECE_BYTES
    from chunkft.executor.train import build_driver, build_model
    from chunkft.planner.simulator import checkpoint_host_bytes, setup_and_candidate

    plan = load_plan(bf16_plan)
    assert plan.rotation.update_interval == 2
    setup, cand, _ = setup_and_candidate(plan)
    in_flight = min(max(s.numel * 2 for s in plan.chunk_table.params), PIECE_BYTES)  # bf16 weights
    model, _ = build_model(plan, torch.device("cpu"))
    driver = build_driver(model, plan, torch.device("cpu"))
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    copies = []
    for _ in range(3):
        driver.backward(model(input_ids=ids, labels=ids).loss)
        driver.step()
        state = driver.state_dict()["optimizer"]["engine"]
        copies.append(
            sum(t.numel() * t.element_size() for s in state["live_slots"] for t in s["tensors"].values())
        )
    driver.close()
    assert (
        copies[0] > 0 and copies[1] == 0
    )  # mid-visit: the slot is live; after the window change: written back
    largest_window = max(copies)
    assert checkpoint_host_bytes(setup, cand) - in_flight >= largest_window
    assert checkpoint_host_bytes(setup, cand) - in_flight == max(w.numel for w in cand.windows) * 3 * 4
