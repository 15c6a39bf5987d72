"""The driver's API for users' own loops (issue 14): the optimizer face under torch LR schedulers, the
warning when a run never reaches some windows, and the starting window. Real tiny HF models, CPU."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from test_optimizer import batches, max_diff, run_driver
from tiny_models import tiny_bert, tiny_llama

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec
from chunkft.executor.optimizer_face import ChunkFTOptimizer
from chunkft.executor.schedule import lr_factor

HP = AdamWHparams(lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
CONSTANT = ScheduleSpec("constant", 0, 40)


def driver_for(model, k, *, schedule=CONSTANT, rotation=None, **kw) -> ChunkFT:
    return ChunkFT(model, partition(param_specs(model), num_chunks=k), hparams=HP, schedule=schedule,
                   rotation=rotation or RotationSpec("bottom-up", update_interval=2), **kw)


def trainer_loop(model, opt, sched, data, clip=None) -> None:
    """What Trainer-style loops do: backward, (clip), optimizer.step, scheduler.step, zero_grad."""
    for b in data:
        model(**b).loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


# ----- the optimizer face -------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_k1_face_under_cosine_annealing_equals_torch_adamw_under_it(make):
    ref, model = make(), make()
    data = batches(12, model)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=HP.lr, betas=HP.betas, eps=HP.eps, weight_decay=0.1)
    trainer_loop(ref, opt_ref, torch.optim.lr_scheduler.CosineAnnealingLR(opt_ref, T_max=12, eta_min=1e-4),
                 data, clip=0.05)

    always = ["classifier.weight", "classifier.bias"] if make is tiny_bert else []  # in the group too
    chunks = partition([s for s in param_specs(model) if s.name not in always], num_chunks=1)
    driver = ChunkFT(model, chunks, hparams=HP, schedule=CONSTANT, rotation=RotationSpec("bottom-up"),
                     max_grad_norm=0.05, always_active=always)
    opt = ChunkFTOptimizer(driver)
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12, eta_min=1e-4)
    trainer_loop(model, opt, sched, data)  # clipping is the driver's (no .grad for clip_grad_norm_)
    assert opt.param_groups[0]["initial_lr"] == HP.lr
    assert opt.param_groups[0]["lr"] == opt_ref.param_groups[0]["lr"]
    assert max_diff(model, ref) <= 1e-5
    assert max_diff(model, make()) > 1e-3


def test_lambda_lr_through_the_face_equals_the_drivers_built_in_schedule_bit_for_bit():
    spec = ScheduleSpec("linear", warmup_steps=3, total_steps=14)
    data = batches(14, tiny_llama())
    built_in = tiny_llama()
    d = driver_for(built_in, 3, schedule=spec)
    lrs = [s.lr for s in run_driver(d, built_in, data)]

    model = tiny_llama()
    opt = ChunkFTOptimizer(driver_for(model, 3))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
    seen = []
    for b in data:
        model(**b).loss.backward()
        opt.step()
        seen.append(opt.last_stats.lr)
        sched.step()
        opt.zero_grad()
    assert seen == lrs
    assert max_diff(model, built_in) == 0.0


def test_face_resume_with_its_scheduler_equals_the_uninterrupted_run():
    data = batches(12, tiny_llama())

    def fresh():
        model = tiny_llama()
        rot = RotationSpec("random", update_interval=2, seed=4)
        opt = ChunkFTOptimizer(driver_for(model, 3, rotation=rot))
        return model, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=12)

    straight, opt, sched = fresh()
    trainer_loop(straight, opt, sched, data)

    first, opt1, sched1 = fresh()
    trainer_loop(first, opt1, sched1, data[:5])  # mid-visit
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "sched": sched1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    second, opt2, sched2 = fresh()
    second.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.param_groups[0]["lr"] == opt1.param_groups[0]["lr"]
    trainer_loop(second, opt2, sched2, data[5:])
    assert max_diff(second, straight) == 0.0


def test_face_closure_zero_grad_and_refusals():
    model = tiny_llama()
    twin = copy.deepcopy(model)
    (b,) = batches(1, model)
    opt = ChunkFTOptimizer(driver_for(model, 2))

    def closure():
        loss = model(**b).loss
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert math.isclose(float(loss.detach()), float(twin(**b).loss.detach()), rel_tol=1e-6)
    assert opt.last_stats.chunk == 0 and not opt.last_stats.skipped
    model(**b).loss.backward()
    opt.zero_grad()  # the accumulated gradient is dropped: the next step sees only the next backward
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))  # no gradient
    with pytest.raises(ValueError, match="one param group"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(ValueError, match=r"already schedules the learning rate \(linear, 2 warm-up steps\)"):
        ChunkFTOptimizer(driver_for(tiny_llama(), 2, schedule=ScheduleSpec("linear", 2, 10)))
    with pytest.raises(ValueError, match="must be a number >= 0"):
        opt.driver.step(lr=-1.0)


# ----- windows a run would never reach ------------------------------------------------------------------


def test_warns_when_update_interval_times_k_exceeds_the_run():
    """The issue's case: K=8 at 10 steps per visit in a 60-step run never trains the last windows."""
    model = tiny_llama()
    with pytest.warns(UserWarning) as rec:
        d = driver_for(model, 8, schedule=ScheduleSpec("cosine", 5, 60),
                       rotation=RotationSpec("bottom-up", 10))
    d.close()
    (w,) = rec
    msg = str(w.message)
    assert msg.startswith("ChunkFT: 60 steps at 10 steps per visit reach 6 of 8 windows; window(s) 6, 7 "
                          "would never be trained (parameters never trained: ")
    assert "lm_head.weight" in msg and "model.norm.weight" in msg
    assert msg.endswith("; use update_interval <= 8, fewer chunks, or more steps (schedule total_steps)")
    assert "\n" not in msg

    # top-down never reaches the embedding; a run shorter than K cannot be fixed by the interval
    short = r"reach 3 of 4 windows; window\(s\) 0 .*embed_tokens.*use fewer chunks"
    with pytest.warns(UserWarning, match=short):
        driver_for(tiny_llama(), 4, schedule=ScheduleSpec("constant", 0, 3),
                   rotation=RotationSpec("top-down", 1)).close()
    # every window reached: silent (ui=8 gives 8 visits in 60 steps, the last one 4 steps long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        driver_for(tiny_llama(), 8, schedule=ScheduleSpec("cosine", 5, 60),
                   rotation=RotationSpec("bottom-up", 8))


# ----- the starting window ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("order", "start", "expected"),
    [
        ("bottom-up", 2, [2, 2, 3, 3, 0, 0, 1, 1, 2]),
        ("top-down", 1, [1, 1, 0, 0, 3, 3, 2, 2, 1]),
        ("bottom-up", None, [0, 0, 1, 1, 2, 2, 3, 3, 0]),
        ("top-down", None, [3, 3, 2, 2, 1, 1, 0, 0, 3]),
    ],
)
def test_start_chunk_is_the_first_window_and_the_rotation_continues_from_it(order, start, expected):
    model = tiny_llama()
    d = driver_for(model, 4, rotation=RotationSpec(order, update_interval=2), start_chunk=start)
    assert [s.chunk for s in run_driver(d, model, batches(9, model))] == expected


def test_random_start_chunk_resume_and_bad_values():
    model = tiny_llama()
    rot = RotationSpec("random", update_interval=1, seed=7)
    d = driver_for(model, 4, rotation=rot, start_chunk=3)
    visited = [s.chunk for s in run_driver(d, model, batches(6, model))]
    assert visited[0] == 3
    state = d.state_dict()
    d.close()
    # a resumed driver continues from the saved position, whatever start_chunk it is built with
    d2 = driver_for(model, 4, rotation=rot, start_chunk=0)
    d2.load_state_dict(state)
    assert d2.active_chunk.index == d._rotation.current()
    d2.close()
    for bad, err in [(4, ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError)]:
        with pytest.raises(err, match="start_chunk") as e:
            driver_for(tiny_llama(), 4, start_chunk=bad)
        assert "\n" not in str(e.value)
