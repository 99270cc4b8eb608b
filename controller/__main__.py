"""`weft-controller` / `python -m controller`: run the control plane."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from controller.errors import WeftError
from controller.settings import ControllerSettings

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def run(
    trust_domain: Annotated[str, typer.Option(help="SPIFFE trust domain.")] = "cluster.local",
    config_dir: Annotated[Path, typer.Option(help="Manifest directory (files source).")] = Path(
        "/etc/weft/config"
    ),
    state_dir: Annotated[Path, typer.Option(help="CA state and node tokens.")] = Path(
        "/var/lib/weft/controller"
    ),
    listen: Annotated[str, typer.Option(help="mTLS gRPC for agents.")] = "0.0.0.0:15012",
    bootstrap_listen: Annotated[str, typer.Option(help="TLS gRPC for node bootstrap.")] = (
        "0.0.0.0:15010"
    ),
    admin_socket: Annotated[Path, typer.Option(help="Operator API Unix socket.")] = Path(
        "/run/weft/controller.sock"
    ),
    metrics_listen: Annotated[str, typer.Option(help="Prometheus metrics; port 0 = off.")] = (
        "0.0.0.0:15014"
    ),
    workload_cert_ttl: Annotated[
        int, typer.Option(help="Workload certificate lifetime, seconds.")
    ] = 86400,
    server_name: Annotated[
        list[str] | None, typer.Option(help="DNS SAN of the serving certificate (repeatable).")
    ] = None,
    server_ip: Annotated[
        list[str] | None, typer.Option(help="IP SAN of the serving certificate (repeatable).")
    ] = None,
    poll_interval: Annotated[float, typer.Option(help="Seconds between config dir scans.")] = 1.0,
    config_source: Annotated[
        str, typer.Option(help="files (a directory) or kubernetes (the API server).")
    ] = "files",
    ca_store: Annotated[
        str, typer.Option(help="file (state dir, 0600) or kubernetes (a Secret).")
    ] = "file",
    ca_secret: Annotated[
        str, typer.Option(help="namespace/name of the CA Secret (ca-store kubernetes).")
    ] = "weft-system/weft-ca",
    ca_bundle_configmap: Annotated[
        str,
        typer.Option(help="namespace/name of the trust bundle ConfigMap; '' = do not publish."),
    ] = "weft-system/weft-ca-root",
    kubeconfig: Annotated[
        Path | None, typer.Option(help="kubeconfig outside a cluster; unset in a pod.")
    ] = None,
    sa_audience: Annotated[
        str, typer.Option(help="Audience of the agents' projected service-account tokens.")
    ] = "weft-controller",
    agent_service_account: Annotated[
        str, typer.Option(help="namespace/name of the agents' service account.")
    ] = "weft-system/weft-agent",
    leader_elect: Annotated[
        bool,
        typer.Option(
            help="Elect a leader among replicas on a Lease: every replica serves agents, "
            "only the leader writes status and judges canaries (config source kubernetes)."
        ),
    ] = False,
    lease: Annotated[
        str, typer.Option(help="namespace/name of the Lease for --leader-elect.")
    ] = "weft-system/weft-controller",
    prometheus_url: Annotated[
        str | None,
        typer.Option(
            help="Prometheus scraping the waypoints: Rollouts with analysis.provider "
            "prometheus are judged from it, once for every replica."
        ),
    ] = None,
    signer_processes: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=64,
            help="Processes that sign certificates beside the event loop (default: one per "
            "CPU beyond the first, 1 to 4; 0 signs in the controller's own process).",
        ),
    ] = None,
    log_level: Annotated[str, typer.Option(envvar="WEFT_LOG_LEVEL")] = "INFO",
) -> None:
    """Run the weft controller: CA, config store, and the gRPC services agents use."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    kw: dict[str, Any] = {}
    if server_name:
        kw["server_names"] = server_name
    if server_ip:
        kw["server_ips"] = server_ip
    settings = ControllerSettings(
        trust_domain=trust_domain,
        config_dir=config_dir,
        state_dir=state_dir,
        listen=listen,
        bootstrap_listen=bootstrap_listen,
        admin_socket=admin_socket,
        metrics_listen=metrics_listen,
        workload_cert_ttl=workload_cert_ttl,
        poll_interval=poll_interval,
        config_source=config_source,
        ca_store=ca_store,
        ca_secret=ca_secret,
        ca_bundle_configmap=ca_bundle_configmap or None,
        kubeconfig=kubeconfig,
        sa_audience=sa_audience,
        agent_service_account=agent_service_account,
        leader_elect=leader_elect,
        lease=lease,
        prometheus_url=prometheus_url,
        signer_processes=signer_processes,
        **kw,
    )
    if leader_elect and config_source != "kubernetes":
        raise typer.BadParameter(
            "leader election runs on a Kubernetes Lease: use it with --config-source "
            "kubernetes (one controller serves the files source)",
            param_hint="--leader-elect",
        )
    from controller.server import serve

    try:
        asyncio.run(serve(settings))
    except WeftError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


def main() -> None:
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    app()


if __name__ == "__main__":
    main()
