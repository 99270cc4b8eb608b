"""`weft inspect`: what one node's agent knows and does right now."""

from __future__ import annotations

from typing import Annotated

import typer

from agent.cli.output import Format, OutputOption, emit
from agent.cli.targets import LabOption, NodeOption, agent_get

app = typer.Typer(
    help="Inspect a node agent: workloads, flows, certificates, config, routes, tunnel.",
    no_args_is_help=True,
)

AdminUrl = Annotated[
    str | None,
    typer.Option("--admin-url", envvar="WEFT_ADMIN_URL", help="Agent admin API (outside the lab)."),
]


@app.command()
def workloads(
    node: NodeOption = None,
    lab: LabOption = "weft",
    admin_url: AdminUrl = None,
    output: Format = OutputOption,
) -> None:
    """Workloads on the node: identity, address, eBPF attachment, STRICT, fast path.

    Example: weft inspect workloads --node node-2 -o json
    """
    data = agent_get(lab, node, "/workloads", admin_url)
    emit(
        data,
        output,
        columns=[
            ("NAMESPACE", "namespace"),
            ("NAME", "name"),
            ("IP", "ip"),
            ("IDENTITY", "identity"),
            ("ATTACHED", "attached"),
            ("STRICT", "strict"),
            ("FASTPATH", "fastpath"),
            ("CERT", "certificate"),
        ],
    )


@app.command()
def flows(
    node: NodeOption = None,
    lab: LabOption = "weft",
    admin_url: AdminUrl = None,
    output: Format = OutputOption,
) -> None:
    """TCP flows of the node's meshed pods, from the eBPF flow map, with identities.

    Example: weft inspect flows -o json
    """
    data = agent_get(lab, node, "/flows", admin_url)
    emit(
        data,
        output,
        columns=[
            ("WORKLOAD", "workload"),
            ("DIR", "direction"),
            ("PEER", "peer"),
            ("REMOTE", "remote"),
            ("ORIGINAL DST", "originalDst"),
            ("SENT", "bytesSent"),
            ("RECEIVED", "bytesReceived"),
            ("SRTT µs", "srttUs"),
            ("RETRANS", "retransmits"),
            ("FASTPATH", "fastpath"),
            ("OPEN", "open"),
        ],
        rows=[{**f, "open": f.get("end") is None} for f in data],
    )


@app.command()
def certs(
    node: NodeOption = None,
    lab: LabOption = "weft",
    admin_url: AdminUrl = None,
    output: Format = OutputOption,
) -> None:
    """Certificates the agent holds: SPIFFE ID, serial, expiry.

    Example: weft inspect certs --node node-1
    """
    data = agent_get(lab, node, "/certs", admin_url)
    if output is Format.table:
        emit(
            None,
            output,
            columns=[
                ("SPIFFE ID", "spiffeId"),
                ("SERIAL", "serial"),
                ("NOT AFTER", "notAfter"),
                ("EXPIRES IN (s)", "expiresInSeconds"),
            ],
            rows=data["workloads"],
        )
    else:
        emit(data, output)


@app.command()
def config(
    node: NodeOption = None,
    lab: LabOption = "weft",
    admin_url: AdminUrl = None,
    output: Format = OutputOption,
) -> None:
    """The config revision the agent runs, its stream state and last NACK."""
    data = agent_get(lab, node, "/config", admin_url)
    emit(
        data,
        output,
        columns=[
            ("NODE", "node"),
            ("REVISION", "revision"),
            ("CONNECTED", "connected"),
            ("NACKS", "nacks"),
            ("LAST NACK", "lastNack"),
            ("RESOURCES", "resources"),
        ],
        rows=[data],
    )


@app.command()
def routes(
    node: NodeOption = None,
    lab: LabOption = "weft",
    admin_url: AdminUrl = None,
    output: Format = OutputOption,
) -> None:
    """Services with their waypoint and the HTTPRoute rules attached to them."""
    data = agent_get(lab, node, "/routes", admin_url)
    emit(
        data,
        output,
        columns=[
            ("SERVICE", "service"),
            ("WAYPOINT", "waypoint"),
            ("ROUTE", "route"),
            ("RULE", "rule"),
            ("MATCHES", "matches"),
            ("BACKENDS", "backends"),
        ],
    )


@app.command()
def rollouts(lab: LabOption = "weft", output: Format = OutputOption) -> None:
    """Automated canary analyses in the lab's waypoints: phase, canary weight, events.

    Example: weft inspect rollouts -o json
    """
    import json
    import urllib.request

    from agent.lab.topology import Lab
    from agent.netns import call_in
    from controller.model.workloads import WAYPOINT_LABEL

    st = Lab(lab).state()
    rows = []
    for p in st.pods:
        if WAYPOINT_LABEL not in p.labels:
            continue

        def get(ip: str = p.ip) -> list[dict[str, object]]:
            with urllib.request.urlopen(f"http://{ip}:15020/rollouts", timeout=5) as r:
                return json.loads(r.read())

        for r in call_in(p.netns, get):
            rows.append({"waypoint": p.key, **r})
    emit(
        rows,
        output,
        columns=[
            ("WAYPOINT", "waypoint"),
            ("ROLLOUT", "rollout"),
            ("PHASE", "phase"),
            ("STEP", "step"),
            ("CANARY %", "canaryWeight"),
            ("FAILURES", "failures"),
        ],
    )


@app.command()
def tunnel(
    node: NodeOption = None,
    lab: LabOption = "weft",
    admin_url: AdminUrl = None,
    output: Format = OutputOption,
) -> None:
    """HBONE connections: pooled outbound (by peer identity) and inbound."""
    data = agent_get(lab, node, "/tunnel", admin_url)
    if output is Format.table:
        rows = [
            {
                "direction": "outbound",
                "peer": c["peer"],
                "streams": c["streams"],
                "opened": c["streamsOpened"],
            }
            for c in data["pool"]
        ]
        rows += [
            {"direction": "inbound", "peer": c["peer"], "streams": c["streams"], "opened": ""}
            for c in data["inbound"]
        ]
        emit(None, output, rows=rows)
    else:
        emit(data, output)
