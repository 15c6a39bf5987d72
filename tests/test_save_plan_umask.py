"""save_plan writes through mkstemp (0600): the plan must still get the user's umask like any file."""

import os
import stat
from pathlib import Path

import pytest

from planner.plan import load_plan, save_plan

GOLDEN = Path(__file__).parent / "golden" / "plan_v1.json"


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_save_plan_honours_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    plan = load_plan(GOLDEN)
    old = os.umask(umask)
    try:
        save_plan(plan, tmp_path / "plan.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "plan.json").stat().st_mode) == mode
    assert load_plan(tmp_path / "plan.json") == plan
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary left behind
