"""The planner's side of chunked cross-entropy: traced head, exact predictions, when the solver uses it.

A Llama whose vocabulary dwarfs its width (the Llama-3 situation in miniature: the logits of a step
outweigh a block's activations) makes the head the peak, so the difference is large and checkable.
"""

import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import LlamaConfig

from chunkft import profiles
from chunkft.chunks import partition
from chunkft.executor.loss import DEFAULT_CHUNK_TOKENS, piece_logit_bytes
from chunkft.plan_format import load_plan
from chunkft.planner.cli import main
from chunkft.planner.costs import cost_model
from chunkft.planner.profile_model import activation_profile, model_structure, reference_step_peak
from chunkft.planner.simulator import Candidate, edge_patterns, simulate_plan, window_peaks, windows_of
from chunkft.planner.solver import make_setup

SEQ = 1024
VOCAB = 8192


def wide_vocab_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2 * SEQ,
    )


@pytest.mark.parametrize("chunk_tokens", [None, DEFAULT_CHUNK_TOKENS])
def test_prediction_matches_the_traced_step(chunk_tokens: int | None) -> None:
    """Every window within 3% of the executor's own step (causal_lm_loss, SliceGradients, optimizer)
    traced under FakeTensorMode, with and without chunked cross-entropy."""
    cfg = wide_vocab_config()
    st = model_structure(cfg, "causal-lm", "float32")
    setup = make_setup(
        st,
        cost_model(profiles.load_gpu("cpu"), "float32"),
        weight_dtype="float32",
        optimizer="adamw",
        sgd_momentum=False,
        seq_len=SEQ,
        on_gpu=False,
    )
    chunks = partition(list(st.specs), num_chunks=3, policy="rows", state_bytes_per_element=8)
    windows = windows_of(st, st.specs, chunks)
    edges = edge_patterns(windows, st.num_layers)
    act = activation_profile(cfg, "causal-lm", 1, SEQ, "float32", chunk_tokens=chunk_tokens, edges=edges)
    cand = Candidate(
        windows,
        (0, 1, 2),
        (),
        1,
        1,
        "host",
        "float32",
        True,
        chunk_tokens=chunk_tokens,
    )
    predicted = window_peaks(setup, cand, act)
    for w, p in enumerate(predicted):
        traced, _ = reference_step_peak(
            cfg,
            "causal-lm",
            chunks,
            w,
            micro_batch=1,
            grad_accum=1,
            seq_len=SEQ,
            dtype="float32",
            chunk_tokens=chunk_tokens,
        )
        assert abs(p - traced) <= 0.03 * traced, (w, p, traced)


def test_chunked_loss_lowers_the_predicted_peak_by_the_logits() -> None:
    """Plain: fp32 logits of the sequence, their log-softmax and gradient exist at once; chunked: a
    piece's. The saving is at least two full logits less two pieces."""
    cfg = wide_vocab_config()
    plain = activation_profile(cfg, "causal-lm", 1, SEQ, "float32")
    chunked = activation_profile(cfg, "causal-lm", 1, SEQ, "float32", chunk_tokens=DEFAULT_CHUNK_TOKENS)
    full = piece_logit_bytes(1, SEQ, None, VOCAB, "float32")
    piece = piece_logit_bytes(1, SEQ, DEFAULT_CHUNK_TOKENS, VOCAB, "float32")
    for mode in ("full", "input", "weight"):
        (pf, pb), (cf, cb) = plain.head(mode), chunked.head(mode)  # type: ignore[arg-type]
        assert pf.delta_bytes - cf.delta_bytes >= full - piece  # logits no longer kept for backward
        assert max(pf.excursion_bytes, pf.delta_bytes + pb.excursion_bytes) - max(
            cf.excursion_bytes, cf.delta_bytes + cb.excursion_bytes
        ) >= 2 * (full - piece)
    assert chunked.blocks == plain.blocks  # only the head is traced again


def _plan(tmp_path: Path, *extra: str) -> tuple[int, str, Path]:
    model = tmp_path / "model"
    if not model.exists():
        wide_vocab_config().save_pretrained(model)
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(
        main,
        [
            str(model),
            "--gpu",
            "cpu",
            "--seq-len",
            str(SEQ),
            "--steps",
            "100",
            "--budget",
            "60MiB",
            "-o",
            str(out),
            *extra,
        ],
    )
    return r.exit_code, r.output, out


def test_auto_chooses_chunked_cross_entropy_when_full_logits_do_not_fit(tmp_path: Path) -> None:
    code, output, out = _plan(tmp_path, "--cross-entropy", "full")
    assert code == 3 and not out.exists(), output
    code, output, out = _plan(tmp_path)
    assert code == 0, output
    plan = load_plan(out)
    assert plan.run.chunked_cross_entropy
    assert "chunked cross-entropy" in output
    assert simulate_plan(plan).peak_bytes == plan.predictions.peak_bytes  # the plan re-simulates as saved


def test_chunked_cross_entropy_refused_where_the_executor_has_none(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(
        main, ["tiny-bert", "--gpu", "cpu", "--seq-len", "64", "--cross-entropy", "chunked", "-o", str(out)]
    )
    assert r.exit_code != 0 and not out.exists()
    lines = [line for line in r.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--cross-entropy full" in lines[0], r.output


def test_the_plan_records_a_forced_cross_entropy_and_a_replan_keeps_it(tmp_path: Path) -> None:
    """run.cross_entropy says what was asked: "auto" when the solver chose, the loss when the user forced
    it; the re-plan command chunkft-run prints keeps a forced loss (and leaves an automatic one free)."""
    from chunkft.executor.replan import replan_command

    code, output, out = _plan(tmp_path)
    assert code == 0, output
    auto = load_plan(out)
    assert (auto.run.cross_entropy, auto.run.chunked_cross_entropy) == ("auto", True)
    assert "--cross-entropy" not in replan_command(auto, auto.hardware.budget_bytes, tmp_path / "a.json")
    code, output, out = _plan(tmp_path, "--cross-entropy", "chunked", "--budget", "4GiB")
    assert code == 0, output
    forced = load_plan(out)
    assert (forced.run.cross_entropy, forced.run.chunked_cross_entropy) == ("chunked", True)
    replanned = tmp_path / "replanned.json"
    command = replan_command(forced, forced.hardware.budget_bytes, replanned)
    assert "--cross-entropy chunked" in command
    r = CliRunner().invoke(main, shlex.split(command)[1:])
    assert r.exit_code == 0, r.output
    assert load_plan(replanned).run.cross_entropy == "chunked"
