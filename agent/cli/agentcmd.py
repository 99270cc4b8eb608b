"""`weft agent`: run the node agent, and inspect its eBPF programs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from agent.cli.logopts import LogLevelOption, MaxMbOption, MaxRateOption, SampleOption
from agent.settings import AgentSettings

app = typer.Typer(
    help="The node agent (a DaemonSet in Kubernetes; one per lab node).", no_args_is_help=True
)

try:  # the data path's own commands (bpf dump, ...)
    from agent.cli import bpf as _bpf

    app.add_typer(_bpf.app, name="bpf", help="The agent's eBPF programs and maps.")
except ImportError:  # pragma: no cover - only while the data path is absent
    pass


@app.command()
def run(
    node: Annotated[str, typer.Option(envvar="NODE_NAME", help="This node's name.")],
    node_ip: Annotated[str, typer.Option(envvar="NODE_IP", help="This node's address.")],
    trust_domain: Annotated[str, typer.Option()] = "cluster.local",
    controller: Annotated[str, typer.Option(help="Controller mTLS API host:port.")] = (
        "weft-controller.weft-system.svc:15012"
    ),
    bootstrap: Annotated[str, typer.Option(help="Controller bootstrap API host:port.")] = (
        "weft-controller.weft-system.svc:15010"
    ),
    controller_name: Annotated[str, typer.Option(help="Name in the controller's certificate.")] = (
        "weft-controller.weft-system.svc"
    ),
    ca_bundle: Annotated[Path, typer.Option(help="Roots to trust the controller with.")] = (
        Path("/var/run/weft/trust-bundle.pem")
    ),
    token_file: Annotated[Path | None, typer.Option(help="Bootstrap token (local store).")] = None,
    datapath: Annotated[
        str, typer.Option(help="ebpf, or none (explicit fallback: no capture, no enforcement).")
    ] = "ebpf",
    pin_root: Annotated[Path, typer.Option(help="bpffs directory for this agent.")] = Path(
        "/sys/fs/bpf/weft/agent"
    ),
    cgroup_mode: Annotated[str, typer.Option(help="lab or kubelet.")] = "kubelet",
    fastpath: Annotated[bool, typer.Option(help="Same-node fast path.")] = True,
    metrics_listen: Annotated[str, typer.Option()] = "0.0.0.0:15020",
    ready_listen: Annotated[str, typer.Option()] = "0.0.0.0:15021",
    admin_listen: Annotated[str, typer.Option()] = "127.0.0.1:15000",
    admin_socket: Annotated[Path | None, typer.Option()] = None,
    workload_socket: Annotated[Path, typer.Option(help="Workload API socket.")] = Path(
        "/var/run/weft/workload.sock"
    ),
    state_dir: Annotated[Path, typer.Option()] = Path("/var/lib/weft/agent"),
    identity_dir: Annotated[
        Path | None,
        typer.Option(
            help="Memory-backed (tmpfs) directory where the node's certificates and keys "
            "wait for the next agent process; must not be on a disk."
        ),
    ] = Path("/run/weft/agent/identities"),
    keeper_socket: Annotated[
        Path | None,
        typer.Option(
            envvar="WEFT_KEEPER_SOCKET",
            help="The socket keeper (weft agent keeper) that holds the tunnel listeners "
            "across a crash of this process, so connects wait instead of being refused.",
        ),
    ] = None,
    drain_timeout: Annotated[float, typer.Option(help="Seconds.")] = 20.0,
    flow_export_interval: Annotated[
        float,
        typer.Option(
            envvar="WEFT_FLOW_EXPORT_INTERVAL",
            min=0.1,
            max=300,
            help="Seconds between reads of the eBPF flow map into Prometheus metrics.",
        ),
    ] = 5.0,
    access_log: Annotated[
        str,
        typer.Option(
            envvar="WEFT_ACCESS_LOG",
            help="Where the per-connection JSON lines go: stdout, stderr, off, or a file path.",
        ),
    ] = "stdout",
    access_log_sample: SampleOption = 1.0,
    access_log_max_rate: MaxRateOption = 0,
    access_log_max_mb: MaxMbOption = 0,
    log_level: LogLevelOption = "INFO",
) -> None:
    """Run the node agent: data path, tunnel, identities, config from the controller.

    Example (a lab node): weft agent run --node node-1 --node-ip 10.0.0.11 --cgroup-mode lab
    """
    kw: dict[str, Any] = dict(
        node=node,
        node_ip=node_ip,
        trust_domain=trust_domain,
        controller=controller,
        bootstrap=bootstrap,
        controller_name=controller_name,
        ca_bundle=ca_bundle,
        token_file=token_file,
        datapath=datapath,
        pin_root=pin_root,
        cgroup_mode=cgroup_mode,
        fastpath=fastpath,
        metrics_listen=metrics_listen,
        ready_listen=ready_listen,
        admin_listen=admin_listen,
        admin_socket=admin_socket,
        workload_socket=workload_socket,
        state_dir=state_dir,
        identity_dir=identity_dir,
        keeper_socket=keeper_socket,
        drain_timeout=drain_timeout,
        flow_export_interval=flow_export_interval,
        access_log=access_log,
        access_log_sample=access_log_sample,
        access_log_max_rate=access_log_max_rate,
        access_log_max_mb=access_log_max_mb,
    )
    settings = AgentSettings(**kw)  # a bad option is the CLI's error, before the exec
    # The agent runs for the node's life: it runs in a fresh interpreter without the CLI's
    # modules (agent/run.py says what that saves), in this same process.
    from agent.run import exec_agent

    exec_agent(settings, log_level)


@app.command()
def keeper(
    socket_path: Annotated[
        Path,
        typer.Option(
            "--socket",
            envvar="WEFT_KEEPER_SOCKET",
            help="Where agents reach the keeper (a Unix socket, mode 0600).",
        ),
    ] = Path("/run/weft/keeper/keeper.sock"),
    log_level: Annotated[str, typer.Option(envvar="WEFT_LOG_LEVEL")] = "INFO",
) -> None:
    """Hold the node agent's listening sockets across its crashes and restarts (a process
    that outlives the agent: a lab process, or a native sidecar container in the agent's
    pod). A new agent takes them and accepts the connects that waited meanwhile.

    Example: weft agent keeper --socket /run/weft/keeper/keeper.sock
    """
    import os
    import sys

    # The keeper runs beside every agent for the node's life: exec the lean module (the
    # standard library and agent/unixsock.py, about 20 MB) rather than keep the CLI's
    # imports (twice that) mapped.
    os.environ["WEFT_LOG_LEVEL"] = log_level
    os.execv(sys.executable, [sys.executable, "-m", "agent.keeper", "--socket", str(socket_path)])
