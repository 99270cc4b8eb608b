"""The weft command's own surface (no lab needed): version, and errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from agent import __version__
from agent.cli import app


def test_version_flag_and_command():
    runner = CliRunner()
    out = runner.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"weft {__version__}"
    out = runner.invoke(app, ["version", "--lab", "no-such-lab"])
    assert out.exit_code == 0 and out.output.splitlines()[0] == f"client  weft {__version__}"


def test_a_user_error_is_one_line_and_an_exit_code_not_a_traceback():
    """An unknown lab (no root needed to find out) ends with `error: ...` and exit code 4."""
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "lab", "status", "--lab", "no-such-lab"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: "), proc.stderr
