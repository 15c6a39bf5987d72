"""save_plan writes through mkstemp (0600): the plan must still get the user's umask like any file."""

import os
import stat
from pathlib import Path

import pytest

from chunkft.plan_format import load_plan, save_plan

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


def test_reading_the_umask_does_not_change_it_even_for_an_instant(monkeypatch: pytest.MonkeyPatch) -> None:
    """current_umask reads /proc/self/status where it can: os.umask(0) then back would, for that instant,
    give other threads' new files mode 0666."""
    from chunkft.files import current_umask

    if not Path("/proc/self/status").is_file():
        pytest.skip("no /proc (not Linux): the set-and-restore fallback is all there is")
    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("os.umask was called"))
        assert current_umask() == 0o027
    finally:
        monkeypatch.undo()
        os.umask(old)
