"""The `weft` command: one program for the lab, the mesh, policy and inspection."""

from __future__ import annotations

import logging
import os
import sys

import typer

from agent import __version__
from agent.cli import (
    agentcmd,
    controllercmd,
    demo,
    inspect,
    lab,
    policy,
    rollout,
    top,
    waypointcmd,
)
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
app.add_typer(rollout.app, name="rollout")
app.add_typer(inspect.app, name="inspect")
app.add_typer(controllercmd.app, name="controller")
app.command("top")(top.top)


app.command("demo")(demo.demo)


def _version_flag(value: bool) -> None:
    if value:
        typer.echo(f"weft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_version_flag,
        is_eager=True,
        help="Print the client's version and exit.",
    ),
) -> None:
    """weft: a sidecarless service mesh for AI microservices."""


@app.command("version")
def version(
    lab: str = typer.Option(
        os.environ.get("WEFT_LAB", "weft"),
        "--lab",
        envvar="WEFT_LAB",
        help="Also ask this lab's agents for theirs, when it runs.",
    ),
) -> None:
    """Print the client's version, and each running lab agent's.

    Example: weft version
    """
    from agent.cli.targets import lab_nodes
    from agent.lab import mesh
    from agent.lab.topology import Lab

    typer.echo(f"client  weft {__version__}")
    env = Lab(lab)
    if not env.exists():
        return
    state = env.state()
    for node in lab_nodes(lab):
        try:
            health = mesh.admin_get(mesh.admin_socket(state, node), "/healthz", timeout=2)
            typer.echo(f"agent   weft {health.get('version', '?')}  (node {node})")
        except (OSError, ValueError):
            typer.echo(f"agent   not reachable  (node {node})")


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
