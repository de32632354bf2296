"""The README's two commands are the ones CI runs, letter for letter."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands(readme: str) -> list[str]:
    """The one-line bash blocks of the README's "Two commands" section."""
    section = readme.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def not_in_ci(readme: str, ci: str) -> list[str]:
    return [c for c in readme_commands(readme) if c not in ci.splitlines()]


def test_ci_runs_the_readme_commands_verbatim():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    commands = readme_commands(readme)
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    assert not not_in_ci(readme, (REPO / ".ci" / "run").read_text(encoding="utf-8"))


def test_a_readme_command_that_ci_does_not_run_is_caught():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    planted = readme.replace("-m pytest -q", "-m pytest -q -x", 1)
    assert not_in_ci(planted, (REPO / ".ci" / "run").read_text(encoding="utf-8")) == [
        readme_commands(planted)[1]]
