"""Controller settings: each field says its unit, its default, and why that default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ControllerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trust_domain: str = Field(
        "cluster.local",
        description="SPIFFE trust domain; Kubernetes' default cluster domain, "
        "so principals read like Istio's (cluster.local/ns/NS/sa/SA).",
    )
    config_source: Literal["files", "kubernetes"] = Field(
        "files",
        description="Where resources come from: a directory (one machine, the lab) "
        "or the Kubernetes API (a cluster).",
    )
    prometheus_url: str | None = Field(
        None,
        description="Prometheus that scrapes the waypoints, for Rollouts judged by the "
        "controller (analysis.provider: prometheus), e.g. http://prometheus.monitoring:9090.",
    )
    config_dir: Path = Field(
        Path("/etc/weft/config"),
        description="Manifest directory for the files source; "
        "`weft policy apply` stores into its applied/ subdirectory.",
    )
    poll_interval: float = Field(
        1.0,
        gt=0,
        description="Seconds between scans of config_dir. One second keeps a "
        "policy edit visible to agents within about a second at negligible cost (stat calls).",
    )
    state_dir: Path = Field(
        Path("/var/lib/weft/controller"),
        description="CA state (0600) and node bootstrap tokens for the local store.",
    )
    ca_store: Literal["file", "kubernetes"] = Field(
        "file", description="Persist the CA in state_dir/ca.json or in a Kubernetes Secret."
    )
    ca_secret: str = Field(
        "weft-system/weft-ca",
        description="namespace/name of the CA Secret when ca_store=kubernetes.",
    )
    listen: str = Field(
        "0.0.0.0:15012",
        description="mTLS gRPC for agents (config stream, CSR signing). "
        "15012 is istiod's port for the same job, so firewall rules carry over.",
    )
    bootstrap_listen: str = Field(
        "0.0.0.0:15010",
        description="Server-authenticated TLS for node bootstrap only "
        "(token or service-account JWT for a node certificate).",
    )
    admin_socket: Path = Field(
        Path("/run/weft/controller.sock"),
        description="Operator API (weft policy ...), a Unix "
        "socket: file permissions are its access control.",
    )
    metrics_listen: str = Field(
        "0.0.0.0:15014", description="Prometheus metrics (istiod's monitoring port)."
    )
    workload_cert_ttl: int = Field(
        24 * 3600,
        ge=600,
        le=7 * 24 * 3600,
        description="Seconds. 24 h as in Istio: short "
        "enough that a leaked key expires soon, long enough to ride out a controller outage "
        "of half a day (agents renew at half-life).",
    )
    signer_processes: int | None = Field(
        None,
        ge=0,
        le=64,
        description="Processes that sign certificates beside the event loop (controller/ca/"
        "signer.py). None: one per CPU beyond the first, 1 to 4; 0: sign in the "
        "controller's own process.",
    )
    server_names: list[str] = Field(
        default_factory=lambda: ["weft-controller.weft-system.svc", "localhost"],
        description="DNS names in the controller's serving certificate.",
    )
    server_ips: list[str] = Field(
        default_factory=lambda: ["127.0.0.1"],
        description="IP SANs in the controller's serving certificate.",
    )
    node_token_ttl: int = Field(
        24 * 3600, description="Seconds a bootstrap token stays valid when none is given."
    )
    sa_audience: str = Field(
        "weft-controller",
        description="Audience agents put in their projected service-account tokens (Kubernetes).",
    )
    agent_service_account: str = Field(
        "weft-system/weft-agent",
        description="namespace/name of the agents' service "
        "account; only its tokens may bootstrap a node (Kubernetes).",
    )

    # ---- Kubernetes (config_source=kubernetes, ca_store=kubernetes) ----------------------
    kubeconfig: Path | None = Field(
        None,
        description="kubeconfig for a controller outside the cluster; unset in a pod, where "
        "the service account's projected token is used (and re-read as it rotates).",
    )
    ca_bundle_configmap: str | None = Field(
        "weft-system/weft-ca-root",
        description="namespace/name of the ConfigMap the trust bundle is published to when "
        "ca_store=kubernetes; agents mount it to trust the controller at first contact. "
        "None: do not publish.",
    )
    leader_elect: bool = Field(
        False,
        description="Elect a leader among replicas on a Kubernetes Lease (controller/"
        "leader.py): every replica serves agents; only the leader writes status and judges "
        "canaries. Needs config_source=kubernetes.",
    )
    lease: str = Field(
        "weft-system/weft-controller",
        description="namespace/name of the Lease the replicas elect their leader on.",
    )
    identity: str | None = Field(
        None, description="This replica's name in the Lease (default: POD_NAME, else the host)."
    )

    @property
    def server_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/weft-system/sa/weft-controller"

    def tls_server_name(self) -> str:
        return self.server_names[0]
