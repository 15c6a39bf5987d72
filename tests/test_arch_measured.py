"""chunkft-run's measured CPU peak against chunkft-plan's prediction on users' own directories of
architectures beyond Llama (issue 15 item 6: measured peaks were 5-10% above the plan on tiny GPT-2,
Qwen2 and Gemma-2 folders): config-only directories planned with --random-init, trained on Tiny
Shakespeare with a character tokenizer (--tokenizer), one full rotation measured, within the README's 5%.

GPT-2 was 5.55% under the plan without checkpointing: its config's use_cache=True made chunkft-run's
step build a KV cache that the plan and the executor's own traced step never had (K=1: 257 KB below the
trace with GPT-2's dropout, 266 KB above it without); executor.loss now passes use_cache=False to
models that generate, and the step equals the trace to 4 KB: -1.81%."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_hf_configs import TINY
from test_tokenizer_option import char_tokenizer
from tiny_runs import SHAKESPEARE
from transformers import Gemma2Config, GPT2Config, Qwen2Config

from chunkft.executor.train import RunOptions, train
from chunkft.planner.cli import main as plan_main


def _config(kind: str):  # type: ignore[no-untyped-def]
    if kind == "gpt2":
        return GPT2Config(n_embd=64, n_layer=4, n_head=2, vocab_size=256, n_positions=256)
    return {"qwen2": Qwen2Config, "gemma2": Gemma2Config}[kind](num_hidden_layers=4, **TINY)


@pytest.mark.parametrize(
    ("kind", "checkpointing"),
    [
        ("qwen2", "none"),  # +0.13%
        ("qwen2", "all"),  # +0.27%
        ("gemma2", "none"),  # +0.09% (eager attention, scaled embedding, soft-capping)
        ("gemma2", "all"),  # +3.17%
        ("gpt2", "none"),  # -1.81% (-5.55% with a KV cache kept through the step; docstring)
        ("gpt2", "all"),  # -3.78% (tied embeddings, dropout)
    ],
)
def test_measured_peak_within_5_percent_of_the_plan(tmp_path: Path, kind: str, checkpointing: str) -> None:
    model = tmp_path / kind
    _config(kind).save_pretrained(model)
    text = SHAKESPEARE.read_text()[:20000]
    data = tmp_path / "data.txt"
    data.write_text(text)
    plan = tmp_path / "plan.json"
    args = [str(model), "--gpu", "cpu", "--seq-len", "128", "--batch-size", "1", "--chunks", "4",
            "--steps", "5", "--lr", "1e-3", "--schedule", "constant", "--dtype", "fp32",
            "--checkpointing", checkpointing, "--random-init", "--host-mem", "4GiB",
            "-o", str(plan)]  # fmt: skip
    res = CliRunner().invoke(plan_main, args)
    assert res.exit_code == 0, res.output
    tokenizer = char_tokenizer(tmp_path / "chars", text)
    result = train(RunOptions(plan, data, tmp_path / "run", progress=False, tokenizer_dir=tokenizer))
    report = json.loads(result.run_json.read_text())
    assert report["measured"]["memory_steps"] == [1, 2, 3, 4]  # every window of the rotation
    measured, predicted = report["measured"]["peak_bytes"], report["predicted"]["peak_bytes"]
    assert abs(measured - predicted) <= 0.05 * predicted, (measured, predicted)
