"""The weft command's own surface (no lab needed): version, and errors without tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_agent_run_execs_the_agent_with_the_options_it_parsed(monkeypatch):
    """`weft agent run` checks its options, then replaces itself (same process) with
    `python -OO -m agent.run`, handing over the settings it built and the log level; a bad
    option stays the CLI's error and execs nothing."""
    import os

    from agent.settings import AgentSettings

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    runner = CliRunner()
    argv = ["agent", "run", "--node", "node-1", "--node-ip", "10.0.0.11", "--cgroup-mode", "lab"]
    out = runner.invoke(app, [*argv, "--drain-timeout", "7", "--log-level", "debug"])
    assert out.exit_code == 0, out.output
    [(path, args)] = calls
    assert path == sys.executable and args[0] == sys.executable
    assert args[-6:-1] == ["-OO", "-m", "agent.run", "--log-level", "debug"]
    settings = AgentSettings.model_validate_json(args[-1])
    assert (settings.node, settings.node_ip, settings.cgroup_mode) == ("node-1", "10.0.0.11", "lab")
    assert settings.drain_timeout == 7.0

    out = runner.invoke(app, [*argv, "--log-level", "chatty"])
    assert out.exit_code != 0 and len(calls) == 1


def test_the_agent_process_reports_a_user_error_as_the_cli_does(monkeypatch, capsys):
    """agent/run.py: an error the agent reports (here: the environment) ends as the CLI's
    do, `error: ...` and the error's exit code, not a traceback."""
    import agent.main
    from agent import run
    from agent.settings import AgentSettings
    from controller.errors import EnvironmentProblem

    def fail(settings: AgentSettings) -> None:
        assert settings.node == "node-1"
        raise EnvironmentProblem("no bpffs", hint="mount it")

    import logging

    monkeypatch.setattr(agent.main, "main", fail)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)  # the test's logging stays
    settings = AgentSettings(node="node-1", node_ip="10.0.0.11")
    code = run.main(["--log-level", "INFO", settings.model_dump_json()])
    assert code == 3
    assert capsys.readouterr().err == "error: no bpffs\n  hint: mount it\n"
    assert run.main(["--settings", "{}"]) == 2


def test_waypoint_run_execs_the_waypoint_with_the_options_it_parsed(monkeypatch):
    """`weft waypoint run` checks its options, then replaces itself with
    `python -OO -m agent.run --waypoint`, as the agent does; the settings come back as
    they went (paths as paths); a bad option stays the CLI's error and execs nothing."""
    import os

    from agent import run
    from agent.waypoint.server import WaypointSettings

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(os, "execv", lambda path, argv: calls.append((path, argv)))
    runner = CliRunner()
    argv = ["waypoint", "run", "--name", "ai-waypoint", "--listen", "10.244.1.9:15008"]
    extra = ["--keeper-socket", "/run/k.sock", "--escaped-slashes", "decode"]
    out = runner.invoke(app, [*argv, *extra, "--log-level", "debug"])
    assert out.exit_code == 0, out.output
    [(path, args)] = calls
    assert path == sys.executable and args[0] == sys.executable
    assert args[-7:-1] == ["-OO", "-m", "agent.run", "--log-level", "debug", "--waypoint"]
    s = run.waypoint_settings(args[-1])
    assert isinstance(s, WaypointSettings)
    assert (s.name, s.listen, s.escaped_slashes) == ("ai-waypoint", "10.244.1.9:15008", "decode")
    assert s.keeper_socket == Path("/run/k.sock") and isinstance(s.workload_socket, Path)

    for bad in (["--log-level", "chatty"], ["--escaped-slashes", "maybe"]):
        out = runner.invoke(app, [*argv, *bad])
        assert out.exit_code != 0 and len(calls) == 1, out.output


def test_the_waypoint_process_runs_what_it_was_handed(monkeypatch):
    """agent/run.py --waypoint: the settings reach the waypoint's main, a user error ends as
    the CLI's do, and a malformed command line is a usage error."""
    import logging

    from agent import run
    from agent.waypoint import server
    from agent.waypoint.server import WaypointSettings
    from controller.errors import EnvironmentProblem

    got: list[WaypointSettings] = []

    def fake(s: WaypointSettings) -> None:
        got.append(s)
        raise EnvironmentProblem("no workload socket", hint="is the agent running?")

    monkeypatch.setattr(server, "main", fake)
    monkeypatch.setattr(logging, "basicConfig", lambda **kw: None)
    s = WaypointSettings(name="w", listen="10.0.0.1:15008", workload_socket=Path("/x.sock"))
    code = run.main(run.argv(s, "INFO")[-4:])
    assert code == 3 and got == [s]
    assert run.main(["--log-level", "INFO", "--waypoint"]) == 2
