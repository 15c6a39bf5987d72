"""Exact sub-tensor gradients (executor/slicegrad.py) against dense autograd on real tiny HF models."""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from chunkft.chunks import Chunk, ParamSlice, param_specs, partition
from chunkft.executor.slicegrad import SliceGradients, UnsupportedModuleError

Loss = Callable[[], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Tiny real models built from config (fp32, CPU, no dropout) and a loss on fixed random inputs


def _causal_lm(cls, cfg, vocab: int, batch: int = 2, seq: int = 8) -> tuple[nn.Module, Loss]:
    torch.manual_seed(0)
    model = cls(cfg).train()
    ids = torch.randint(0, vocab, (batch, seq))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def llama(tied: bool = False, layers: int = 2) -> tuple[nn.Module, Loss]:
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=tied, attn_implementation="eager",
    )  # fmt: skip
    return _causal_lm(LlamaForCausalLM, cfg, 128)


def mistral() -> tuple[nn.Module, Loss]:
    cfg = MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, attn_implementation="eager",
    )  # fmt: skip
    return _causal_lm(MistralForCausalLM, cfg, 96)


def qwen2() -> tuple[nn.Module, Loss]:
    cfg = Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, tie_word_embeddings=True,
        attn_implementation="eager",
    )  # fmt: skip
    return _causal_lm(Qwen2ForCausalLM, cfg, 96)


def gpt2() -> tuple[nn.Module, Loss]:
    cfg = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    return _causal_lm(GPT2LMHeadModel, cfg, 100)


def bert() -> tuple[nn.Module, Loss]:
    cfg = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=100, max_position_embeddings=32, type_vocab_size=2, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg).train()
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones_like(ids)
    ids[0, 6:] = 0  # padding (padding_idx 0 gets no gradient)
    mask[0, 6:] = 0
    ids[2, 8:] = 0
    mask[2, 8:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    labels = torch.tensor([0, 2, 1])
    return model, lambda: model(
        input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels
    ).loss


class Toy(nn.Module):
    """Covers what the HF models do not: scale_grad_by_freq, 2-D LayerNorm shape, 4-D Linear input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 32, padding_idx=3, scale_grad_by_freq=True)
        self.norm = nn.LayerNorm((4, 8))
        self.lin = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids).view(*ids.shape, 4, 8))
        return self.head(torch.tanh(self.lin(h))).square().mean()


def toy() -> tuple[nn.Module, Loss]:
    torch.manual_seed(0)
    model = Toy()
    ids = torch.tensor([[1, 2, 3, 2, 7, 19], [3, 3, 5, 1, 1, 1]])
    return model, lambda: model(ids)


MODELS = {"llama": llama, "llama_tied": lambda: llama(tied=True), "mistral": mistral, "qwen2": qwen2,
          "gpt2": gpt2, "bert": bert, "toy": toy}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Helpers


def bf16_autocast(loss: Loss) -> Loss:
    """The same loss computed under CPU bf16 autocast."""

    def autocast_loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss()

    return autocast_loss


def dense_grads(model: nn.Module, loss: Loss) -> dict[str, torch.Tensor]:
    """Reference: plain autograd with every parameter trainable."""
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    return grads


def random_chunk(model: nn.Module, rng: random.Random, p_take: float, p_cut: float) -> Chunk:
    """A hand-built window: random tensors, each whole or a random proper row range."""
    slices = []
    for name, p in model.named_parameters():
        if rng.random() >= p_take:
            continue
        rows = p.shape[0]
        if rows > 1 and rng.random() < p_cut:
            a = rng.randrange(rows)
            b = rng.randrange(a + 1, rows + 1)
            if (a, b) == (0, rows):
                b -= 1
            slices.append(ParamSlice(name, a, b))
        else:
            slices.append(ParamSlice(name, 0, rows))
    if not slices:
        name, p = next(iter(model.named_parameters()))
        slices.append(ParamSlice(name, 0, p.shape[0]))
    return Chunk(index=0, slices=tuple(slices))


def assert_window_exact(
    sg: SliceGradients, model: nn.Module, chunk: Chunk, loss: Loss, dense: dict[str, torch.Tensor],
    rtol: float = 1e-5, atol: float = 1e-6,
) -> None:  # fmt: skip
    sg.activate(chunk)
    loss().backward()
    assert all(p.grad is None for p in model.parameters()), "a parameter holds .grad after backward"
    grads = sg.window_grads()
    assert set(grads) == {sl.name for sl in chunk.slices}
    for sl in chunk.slices:
        g = grads[sl.name]
        assert g.dtype == torch.float32
        ref = dense[sl.name][sl.row_start : sl.row_end].float()
        torch.testing.assert_close(g, ref, rtol=rtol, atol=atol, msg=lambda m, sl=sl: f"{sl}: {m}")
    sg.deactivate()


def straddled_owners(model: nn.Module, sg: SliceGradients) -> set[str]:
    return {path for path, m in model.named_modules() if "forward" in m.__dict__}


# ----------------------------------------------------------------------------------------------
# Test 1: slice gradients equal dense autograd slices


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_random_windows_match_dense_autograd(kind: str) -> None:
    model, loss = MODELS[kind]()
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    specs = param_specs(model)
    rng = random.Random(kind)  # str seeds are stable across runs
    chunks: list[Chunk] = []
    chunks.extend(partition(specs, num_chunks=rng.randrange(3, 8)))
    chunks.extend(random_chunk(model, rng, p_take=0.5, p_cut=0.5) for _ in range(3))
    chunks.append(random_chunk(model, rng, p_take=1.0, p_cut=1.0))  # every owner sliced at once
    sg.check_supported(chunks)
    straddled_any = False
    for chunk in chunks:
        assert_window_exact(sg, model, chunk, loss, dense)
        straddled_any |= any(0 < sl.row_start or sl.row_end < dict(model.named_parameters())[sl.name].shape[0]
                             for sl in chunk.slices)  # fmt: skip
    assert straddled_any


def test_every_module_kind_is_sliced_and_exact() -> None:
    """One window straddling every tensor of each model: all five sliced kinds run, all exact."""
    seen: set[str] = set()
    for kind in ("llama_tied", "gpt2", "bert", "toy"):
        model, loss = MODELS[kind]()
        dense = dense_grads(model, loss)
        sg = SliceGradients(model)
        chunk = random_chunk(model, random.Random(7), p_take=1.0, p_cut=1.0)
        sg.activate(chunk)
        seen |= {type(m).__name__ for m in model.modules() if "forward" in m.__dict__}
        sg.deactivate()
        assert_window_exact(sg, model, chunk, loss, dense)
    assert {"Linear", "Embedding", "LayerNorm", "LlamaRMSNorm", "Conv1D"} <= seen


def test_tied_embedding_and_head_both_sliced() -> None:
    for make, emb, head in ((lambda: llama(tied=True), "model.embed_tokens", "lm_head"),
                            (gpt2, "transformer.wte", "lm_head")):  # fmt: skip
        model, loss = make()
        assert model.get_submodule(emb).weight is model.get_submodule(head).weight
        dense = dense_grads(model, loss)
        sg = SliceGradients(model)
        name = f"{emb}.weight"
        chunk = Chunk(0, (ParamSlice(name, 5, 77),))
        sg.activate(chunk)
        assert straddled_owners(model, sg) == {emb, head}
        sg.deactivate()
        assert_window_exact(sg, model, chunk, loss, dense)
        # whole tied tensor: both uses summed by autograd, moved into the buffer by the hook
        rows = model.get_submodule(emb).weight.shape[0]
        assert_window_exact(sg, model, Chunk(1, (ParamSlice(name, 0, rows),)), loss, dense)


def test_padding_idx_row_gets_no_gradient() -> None:
    model, loss = bert()
    dense = dense_grads(model, loss)
    name = "bert.embeddings.word_embeddings.weight"
    assert torch.count_nonzero(dense[name][0]) == 0
    sg = SliceGradients(model)
    types = "bert.embeddings.token_type_embeddings.weight"
    chunk = Chunk(0, (ParamSlice(name, 0, 37), ParamSlice(types, 1, 2)))
    assert_window_exact(sg, model, chunk, loss, dense)


def test_gradient_accumulation_and_zero_grad() -> None:
    model, loss = llama()
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    chunk = Chunk(0, (ParamSlice("model.layers.0.mlp.up_proj.weight", 3, 70),
                      ParamSlice("model.layers.0.mlp.up_proj.bias", 0, 128),
                      ParamSlice("model.norm.weight", 10, 20)))  # fmt: skip
    sg.activate(chunk)
    loss().backward()
    loss().backward()
    for sl in chunk.slices:
        ref = 2 * dense[sl.name][sl.row_start : sl.row_end]
        torch.testing.assert_close(sg.window_grads()[sl.name], ref, rtol=1e-5, atol=1e-6)
    sg.zero_grad()
    assert all(torch.count_nonzero(g) == 0 for g in sg.window_grads().values())
    loss().backward()
    sl = chunk.slices[0]
    torch.testing.assert_close(sg.window_grads()[sl.name], dense[sl.name][3:70], rtol=1e-5, atol=1e-6)
    sg.deactivate()


# ----------------------------------------------------------------------------------------------
# Test 4: no dense gradient, ever


class _Allocations(TorchDispatchMode):
    """Records the numel of every op output that does not alias an input (a real allocation)."""

    def __init__(self) -> None:
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numels.append(t.numel())
        return out


@pytest.mark.parametrize(
    "name",
    ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
     "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"],
)  # fmt: skip
def test_backward_never_materializes_a_dense_gradient(name: str) -> None:
    model, loss = llama()  # batch 2 x seq 8: every activation is smaller than these weights
    p = dict(model.named_parameters())[name]
    sg = SliceGradients(model)
    sg.activate(Chunk(0, (ParamSlice(name, 1, p.shape[0] - 1),)))
    out = loss()
    with _Allocations() as allocs:
        out.backward()
    assert allocs.numels and max(allocs.numels) < p.numel()
    assert all(q.grad is None for q in model.parameters())
    sg.deactivate()
    # control: dense backward does allocate a tensor of the weight's size, so the check can fail
    out = loss()
    with _Allocations() as allocs:
        out.backward()
    assert max(allocs.numels) >= p.numel()
    model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------------------------
# Test 5: backward stops at the lowest active parameter


def _requires_grad_probe(model: nn.Module, paths: list[str]) -> tuple[dict[str, bool], list]:
    seen: dict[str, bool] = {}
    handles = []
    for path in paths:
        def hook(_m, _i, out, path=path):
            t = out[0] if isinstance(out, tuple) else out
            seen[path] = bool(t.requires_grad)
        handles.append(model.get_submodule(path).register_forward_hook(hook))
    return seen, handles


def test_backward_does_not_reach_below_the_window() -> None:
    model, loss = llama(layers=4)
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    paths = ["model.embed_tokens"] + [f"model.layers.{i}" for i in range(4)] + ["model.layers.2.mlp.up_proj"]
    seen, handles = _requires_grad_probe(model, paths)

    layer2 = [ParamSlice(n, 0, p.shape[0]) for n, p in model.named_parameters() if ".layers.2." in n]
    sg.activate(Chunk(0, tuple(layer2)))
    loss().backward()
    assert seen == {"model.embed_tokens": False, "model.layers.0": False, "model.layers.1": False,
                    "model.layers.2": True, "model.layers.3": True,
                    "model.layers.2.mlp.up_proj": True}  # fmt: skip
    sg.deactivate()

    # the lowest active parameter straddles: even layer 2's attention and up_proj see no backward
    chunk = Chunk(1, (ParamSlice("model.layers.2.mlp.down_proj.weight", 3, 40),))
    assert_window_exact(sg, model, chunk, loss, dense)
    assert seen["model.layers.1"] is False and seen["model.layers.2.mlp.up_proj"] is False
    assert seen["model.layers.2"] is True

    # control: dense training back-propagates through every layer
    dense_grads(model, loss)
    assert all(seen.values())
    for h in handles:
        h.remove()


def _saved_bytes(loss: Loss) -> int:
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss()
    out.backward()
    return total


def test_window_at_the_top_saves_fewer_activations() -> None:
    model, loss = llama(layers=4)
    for p in model.parameters():
        p.requires_grad_(True)
    dense_bytes = _saved_bytes(loss)
    model.zero_grad(set_to_none=True)
    sg = SliceGradients(model)
    top = [ParamSlice(n, 0, p.shape[0]) for n, p in model.named_parameters() if ".layers.3." in n]
    sg.activate(Chunk(0, (*top, ParamSlice("lm_head.weight", 0, 64))))
    window_bytes = _saved_bytes(loss)
    sg.deactivate()
    assert window_bytes < dense_bytes / 2, (window_bytes, dense_bytes)


# ----------------------------------------------------------------------------------------------
# Activation checkpointing and autocast


def _checkpointed(make: Callable[[], tuple[nn.Module, Loss]]) -> tuple[nn.Module, Loss]:
    model, loss = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()  # transformers forces input grads on; chunkft does not need them
    return model, loss


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_non_reentrant_checkpointing_is_exact(kind: str) -> None:
    plain, plain_loss = MODELS[kind]()
    dense = dense_grads(plain, plain_loss)
    model, loss = _checkpointed(MODELS[kind])
    sg = SliceGradients(model)
    rng = random.Random(3)
    for chunk in [*partition(param_specs(model), num_chunks=3), random_chunk(model, rng, 1.0, 1.0)]:
        assert_window_exact(sg, model, chunk, loss, dense)


def test_checkpointing_recomputes_only_the_window_layers() -> None:
    """Non-reentrant recomputation runs only where tensors were saved: the window and above."""

    class Count(TorchDispatchMode):
        silu = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.silu += func is torch.ops.aten.silu.default  # one per decoder layer forward
            return func(*args, **(kwargs or {}))

    def recomputed_layers(sg: SliceGradients | None) -> int:
        out = loss()
        Count.silu = 0
        with Count():
            out.backward()
        if sg is not None:
            sg.deactivate()
        return Count.silu

    model, loss = _checkpointed(lambda: llama(layers=4))
    assert recomputed_layers(None) == 4  # control: dense recomputes every layer
    sg = SliceGradients(model)
    sg.activate(Chunk(0, (ParamSlice("model.layers.2.mlp.down_proj.weight", 3, 40),)))
    assert recomputed_layers(sg) == 2  # layers 2 and 3; layers 0 and 1 are never replayed


def test_reentrant_checkpointing_and_input_grad_hooks_are_reported() -> None:
    model, _ = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    sg = SliceGradients(model)
    chunk = Chunk(0, (ParamSlice("lm_head.weight", 0, 10),))
    with pytest.raises(ValueError, match="use_reentrant"):
        sg.activate(chunk)
    assert all("forward" not in m.__dict__ for m in model.modules())
    model, _ = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.warns(UserWarning, match="disable_input_require_grads"):
        SliceGradients(model).activate(chunk)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_bf16_autocast_matches_dense_autocast(kind: str) -> None:
    model, plain_loss = MODELS[kind]()
    loss = bf16_autocast(plain_loss)
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    chunks = [random_chunk(model, random.Random(s), 1.0, 1.0) for s in range(2)]
    for chunk in chunks:
        # same casts as dense autocast (bf16 matmuls, gradients summed in fp32): near bit-identical
        assert_window_exact(sg, model, chunk, loss, dense, rtol=1e-3, atol=1e-5)
    sg.activate(chunks[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dtypes = {m(torch.randn(2, 3, m.in_features)).dtype for m in model.modules()
                  if "forward" in m.__dict__ and isinstance(m, nn.Linear)}  # fmt: skip
    sg.deactivate()
    assert dtypes == {torch.bfloat16}  # the sliced Linear casts like F.linear under autocast


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_bf16_weights_give_fp32_window_gradients(kind: str) -> None:
    model, loss = MODELS[kind]()
    model.to(torch.bfloat16)
    dense = dense_grads(model, loss)  # bf16 gradients
    sg = SliceGradients(model)
    chunk = random_chunk(model, random.Random(5), 1.0, 1.0)
    sg.activate(chunk)
    loss().backward()
    assert all(p.grad is None for p in model.parameters())
    for sl in chunk.slices:
        g, ref = sg.window_grads()[sl.name], dense[sl.name][sl.row_start : sl.row_end].float()
        assert g.dtype == torch.float32
        assert (g - ref).abs().max() <= 0.02 * ref.abs().max(), sl  # within bf16 rounding of dense
    sg.deactivate()


def test_bf16_layernorm_bias_slice_is_the_exact_sum() -> None:
    """Dense bf16 sums LayerNorm bias gradients in bf16 (10% off here); the window sums in fp32."""
    model, loss = bert()
    model.to(torch.bfloat16)
    ln = model.bert.embeddings.LayerNorm
    captured = []
    handle = ln.register_full_backward_hook(lambda _m, _gi, go: captured.append(go[0].detach()))
    dense_grads(model, loss)
    handle.remove()
    exact = captured[0].double().sum((0, 1))[3:20]
    sg = SliceGradients(model)
    name = "bert.embeddings.LayerNorm.bias"
    sg.activate(Chunk(0, (ParamSlice(name, 3, 20),)))
    loss().backward()
    torch.testing.assert_close(sg.window_grads()[name].double(), exact, rtol=1e-6, atol=1e-9)
    sg.deactivate()


# ----------------------------------------------------------------------------------------------
# Unsupported modules, restoration, bad input


class _MatmulWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


def test_unsupported_straddled_module_is_refused_by_name() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 8), _MatmulWeight())
    sg = SliceGradients(model)
    for name, path, type_name in (("0.weight", "'0'", "Conv2d"), ("3.weight", "'3'", "_MatmulWeight")):
        chunk = Chunk(4, (ParamSlice(name, 1, 3),))
        for call in (lambda c: sg.check_supported([c]), sg.activate):
            with pytest.raises(UnsupportedModuleError, match=rf"chunk 4 .*{name}.*{path} \({type_name}\)"):
                call(chunk)
        assert all(p.requires_grad for p in model.parameters())
    # the same modules are fine when the window holds their tensors whole
    x = torch.randn(2, 2, 4, 4)
    whole = (ParamSlice("0.weight", 0, 4), ParamSlice("2.weight", 2, 6), ParamSlice("3.weight", 0, 8))
    chunk = Chunk(0, whole)

    def loss() -> torch.Tensor:
        return model(x).square().sum()

    assert_window_exact(sg, model, chunk, loss, dense_grads(model, loss))


def test_other_refusals() -> None:
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    cases = [
        (nn.Sequential(nn.Embedding(10, 4, max_norm=1.0)), "0.weight", "max_norm"),
        (nn.Sequential(nn.MultiheadAttention(8, 2)), "0.out_proj.weight", "out_proj"),
        (nn.Sequential(T5LayerNorm(8)), "0.weight", "differs from the Llama-style RMSNorm"),
        (nn.Sequential(nn.RMSNorm(8)), "0.weight", "RMSNorm"),
    ]
    for model, name, match in cases:
        with pytest.raises(UnsupportedModuleError, match=match):
            SliceGradients(model).check_supported([Chunk(0, (ParamSlice(name, 1, 3),))])
    hooked = nn.Sequential(nn.Linear(4, 4))
    hooked[0].forward = lambda x: x  # what accelerate's hooks do
    with pytest.raises(UnsupportedModuleError, match="already replaced"):
        SliceGradients(hooked).check_supported([Chunk(0, (ParamSlice("0.weight", 1, 3),))])


@pytest.mark.parametrize("kind", ["llama_tied", "gpt2", "bert", "toy"])
def test_deactivate_restores_exact_forward_and_flags(kind: str) -> None:
    model, loss = MODELS[kind]()
    frozen = next(iter(model.parameters()))
    frozen.requires_grad_(False)  # a user-frozen tensor must stay frozen afterwards
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with torch.no_grad():
        before = loss()
    sg = SliceGradients(model)
    chunk = random_chunk(model, random.Random(11), 1.0, 1.0)
    sg.activate(chunk)
    assert straddled_owners(model, sg)
    with torch.no_grad():
        during = loss()
    assert torch.equal(during, before)  # the sliced forwards compute the very same values
    loss().backward()
    sg.deactivate()
    assert not straddled_owners(model, sg)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with torch.no_grad():
        assert torch.equal(loss(), before)
    with pytest.raises(RuntimeError, match="activate"):
        sg.window_grads()


def test_bad_chunks_are_refused_without_side_effects() -> None:
    model, _ = llama()
    sg = SliceGradients(model)
    bad = [
        (Chunk(2, (ParamSlice("lm_head.weight", 0, 5), ParamSlice("nope.weight", 0, 1))), "nope.weight"),
        (Chunk(2, (ParamSlice("lm_head.weight", 0, 5), ParamSlice("lm_head.weight", 5, 9))), "twice"),
        (Chunk(2, (ParamSlice("model.norm.weight", 0, 65),)), "outside"),
        (Chunk(2, (ParamSlice("model.norm.weight", 4, 4),)), "empty"),
    ]
    for chunk, match in bad:
        with pytest.raises(ValueError, match=match):
            sg.activate(chunk)
        assert sg.active_chunk is None
        assert all(p.requires_grad for p in model.parameters())
        assert not straddled_owners(model, sg)
