"""Always-active parameters (issue 14): whole tensors trained every step beside the rotating window,
checked against torch.optim.AdamW and dense autograd on real tiny Hugging Face models (CPU)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from test_optimizer import batches, max_diff, run_driver
from tiny_models import tiny_bert, tiny_llama

from chunkft.chunks import param_specs, partition
from chunkft.executor.chunkft import AdamWHparams, ChunkFT, RotationSpec, ScheduleSpec, SGDHparams
from chunkft.executor.distributed import World
from chunkft.executor.schedule import lr_factor

BERT_ALWAYS = ["bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias",
               "bert.encoder.layer.0.attention.output.LayerNorm.weight"]
LLAMA_ALWAYS = ["model.norm.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"]


def always_for(model: torch.nn.Module) -> list[str]:
    return BERT_ALWAYS if "bert" in type(model).__name__.lower() else LLAMA_ALWAYS


def rest(model: torch.nn.Module, names: list[str], k: int, policy: str = "rows"):
    return partition([s for s in param_specs(model) if s.name not in names], num_chunks=k, policy=policy)


@pytest.mark.parametrize("make", [tiny_llama, tiny_bert], ids=["llama", "bert"])
def test_k1_with_always_active_equals_torch_adamw_over_every_parameter(make):
    """K=1 window + always-active set = one torch AdamW over all parameters: same hparams, one clipping
    norm over everything, the same linear warm-up schedule."""
    ref, model = make(), make()
    names = always_for(model)
    data = batches(16, model)
    hp = AdamWHparams(lr=3e-3, betas=(0.9, 0.99), eps=1e-7, weight_decay=0.1)
    spec = ScheduleSpec("linear", warmup_steps=3, total_steps=16)
    opt = torch.optim.AdamW(ref.parameters(), lr=hp.lr, betas=hp.betas, eps=hp.eps, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(spec, s))
    norms = []
    for b in data:
        ref(**b).loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    driver = ChunkFT(model, rest(model, names, 1), hparams=hp, schedule=spec,
                     rotation=RotationSpec("bottom-up"), max_grad_norm=0.05, always_active=names)
    stats = run_driver(driver, model, data)
    driver.close()
    assert [s.grad_norm for s in stats] == pytest.approx(norms, rel=1e-5)  # one norm over window + always
    assert max_diff(model, ref) <= 1e-5
    assert max_diff(model, make()) > 1e-3


@pytest.mark.parametrize("hp", [AdamWHparams(lr=1e-2, weight_decay=0.05), SGDHparams(lr=0.05, momentum=0.9)],
                         ids=["adamw", "sgd"])
def test_k_windows_plus_always_active_equal_torch_optimizers_taking_turns(hp):
    """K=3 whole-tensor windows: each window is its own torch optimizer taking turns (the plain ChunkFT
    reference), the always-active tensors one more torch optimizer stepping on every step; the clip norm is
    over the window's and the always-active gradients together."""
    ref, model = tiny_llama(), tiny_llama()
    names = LLAMA_ALWAYS
    chunks = rest(model, names, 3, policy="whole")
    spec = ScheduleSpec("cosine", warmup_steps=2, total_steps=14)
    rot = RotationSpec("random", update_interval=2, seed=3)
    data = batches(14, model)
    driver = ChunkFT(model, chunks, hparams=hp, schedule=spec, rotation=rot, max_grad_norm=1.0,
                     always_active=names)
    stats = run_driver(driver, model, data)
    driver.close()
    visited = [s.chunk for s in stats]
    assert len(set(visited)) == 3
    assert any(s.grad_norm > 1.0 for s in stats)  # clipping was exercised

    named = dict(ref.named_parameters())

    def make_opt(params):
        if isinstance(hp, AdamWHparams):
            return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum)

    opts = [make_opt([named[s.name] for s in c.slices]) for c in chunks]
    always_opt = make_opt([named[n] for n in names])
    for step, k in enumerate(visited):
        lr = hp.lr * lr_factor(spec, step)
        for p in ref.parameters():
            p.requires_grad_(False)
        trained = [named[s.name] for s in chunks[k].slices] + [named[n] for n in names]
        for p in trained:
            p.requires_grad_(True)
        ref(**data[step]).loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        for o in (opts[k], always_opt):
            for g in o.param_groups:
                g["lr"] = lr
            o.step()
            o.zero_grad(set_to_none=True)
    assert max_diff(model, ref) <= 1e-5
    for n in names:  # the always-active tensors trained on every step
        assert not torch.equal(dict(model.named_parameters())[n], dict(tiny_llama().named_parameters())[n])


def test_always_active_bias_of_a_row_cut_linear_gets_the_dense_gradient():
    """A window that cuts a Linear's weight by rows patches that module's forward; the bias beside it,
    always-active, must still get autograd's whole gradient (not be dropped by the sliced Function)."""
    model = tiny_bert()
    dense = copy.deepcopy(model)
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    chunks = rest(model, biases, 5)
    params = dict(model.named_parameters())
    cut = [s.name for c in chunks for s in c.slices if s.num_rows < params[s.name].shape[0]]
    beside = [n.removesuffix("weight") + "bias" for n in cut]
    assert any(n in params for n in beside), "the partition must cut a weight beside an always-active bias"
    driver = ChunkFT(model, chunks, hparams=AdamWHparams(lr=1e-3), schedule=ScheduleSpec("constant", 0, 50),
                     rotation=RotationSpec("bottom-up"), always_active=biases)
    (b,) = batches(1, model)
    dense(**b).loss.backward()
    ref = {n: p.grad for n, p in dense.named_parameters()}
    for _ in range(5):  # every window in turn
        if any(s.num_rows < params[s.name].shape[0] for s in driver.active_chunk.slices):
            driver.backward(model(**b).loss)
            got = driver._always.grads()
            assert set(got) == set(biases)
            for n in biases:
                torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)
            assert all(p.grad is None for p in model.parameters())
        driver.discard_grads()
        driver._rotation.advance()  # walk the windows without updating anything
        driver._activate(driver._rotation.current())
    driver.close()


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_resume_mid_run_with_always_active_equals_the_uninterrupted_run(weights):
    """state_dict round trip (torch.save / weights_only load) after 5 of 11 steps, mid-visit; bf16 weights
    keep an fp32 master of each always-active tensor, which must travel too."""
    names = LLAMA_ALWAYS
    kw = dict(hparams=AdamWHparams(lr=1e-2, weight_decay=0.01), schedule=ScheduleSpec("linear", 2, 11),
              rotation=RotationSpec("random", update_interval=2, seed=1), max_grad_norm=0.5,
              always_active=names)
    data = batches(11, tiny_llama())
    straight = tiny_llama(weights)
    d = ChunkFT(straight, rest(straight, names, 3), **kw)
    run_driver(d, straight, data)

    first = tiny_llama(weights)
    d1 = ChunkFT(first, rest(first, names, 3), **kw)
    run_driver(d1, first, data[:5])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "driver": d1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["driver"]["always_active"]["names"] == names
    second = tiny_llama(weights)
    second.load_state_dict(saved["model"])
    d2 = ChunkFT(second, rest(second, names, 3), **kw)
    d2.load_state_dict(saved["driver"])
    run_driver(d2, second, data[5:])
    assert max_diff(second, straight) == 0.0


def test_always_active_stay_trainable_hold_no_grad_and_close_restores_flags():
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)  # a flag close() must give back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    names = LLAMA_ALWAYS
    driver = ChunkFT(model, rest(model, names, 4), hparams=AdamWHparams(lr=1e-2),
                     schedule=ScheduleSpec("constant", 0, 8), rotation=RotationSpec("bottom-up"),
                     always_active=names)
    params = dict(model.named_parameters())
    for b in batches(8, model):  # two full cycles: every activation re-enables them
        assert all(params[n].requires_grad for n in names)
        driver.backward(model(**b).loss)
        assert all(p.grad is None for p in model.parameters())
        driver.step()
    assert driver.always_active == tuple(names)
    assert driver.always_active_bytes() == 8 * sum(params[n].numel() for n in names)
    driver.close()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_bad_always_active_is_refused_in_one_line():
    model = tiny_llama()
    base = dict(hparams=AdamWHparams(lr=1e-2), schedule=ScheduleSpec("constant", 0, 8),
                rotation=RotationSpec("bottom-up"))
    every = partition(param_specs(model), num_chunks=2)
    cases = [
        (every, ["lm_head.weight"], ValueError, r"'lm_head.weight', which is also in chunk 1; partition"),
        (rest(model, ["nope"], 2), ["nope"], ValueError, r"'nope', which is not a parameter of the model"),
        (rest(model, LLAMA_ALWAYS, 2), LLAMA_ALWAYS + ["model.norm.weight"], ValueError, "twice"),
        (rest(model, ["lm_head.weight"], 2), "lm_head.weight", TypeError, "not one string"),
    ]
    for chunks, names, err, match in cases:
        with pytest.raises(err, match=match) as e:
            ChunkFT(model, chunks, always_active=names, **base)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not supported under data parallel yet") as e:
        ChunkFT(model, rest(model, LLAMA_ALWAYS, 2), always_active=LLAMA_ALWAYS, world=World(0, 2), **base)
    with pytest.raises(ValueError, match="start_chunk 9 is not a chunk index"):
        ChunkFT(model, rest(model, LLAMA_ALWAYS, 2), always_active=LLAMA_ALWAYS, start_chunk=9, **base)
    assert all(p.requires_grad for p in model.parameters())  # nothing half-done: flags and no hooks left
    (b,) = batches(1, model)
    model(**b).loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # a leftover hook would have taken them
    model.zero_grad(set_to_none=True)

    # a state saved with other always-active names is refused
    d = ChunkFT(model, rest(model, LLAMA_ALWAYS, 2), always_active=LLAMA_ALWAYS, **base)
    state = d.state_dict()
    d.close()
    other = ChunkFT(model, rest(model, LLAMA_ALWAYS, 2), always_active=LLAMA_ALWAYS[::-1], **base)
    with pytest.raises(ValueError, match="resume with the same always_active names"):
        other.load_state_dict(state)
    other.close()


def test_sharded_state_dict_on_one_rank_carries_the_always_active_states():
    """chunkft-run checkpoints through sharded_state_dict(): the always-active states travel in its small
    part (plain tensors), so a resume from it equals the uninterrupted run too."""
    names = LLAMA_ALWAYS
    kw = dict(hparams=AdamWHparams(lr=1e-2), schedule=ScheduleSpec("constant", 0, 10),
              rotation=RotationSpec("bottom-up", update_interval=3), always_active=names)
    data = batches(10, tiny_llama())
    straight = tiny_llama()
    run_driver(ChunkFT(straight, rest(straight, names, 3), **kw), straight, data)

    first = tiny_llama()
    d1 = ChunkFT(first, rest(first, names, 3), **kw)
    run_driver(d1, first, data[:4])
    small, shards = d1.sharded_state_dict()
    saved = {k: v.local.clone() for k, v in shards.items()}
    small = copy.deepcopy(small)
    weights = copy.deepcopy(first.state_dict())
    run_driver(d1, first, data[4:6])  # the first driver moves on: the saved copies must not alias it

    def read(targets):
        for k, t in targets.items():
            t.local.copy_(saved[k])

    second = tiny_llama()
    second.load_state_dict(weights)
    d2 = ChunkFT(second, rest(second, names, 3), **kw)
    d2.load_state_dict(small, read=read)
    run_driver(d2, second, data[4:])
    assert max_diff(second, straight) == 0.0
