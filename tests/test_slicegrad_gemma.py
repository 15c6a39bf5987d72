"""Gemma-family owners (scaled embedding, x_hat * (1 + w) RMSNorm) and foreign weight reads in
executor/slicegrad.py, against dense autograd on tiny real Gemma-2 / Gemma-3 models."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
import torch.nn.functional as F
from test_slicegrad import (
    Loss,
    _checkpointed,
    assert_window_exact,
    bf16_autocast,
    dense_grads,
    random_chunk,
    straddled_owners,
)
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
from transformers import (
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
)
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm, Gemma2TextScaledWordEmbedding

from chunkft.chunks import Chunk, ParamSlice, param_specs, partition
from chunkft.executor import slicegrad
from chunkft.executor.slicegrad import SliceGradients, UnsupportedModuleError

VOCAB = 256
EMB = "model.embed_tokens.weight"  # tied with lm_head (Gemma's default)
UP = "model.layers.1.mlp.up_proj.weight"


def _gemma_cfg(cls: type) -> object:
    return cls(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, vocab_size=VOCAB, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip


def _causal(model: nn.Module) -> tuple[nn.Module, Loss]:
    model.train()
    # Gemma initialises its norms to w = 0; random w makes the 1 + w offset and each row matter
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)
    ids = torch.randint(0, VOCAB, (2, 8))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def gemma2() -> tuple[nn.Module, Loss]:
    torch.manual_seed(0)
    return _causal(Gemma2ForCausalLM(_gemma_cfg(Gemma2Config)))


def gemma3() -> tuple[nn.Module, Loss]:
    torch.manual_seed(0)
    return _causal(Gemma3ForCausalLM(_gemma_cfg(Gemma3TextConfig)))


MODELS = {"gemma2": gemma2, "gemma3": gemma3}


def _rows(model: nn.Module, name: str) -> int:
    return dict(model.named_parameters())[name].shape[0]


# ----------------------------------------------------------------------------------------------
# (a) Gemma's scaled embedding and RMSNorm are sliced, exactly


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_gemma_windows_match_dense_autograd(kind: str) -> None:
    model, loss = MODELS[kind]()
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    rng = random.Random(kind)
    chunks = [*partition(param_specs(model), num_chunks=5)]
    chunks += [random_chunk(model, rng, p_take=0.5, p_cut=0.5) for _ in range(3)]
    chunks.append(random_chunk(model, rng, p_take=1.0, p_cut=1.0))  # every owner sliced at once
    sg.check_supported(chunks)
    prefix = "Gemma2" if kind == "gemma2" else "Gemma3"
    sg.activate(chunks[-1])
    assert {f"{prefix}TextScaledWordEmbedding", f"{prefix}RMSNorm"} <= {
        type(m).__name__ for m in model.modules() if "forward" in m.__dict__
    }
    sg.deactivate()
    for chunk in chunks:
        assert_window_exact(sg, model, chunk, loss, dense)


EMB_CUTS = [(0, 1), (1, VOCAB), (0, VOCAB - 1), (37, 38), (100, 201)]
NORM_CUTS = [(0, 1), (63, 64), (1, 63), (20, 44)]
NORMS = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.pre_feedforward_layernorm.weight",
    "model.layers.1.post_feedforward_layernorm.weight",
    "model.norm.weight",
]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_cuts_at_several_rows_of_embedding_and_norms(kind: str) -> None:
    model, loss = MODELS[kind]()
    norms = list(NORMS)
    if kind == "gemma3":  # Gemma-3's per-head q/k norms are the same class, over head_dim = 32
        norms += ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"]
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    for i, (a, b) in enumerate(EMB_CUTS):
        chunk = Chunk(i, (ParamSlice(EMB, a, b),))
        sg.activate(chunk)
        assert straddled_owners(model, sg) == {"model.embed_tokens", "lm_head"}
        sg.deactivate()
        assert_window_exact(sg, model, chunk, loss, dense)
    for name in norms:
        rows = _rows(model, name)
        for a, b in NORM_CUTS:
            a, b = min(a, rows - 1), min(b, rows)
            # a window edge: the norm's cut rows plus a whole neighbour, as partition() writes them
            chunk = Chunk(0, (ParamSlice(name, a, b), ParamSlice(UP, 0, 128)))
            assert_window_exact(sg, model, chunk, loss, dense)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bf16_autocast_matches_dense_autocast(kind: str) -> None:
    model, plain_loss = MODELS[kind]()
    loss = bf16_autocast(plain_loss)
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    for s in range(2):
        assert_window_exact(sg, model, random_chunk(model, random.Random(s), 1.0, 1.0), loss, dense,
                            rtol=1e-3, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_bf16_weights_give_fp32_window_gradients(kind: str) -> None:
    model, loss = MODELS[kind]()
    model.to(torch.bfloat16)
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    chunk = random_chunk(model, random.Random(5), 1.0, 1.0)
    sg.activate(chunk)
    loss().backward()
    assert all(p.grad is None for p in model.parameters())
    for sl in chunk.slices:
        g, ref = sg.window_grads()[sl.name], dense[sl.name][sl.row_start : sl.row_end].float()
        assert g.dtype == torch.float32
        assert (g - ref).abs().max() <= 0.02 * ref.abs().max(), sl
    sg.deactivate()


def test_gemma2_non_reentrant_checkpointing_is_exact() -> None:
    dense = dense_grads(*gemma2())
    model, loss = _checkpointed(gemma2)
    sg = SliceGradients(model)
    chunks = [*partition(param_specs(model), num_chunks=3), random_chunk(model, random.Random(3), 1.0, 1.0)]
    for chunk in chunks:
        assert_window_exact(sg, model, chunk, loss, dense)


def test_deactivate_restores_exact_gemma_forward() -> None:
    model, loss = gemma2()
    with torch.no_grad():
        before = loss()
    sg = SliceGradients(model)
    sg.activate(random_chunk(model, random.Random(11), 1.0, 1.0))
    with torch.no_grad():
        assert torch.equal(loss(), before)  # the sliced forwards compute the very same values
    loss().backward()
    sg.deactivate()
    assert not straddled_owners(model, sg)
    with torch.no_grad():
        assert torch.equal(loss(), before)


def test_meta_and_fake_gemma_models_are_accepted() -> None:
    """The probes run on random real tensors, so the planner's meta and FakeTensorMode models work."""
    chunk = Chunk(0, (ParamSlice(EMB, 3, 200), ParamSlice("model.layers.1.input_layernorm.weight", 5, 40)))
    with torch.device("meta"):
        meta = Gemma2ForCausalLM(_gemma_cfg(Gemma2Config))
    SliceGradients(meta).check_supported([chunk])
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = Gemma2ForCausalLM(_gemma_cfg(Gemma2Config)).train()
        sg = SliceGradients(model)
        sg.activate(chunk)
        ids = torch.randint(0, VOCAB, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        assert {n: tuple(g.shape) for n, g in sg.window_grads().items()} == {
            EMB: (197, 64),
            "model.layers.1.input_layernorm.weight": (35,),
        }
        sg.deactivate()


class _ScaleNoCast(Gemma2TextScaledWordEmbedding):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.Embedding.forward(self, input_ids) * self.embed_scale  # no cast to the weight dtype


class _ScaleConstant(Gemma2TextScaledWordEmbedding):
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.Embedding.forward(self, input_ids) * math.sqrt(self.embedding_dim)  # ignores the buffer


class _ExpNorm(Gemma2RMSNorm):
    """x_hat * exp(w): equal to Gemma's x_hat * (1 + w) at its w = 0 init, different anywhere else."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self._norm(x.float()) * torch.exp(self.weight.float())).type_as(x)


class _CastFirstNorm(Gemma2RMSNorm):
    """(1 + w) * x_hat cast to the input dtype first (Llama's cast order with Gemma's offset)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.weight) * self._norm(x.float()).type_as(x)


@pytest.mark.parametrize(
    ("module", "match"),
    [
        (Gemma2TextScaledWordEmbedding(20, 8, 0, embed_scale=8**0.5), None),
        (_ScaleNoCast(20, 8, 0, embed_scale=8**0.5), "not the Gemma-style scaled embedding"),
        (_ScaleConstant(20, 8, 0, embed_scale=8**0.5), "not the Gemma-style scaled embedding"),
        (Gemma2RMSNorm(8), None),
        (_ExpNorm(8), "differs from the Llama-style RMSNorm formula .* and from the Gemma-style"),
        (_CastFirstNorm(8), "differs from the Llama-style RMSNorm formula .* and from the Gemma-style"),
    ],
    ids=["scaled", "scale-no-cast", "scale-constant", "rmsnorm", "exp-norm", "cast-first-norm"],
)  # fmt: skip
def test_gemma_look_alikes_are_refused(module: nn.Module, match: str | None) -> None:
    model = nn.Sequential(module)
    chunk = Chunk(3, (ParamSlice("0.weight", 1, 5),))
    sg = SliceGradients(model)
    if match is None:
        sg.check_supported([chunk])
        return
    pattern = rf"chunk 3 cuts '0.weight'.*\({type(module).__name__}\).*{match}"
    with pytest.raises(UnsupportedModuleError, match=pattern):
        sg.check_supported([chunk])


# ----------------------------------------------------------------------------------------------
# (b) a cut weight read outside its owner's forward is refused on the first step, naming both


class _SharedHead(nn.Module):
    def forward(self, h: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        return F.linear(h, table.weight)  # reads another module's weight: invisible to its sliced forward


class _Foreign(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)
        self.head = _SharedHead()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))), self.emb).square().mean()


def _foreign() -> tuple[nn.Module, Loss]:
    torch.manual_seed(0)
    model = _Foreign()
    ids = torch.tensor([[1, 2, 3, 15], [0, 7, 7, 9]])
    return model, lambda: model(ids)


def _no_watch_left(model: nn.Module) -> bool:
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return hooks == 0 and not _get_current_dispatch_mode_stack()


def test_foreign_read_of_a_cut_weight_is_refused_in_one_line() -> None:
    model, loss = _foreign()
    sg = SliceGradients(model)
    chunk = Chunk(2, (ParamSlice("emb.weight", 4, 11), ParamSlice("mix.weight", 0, 8)))
    sg.check_supported([chunk])  # the owner itself (nn.Embedding) is sliceable
    sg.activate(chunk)
    with pytest.raises(UnsupportedModuleError) as info:
        loss()
    msg = str(info.value)
    assert "\n" not in msg
    assert "chunk 2 cuts 'emb.weight' at rows [4, 11)" in msg
    assert "module 'head' (_SharedHead) reads it" in msg and "its owner 'emb'" in msg
    sg.deactivate()
    assert _no_watch_left(model)
    with torch.no_grad():
        sg.activate(chunk)
        loss()  # no gradient, nothing wrong: an evaluation forward is not refused
        sg.deactivate()


def test_foreign_read_is_fine_when_the_tensor_is_whole_and_check_is_one_shot() -> None:
    model, loss = _foreign()
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    whole = Chunk(0, (ParamSlice("emb.weight", 0, 16), ParamSlice("mix.weight", 2, 6)))
    for _ in range(2):
        assert_window_exact(sg, model, whole, loss, dense)  # ordinary autograd sums both uses
    assert _no_watch_left(model)
    sg.activate(whole)  # mix.weight passed the check once: no watch is armed again
    assert _no_watch_left(model)
    sg.deactivate()


def test_foreign_uses_lists_what_a_plan_must_keep_whole() -> None:
    model, loss = _foreign()
    assert slicegrad.foreign_uses(model, loss) == {"emb.weight": "module 'head' (_SharedHead)"}
    assert _no_watch_left(model)
    gemma, gemma_loss = gemma2()  # tied lm_head is an owner, not a foreign reader
    assert slicegrad.foreign_uses(gemma, gemma_loss) == {}


def _deberta_mlm() -> tuple[nn.Module, Loss]:
    cfg = DebertaV2Config(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        legacy=False, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = DebertaV2ForMaskedLM(cfg).train()
    ids = torch.randint(1, 100, (2, 8))
    return model, lambda: model(input_ids=ids, labels=ids).loss


def test_deberta_v2_mlm_head_reading_the_embedding_is_refused() -> None:
    model, loss = _deberta_mlm()
    name = "deberta.embeddings.word_embeddings.weight"
    reader = "module 'lm_predictions.lm_head' (DebertaV2LMPredictionHead)"
    assert slicegrad.foreign_uses(model, loss) == {name: reader}
    dense = dense_grads(model, loss)
    sg = SliceGradients(model)
    sg.activate(Chunk(0, (ParamSlice(name, 3, 50),)))
    with pytest.raises(
        UnsupportedModuleError, match=re.escape(f"cuts '{name}' at rows [3, 50), but {reader} reads")
    ):
        loss()
    sg.deactivate()
    assert_window_exact(sg, model, Chunk(1, (ParamSlice(name, 0, 100),)), loss, dense)


def test_unsliceable_names_what_a_window_must_keep_whole() -> None:
    """What the planner keeps whole: a module the executor cannot slice is named with its reason; the
    Llama and Gemma-2 modules are all sliceable now."""
    import torch.nn as nn

    from chunkft.executor.slicegrad import SliceGradients

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4, 3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x @ self.weight.t().exp()

    model = nn.Sequential(nn.Linear(3, 4), Odd())
    found = SliceGradients(model).unsliceable()
    assert list(found) == ["1.weight"] and found["1.weight"].startswith("1 (Odd): ")
