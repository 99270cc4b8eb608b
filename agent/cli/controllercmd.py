"""`weft controller`: the control plane's view: agents, rejections, tokens, root CA."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from agent.cli.output import Format, OutputOption, emit
from agent.cli.targets import ControllerSocketOption, LabOption, admin_stub, call

app = typer.Typer(
    help="The controller: connected agents, NACKs, rejected resources, CA.", no_args_is_help=True
)


@app.command()
def status(
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
    output: Format = OutputOption,
) -> None:
    """Agents with their acknowledged revision and last NACK, and rejected resources.

    Example: weft controller status -o json
    """
    from controller.api.gen import admin_pb2

    stub = admin_stub(lab, controller_socket)
    nodes = call(stub.ListNodes, admin_pb2.ListNodesRequest())
    rej = call(stub.ListRejections, admin_pb2.ListRejectionsRequest())
    rows = [
        {
            "node": n.node,
            "connected": n.connected,
            "ackedRevision": n.acked_revision,
            "upToDate": n.acked_revision == nodes.revision,
            "lastNack": n.last_nack,
            "lastSeen": time.strftime("%H:%M:%S", time.localtime(n.last_seen_unix)),
            "agentVersion": n.agent_version,
        }
        for n in nodes.nodes
    ]
    problems = [
        {
            "file": p.file,
            "line": p.line,
            "resource": p.resource,
            "field": p.field,
            "reason": p.reason,
        }
        for p in rej.problems
    ]
    if output is not Format.table:
        emit(
            {"revision": nodes.revision, "epoch": nodes.epoch, "nodes": rows, "rejected": problems},
            output,
        )
        return
    typer.echo(f"config revision {nodes.revision} (epoch {nodes.epoch})\n")
    emit(
        None,
        output,
        rows=rows,
        columns=[
            ("NODE", "node"),
            ("CONNECTED", "connected"),
            ("ACKED", "ackedRevision"),
            ("UP TO DATE", "upToDate"),
            ("LAST NACK", "lastNack"),
            ("SEEN", "lastSeen"),
        ],
    )
    if problems:
        typer.echo("\nrejected (the last good version of each stays active):")
        for p in problems:
            where = f"{p['file']}:{p['line']}" if p["line"] else p["file"]
            typer.echo(f"  {where}: {p['resource']}: {p['field']}: {p['reason']}")


@app.command()
def token(
    node: Annotated[str, typer.Option(help="Node the token may bootstrap.")],
    ttl: Annotated[int, typer.Option(help="Seconds the token stays valid.")] = 86400,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
) -> None:
    """Create a bootstrap token for a node's agent (local store)."""
    from controller.api.gen import admin_pb2

    resp = call(
        admin_stub(lab, controller_socket).CreateNodeToken,
        admin_pb2.CreateNodeTokenRequest(node=node, ttl_seconds=ttl),
    )
    typer.echo(resp.token)


@app.command("rotate-root")
def rotate_root(
    overlap: Annotated[int, typer.Option(help="Seconds the old root stays trusted.")] = 7 * 86400,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
) -> None:
    """Start signing with a new root CA; the old root stays in the bundle for the overlap."""
    from controller.api.gen import admin_pb2

    resp = call(
        admin_stub(lab, controller_socket).RotateRoot,
        admin_pb2.RotateRootRequest(overlap_seconds=overlap),
    )
    typer.echo(f"new root active; bundle has {resp.trust_bundle_pem.count(b'BEGIN CERT')} roots")
