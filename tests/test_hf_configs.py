"""chunkft-plan on users' own Hugging Face directories (a config.json) of architectures the presets do
not cover: Gemma-2 (no sdpa attention in transformers) and models shallower than the 3-block profiling
copy whose config lists `layer_types` (Qwen2, Gemma-2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from transformers import Gemma2Config, PretrainedConfig, Qwen2Config

from chunkft.plan_format import load_plan
from chunkft.planner.cli import main
from chunkft.planner.profile_model import TRACE_LAYERS, _shallow_config, supported_attention

TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}
CONFIGS = {"qwen2": Qwen2Config, "gemma2": Gemma2Config}


def _model_dir(tmp_path: Path, kind: str, layers: int) -> Path:
    """A config-only model directory, as a user brings one."""
    d = tmp_path / f"{kind}-{layers}"
    CONFIGS[kind](num_hidden_layers=layers, **TINY).save_pretrained(d)
    return d


def _plan(model: Path, out: Path, *extra: str) -> Result:
    args = [str(model), "--gpu", "4090", "--seq-len", "64", "--host-mem", "4GiB", "--random-init"]
    return CliRunner().invoke(main, [*args, *extra, "-o", str(out)])


# ---------------------------------------------------------------------------------------- attention


def test_gemma2_forced_sdpa_is_refused_in_chunkft_words_and_nothing_is_written(tmp_path: Path) -> None:
    """transformers refuses sdpa for Gemma-2 with advice for Python callers (attn_implementation=...);
    the planner must say which of its own options to use instead."""
    out = tmp_path / "plan.json"
    r = _plan(_model_dir(tmp_path, "gemma2", 4), out, "--attn", "sdpa")
    assert r.exit_code == 2, r.output  # EXIT_BAD_INPUT
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chunkft-plan: error: "), r.output
    assert "--attn eager" in lines[0] and "attn_implementation" not in lines[0], lines[0]
    assert not out.exists()


def test_gemma2_plans_with_eager_by_default_and_the_plan_carries_it_to_the_run(tmp_path: Path) -> None:
    """Without --attn the planner takes the attention the model's class supports (Gemma-2: eager only;
    before, it failed with transformers' raw error); chunkft-run builds the model with the plan's."""
    out = tmp_path / "plan.json"
    r = _plan(_model_dir(tmp_path, "gemma2", 4), out)
    assert r.exit_code == 0, r.output
    assert load_plan(out).run.attn_implementation == "eager"
    r = _plan(_model_dir(tmp_path, "qwen2", 4), out)
    assert r.exit_code == 0, r.output
    assert load_plan(out).run.attn_implementation == "sdpa"  # where the class has it, as before


def test_supported_attention_reads_the_model_class() -> None:
    assert supported_attention(Gemma2Config(**TINY), "causal-lm") == ("eager",)
    assert supported_attention(Gemma2Config(**TINY), "sequence-classification") == ("eager",)
    assert supported_attention(Qwen2Config(**TINY), "causal-lm") == ("sdpa", "eager")


# --------------------------------------------------------------------------- models under 3 blocks


@pytest.mark.parametrize("kind", ["qwen2", "gemma2"])
@pytest.mark.parametrize("layers", [1, 2])
def test_models_shallower_than_the_profiling_copy_plan(tmp_path: Path, kind: str, layers: int) -> None:
    """The 3-block profiling copy of a 1- or 2-block model used to keep a shorter `layer_types` than
    its num_hidden_layers, and transformers raised IndexError building it."""
    out = tmp_path / "plan.json"
    r = _plan(_model_dir(tmp_path, kind, layers), out)
    assert r.exit_code == 0, r.output
    assert load_plan(out).predictions.peak_bytes > 0


def _layer_types(cfg: PretrainedConfig) -> list[str]:
    return list(cfg.layer_types)  # type: ignore[attr-defined]


@pytest.mark.parametrize("layers", [1, 2, 3, 6])
def test_the_profiling_copy_keeps_per_layer_lists_as_long_as_its_depth(layers: int) -> None:
    """Block i of the copy is block min(i, L-1) of the model: a deep model's first blocks, a shallow
    model's last block repeated; but block 0 is of the representative block's type (a same-type block
    below it, see _shallow_config). The model's own config is left as it was."""
    cfg = Gemma2Config(num_hidden_layers=layers, **TINY)
    before = _layer_types(cfg)
    copy = _shallow_config(cfg, TRACE_LAYERS)
    assert copy.num_hidden_layers == TRACE_LAYERS  # type: ignore[attr-defined]
    source = [min(i, layers - 1) for i in range(TRACE_LAYERS)]
    source[0] = source[1]
    assert _layer_types(copy) == [before[j] for j in source]  # type: ignore[arg-type]
    if layers >= 3:  # Gemma-2 alternates: the copy is [full, full, sliding], the model [sliding, full, ...]
        assert _layer_types(copy)[0] == _layer_types(copy)[1] != before[0]
    assert _layer_types(cfg) == before and cfg.num_hidden_layers == layers


# ----------------------------------------------------------------- modules the executor cannot slice


def test_windows_never_cut_what_the_executor_cannot_slice_so_the_run_accepts_the_plan(tmp_path: Path) -> None:
    """Nemotron's LayerNorm1P (x_hat * (1 + w) + b) has no sliced path: the plan keeps those tensors whole
    and chunkft-run trains it. Before: cuts landed inside them and chunkft-run refused the written plan."""
    from transformers import NemotronConfig

    from chunkft.executor.cli import main as run_main

    model = tmp_path / "nemotron"
    NemotronConfig(num_hidden_layers=2, vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=128, pad_token_id=None, bos_token_id=0,
                   eos_token_id=1).save_pretrained(model)  # fmt: skip
    out = tmp_path / "plan.json"
    args = [str(model), "--gpu", "cpu", "--seq-len", "32", "--batch-size", "2", "--chunks", "16",
            "--steps", "2", "--dtype", "fp32", "--random-init", "-o", str(out)]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    rows = {s.name: s.shape[0] for s in plan.chunk_table.params}
    whole_only = [n for n in rows if "layernorm" in n or n.startswith("model.norm")]
    assert whole_only
    for chunk in plan.chunk_table.chunks:
        for sl in chunk.slices:
            if sl.name in whole_only:
                assert (sl.row_start, sl.row_end) == (0, rows[sl.name]), sl
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 40)
    res = CliRunner().invoke(run_main, [str(out), "--data", str(data), "--output", str(tmp_path / "run"),
                                        "--quiet"])  # fmt: skip
    assert res.exit_code == 0, res.output


def test_the_solvers_partition_keeps_unsliceable_tensors_whole() -> None:
    """The partition the plan is written with (solver_chunks) moves every cut out of a tensor the
    structure marks unsliceable (here each tensor that K=8 cuts otherwise)."""
    import dataclasses

    from chunkft import profiles
    from chunkft.planner.profile_model import model_structure
    from chunkft.planner.solver import solver_chunks

    preset = profiles.load_model("tiny-llama")
    st = model_structure(preset.config, preset.task, "float32")
    rows = {s.name: s.shape[0] for s in st.specs}

    def cut(structure: object) -> set[str]:
        return {sl.name for ch in solver_chunks(structure, 8, 8) for sl in ch.slices  # type: ignore[arg-type]
                if (sl.row_start, sl.row_end) != (0, rows[sl.name])}

    straddled = cut(st)
    assert straddled and st.unsliceable == ()
    assert not cut(dataclasses.replace(st, unsliceable=tuple(sorted(straddled)))) & straddled
