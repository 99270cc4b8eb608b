"""The `weft` command: one program for the lab, the mesh, policy and inspection."""

from __future__ import annotations

import logging
import os
import sys

import typer

from agent.cli import agentcmd, controllercmd, demo, inspect, lab, policy, top, waypointcmd
from controller.errors import WeftError

app = typer.Typer(
    name="weft",
    help="weft: a sidecarless service mesh for AI microservices.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(lab.app, name="lab")
app.add_typer(agentcmd.app, name="agent")
app.add_typer(waypointcmd.app, name="waypoint")
app.add_typer(policy.app, name="policy")
app.add_typer(inspect.app, name="inspect")
app.add_typer(controllercmd.app, name="controller")
app.command("top")(top.top)


app.command("demo")(demo.demo)


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("WEFT_LOG_LEVEL", "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        app()
    except WeftError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
