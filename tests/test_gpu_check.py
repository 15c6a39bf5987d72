"""The GPU check's CPU dry run (bench/gpu_check.py): every case goes through chunkft-run's train() with the
transfer engine's asynchronous branch on stand-in streams, rotates through K=4 windows at least twice, and
an out-of-memory error in one case becomes a "missed" row while the later cases still run.

One dry run serves every test here (module fixture), with an OOM injected into the second case from inside
train()'s step loop (the loss raising torch.OutOfMemoryError at its third call, after step 0 and 1).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not an installed package

from bench import gpu_check  # noqa: E402

OOM_CASE = "llama-2-7b-13.72GiB"  # the second case; three more run after it
CASES = ["llama-3-8b-4090", OOM_CASE, "llama-2-7b-13.72GiB-r0", "k1-vs-adamw", "cuda-vs-cpu"]


def _data(tmp: Path) -> Path:
    """tinyshakespeare where the checkout has it (the dry run's default), else a stand-in text."""
    if gpu_check.DATA.is_file():
        return gpu_check.DATA
    words = "to be or not to be that is the question whether tis nobler in the mind".split()
    g = torch.Generator().manual_seed(0)
    text = " ".join(words[int(i)] for i in torch.randint(0, len(words), (4000,), generator=g))
    path = tmp / "text.txt"
    path.write_text(text + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import chunkft.executor.stream_standins
    import chunkft.executor.train

    tmp = tmp_path_factory.mktemp("gpu_check")
    out, work = tmp / "results" / "gpu_check.json", tmp / "work"
    real_train = chunkft.executor.train.train
    real_loss = chunkft.executor.train.causal_lm_loss
    written: list[int] = []  # rows in the summary at each write
    real_write = gpu_check.write_results
    streams: list[str] = []  # the stand-in streams train() built, one per run
    real_standins = chunkft.executor.stream_standins.standin_streams

    def standins(name: str) -> Any:
        streams.append(name)
        return real_standins(name)

    def train(opts: Any, log: Any = sys.stderr) -> Any:
        if Path(opts.output_dir).name != OOM_CASE:
            return real_train(opts, log)
        calls = [0]

        def loss(*args: Any, **kwargs: Any) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == 3:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return real_loss(*args, **kwargs)

        with pytest.MonkeyPatch.context() as m:
            m.setattr(chunkft.executor.train, "causal_lm_loss", loss)
            return real_train(opts, log)

    def write(out_path: Path, rows: list[Any], meta: dict[str, Any], pending: list[str]) -> None:
        written.append(len(rows))
        real_write(out_path, rows, meta, pending)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(chunkft.executor.train, "train", train)
        m.setattr(gpu_check, "write_results", write)
        m.setattr(chunkft.executor.stream_standins, "standin_streams", standins)
        argv = ["--device", "cpu", "--model", "tiny-llama", "--seq-len", "64", "--out", str(out),
                "--work-dir", str(work), "--keep", "--data", str(_data(tmp))]
        code = gpu_check.main(argv)
    summary = json.loads(out.read_text())
    return {"code": code, "out": out, "work": work, "summary": summary, "written": written,
            "streams": streams, "rows": {r["case"]: r for r in summary["rows"]}}


def test_summary_written_after_every_case(dry_run: dict[str, Any]) -> None:
    assert dry_run["code"] == 0
    assert dry_run["written"] == [1, 2, 3, 4, 5]  # after each case, not only at the end
    assert list(dry_run["rows"]) == CASES
    assert dry_run["summary"]["meta"]["pending"] == []
    md = dry_run["out"].with_suffix(".md").read_text()
    for case in CASES:
        assert f"| {case} (tiny-llama) |" in md
    assert not list(dry_run["out"].parent.glob("*.tmp"))  # written beside, then swapped in


def test_every_run_on_the_engines_asynchronous_path(dry_run: dict[str, Any]) -> None:
    # five cases on stand-in "late" streams (the CUDA branch of the transfer engine on the CPU); the
    # cuda-vs-cpu reference run is the synchronous CPU path and builds none
    assert dry_run["streams"] == ["late"] * 5


def test_oom_is_a_missed_row_and_later_cases_run(dry_run: dict[str, Any]) -> None:
    row = dry_run["rows"][OOM_CASE]
    assert row["status"] == "missed"
    assert "out of memory" in row["message"].lower() and "chunkft-plan" in row["message"]  # the re-plan line
    assert row["goals"] == [["the plan runs", "MISSED"]]
    for case in CASES[2:]:
        assert dry_run["rows"][case]["status"] == "ok", dry_run["rows"][case]["message"]


def test_every_window_is_written_back_and_fetched_again(dry_run: dict[str, Any]) -> None:
    for case in ("llama-3-8b-4090", "llama-2-7b-13.72GiB-r0", "cuda-vs-cpu"):
        row = dry_run["rows"][case]
        assert row["num_chunks"] == 4 and row["steps"] >= 2 * 4 * row["update_interval"] + 1
        metrics = (dry_run["work"] / case / "metrics.jsonl").read_text()
        records = [json.loads(ln) for ln in metrics.splitlines()]
        chunks = [r["chunk"] for r in records if "loss" in r]
        assert len(chunks) == row["steps"]
        for window in range(4):
            seen = [i for i, c in enumerate(chunks) if c == window]
            assert len(seen) >= 2, (case, window, chunks)
            # another window's visit in between: written back, then fetched again
            assert any(c != window for c in chunks[seen[0]:seen[-1]]), (case, window, chunks)
        assert all(v >= 2 for v in row["window_visits"].values()) and len(row["window_visits"]) == 4


def test_losses_finite_and_figures_from_run_json(dry_run: dict[str, Any]) -> None:
    for case in CASES:
        row = dry_run["rows"][case]
        if row["status"] != "ok":
            continue
        assert len(row["losses"]) == row["steps"] and all(math.isfinite(x) for x in row["losses"])
        run = json.loads((dry_run["work"] / case / "run.json").read_text())
        assert row["losses"] == run["losses"]["train"]
        assert row["peak_bytes"] == run["measured"]["peak_bytes"] and row["memory_method"] == "memtracker"
        assert row["predicted_peak_bytes"] == run["predicted"]["peak_bytes"]
        assert row["step_seconds"] == run["measured"]["step_seconds"] > 0
        assert ("losses finite", "met") in [tuple(g) for g in row["goals"]]


def test_loss_comparisons(dry_run: dict[str, Any]) -> None:
    k1 = dry_run["rows"]["k1-vs-adamw"]
    assert k1["num_chunks"] == 1 and len(k1["reference_losses"]) == len(k1["losses"]) >= gpu_check.MIN_STEPS
    assert k1["losses"][0] == k1["reference_losses"][0]  # same init, same first batch
    assert k1["max_rel_diff"] <= gpu_check.ADAMW_RTOL
    assert k1["losses"][-1] < k1["losses"][0] - 0.5  # it trains, so the comparison is not of two flat lines
    cpu = dry_run["rows"]["cuda-vs-cpu"]
    # on the CPU: stand-in streams against synchronous copies, which must agree exactly
    assert cpu["losses"] == cpu["reference_losses"] and cpu["max_rel_diff"] == 0.0
    assert cpu["update_interval"] == 2


def test_big_cases_sink_the_checkpoint_and_small_ones_write_it(dry_run: dict[str, Any]) -> None:
    assert dry_run["rows"]["llama-3-8b-4090"]["checkpoint"].startswith("streamed to /dev/null")
    assert not (dry_run["work"] / "llama-3-8b-4090" / "checkpoints").exists()
    assert dry_run["rows"]["k1-vs-adamw"]["checkpoint"] == "written"
    assert (dry_run["work"] / "k1-vs-adamw" / "checkpoints" / "latest").is_file()


def test_a_budget_nothing_fits_is_a_no_plan_row(tmp_path: Path, dry_run: dict[str, Any]) -> None:
    case = gpu_check.Case("tiny-1MiB", "tiny-llama", ("--budget", "1MiB"))
    a = gpu_check.argparse.Namespace(seq_len=64, keep=False)
    row = gpu_check.check_case(case, a, torch.device("cpu"), tmp_path, {})
    assert row.status == "no-plan" and "does not fit" in row.message, row.message
    assert row.goals == [("the plan runs", "n/a: no plan fits")]


def test_cuda_cap_counts_the_context_inside_24_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-only arithmetic, with torch.cuda's figures stood in: 1 GiB of the card in use before CUDA
    started, 1.5 GiB after the warm-up of which 0.25 GiB is the allocator's, so the context is 0.25 GiB."""
    gib, total = 2**30, 141 * 2**30
    fraction: list[float] = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (total - int(1.5 * gib), total))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: gib // 4)
    props = type("Props", (), {"total_memory": total})
    monkeypatch.setattr(cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", lambda f, device=None: fraction.append(f))
    cap = gpu_check.cap_cuda(torch.device("cpu"), used_before=gib)  # the warm-up's tensors on the CPU
    assert cap["context_bytes"] == gib // 4
    assert cap["allocator_cap_bytes"] + cap["context_bytes"] == gpu_check.CAP_BYTES
    assert fraction == [cap["allocator_cap_bytes"] / total]
    assert "NVML" in cap["counted"]


def test_cuda_verdicts() -> None:
    gib = 2**30
    row = gpu_check.Row(case="x", model="m", status="ok", num_chunks=2, losses=[2.0, 1.0],
                        window_visits={"0": 2, "1": 2}, predicted_peak_bytes=13 * gib,
                        predicted_headroom_bytes=0, peak_bytes=int(13.5 * gib), reserved_bytes=23 * gib,
                        context_bytes=gib, budget_bytes=int(13.72 * gib))
    paper = dict(gpu_check.judge(gpu_check.Case("x", "m", (), paper=True, budget_goal=True), row, cuda=True))
    assert paper["allocated peak <= predicted peak + headroom"] == "MISSED"
    assert paper["reserved + context <= 23.99 GiB (the RTX 4090's memory)"] == "MISSED"  # 24 GiB > 23.99
    assert paper["allocated peak <= 13.72 GiB (paper, Llama-2-7B at 1K tokens)"] == "met"
    assert paper["reserved + context <= the plan's budget 13.72 GiB"] == "MISSED"
    assert paper["every window written back and fetched again (>= 2 visits each)"] == "met"


def test_a_pinning_failure_stops_the_check_after_writing_its_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed cudaHostRegister leaves its CUDA error pending, so no later case could run in this process:
    the check writes the row and stops with exit 1."""
    import chunkft.executor.train
    from chunkft.executor.streams import PinnedMemoryError

    def train(opts: Any, log: Any = sys.stderr) -> Any:
        raise PinnedMemoryError("page-locking 1.00 GiB of host memory for optimizer states failed (injected)")

    monkeypatch.setattr(chunkft.executor.train, "train", train)
    monkeypatch.setattr(gpu_check, "train", train, raising=False)
    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--model", "tiny-llama", "--seq-len", "64", "--out", str(out),
            "--data", str(_data(tmp_path)), "--only", "k1-vs-adamw", "--only", "cuda-vs-cpu"]  # fmt: skip
    assert gpu_check.main(args) == 1
    rows = json.loads(out.read_text())["rows"]
    assert [r["status"] for r in rows] == ["pinning-failed"]  # the second case never ran
