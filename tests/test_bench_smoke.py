"""The benchmark harness (bench/peers.py) runs and reports what its tables need, so the bench cannot rot.

A 2-layer Llama built from a config directory (so chunkft-plan plans exactly this model), 2 optimizer
steps per method on tinyshakespeare bytes. Peers are optional packages: their rows are skipped when the
package is not installed.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import peers  # noqa: E402

STEPS = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    from transformers import LlamaConfig

    from profiles import build_model, load_model

    d = tmp_path_factory.mktemp("tiny")
    LlamaConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                pad_token_id=258, bos_token_id=256, eos_token_id=257,
                architectures=["LlamaForCausalLM"]).save_pretrained(d)
    torch.manual_seed(0)
    base = build_model(load_model(str(d)), device="cpu")
    wl = peers.Workload(task="causal-lm", model_ref=str(d), seq_len=16, micro_batch=2, steps=STEPS,
                        eval_examples=4)
    data = peers.shakespeare_lm(wl.seq_len, wl.eval_examples)
    model_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    return base, wl, data, model_bytes, d


def _run(setup, specs):
    base, wl, data, _, d = setup
    build = peers.copy_model(base)
    return peers.run_methods(build, specs, wl, data, plan_dir=d / "plans", log=lambda s: None)


def _check_trained(r: peers.MethodResult) -> None:
    assert r.status == "ok", r.status
    assert r.steps == STEPS and len(r.train_losses) == STEPS
    assert all(math.isfinite(x) for x in r.train_losses)
    assert r.loss_before is not None and r.loss_after is not None
    assert r.loss_after != r.loss_before  # the weights the evaluation sees were updated
    assert r.median_step_seconds is not None and r.median_step_seconds > 0
    assert r.peak_bytes is not None and r.peak_bytes == sum(b for _, b in r.peak_by_category)


def test_dense_adamw_and_chunkft_run_and_report(setup) -> None:
    _, _, _, param_bytes, _ = setup
    dense, chunk = _run(setup, [peers.MethodSpec("AdamW", "adamw", 1e-3),
                                peers.MethodSpec("ChunkFT K=2", "chunkft", 1e-3, num_chunks=2)])
    for r in (dense, chunk):
        _check_trained(r)
        assert dict(r.peak_by_category)["weights"] == param_bytes  # ChunkFT's host stores taken out exactly
    # (param_bytes: the model's parameters and buffers, what the tracker counts as weights)
    # dense AdamW is tracked from its first step: both fp32 Adam states of every parameter are counted
    assert dict(dense.peak_by_category)["optimizer_states"] >= 2 * param_bytes
    assert dense.peak_bytes > 3 * param_bytes
    assert chunk.num_chunks == 2 and chunk.tracked_steps == (1,)
    assert chunk.predicted_peak_bytes and chunk.predicted_peak_bytes > param_bytes
    assert chunk.predicted_step_seconds and chunk.predicted_step_seconds > 0
    assert chunk.peak_bytes < dense.peak_bytes  # one window of states and gradients, not all of them
    table = peers.results_table([dense, chunk], classification=False)
    assert "| AdamW |" in table and "| ChunkFT K=2 |" in table
    assert "| ChunkFT K=2 | 2 |" in peers.planner_table([dense, chunk])
    assert "held-out loss within 2% of dense AdamW" in peers.goals_table([dense, chunk])


@pytest.mark.parametrize(
    ("kind", "module", "lr"),
    [("lora", "peft", 3e-3), ("badam", "badam", 1e-3), ("lomo", "lomo_optim", 3e-2),
     ("galore", "galore_torch", 1e-3)],
)
def test_peer_runs_two_steps(setup, kind: str, module: str, lr: float) -> None:
    pytest.importorskip(module)
    (r,) = _run(setup, [peers.MethodSpec(kind, kind, lr)])  # type: ignore[arg-type]
    _check_trained(r)
    if kind == "lora":
        assert 0 < r.trainable_params < sum(p.numel() for p in setup[0].parameters())


def test_unrunnable_peer_is_a_row_not_a_crash(setup) -> None:
    pytest.importorskip("lomo_optim")
    if torch.cuda.is_available():
        pytest.skip("AdaLomo runs where CUDA exists")
    (r,) = _run(setup, [peers.MethodSpec("AdaLomo", "adalomo", 1e-3)])
    assert r.status.startswith("failed") and r.loss_after is None  # lomo-optim's AdaLomo calls .cuda()
    assert "| AdaLomo |" in peers.results_table([r], classification=False)


def test_badam_blocks_cover_every_parameter(setup) -> None:
    base = setup[0]
    blocks = peers.block_prefixes(base)
    names = [n for n, _ in base.named_parameters()]
    assert all(sum(any(p in n for p in b) for b in blocks) == 1 for n in names)  # each in exactly one
    assert blocks[0] == ["model.embed_tokens.weight"] and "lm_head.weight" in blocks[-1]


def test_write_section_replaces_its_block(tmp_path: Path) -> None:
    f = tmp_path / "r.md"
    peers.write_section(f, "x", "first")
    peers.write_section(f, "y", "other")
    peers.write_section(f, "x", "second")
    text = f.read_text()
    assert "second" in text and "first" not in text and "other" in text
    assert text.count("<!-- x -->") == 1
