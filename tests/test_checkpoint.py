"""Checkpoints: atomic under SIGKILL, verified on load, refused for another model or plan, pruned to 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from executor.checkpoint import (
    CheckpointError,
    CheckpointMeta,
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
    from executor.checkpoint import CheckpointMeta, rng_state, save_checkpoint
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
