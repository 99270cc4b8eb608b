"""`weft waypoint`: run an L7 waypoint (a Deployment in Kubernetes; a pod in the lab)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from agent.cli.logopts import MaxMbOption, MaxRateOption, SampleOption

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
    log_level: Annotated[str, typer.Option(envvar="WEFT_LOG_LEVEL")] = "INFO",
) -> None:
    """Run a waypoint. It gets its identity and config from the node agent.

    Example (a lab pod): weft waypoint run --name ai-waypoint --listen 10.244.1.9:15008
    """
    logging.basicConfig(
        level=log_level.upper(),
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from agent.waypoint.server import WaypointSettings, main

    if escaped_slashes not in ("reject", "decode", "keep"):
        raise typer.BadParameter(
            f"{escaped_slashes!r}: use reject, decode or keep", param_hint="--escaped-slashes"
        )

    from agent.waypoint.ai.quotastore import store_kind

    try:
        store_kind(quota_store)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--quota-store") from None

    main(
        WaypointSettings(
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
        )
    )
