"""Profiling without allocating: parameter counts from meta models, activation segments from fake traces."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chunkft import profiles
from chunkft.planner.profile_model import (
    _shallow_forward,
    activation_profile,
    model_structure,
    read_outside_owner,
    structure_of,
)


def test_llama3_8b_parameter_count_matches_published() -> None:
    preset = profiles.load_model("llama-3-8b")
    st = model_structure(preset.config, preset.task, "bfloat16")
    assert st.num_params == 8_030_261_248
    assert st.num_layers == 32
    # stream order: embedding first, blocks in order, head last
    assert st.spec_layer[0] == -1 and st.spec_layer[-1] == 32
    assert list(st.spec_layer) == sorted(st.spec_layer)


def test_tiny_presets_counts() -> None:
    for key in ("tiny-llama", "tiny-bert"):
        preset = profiles.load_model(key)
        st = model_structure(preset.config, preset.task, "float32")
        assert st.num_params == preset.published_num_params


def test_block_modes_order_saved_bytes() -> None:
    preset = profiles.load_model("tiny-llama")
    act = activation_profile(preset.config, preset.task, 2, 128, "float32")
    full, inp, none = act.block("full"), act.block("input"), act.block("none")
    ck_full = act.block("full", checkpointed=True)
    # below the window nothing is kept for backward: the input is replaced by the output
    assert abs(none.fwd.delta_bytes) <= act.hidden_bytes
    assert none.bwd.excursion_bytes == 0
    # frozen weights save less than trainable ones, checkpointing keeps about one block input
    assert full.fwd.delta_bytes > inp.fwd.delta_bytes > 0
    assert 0 <= ck_full.fwd.delta_bytes <= 2 * act.hidden_bytes < full.fwd.delta_bytes
    # the backward frees what the forward kept (up to the fp32 gradient buffers it creates)
    assert full.bwd.delta_bytes - full.bwd.grad_bytes == -full.fwd.delta_bytes
    assert full.bwd.grad_bytes == 4 * sum(
        s.numel for s, g in zip(act_structure().specs, act_structure().spec_layer, strict=True) if g == 1
    )


def act_structure():  # type: ignore[no-untyped-def]
    preset = profiles.load_model("tiny-llama")
    return model_structure(preset.config, preset.task, "float32")


def test_activations_scale_with_batch() -> None:
    preset = profiles.load_model("tiny-llama")
    a1 = activation_profile(preset.config, preset.task, 1, 128, "float32")
    a2 = activation_profile(preset.config, preset.task, 2, 128, "float32")
    d1, d2 = a1.block("full").fwd.delta_bytes, a2.block("full").fwd.delta_bytes
    assert 1.9 * d1 <= d2 <= 2.1 * d1


class _Block(nn.Module):
    """A block whose second module reads the first's weight in its own forward (a foreign read)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + F.linear(x, self.a.weight)


class _ReadsOutside(nn.Module):
    """Embedding, blocks, and a head multiplying by the embedding weight directly (DeBERTa-v2's MLM)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(hidden_size=4, num_attention_heads=1, vocab_size=10)
        self.emb = nn.Embedding(10, 4)
        self.layers = nn.ModuleList(_Block() for _ in range(layers))
        self.norm = nn.LayerNorm(4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        for layer in self.layers:
            h = layer(h)
        return F.linear(self.norm(h), self.emb.weight).sum()


def test_weights_read_outside_their_owner_are_kept_whole_in_every_block() -> None:
    """Found on the shallow copy (3 blocks), named for every block of the full model (5 here)."""
    full = structure_of(_ReadsOutside(5), "causal-lm")
    shallow = _ReadsOutside(3)
    ids = torch.tensor([[1, 2, 3]])
    found = read_outside_owner(full, shallow, lambda: shallow(ids))
    assert found == {"emb.weight", *(f"layers.{i}.a.weight" for i in range(5))}

    def broken() -> None:
        raise RuntimeError("this forward does not run here")

    assert read_outside_owner(full, shallow, broken) == set()  # the executor's own check still refuses


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-bert", "gemma-2-2b"])
def test_the_shallow_forward_runs_and_finds_no_foreign_reads(model: str) -> None:
    """The check really runs on supported models (a forward that failed would find nothing silently)."""
    from chunkft.executor.slicegrad import foreign_uses

    preset = profiles.load_model(model)
    shallow, forward = _shallow_forward(preset.config, preset.task, "float32")
    assert foreign_uses(shallow, forward) == {}
