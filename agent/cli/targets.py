"""Where the CLI finds the controller and the agents.

On a machine running the lab, commands talk to the lab's controller and agents through
their Unix sockets (pick the lab with --lab or WEFT_LAB; the default lab is "weft"). On a
node of a real cluster, they talk to the local agent's admin port (localhost:15000) and
the controller's admin socket; --controller-socket and --admin-url override both.
"""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.lab import mesh
from agent.lab.topology import Lab
from controller.errors import EnvironmentProblem, NotFound

DEFAULT_CONTROLLER_SOCKET = Path("/run/weft/controller.sock")
DEFAULT_ADMIN_URL = "http://127.0.0.1:15000"

LabOption = Annotated[
    str, typer.Option("--lab", envvar="WEFT_LAB", help="Lab whose mesh to talk to (if it is up).")
]
ControllerSocketOption = Annotated[
    Path | None,
    typer.Option(
        "--controller-socket",
        envvar="WEFT_CONTROLLER_SOCKET",
        help="The controller's admin socket (default: the lab's, else /run/weft/controller.sock).",
    ),
]
NodeOption = Annotated[
    str | None,
    typer.Option("--node", help="Node whose agent to ask (lab: default the first node)."),
]


def controller_socket(lab: str, override: Path | None) -> Path:
    if override is not None:
        return override
    env = Lab(lab)
    if env.exists():
        return mesh.paths(env.state())["admin"]
    return DEFAULT_CONTROLLER_SOCKET


def admin_stub(lab: str, override: Path | None) -> Any:
    """A stub of the controller's Admin service. grpc is imported here, not by the module:
    every `weft` command imports this module, the agent and waypoint processes included."""
    import grpc

    from controller.api.gen import admin_pb2_grpc

    sock = controller_socket(lab, override)
    if not sock.exists():
        raise EnvironmentProblem(
            f"no controller admin socket at {sock}",
            hint="is the controller running? In the lab: weft lab up (the mesh starts with "
            "it); elsewhere pass --controller-socket",
        )
    # An apply may carry up to MAX_APPLY_BYTES of YAML (policy.py checks it per file).
    channel = grpc.insecure_channel(
        f"unix:{sock}", options=[("grpc.max_send_message_length", 20 * 1024 * 1024)]
    )
    return admin_pb2_grpc.AdminStub(channel)


def call(fn: Any, request: Any) -> Any:
    """One admin RPC, with gRPC errors turned into user-facing ones."""
    import grpc

    try:
        return fn(request, timeout=30)
    except grpc.RpcError as e:
        code = e.code() if hasattr(e, "code") else None
        details = e.details() if hasattr(e, "details") else str(e)
        if code == grpc.StatusCode.UNAVAILABLE:
            raise EnvironmentProblem(f"the controller is not answering: {details}") from None
        raise (
            NotFound(details)
            if code == grpc.StatusCode.NOT_FOUND
            else EnvironmentProblem(f"controller: {details}")
        ) from None


def agent_get(lab: str, node: str | None, path: str, admin_url: str | None = None) -> Any:
    """GET a JSON document from a node agent's admin API."""
    env = Lab(lab)
    if admin_url is None and env.exists():
        state = env.state()
        name = node or state.nodes[0].name
        state.node(name)  # NotFound with the list of nodes if wrong
        sock = mesh.admin_socket(state, name)
        if not sock.exists():
            raise EnvironmentProblem(f"the agent on {name} is not running (no {sock})")
        return mesh.admin_get(sock, path)
    url = (admin_url or os.environ.get("WEFT_ADMIN_URL") or DEFAULT_ADMIN_URL) + path
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.loads(r.read())
    except OSError as e:
        raise EnvironmentProblem(
            f"cannot reach the agent's admin API at {url}: {e}",
            hint="run on the node, or pass --admin-url",
        ) from None


def lab_nodes(lab: str) -> list[str]:
    env = Lab(lab)
    return [n.name for n in env.state().nodes] if env.exists() else []
