"""The README's first two commands are the ones users and CI run: keep them true."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```sh\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_readme_run_command_runs_this_addon_on_loopback():
    run_command, _ = readme_commands()
    assert "pip install -r requirements.txt" in run_command
    assert "mitmdump -s addon.py --mode reverse:" in run_command
    assert "--listen-host 127.0.0.1" in run_command
