"""LR schedules (pure functions of the optimizer step) and the window rotation (resumable position)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT
from chunkft.executor.rotation import Rotation, RotationSpec, cycle_order
from chunkft.executor.schedule import ScheduleSpec, lr_at, lr_factor

# ----- schedules ----------------------------------------------------------------------------------------


def test_schedule_shapes():
    const = ScheduleSpec("constant", warmup_steps=4, total_steps=10)
    assert [lr_factor(const, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    lin = ScheduleSpec("linear", warmup_steps=2, total_steps=12, min_lr_ratio=0.1)
    assert lr_factor(lin, 0) == 0.5 and lr_factor(lin, 1) == 1.0 and lr_factor(lin, 2) == 1.0
    assert lr_factor(lin, 7) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(lin, 12) == pytest.approx(0.1) and lr_factor(lin, 50) == pytest.approx(0.1)
    cos = ScheduleSpec("cosine", warmup_steps=0, total_steps=10)
    assert lr_factor(cos, 0) == 1.0
    assert lr_factor(cos, 5) == pytest.approx(0.5)
    assert lr_factor(cos, 10) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(ScheduleSpec("cosine", 0, 8, 0.2), 2) == pytest.approx(
        0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert lr_factor(ScheduleSpec("linear", 5, 5), 5) == 0.0  # all warmup, then the floor
    assert lr_at(lin, 3e-4, 2) == 3e-4


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
@pytest.mark.parametrize(("warmup", "total"), [(0, 5), (1, 5), (4, 10), (5, 5)])
def test_no_step_of_the_schedule_trains_at_lr_0(kind, warmup, total):
    """Warm-up step i uses (i+1)/warmup (Hugging Face's i/warmup wastes step 0 at lr 0), and the decay's
    last step is still above the floor: every step up to total_steps moves the weights."""
    spec = ScheduleSpec(kind, warmup_steps=warmup, total_steps=total)
    factors = [lr_factor(spec, s) for s in range(total)]
    assert all(f > 0 for f in factors), factors
    if warmup:
        assert factors[0] == 1 / warmup and factors[warmup - 1] == 1.0


def test_schedule_drives_torch_lambda_lr_identically():
    spec = ScheduleSpec("cosine", warmup_steps=3, total_steps=20, min_lr_ratio=0.05)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
    seen = []
    for _ in range(25):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [lr_at(spec, 0.1, s) for s in range(25)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kind="step", warmup_steps=0, total_steps=5), "unknown"),
        (dict(kind="linear", warmup_steps=0, total_steps=0), "total_steps"),
        (dict(kind="linear", warmup_steps=6, total_steps=5), "warmup_steps"),
        (dict(kind="cosine", warmup_steps=0, total_steps=5, min_lr_ratio=1.5), "min_lr_ratio"),
    ],
)
def test_schedule_rejects_bad_specs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleSpec(**kwargs)


def test_schedule_advances_every_optimizer_step_not_every_cycle():
    """The reference advanced once per K steps: its linear decay ended near lr*(1-1/K). Here, after
    total_steps optimizer steps the decay has fully run, whatever K is."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(cfg)
    spec = ScheduleSpec("linear", warmup_steps=2, total_steps=8)
    d = ChunkFT(
        model,
        partition(param_specs(model), num_chunks=4),
        hparams=AdamWHparams(lr=1.0),
        schedule=spec,
        rotation=RotationSpec("bottom-up"),
    )
    ids = torch.randint(0, 32, (1, 8), generator=torch.Generator().manual_seed(0))
    lrs = []
    for _ in range(8):
        d.backward(model(input_ids=ids, labels=ids).loss)
        lrs.append(d.step().lr)
    assert lrs == [lr_factor(spec, s) for s in range(8)]
    assert lrs[2] == 1.0 and d.lr() == 0.0 and d.schedule_step == 8
    d.close()


# ----- rotation -----------------------------------------------------------------------------------------


def visits(rot: Rotation, n: int) -> list[int]:
    out = []
    for _ in range(n):
        out.append(rot.current())
        rot.advance()
    return out


def test_deterministic_orders_and_update_interval():
    assert visits(Rotation(RotationSpec("bottom-up"), 3), 7) == [0, 1, 2, 0, 1, 2, 0]
    assert visits(Rotation(RotationSpec("top-down"), 3), 4) == [2, 1, 0, 2]
    assert visits(Rotation(RotationSpec("bottom-up", update_interval=3), 2), 8) == [0, 0, 0, 1, 1, 1, 0, 0]
    assert visits(Rotation(RotationSpec("top-down"), 1), 3) == [0, 0, 0]


def test_random_order_is_a_fresh_seeded_permutation_per_cycle():
    k = 7
    spec = RotationSpec("random", seed=11)
    seq = visits(Rotation(spec, k), 4 * k)
    cycles = [seq[i : i + k] for i in range(0, 4 * k, k)]
    assert all(sorted(c) == list(range(k)) for c in cycles)
    assert len({tuple(c) for c in cycles}) > 1  # not the same permutation every cycle
    assert cycles[2] == list(cycle_order(spec, k, 2))  # a function of (seed, cycle) alone
    assert visits(Rotation(spec, k), 4 * k) == seq  # reproducible
    assert visits(Rotation(RotationSpec("random", seed=12), k), 4 * k) != seq


@pytest.mark.parametrize("order", ["bottom-up", "top-down", "random"])
def test_upcoming_is_the_next_different_window(order):
    rot = Rotation(RotationSpec(order, update_interval=2, seed=3), 3)
    for _ in range(40):
        predicted, now = rot.upcoming(), rot.current()
        while rot.current() == now:
            rot.advance()
        assert rot.current() == predicted
    assert Rotation(RotationSpec(order), 1).upcoming() is None


def test_rotation_position_is_the_whole_resumable_state():
    spec = RotationSpec("random", update_interval=2, seed=4)
    rot = Rotation(spec, 5)
    visits(rot, 13)  # mid-cycle and mid-window
    state = rot.state_dict()
    assert state == {"cycle": 1, "position": 1, "steps_in_window": 1}
    resumed = Rotation(spec, 5)
    resumed.load_state_dict(state)
    assert visits(resumed, 30) == visits(rot, 30)
    with pytest.raises(ValueError, match="does not fit"):
        Rotation(spec, 3).load_state_dict({"cycle": 0, "position": 4, "steps_in_window": 0})
    with pytest.raises(ValueError, match="update_interval"):
        Rotation(RotationSpec("random", seed=4), 5).load_state_dict(state)


def test_rotation_rejects_bad_specs():
    with pytest.raises(ValueError, match="unknown"):
        RotationSpec("sideways")
    with pytest.raises(ValueError, match="update_interval"):
        RotationSpec("bottom-up", update_interval=0)
