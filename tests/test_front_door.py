"""The README's three commands are what CI runs: the same install command and the same test command,
character for character (issue 15: the README once lacked the pretrained wheel CI installs, so a
newcomer's `pytest` failed one test)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    """The command lines of the README's "Three commands on a fresh machine" block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"## Three commands on a fresh machine\n\n```bash\n(.*?)```", text, re.S)
    assert block, "README has no 'Three commands on a fresh machine' bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_ci_runs_the_readmes_install_and_test_commands_literally() -> None:
    install, main_job, tests = readme_commands()
    ci = [ln for ln in (REPO / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert install in ci and tests in ci, (install, tests, ci)
    assert ci.index(install) < ci.index(tests)
    assert main_job == "chunkft-plan llama-3-8b --gpu 4090 -o plan.json"
