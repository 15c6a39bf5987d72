"""Checkpoints: atomic under SIGKILL, verified on load, refused for another model or plan, pruned to 2."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_model
from tiny_models import tiny_bert, tiny_llama
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chunkft.executor.checkpoint import (
    CheckpointDiskFull,
    CheckpointError,
    CheckpointMeta,
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

REPO = Path(__file__).parents[1]


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50))
    m[1].weight = m[0].weight  # tied, as in many language models: stored once
    return m


def _meta(step: int, fp: str = "fp-a", plan: str = "plan-a") -> CheckpointMeta:
    return CheckpointMeta(
        step=step, model_fingerprint=fp, plan_sha256=plan, data_epoch=1, data_index=step * 4
    )


def test_round_trip_restores_weights_trainer_state_and_rng(tmp_path: Path) -> None:
    src = _model(0)
    trainer = {"driver": {"states": [torch.arange(5.0)], "step": 3}, "rng": rng_state()}
    expected_draw = torch.rand(3)
    path = save_checkpoint(tmp_path, _meta(3), src, trainer)
    assert path == tmp_path / "checkpoints" / "step-000003"
    assert latest_checkpoint(tmp_path) == path
    dst = _model(1)
    ck = load_checkpoint(path, dst, model_fingerprint="fp-a", plan_sha256="plan-a")
    for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert dst[1].weight is dst[0].weight
    assert ck.meta == _meta(3)
    assert torch.equal(ck.trainer["driver"]["states"][0], torch.arange(5.0))
    set_rng_state(ck.trainer["rng"])
    assert torch.equal(torch.rand(3), expected_draw)


def test_keeps_the_last_two(tmp_path: Path) -> None:
    m = _model(0)
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, _meta(step), m, {"driver": {}, "rng": rng_state()})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-000004", "step-000006"]
    assert latest_checkpoint(tmp_path).name == "step-000006"


def test_refuses_another_model_or_plan(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _meta(1), _model(0), {"driver": {}, "rng": rng_state()})
    with pytest.raises(CheckpointError, match="belongs to another model"):
        load_checkpoint(path, _model(0), model_fingerprint="fp-b", plan_sha256="plan-a")
    with pytest.raises(CheckpointError, match="another plan"):
        load_checkpoint(path, _model(0), model_fingerprint="fp-a", plan_sha256="plan-b")
    with pytest.raises(CheckpointError, match="another plan .*this plan plan-b"):
        load_checkpoint(path, _model(0), model_fingerprint="fp-a", plan_sha256=("plan-b", "plan-c"))
    # a plan's digests (chunkft.plan_format.plan_digests): a checkpoint recording either of them is its own
    load_checkpoint(path, _model(0), model_fingerprint="fp-a", plan_sha256=("plan-b", "plan-a"))
    other = torch.nn.Sequential(torch.nn.Embedding(50, 8), torch.nn.Linear(8, 60))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(path, other, model_fingerprint="fp-a", plan_sha256="plan-a")


def test_corruption_is_detected_with_one_line(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path, _meta(1), _model(0), {"driver": {}, "rng": rng_state()})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the tensor data: the size is right, the digest is not
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as e:
        read_meta(path)
    assert "\n" not in str(e.value)
    (path / "state.json").write_text('{"step": ')
    with pytest.raises(CheckpointError, match="unreadable checkpoint state"):
        read_meta(path)
    (tmp_path / "checkpoints" / "latest").write_text("step-999999\n")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        latest_checkpoint(tmp_path / "elsewhere")


WRITER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from chunkft.executor.checkpoint import CheckpointMeta, rng_state, save_checkpoint
    out = Path(sys.argv[1])
    model = torch.nn.Linear(1024, 2048)  # 8 MiB of weights: a write takes a while
    step = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
        meta = CheckpointMeta(step, model_fingerprint="fp", plan_sha256="p", data_epoch=0, data_index=step)
        save_checkpoint(out, meta, model, {"driver": {"step": step}, "rng": rng_state()})
    """
)


def test_sigkill_mid_write_leaves_a_complete_checkpoint(tmp_path: Path) -> None:
    """A writer saving checkpoints in a loop is killed at several moments; every time, `latest` names a
    checkpoint whose files match their digests and whose weights are those of its own step."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    last_step = 0
    for delay in (0.7, 1.3, 2.1):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path), str(last_step)],
            env=env,
            stdout=subprocess.PIPE,
            cwd=REPO,
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        path = latest_checkpoint(tmp_path)
        meta = read_meta(path)  # raises if any file is partial
        model = torch.nn.Linear(1024, 2048)
        ck = load_checkpoint(path, model, model_fingerprint="fp", plan_sha256="p")
        assert ck.trainer["driver"]["step"] == meta.step
        assert torch.all(model.weight == float(meta.step))
        assert meta.step > last_step, "the writer made no progress; the machine is too loaded for this test"
        last_step = meta.step
    # the next save clears whatever temporary directory the kill left behind
    save_checkpoint(
        tmp_path,
        _meta(last_step + 1, fp="fp", plan="p"),
        torch.nn.Linear(1024, 2048),
        {"driver": {}, "rng": rng_state()},
    )
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if ".tmp-" in p.name]


# ---------------------------------------------------------------------------- streamed weights, export


def test_checkpoint_weights_are_the_file_save_model_wrote(tmp_path: Path) -> None:
    """The streamed model.safetensors holds what safetensors.torch.save_model stored (tied once, same
    names) and records the dropped names the same way, plus format=pt."""
    model = tiny_llama(torch.bfloat16, tied=True)
    path = save_checkpoint(tmp_path, _meta(1), model, {"driver": {}, "rng": rng_state()})
    save_model(model, str(tmp_path / "ref.safetensors"))
    new, ref = load_file(path / "model.safetensors"), load_file(tmp_path / "ref.safetensors")
    assert set(new) == set(ref) and all(torch.equal(new[k], ref[k]) for k in ref)
    with safe_open(path / "model.safetensors", "pt") as a, safe_open(tmp_path / "ref.safetensors", "pt") as b:
        assert a.metadata() == {"format": "pt", **b.metadata()}
    fresh = tiny_llama(torch.bfloat16, tied=True)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    load_checkpoint(path, fresh, model_fingerprint="fp-a", plan_sha256="plan-a")
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight


def test_weights_over_the_file_size_limit_keep_the_previous_checkpoint(tmp_path: Path) -> None:
    """The weights file itself fails mid-stream (EFBIG from RLIMIT_FSIZE; Python ignores SIGXFSZ): the
    partial directory goes, CheckpointDiskFull names the previous checkpoint, which still loads."""
    small = torch.nn.Linear(16, 16)
    first = save_checkpoint(tmp_path, _meta(2), small, {"driver": {}, "rng": rng_state()})
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))  # the 1 MiB weights cannot be written
    try:
        with pytest.raises(CheckpointDiskFull, match="the previous checkpoint step-000002 is intact"):
            save_checkpoint(tmp_path, _meta(4), torch.nn.Linear(512, 512), {"driver": {}, "rng": rng_state()})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert latest_checkpoint(tmp_path) == first
    load_checkpoint(first, torch.nn.Linear(16, 16), model_fingerprint="fp-a", plan_sha256="plan-a")


@pytest.mark.parametrize("kind", ["llama-tied-bf16", "llama", "bert"])
def test_export_is_what_save_pretrained_writes_and_loads_back(tmp_path: Path, kind: str) -> None:
    model = {
        "llama-tied-bf16": lambda: tiny_llama(torch.bfloat16, tied=True),
        "llama": tiny_llama,
        "bert": tiny_bert,
    }[kind]()
    with torch.no_grad():  # trained weights: not what the config's initialisation would give
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(str(tmp_path / "ref"))
    assert export_safetensors(model, tmp_path / "new") == tmp_path / "new"
    new, ref = tmp_path / "new", tmp_path / "ref"
    assert sorted(p.name for p in new.iterdir()) == sorted(p.name for p in ref.iterdir())
    assert (new / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    for name in ("config.json", "generation_config.json"):
        if (ref / name).exists():
            assert json.loads((new / name).read_text()) == json.loads((ref / name).read_text())
    auto = AutoModelForSequenceClassification if kind == "bert" else AutoModelForCausalLM
    loaded = auto.from_pretrained(new)
    assert loaded.dtype == model.dtype
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    if kind == "llama-tied-bf16":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_a_format_1_checkpoint_with_the_states_in_trainer_pt_still_resumes(tmp_path: Path) -> None:
    """chunkft before states/ kept every window's states inside trainer.pt (format 1): it still loads,
    and continues as the run that wrote it does."""
    from dp_workers import CASES, continue_steps, make

    from chunkft.executor.distributed import World

    one = World.single()
    model, driver = make(CASES[0], one)
    continue_steps(model, driver, one, 0, 3)
    path = save_checkpoint(tmp_path, _meta(3), model, {"driver": driver.state_dict()})
    state = json.loads((path / "state.json").read_text())
    assert state["format_version"] == 2 and not (path / "states").exists()
    (path / "state.json").write_text(json.dumps({**state, "format_version": 1}))
    m2, d2 = make(CASES[0], one)
    ck = load_checkpoint(path, m2, model_fingerprint="fp-a", plan_sha256="plan-a")
    d2.load_state_dict(ck.trainer["driver"])
    continue_steps(model, driver, one, 3, 5)
    continue_steps(m2, d2, one, 3, 5)
    for (n, a), b in zip(model.named_parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b), n


def test_the_states_files_are_verified_and_needed(tmp_path: Path) -> None:
    """A states file is hashed like the others (a flipped byte is caught before loading), and a sharded
    driver state cannot be loaded without a reader for it."""
    from dp_workers import CASES, make

    from chunkft.executor.distributed import World

    model, driver = make(CASES[0], World.single())
    small, shards = driver.sharded_state_dict()
    path = save_checkpoint(tmp_path, _meta(1), model, {"driver": small}, shards=shards)
    with pytest.raises(ValueError, match="pass `read` for them"):
        make(CASES[0], World.single())[1].load_state_dict(small)
    f = path / "states" / "__0_0.distcp"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: missing or does not match"):
        read_meta(path)


def test_the_states_reach_dcps_writer_as_aliases_not_copies() -> None:
    """The host stores are views of one block; DCP's writer clones a view of a larger storage (and holds
    the clones until the file closes: a second copy of every state). The planner hands it tensors on the
    same memory whose storage is exactly their bytes, so it has nothing to clone. (RSS, measured in
    BENCHMARKS.md: +1 MiB saving 1 GiB of states, against +1.0 GiB with plain views.)"""
    from chunkft.executor.checkpoint import _AliasingSavePlanner

    block = torch.arange(12.0)
    views = {"a": block[:5], "b": block[5:]}
    planner = _AliasingSavePlanner()
    planner.set_up_planner(views, is_coordinator=True)
    items = planner.create_local_plan().items
    assert {i.index.fqn for i in items} == {"a", "b"}
    for item in items:
        t = planner.resolve_data(item)
        view = views[item.index.fqn]
        assert t.data_ptr() == view.data_ptr() and torch.equal(t, view)  # the same memory
        assert t.untyped_storage().nbytes() == t.nbytes  # nothing for the writer to clone
