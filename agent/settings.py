"""Agent settings, grouped by concern. Each field says its unit, its default, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AgentSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # ---- who and where ------------------------------------------------------------------
    node: str = Field(
        description="This node's name (Kubernetes: spec.nodeName via the downward API)."
    )
    node_ip: str = Field(
        description="This node's address: the tunnel listens here and "
        "connects to pods from here (STRICT pods accept only this source)."
    )
    trust_domain: str = Field("cluster.local", description="SPIFFE trust domain.")

    # ---- controller ---------------------------------------------------------------------
    controller: str = Field(
        "weft-controller.weft-system.svc:15012",
        description="host:port of the controller's mTLS API.",
    )
    bootstrap: str = Field(
        "weft-controller.weft-system.svc:15010",
        description="host:port of the controller's bootstrap API.",
    )
    controller_name: str = Field(
        "weft-controller.weft-system.svc",
        description="DNS name the controller's certificate must carry.",
    )
    ca_bundle: Path = Field(
        Path("/var/run/weft/trust-bundle.pem"),
        description="Roots to "
        "trust the controller with at first contact (Kubernetes: the "
        "weft-ca-root ConfigMap).",
    )
    token_file: Path | None = Field(
        None,
        description="Local store: this node's bootstrap "
        "token. Kubernetes: unset, a service-account token is "
        "used.",
    )
    sa_token_file: Path = Field(
        Path("/var/run/secrets/weft/token"),
        description="Projected service-account token (audience weft-controller).",
    )

    # ---- data path ----------------------------------------------------------------------
    datapath: Literal["ebpf", "none"] = Field(
        "ebpf",
        description="'none' is the explicit fallback: no capture, no STRICT "
        "enforcement, only the tunnel's listeners. The agent refuses to start without eBPF "
        "unless this says so.",
    )
    pin_root: Path = Field(
        Path("/sys/fs/bpf/weft/agent"),
        description="bpffs directory of this agent's maps and programs; survives agent restarts.",
    )
    cgroup_mode: Literal["lab", "kubelet"] = Field(
        "kubelet",
        description="How a workload's cgroup is found: 'lab' reads the path the "
        "lab wrote into the Workload; 'kubelet' searches the kubelet's tree by pod UID.",
    )
    fastpath: bool = Field(
        True,
        description="Same-node fast path (sk_msg splicing), node "
        'switch. Per pod: annotation weft.dev/fastpath: "false".',
    )
    default_strict: bool = Field(
        True,
        description="mTLS mode when no PeerAuthentication "
        "applies: STRICT (see docs/policy-reference.md).",
    )
    socket_mark: int = Field(
        0x5746, description="SO_MARK on the tunnel's own sockets, which capture skips."
    )

    # ---- endpoints ----------------------------------------------------------------------
    outbound_port: int = Field(15001, description="Redirected pod connections (Istio's port).")
    inbound_port: int = Field(15008, description="HBONE, mutual TLS (IANA's HBONE port).")
    metrics_listen: str = Field("0.0.0.0:15020", description="Prometheus /metrics; port 0: off.")
    ready_listen: str = Field("0.0.0.0:15021", description="/healthz/ready for the kubelet.")
    admin_listen: str = Field(
        "127.0.0.1:15000", description="Admin API; localhost only, it shows identities and flows."
    )
    admin_socket: Path | None = Field(
        None, description="Also serve the admin API on this Unix socket (the lab's CLI uses it)."
    )
    workload_socket: Path | None = Field(
        Path("/var/run/weft/workload.sock"),
        description="Workload API (identities for local workloads such as waypoints, attested "
        "by cgroup); mounted into waypoint pods.",
    )

    state_dir: Path = Field(
        Path("/var/lib/weft/agent"),
        description="Last good config (restarts during a controller outage), and the "
        "handover socket a restarting agent asks its predecessor on.",
    )
    keeper_socket: Path | None = Field(
        None,
        description="The socket keeper (agent/keeper.py) holding this node's tunnel "
        "listeners across agent crashes; None: the agent holds them alone.",
    )
    identity_dir: Path | None = Field(
        Path("/run/weft/agent/identities"),
        description="Memory-backed (tmpfs), root-only store of the node's certificates and "
        "keys, for the next agent process; refused if not memory-backed. None: no store.",
    )

    # ---- timing -------------------------------------------------------------------------
    drain_timeout: float = Field(
        20.0,
        description="Seconds streams get to finish on "
        "SIGTERM (Kubernetes waits 30 s before SIGKILL).",
    )
    reconcile_interval: float = Field(
        2.0,
        description="Seconds between re-checks of pod "
        "cgroups (a pod's cgroup appears after its Workload).",
    )
    flow_export_interval: float = Field(
        5.0, gt=0, description="Seconds between reads of the eBPF flow map into metrics."
    )
    access_log: str = Field(
        "stdout",
        description="Where the per-connection JSON lines go: stdout, stderr, off, or a path.",
    )
    access_log_sample: float = Field(1.0, ge=0, le=1, description="Share of ordinary lines.")
    access_log_max_rate: int = Field(0, ge=0, description="Lines a second at most; 0: no cap.")
    access_log_max_mb: float = Field(0, ge=0, description="Rotate a file log past this size.")

    @staticmethod
    def split(hostport: str) -> tuple[str, int]:
        host, _, port = hostport.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)
