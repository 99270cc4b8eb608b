"""The node agent's own process: what `weft agent run` becomes once it has read its options.

    python -OO -m agent.run --log-level INFO '<AgentSettings as JSON>'

`weft agent run` parses and checks the options with the CLI (typer, every command group
and what they import: `weft lab`, `weft policy`, `weft top`...), then execs this module
in the same process (same PID, descriptors, cgroup and environment), which imports the
agent and nothing of the CLI. A process that lives as long as its node does not keep the
CLI's modules resident: 2.7 MB of RSS measured on import (CPython 3.11), about 5 % of an
agent (issue 16). Not meant to be started by hand; `weft agent run` is the interface.

The agent's interpreter runs with -OO: no docstrings (weft's, pydantic's, every
library's; nothing in the agent process reads them, its help text is the CLI's) and no
assert statements (weft's own in the agent are type narrowings; libraries are written to
run under -O). That is 1.8 MB less on import. The cost is at start: there are seldom
.opt-2.pyc files for the libraries, so each module is compiled from source where the
bytecode cannot be cached (0.5 -> 0.9 s to import the agent with PYTHONDONTWRITEBYTECODE,
in the lab); where it can, the first start writes them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from agent.settings import AgentSettings
from controller.errors import WeftError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def argv(settings: AgentSettings, log_level: str) -> list[str]:
    """The command line that runs the agent with `settings` in a fresh interpreter: this
    interpreter and its flags (-X, -W, ...), so an agent started with them keeps them,
    with -OO whatever the CLI ran with."""
    flags: list[str] = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
    return [
        sys.executable,
        *(f for f in flags if f not in ("-O", "-OO")),
        "-OO",
        "-m",
        "agent.run",
        "--log-level",
        log_level,
        settings.model_dump_json(),
    ]


def exec_agent(settings: AgentSettings, log_level: str) -> None:
    """Replace the calling process (the CLI) with the agent. Returns only if exec fails."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.execv(sys.executable, argv(settings, log_level))


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else args
    if len(args) != 3 or args[0] != "--log-level":
        print("usage: python -m agent.run --log-level LEVEL SETTINGS_JSON", file=sys.stderr)
        return 2
    logging.basicConfig(level=args[1].upper(), force=True, format=LOG_FORMAT)
    settings = AgentSettings.model_validate_json(args[2])
    from agent.main import main as run_agent

    try:
        run_agent(settings)
    except WeftError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
