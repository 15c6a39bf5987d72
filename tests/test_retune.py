"""A model chunkft exported is planned and fine-tuned again from its trained weights; a config-only directory
is warned about at plan time, refused by chunkft-run in one line, and trained with --random-init from the
plan's seed (like a preset) with the directory's tokenizer or the byte-level one."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from chunkft.executor.cli import main as run_main
from chunkft.executor.data import ByteTokenizer, HFTokenizer
from chunkft.executor.train import build_model
from chunkft.plan_format import PlanError, load_plan, plan_from_dict
from chunkft.planner.cli import main as plan_main

SHAKESPEARE = Path(__file__).parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
GOLDEN = Path(__file__).parent / "golden" / "plan_v1.json"
STEPS = 20
# Everything but the model: the same settings give the same plan, so runs can be compared step by step.
PLAN_ARGS = [
    "--gpu", "cpu", "--seq-len", "32", "--batch-size", "4", "--micro-batch", "2", "--chunks", "4",
    "--steps", str(STEPS), "--lr", "2e-3", "--schedule", "constant", "--dtype", "fp32",
    "--checkpointing", "none",
]  # fmt: skip


def _plan(model: str | Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(plan_main, [str(model), *PLAN_ARGS, *extra, "-o", str(out)])


def _run(plan: Path, data: Path, out: Path, *extra: str) -> Result:
    return CliRunner().invoke(
        run_main, [str(plan), "--data", str(data), "--output", str(out), "--quiet", *extra]
    )


def _losses(out: Path) -> tuple[list[float], dict[int, float]]:
    """(train loss per step, eval loss by step) from a run's metrics.jsonl."""
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x["eval_loss"] for x in lines if "eval_loss" in x}
    return [x["loss"] for x in lines if "loss" in x], evals


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(data file, output directory) of a 20-step tiny-llama run."""
    tmp = tmp_path_factory.mktemp("first")
    data = tmp / "shakespeare.txt"
    data.write_text(SHAKESPEARE.read_text()[:20_000])
    res = _plan("tiny-llama", tmp / "plan.json")
    assert res.exit_code == 0, res.output
    res = _run(tmp / "plan.json", data, tmp / "run")
    assert res.exit_code == 0, res.output
    return data, tmp / "run"


def _config_only(directory: Path, **overrides: object) -> Path:
    """A directory with tiny-llama's config.json and nothing else."""
    from chunkft.profiles import load_model

    config = load_model("tiny-llama").config
    for k, v in overrides.items():
        setattr(config, k, v)
    config.save_pretrained(str(directory))
    return directory


def test_an_exported_model_is_planned_and_fine_tuned_again(tmp_path: Path, first: tuple[Path, Path]) -> None:
    data, run1 = first
    exported = run1 / "model"
    assert HFTokenizer(exported).encode("héllo ☃") == ByteTokenizer().encode("héllo ☃")
    res = _plan(exported, tmp_path / "again.json", "--eval-every", "5")
    assert res.exit_code == 0, res.output
    assert load_plan(tmp_path / "again.json").model.source == "hf-dir"
    res = _run(tmp_path / "again.json", data, tmp_path / "run2", "--max-steps", "3")
    assert res.exit_code == 0, res.output
    losses1, evals1 = _losses(run1)
    losses2, evals2 = _losses(tmp_path / "run2")
    # the same first batch (same seed) scored ~ln(512) at random init, now what the trained model scores
    assert losses2[0] < losses1[0] - 2.0, (losses1, losses2)
    assert abs(losses2[0] - losses1[-1]) < 0.5, (losses1, losses2)
    # the held-out loss before the second run's first step is the first run's final one: the same weights
    assert evals2[0] == pytest.approx(evals1[STEPS], abs=1e-5)
    assert HFTokenizer(tmp_path / "run2" / "model").encode("<|eos|>") == list(b"<|eos|>")  # re-exported


def test_config_only_directory_is_warned_at_plan_time_and_refused_by_the_run(
    tmp_path: Path, first: tuple[Path, Path]
) -> None:
    data, _ = first
    model = _config_only(tmp_path / "cfg")
    res = _plan(model, tmp_path / "plan.json")
    assert res.exit_code == 0, res.output
    assert "has config.json but no weights" in res.stderr and "--random-init" in res.stderr, res.stderr
    res = _run(tmp_path / "plan.json", data, tmp_path / "out")
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "has config.json but no weights" in lines[0] and "--random-init" in lines[0]
    assert not (tmp_path / "out").exists()
    # the advice is a command (before: "re-plan with chunkft-plan --random-init", no model, no -o)
    replan = shlex.split(lines[0][lines[0].index("chunkft-plan ") :])
    assert CliRunner().invoke(plan_main, replan[1:]).exit_code == 0
    replanned = Path(replan[replan.index("-o") + 1])
    assert load_plan(replanned).model.source == "hf-config"
    res = _run(replanned, data, tmp_path / "out", "--max-steps", "1")
    assert res.exit_code == 0, res.output


def test_random_init_trains_a_config_only_directory_like_the_preset(
    tmp_path: Path, first: tuple[Path, Path]
) -> None:
    data, run1 = first
    model = _config_only(tmp_path / "cfg")
    res = _plan(model, tmp_path / "plan.json", "--random-init")
    assert res.exit_code == 0, res.output
    assert "warning" not in res.stderr
    plan = load_plan(tmp_path / "plan.json")
    assert (plan.model.source, plan.model.path) == ("hf-config", str(model))
    res = _run(tmp_path / "plan.json", data, tmp_path / "out", "--max-steps", "3")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model" / "tokenizer.json").is_file()  # the byte-level one, exported
    # tiny-llama's config from the same seed: the preset's very initialisation, so the very same losses
    assert _losses(tmp_path / "out")[0] == pytest.approx(_losses(run1)[0][:3], abs=1e-5)


def test_random_init_uses_the_directory_tokenizer_and_ignores_its_weights(
    tmp_path: Path, first: tuple[Path, Path]
) -> None:
    import torch

    from chunkft.profiles import build_model as build_preset
    from chunkft.profiles import load_model

    exported = first[1] / "model"
    res = _plan(exported, tmp_path / "plan.json", "--random-init")
    assert res.exit_code == 0, res.output
    model, tokenizer = build_model(load_plan(tmp_path / "plan.json"), torch.device("cpu"))
    assert isinstance(tokenizer, HFTokenizer) and str(exported) in str(tokenizer.hf.name_or_path)
    torch.manual_seed(0)
    fresh = build_preset(load_model("tiny-llama"), "cpu")
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)  # the seed's init, not the trained weights


def test_random_init_without_a_tokenizer_needs_room_for_bytes(tmp_path: Path) -> None:
    import torch

    from chunkft.executor.train import RunError

    model = _config_only(tmp_path / "cfg", vocab_size=200, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    res = _plan(model, tmp_path / "plan.json", "--random-init")
    assert res.exit_code == 0, res.output
    with pytest.raises(RunError, match=r"no tokenizer files\) has a 200-token vocabulary; the byte"):
        build_model(load_plan(tmp_path / "plan.json"), torch.device("cpu"))


def test_random_init_is_for_directories(tmp_path: Path) -> None:
    res = _plan("tiny-llama", tmp_path / "plan.json", "--random-init")
    assert res.exit_code == plan_main.usage_exit_code and not (tmp_path / "plan.json").exists(), res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--random-init is for a model directory" in lines[0], res.output
    assert "tiny-llama is a preset, always randomly initialised" in lines[0]


def test_hf_config_source_needs_the_directory_in_the_plan() -> None:
    data = json.loads(GOLDEN.read_text())
    data["model"] = {**data["model"], "source": "hf-config", "path": None}
    with pytest.raises(PlanError, match="model.path must name the model directory when source is 'hf-co"):
        plan_from_dict(data)
    data["model"]["path"] = "/models/base"
    assert plan_from_dict(data).model.source == "hf-config"
