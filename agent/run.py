"""The node agent's and the waypoint's own processes: what `weft agent run` and
`weft waypoint run` become once they have read their options.

    python -OO -m agent.run --log-level INFO '<AgentSettings as JSON>'
    python -OO -m agent.run --log-level INFO --waypoint '<WaypointSettings as JSON>'

`weft agent run` parses and checks the options with the CLI (typer, every command group
and what they import: `weft lab`, `weft policy`, `weft top`...), then execs this module
in the same process (same PID, descriptors, cgroup and environment), which imports the
agent and nothing of the CLI. A process that lives as long as its node does not keep the
CLI's modules resident: 2.7 MB of RSS measured on import (CPython 3.11), about 5 % of an
agent (issue 16). A waypoint lives as long as its pod, and its memory has a target too
(issue 13: 60 MB): `weft waypoint run` does the same. Not meant to be started by hand;
the two `run` commands are the interface.

The agent's interpreter runs with -OO: no docstrings (weft's, pydantic's, every
library's; nothing in the agent process reads them, its help text is the CLI's) and no
assert statements (weft's own in the agent are type narrowings; libraries are written to
run under -O). That is 1.8 MB less on import. The cost is at start: there are seldom
.opt-2.pyc files for the libraries, so each module is compiled from source where the
bytecode cannot be cached (0.5 -> 0.9 s to import the agent with PYTHONDONTWRITEBYTECODE,
in the lab); where it can, the first start writes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.settings import AgentSettings
from controller.errors import WeftError

if TYPE_CHECKING:
    from agent.waypoint.server import WaypointSettings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WAYPOINT = "--waypoint"


def argv(settings: AgentSettings | WaypointSettings, log_level: str) -> list[str]:
    """The command line that runs the agent (or the waypoint) with `settings` in a fresh
    interpreter: this interpreter and its flags (-X, -W, ...), so a process started with
    them keeps them, with -OO whatever the CLI ran with."""
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    if isinstance(settings, AgentSettings):
        program, text = [], settings.model_dump_json()
    else:
        program, text = [WAYPOINT], json.dumps(dataclasses.asdict(settings), default=str)
    return [
        sys.executable,
        *(f for f in flags if f not in ("-O", "-OO")),
        "-OO",
        "-m",
        "agent.run",
        "--log-level",
        log_level,
        *program,
        text,
    ]


def exec_agent(settings: AgentSettings | WaypointSettings, log_level: str) -> None:
    """Replace the calling process (the CLI) with the agent or the waypoint. Returns only
    if exec fails."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, argv(settings, log_level))


def waypoint_settings(text: str) -> WaypointSettings:
    """WaypointSettings from the JSON `argv` wrote (its paths come back as Paths)."""
    from agent.waypoint.server import WaypointSettings

    raw: dict[str, Any] = json.loads(text)
    for f in dataclasses.fields(WaypointSettings):
        if "Path" in str(f.type) and raw.get(f.name) is not None:
            raw[f.name] = Path(raw[f.name])
    return WaypointSettings(**raw)


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    waypoint = len(args) == 4 and args[2] == WAYPOINT
    if len(args) != (4 if waypoint else 3) or args[0] != "--log-level" or args[-1][:1] == "-":
        print(
            "usage: python -m agent.run --log-level LEVEL [--waypoint] SETTINGS_JSON",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=args[1].upper(), force=True, format=LOG_FORMAT)
    from agent import compiled

    old = compiled.stale()
    level = logging.WARNING if old else logging.INFO
    logging.getLogger("weft.run").log(level, "runtime: %s", compiled.describe(old))
    try:
        if waypoint:
            from agent.waypoint.server import main as run_waypoint

            run_waypoint(waypoint_settings(args[3]))
        else:
            from agent.main import main as run_agent

            run_agent(AgentSettings.model_validate_json(args[2]))
    except WeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
