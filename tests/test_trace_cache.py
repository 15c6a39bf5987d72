"""The on-disk cache of traces and model structure (planner/trace_cache.py): plans are byte-identical
with it, without it and from it; what it reads is checked, what it cannot use is ignored."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import chunkft.planner.profile_model as pm
from chunkft.planner import trace_cache as tc
from chunkft.planner.cli import main

TINY = ["--gpu", "cpu", "--seq-len", "128", "--host-mem", "4GiB"]


@pytest.fixture(autouse=True)
def fresh_process_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each plan starts like a new process: the in-memory profile caches would hide the disk."""
    monkeypatch.setattr(pm, "_CACHE", {})
    monkeypatch.setattr(pm, "_TRACERS", {})


def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pm, "_CACHE", {})
    monkeypatch.setattr(pm, "_TRACERS", {})


def _plan(out: Path, model: str = "tiny-llama", *extra: str, batch: int = 1) -> bytes:
    r = CliRunner().invoke(main, [model, *TINY, "--batch-size", str(batch), *extra, "-o", str(out)])
    assert r.exit_code == 0, r.output
    return out.read_bytes()


def _no_tracing_or_building(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("traced or built although everything was cached")

    monkeypatch.setattr(pm, "_trace", refuse)
    monkeypatch.setattr(pm._ShallowTracer, "_trace_block_alone", refuse)
    monkeypatch.setattr(pm, "build_from_config", refuse)


@pytest.mark.parametrize("extra", [(), ("--cross-entropy", "chunked")], ids=["plain", "chunked-ce"])
def test_cached_uncached_and_warm_plans_are_byte_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: tuple[str, ...]
) -> None:
    model = "tiny-llama-tied" if extra else "tiny-llama"
    monkeypatch.setenv(tc.ENV, "off")
    uncached = _plan(tmp_path / "off.json", model, *extra, batch=2)  # micro-batches 1 and 2
    assert not list(tmp_path.glob("cache/**/*.json"))
    monkeypatch.setenv(tc.ENV, str(tmp_path / "cache"))
    _fresh(monkeypatch)
    cold = _plan(tmp_path / "cold.json", model, *extra, batch=2)
    assert len(list((tmp_path / "cache" / "traces").glob("*.json"))) == 2
    assert len(list((tmp_path / "cache" / "models").glob("*.json"))) == 1
    _fresh(monkeypatch)
    _no_tracing_or_building(monkeypatch)
    warm = _plan(tmp_path / "warm.json", model, *extra, batch=2)
    assert uncached == cold == warm
    if extra:
        assert json.loads(warm)["run"]["chunked_cross_entropy"] is True


def test_corrupt_or_mismatching_files_are_ignored_and_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(tc.ENV, str(cache))
    want = _plan(tmp_path / "a.json")
    files = sorted(cache.glob("*/*.json"))
    assert files
    damage = [
        b"{not json",
        b"",
        json.dumps({"key": {"format": -1}, "sections": {}}).encode(),  # another key's file
    ]
    for i, f in enumerate(files):
        f.write_bytes(damage[i % len(damage)])
    _fresh(monkeypatch)
    assert _plan(tmp_path / "b.json") == want
    for f in files:  # recomputed and written back whole
        data = json.loads(f.read_text())
        assert data["key"]["format"] == tc.TRACE_FORMAT and data["sections"]


def test_a_value_that_does_not_decode_is_recomputed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv(tc.ENV, str(cache))
    want = _plan(tmp_path / "a.json")
    for f in cache.glob("traces/*.json"):
        data = json.loads(f.read_text())
        data["sections"]["profile"]["plain"]["hidden_bytes"] = "many"
        for name in data["sections"].get("edges", {}):
            data["sections"]["edges"][name] = [[1.5, 2, 3], [0, 0, 0]]  # not integers
        f.write_text(json.dumps(data))
    _fresh(monkeypatch)
    assert _plan(tmp_path / "b.json") == want


def test_an_unwritable_cache_costs_nothing_but_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(tc.ENV, "off")
    want = _plan(tmp_path / "a.json")
    monkeypatch.setenv(tc.ENV, str(blocker / "cache"))  # mkdir fails: a file is in the way
    _fresh(monkeypatch)
    assert _plan(tmp_path / "b.json") == want
    assert blocker.read_text() == "not a directory"


def _key(**change: object) -> str:
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config_fields = {"hidden_size": "hidden_size", "name_or_path": "_name_or_path", "cfg_dtype": "dtype"}
    for arg, name in config_fields.items():
        if arg in change:
            setattr(cfg, name, change.pop(arg))
    args = {"task": "causal-lm", "micro_batch": 1, "seq_len": 128, "dtype": "float32", "attn": "sdpa"}
    args.update(change)  # type: ignore[arg-type]
    return tc.key_digest(tc.trace_key(cfg, padded=False, **args))  # type: ignore[arg-type]


def test_the_key_follows_what_the_trace_depends_on(monkeypatch: pytest.MonkeyPatch) -> None:
    base = _key()
    assert _key() == base  # stable
    for change in (
        {"seq_len": 256},
        {"dtype": "bfloat16"},
        {"micro_batch": 2},
        {"attn": "eager"},
        {"task": "sequence-classification"},
        {"hidden_size": 64},
    ):
        assert _key(**change) != base, change
    # where the config came from, and the dtype HF writes back into it, change nothing traced
    assert _key(name_or_path="/some/dir") == base
    assert _key(cfg_dtype="bfloat16") == base  # the config's dtype field, not the traced dtype
    import torch

    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert _key() != base
    monkeypatch.undo()
    monkeypatch.setattr(tc, "TRACE_FORMAT", tc.TRACE_FORMAT + 1)
    assert _key() != base


def test_the_cache_directory_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tc.ENV, str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tc.cache_dir() == tmp_path / "mine"
    for off in ("off", "OFF", "none", "0", "false", "no"):
        monkeypatch.setenv(tc.ENV, off)
        assert tc.cache_dir() is None
    monkeypatch.setenv(tc.ENV, "")
    assert tc.cache_dir() == tmp_path / "xdg" / "chunkft"
    monkeypatch.delenv(tc.ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tc.cache_dir() == tmp_path / "home" / ".cache" / "chunkft"


def test_a_plan_writes_only_under_the_chosen_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "chosen"
    home = tmp_path / "home"
    monkeypatch.setenv(tc.ENV, str(cache))
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    _plan(tmp_path / "p.json")
    assert {p.parent.name for p in cache.glob("*/*.json")} == {"models", "traces"}
    assert not home.exists()
    assert not list(cache.glob("*/*.tmp"))  # temporary files are moved into place or removed


def test_cache_files_honour_the_umask(tmp_path: Path) -> None:
    entry = tc.Entry({"k": 1}, tmp_path / "traces" / "x.json")
    old = os.umask(0o022)
    try:
        entry.put("facts", "a", True)
    finally:
        os.umask(old)
    assert (entry.path.stat().st_mode & 0o777) == 0o644
    assert tc.Entry({"k": 1}, entry.path).get("facts", "a", tc.decode_bool) is True
    assert tc.Entry({"k": 2}, entry.path).get("facts", "a", tc.decode_bool) is None  # another key
