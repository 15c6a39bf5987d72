"""Model presets users asked for: Llama-3.2, Qwen3, Gemma-2, Phi-3-mini and Mistral-Nemo.

Every config value comes from the model's published config.json on the Hugging Face hub (each preset's
sources name the repository); the parameter count is the published one, and here it must equal both the
count of the Hugging Face model built on the meta device and a closed form of the config.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from chunkft.plan_format import load_plan
from chunkft.planner.cli import main
from chunkft.profiles import count_params, list_models, load_model

# key -> (published parameter count, tied weights counted once; the hub repository of its config.json)
ADDED = {
    "llama-3.2-1b": (1_235_814_400, "meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": (3_212_749_824, "meta-llama/Llama-3.2-3B"),
    "qwen3-0.6b": (596_049_920, "Qwen/Qwen3-0.6B"),
    "qwen3-1.7b": (1_720_574_976, "Qwen/Qwen3-1.7B"),
    "qwen3-4b": (4_022_468_096, "Qwen/Qwen3-4B"),
    "qwen3-8b": (8_190_735_360, "Qwen/Qwen3-8B"),
    "qwen3-14b": (14_768_307_200, "Qwen/Qwen3-14B"),
    "qwen3-32b": (32_762_123_264, "Qwen/Qwen3-32B"),
    "gemma-2-2b": (2_614_341_888, "google/gemma-2-2b"),
    "gemma-2-9b": (9_241_705_984, "google/gemma-2-9b"),
    "phi-3-mini": (3_821_079_552, "microsoft/Phi-3-mini-4k-instruct"),
    "mistral-nemo-12b": (12_247_782_400, "mistralai/Mistral-Nemo-Base-2407"),
}
# Planned end to end: the smallest new presets, and Gemma-2, which has no sdpa path in transformers.
PLANNED = ["qwen3-0.6b", "llama-3.2-1b", "gemma-2-2b"]


def _closed_form_params(config) -> int:
    """Parameters of a Llama / Mistral / Qwen3 / Phi-3 / Gemma-2 decoder from its config alone.

    head_dim is explicit in these configs (Qwen3, Mistral-Nemo, Gemma-2: heads x head_dim != hidden);
    Phi-3 fuses q/k/v and gate/up, which changes no count.
    """
    h, i, v, n = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    attention = 2 * h * q + 2 * h * kv  # q and o, k and v
    norms = 2 * h
    if config.model_type == "qwen3":
        attention += 2 * head_dim  # q_norm and k_norm over each head
    if config.model_type == "gemma2":
        norms = 4 * h  # sandwich norms around attention and the MLP
    layer = attention + 3 * h * i + norms
    head = 0 if config.tie_word_embeddings else v * h
    return v * h + n * layer + h + head


@pytest.mark.parametrize("key", sorted(ADDED))
def test_added_preset_loads_with_its_source_and_published_count(key: str) -> None:
    published, repo = ADDED[key]
    preset = load_model(key)
    assert (preset.key, preset.task, preset.source) == (key, "causal-lm", "preset")
    assert preset.published_num_params == published
    assert repo in preset.sources["config"] and "Hugging Face hub" in preset.sources["config"]
    assert preset.sources["published_num_params"].strip()
    assert repo in preset.aliases
    for alias in preset.aliases:
        assert load_model(alias).key == key, alias
    assert count_params(preset) == published  # built by transformers on the meta device
    assert _closed_form_params(preset.config) == published


def test_added_presets_are_listed() -> None:
    assert set(ADDED) <= {m.key for m in list_models()}


def test_family_details_from_the_published_configs() -> None:
    small, big = load_model("llama-3.2-1b").config, load_model("llama-3.2-3b").config
    assert small.tie_word_embeddings and big.tie_word_embeddings
    assert (small.head_dim, big.head_dim) == (64, 128)
    assert small.rope_parameters["rope_type"] == "llama3" and small.rope_parameters["factor"] == 32.0
    assert small.max_position_embeddings == 131072

    for key, tied in [
        ("qwen3-0.6b", True),
        ("qwen3-1.7b", True),
        ("qwen3-4b", True),
        ("qwen3-8b", False),
        ("qwen3-14b", False),
        ("qwen3-32b", False),
    ]:
        c = load_model(key).config
        assert (c.model_type, c.head_dim, c.vocab_size, c.tie_word_embeddings) == ("qwen3", 128, 151936, tied)
        assert c.max_position_embeddings == 40960 and not c.attention_bias
    assert load_model("qwen3-32b").config.num_attention_heads * 128 == 8192  # wider than hidden 5120

    nemo = load_model("mistral-nemo-12b").config
    assert (nemo.model_type, nemo.head_dim, nemo.vocab_size) == ("mistral", 128, 131072)
    assert nemo.num_attention_heads * nemo.head_dim == 4096 != nemo.hidden_size == 5120

    phi = load_model("phi-3-mini").config
    assert (phi.model_type, phi.vocab_size, phi.max_position_embeddings) == ("phi3", 32064, 4096)
    assert phi.num_key_value_heads == phi.num_attention_heads == 32

    for key in ("gemma-2-2b", "gemma-2-9b"):
        c = load_model(key).config
        assert (c.model_type, c.head_dim, c.vocab_size, c.sliding_window) == ("gemma2", 256, 256000, 4096)
        assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
        assert c.query_pre_attn_scalar == 256
        assert c.tie_word_embeddings


def test_the_published_dtype_is_kept() -> None:
    # The Gemma-2 base checkpoints are stored in float32; the others in bfloat16. The planner picks the
    # weight dtype itself (bf16 on GPUs), so this is provenance, not a planning input.
    for key in ADDED:
        expected = torch.float32 if key.startswith("gemma-2") else torch.bfloat16
        assert load_model(key).config.dtype == expected, key


@pytest.mark.parametrize("key", PLANNED)
def test_small_added_presets_plan_on_a_4090(key: str, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(main, [key, "--gpu", "4090", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert f"plan written to {out}" in r.output
    plan = load_plan(out)
    assert plan.model.name == key and plan.model.num_params == ADDED[key][0]
    assert plan.hardware.gpu == "rtx-4090" and plan.run.weight_dtype == "bfloat16"
    # Gemma-2 has no sdpa attention in transformers: the planner picks eager without being told.
    assert plan.run.attn_implementation == ("eager" if key.startswith("gemma-2") else "sdpa")
    pr, hw = plan.predictions, plan.hardware
    assert pr.peak_bytes + pr.reserve_bytes + hw.headroom_bytes <= hw.budget_bytes <= 24 * 2**30
