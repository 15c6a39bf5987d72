"""The planner's disk-tier figures against the executor's: host bytes of the staging, the disk lane."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from chunkft.executor.state_store import staging_host_bytes
from chunkft.plan_format import load_plan
from chunkft.planner.cli import main
from chunkft.planner.simulator import (
    checkpoint_host_bytes,
    disk_checkpoint_host_bytes,
    disk_host_bytes,
    disk_lane_seconds,
    disk_unhidden_seconds,
    host_bytes,
    setup_and_candidate,
)


@pytest.fixture(scope="module", params=["fp32", "bf16"])
def planned(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    out = Path(tmp_path_factory.mktemp("p")) / "plan.json"
    args = ["tiny-llama", "--gpu", "cpu", "--seq-len", "64", "--batch-size", "1", "--host-mem", "4GiB",
            "--chunks", "4", "--dtype", request.param, "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    plan = load_plan(out)
    setup, cand, _ = setup_and_candidate(plan)
    return plan, setup, cand


def test_disk_host_bytes_match_the_executors_staging(planned) -> None:  # type: ignore[no-untyped-def]
    plan, setup, cand = planned
    assert plan.placement.optimizer_states == "host"
    assert disk_host_bytes(setup, cand) == staging_host_bytes(plan)
    assert disk_host_bytes(setup, cand) < host_bytes(setup, cand)  # K=4: (slots + 2) of 4 windows or less


def test_disk_lane_reads_and_writes_one_largest_window(planned) -> None:  # type: ignore[no-untyped-def]
    plan, setup, cand = planned
    slots = 2 if plan.placement.prefetch else 1
    window = staging_host_bytes(plan) // (slots + 2)  # the executor's bytes of the largest window
    lane = disk_lane_seconds(setup, cand, 1_000_000_000, 500_000_000)
    assert lane == pytest.approx(window / 1e9 + window / 5e8)


def test_disk_checkpoint_holds_one_state_file_more(planned) -> None:  # type: ignore[no-untyped-def]
    plan, setup, cand = planned
    extra = disk_checkpoint_host_bytes(setup, cand) - checkpoint_host_bytes(setup, cand)
    largest = max(-(-w.numel // cand.ranks) for w in cand.windows)
    assert extra == largest * 4  # fp32 master rows or fp32 moments: 4 bytes an element


def test_unhidden_part_spreads_over_the_visit() -> None:
    assert disk_unhidden_seconds(0.5, 0.2, 2) == pytest.approx(0.05)  # 0.5 - 0.4 over 2 steps
    assert disk_unhidden_seconds(0.3, 0.2, 2) == 0.0  # hidden
