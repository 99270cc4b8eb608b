"""`weft waypoint`: run an L7 waypoint (a Deployment in Kubernetes; a pod in the lab), and
declare, list and inspect waypoints the way `istioctl waypoint` does (a Gateway of class
weft-waypoint: controller/model/gateway.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli.logopts import LogLevelOption, MaxMbOption, MaxRateOption, SampleOption
from agent.cli.output import Format, OutputOption, emit
from agent.cli.targets import ControllerSocketOption, LabOption

app = typer.Typer(
    help="The L7 waypoint for Services that opt in (weft.dev/use-waypoint).", no_args_is_help=True
)


@app.command()
def run(
    name: Annotated[str, typer.Option(help="Waypoint name (Services reference it).")],
    listen: Annotated[
        str, typer.Option(envvar="WAYPOINT_LISTEN", help="HBONE address, pod_ip:15008.")
    ],
    workload_socket: Annotated[Path, typer.Option(help="The node agent's Workload API.")] = Path(
        "/var/run/weft/workload.sock"
    ),
    metrics_listen: Annotated[str, typer.Option(help="Prometheus and readiness.")] = (
        "0.0.0.0:15020"
    ),
    otlp_endpoint: Annotated[
        str | None,
        typer.Option(
            envvar="OTEL_EXPORTER_OTLP_ENDPOINT",
            help="OTLP/HTTP collector for spans, e.g. "
            "http://collector:4318 (unset: propagate trace context only).",
        ),
    ] = None,
    quota_store: Annotated[
        str,
        typer.Option(
            envvar="WEFT_QUOTA_STORE",
            help="Where token quotas are counted: memory (this replica only), a path to an "
            "SQLite file (shared by the replicas of a node), or redis://HOST:PORT "
            "(rediss:// for TLS; shared by every replica: use it when a waypoint has "
            "replicas on several nodes).",
        ),
    ] = "memory",
    drain_timeout: Annotated[
        float,
        typer.Option(
            envvar="WEFT_DRAIN_TIMEOUT",
            help="Seconds a stopping waypoint lets its requests finish before it closes.",
        ),
    ] = 10.0,
    head_timeout: Annotated[
        float,
        typer.Option(
            envvar="WEFT_HEAD_TIMEOUT",
            help="Seconds a caller has to send a complete request head (slowloris protection).",
        ),
    ] = 10.0,
    access_log: Annotated[
        str,
        typer.Option(
            envvar="WEFT_ACCESS_LOG",
            help="Where the per-request JSON lines go: stdout, stderr, off, or a file path.",
        ),
    ] = "stdout",
    access_log_sample: SampleOption = 1.0,
    access_log_max_rate: MaxRateOption = 0,
    access_log_max_mb: MaxMbOption = 0,
    escaped_slashes: Annotated[
        str,
        typer.Option(
            envvar="WEFT_ESCAPED_SLASHES",
            help="A request path with %2F or %5C: reject (400), decode (to /) or keep "
            "(docs/policy-reference.md, path normalization).",
        ),
    ] = "reject",
    handoff: Annotated[
        bool,
        typer.Option(
            help="Take connections from the node agent directly when on the caller's node "
            "(no HBONE hop).",
        ),
    ] = True,
    keeper_socket: Annotated[
        Path | None,
        typer.Option(
            envvar="WEFT_KEEPER_SOCKET",
            help="The pod's socket keeper (weft agent keeper): holds the HBONE listener "
            "across a crash, so connects wait for the next process instead of being refused.",
        ),
    ] = None,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run a waypoint. It gets its identity and config from the node agent.

    Example (a lab pod): weft waypoint run --name ai-waypoint --listen 10.244.1.9:15008
    """
    from agent.waypoint.server import WaypointSettings

    if escaped_slashes not in ("reject", "decode", "keep"):
        raise typer.BadParameter(
            f"{escaped_slashes!r}: use reject, decode or keep", param_hint="--escaped-slashes"
        )

    from agent.waypoint.ai.quotastore import store_kind

    try:
        store_kind(quota_store)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--quota-store") from None

    settings = WaypointSettings(
        name=name,
        listen=listen,
        workload_socket=workload_socket,
        metrics_listen=metrics_listen,
        otlp_endpoint=otlp_endpoint,
        head_timeout=head_timeout,
        drain_timeout=drain_timeout,
        quota_store=quota_store,
        access_log=access_log,
        access_log_sample=access_log_sample,
        access_log_max_rate=access_log_max_rate,
        access_log_max_mb=access_log_max_mb,
        handoff=handoff,
        escaped_slashes=escaped_slashes,  # type: ignore[arg-type]
        keeper_socket=keeper_socket,
    )
    # The waypoint runs for its pod's life: in a fresh interpreter without the CLI's modules,
    # under -OO (agent/run.py says what that saves), in this same process.
    from agent.run import exec_agent

    exec_agent(settings, log_level)


WaypointName = Annotated[
    str, typer.Option("--name", help="The waypoint's name (Services use it by this name).")
]
WaypointNamespace = Annotated[
    str, typer.Option("--namespace", "-n", help="Its namespace (it serves Services there).")
]


def gateway_document(name: str, namespace: str, for_: str = "service") -> dict[str, object]:
    """The Gateway that declares waypoint `name` (what `istioctl waypoint generate` writes,
    with weft's class)."""
    from controller.model.gateway import HBONE_PORT, WAYPOINT_FOR_LABEL

    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {WAYPOINT_FOR_LABEL: for_},
        },
        "spec": {
            "gatewayClassName": "weft-waypoint",
            "listeners": [{"name": "mesh", "port": HBONE_PORT, "protocol": "HBONE"}],
        },
    }


ForOption = Annotated[
    str,
    typer.Option(
        "--for",
        help="What it serves: service or all (istio.io/waypoint-for; weft serves "
        "Services either way).",
    ),
]


def _checked(name: str, namespace: str, for_: str) -> str:
    """The Gateway's YAML, validated by the controller's model (a bad name is an error
    here, not at the controller)."""
    import yaml

    from controller.model.base import parse_resource

    doc = gateway_document(name, namespace, for_)
    parse_resource(doc)  # InvalidConfig names what is wrong
    return yaml.safe_dump(doc, sort_keys=False)


@app.command()
def generate(
    name: WaypointName = "waypoint",
    namespace: WaypointNamespace = "default",
    for_: ForOption = "service",
) -> None:
    """Print the Gateway that declares a waypoint (as `istioctl waypoint generate`).

    Example: weft waypoint generate --name ai-waypoint -n ai > waypoint.yaml
    """
    typer.echo(_checked(name, namespace, for_), nl=False)


@app.command("apply")
def apply_(
    name: WaypointName = "waypoint",
    namespace: WaypointNamespace = "default",
    for_: ForOption = "service",
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
) -> None:
    """Declare a waypoint in the controller (as `istioctl waypoint apply`). Its pods are run
    by the chart's waypoints value (or are lab pods labelled weft.dev/waypoint: NAME); until
    one is ready, `weft waypoint list` says NoResources.

    Example: weft waypoint apply --name ai-waypoint -n ai
    """
    from agent.cli.targets import admin_stub, call
    from controller.api.gen import admin_pb2

    text = _checked(name, namespace, for_)
    stub = admin_stub(lab, controller_socket)
    resp = call(
        stub.Apply,
        admin_pb2.ApplyRequest(
            documents=[admin_pb2.ApplyRequest.Document(file="waypoint", text=text)]
        ),
    )
    if resp.problems:
        from controller.model.problems import InvalidConfig, Problem

        raise InvalidConfig([Problem(p.reason, resource=p.resource or None) for p in resp.problems])
    typer.echo(f"waypoint {namespace}/{name} applied")
    for w in resp.warnings:
        typer.echo(f"warning: {w.resource}: {w.reason}", err=True)


@app.command("list")
def list_(
    namespace: Annotated[
        str | None, typer.Option("--namespace", "-n", help="Only this namespace.")
    ] = None,
    lab: LabOption = "weft",
    controller_socket: ControllerSocketOption = None,
    output: Format = OutputOption,
) -> None:
    """Waypoints: declared ones (Gateways) and ones that only run (labelled pods), with
    their ready instances and status.

    Example: weft waypoint list -n ai
    """
    import json

    from agent.cli.targets import admin_stub, call
    from controller.api.gen import admin_pb2
    from controller.model.workloads import WAYPOINT_LABEL

    stub = admin_stub(lab, controller_socket)
    ns = namespace or ""
    gateways = call(stub.Get, admin_pb2.GetRequest(kind="Gateway", namespace=ns, name=""))
    pods = call(stub.Get, admin_pb2.GetRequest(kind="Workload", namespace=ns, name=""))
    # (namespace, name) -> [class, status, message, ready, instances]
    found: dict[tuple[str, str], list[Any]] = {}
    for r in gateways.resources:
        programmed = next((c for c in r.conditions if c.type == "Programmed"), None)
        found[(r.namespace, r.name)] = [
            json.loads(r.body)["spec"]["gatewayClassName"],
            programmed.reason if programmed is not None else "-",
            programmed.message if programmed is not None else "",
            0,
            0,
        ]
    for r in pods.resources:
        doc = json.loads(r.body)
        wp = (doc["metadata"].get("labels") or {}).get(WAYPOINT_LABEL)
        if not wp:
            continue
        # A waypoint that runs but that no Gateway declares is listed too.
        row = found.setdefault((r.namespace, wp), ["-", "Running", "no Gateway declares it", 0, 0])
        spec = doc["spec"]
        row[3] += bool(spec.get("ready", True) and spec.get("phase", "Running") == "Running")
        row[4] += 1
    rows = [
        {
            "namespace": ns_,
            "name": name,
            "class": cls,
            "ready": f"{ready}/{n}",
            "status": status,
            "message": message,
        }
        for (ns_, name), (cls, status, message, ready, n) in sorted(found.items())
    ]
    emit(
        rows,
        output,
        columns=[
            ("NAMESPACE", "namespace"),
            ("NAME", "name"),
            ("CLASS", "class"),
            ("READY", "ready"),
            ("STATUS", "status"),
        ],
    )
