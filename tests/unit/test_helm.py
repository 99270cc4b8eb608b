"""The Helm chart: lint, render with default and custom values, validate every rendered
object against Kubernetes 1.35's schemas offline, and pin the security-relevant parts.

Needs helm (`make setup` installs it in .tools/); without it these tests skip and say so.
Schema validation uses kubernetes-validate's bundled 1.35 schemas (strict: unknown fields
are errors), because `kubectl --dry-run=client --validate` needs an API server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "weft"
HELM = ROOT / ".tools" / "helm"
CUSTOM = ROOT / "tests" / "data" / "helm" / "values-custom.yaml"
K8S_VERSION = "1.35.0"
# Kinds of other projects the chart may render (optional switches); no 1.35 schema has them.
EXTERNAL_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    # Gateway API (checked by parsing them with the controller's own model instead).
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "GatewayClass"),
}

pytestmark = pytest.mark.skipif(
    not HELM.exists(), reason=f"helm is not installed at {HELM} (run `make setup`, target tools)"
)


def helm(cmd: str, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    target = ["weft", str(chart)] if cmd == "template" else [str(chart)]
    return subprocess.run(
        [str(HELM), cmd, *target, *args], capture_output=True, text=True, timeout=60
    )


def render(
    *extra: str, chart: Path = CHART, namespace: str = "weft-system"
) -> list[dict[str, Any]]:
    r = helm("template", "-n", namespace, *extra, chart=chart)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


@pytest.fixture(scope="module")
def custom() -> list[dict[str, Any]]:
    return render("-f", str(CUSTOM), namespace="mesh-system")


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def agent_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]


def mounts(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in c["volumeMounts"]}


def volumes(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in one(docs, "DaemonSet")["spec"]["template"]["spec"]["volumes"]}


# ---- lint and render ------------------------------------------------------------------


def test_helm_lint_is_clean_with_default_and_custom_values() -> None:
    for extra in ((), ("-f", str(CUSTOM))):
        r = helm("lint", "--strict", *extra)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "[ERROR]" not in r.stdout and "[WARNING]" not in r.stdout, r.stdout


def validate(doc: dict[str, Any]) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_rendered_object_validates_against_kubernetes_1_35(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    """Strict schemas: a misspelt or misplaced field anywhere is an error."""
    crds = [yaml.safe_load(p.read_text()) for p in sorted((CHART / "crds").glob("*.yaml"))]
    checked = 0
    for doc in [*default, *custom, *crds]:
        if (doc["apiVersion"], doc["kind"]) in EXTERNAL_KINDS:
            assert doc["metadata"]["name"] and doc["spec"], doc
            continue
        validate(doc)
        checked += 1
    assert checked >= 2 * 12 + len(crds)


def test_the_validator_is_not_a_no_op(default: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    ds = json.loads(json.dumps(one(default, "DaemonSet")))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(ds)


def test_custom_values_render_every_optional_object(custom: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in custom}
    assert {"ServiceMonitor", "PodMonitor", "PodDisruptionBudget"} <= kinds
    cm = one(custom, "ConfigMap", "weft-dashboards")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    deploy = one(custom, "Deployment", "weft-controller")
    assert deploy["spec"]["replicas"] == 2
    assert "--leader-elect" in deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    image = agent_container(custom)["image"]
    assert image.startswith("registry.example.org/mesh/weft@sha256:")


def test_values_schema_rejects_unknown_keys_and_mismatched_audiences() -> None:
    r = helm("template", "--set", "agent.privilegd=true")
    assert r.returncode != 0 and "privilegd" in r.stderr
    r = helm("template", "--set", "controller.tokenAudience=other")
    assert r.returncode != 0 and "must be equal" in r.stderr


# ---- the agent DaemonSet: privileges, mounts, identity ---------------------------------


def test_agent_runs_on_every_node_on_the_host_network(default: list[dict[str, Any]]) -> None:
    ds = one(default, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["terminationGracePeriodSeconds"] == 75
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0},
    }
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert env == {"NODE_NAME": "spec.nodeName", "NODE_IP": "status.hostIP"}
    meta = ds["spec"]["template"]["metadata"]["annotations"]
    assert meta["prometheus.io/scrape"] == "true" and meta["prometheus.io/port"] == "15020"


def test_agent_default_is_capabilities_not_privileged(default: list[dict[str, Any]]) -> None:
    sc = agent_container(default)["securityContext"]
    assert sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {
        "drop": ["ALL"],
        "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"],
    }
    # Default profiles refuse bpf(2); the chart says so rather than failing at start.
    assert sc["seccompProfile"] == {"type": "Unconfined"}
    # Bidirectional propagation is refused by the API server for unprivileged containers.
    assert mounts(agent_container(default))["bpffs"]["mountPropagation"] == "HostToContainer"


def test_agent_privileged_switch(custom: list[dict[str, Any]]) -> None:
    c = agent_container(custom)
    assert c["securityContext"] == {"privileged": True}
    assert mounts(c)["bpffs"]["mountPropagation"] == "Bidirectional"


def test_agent_host_mounts(default: list[dict[str, Any]], custom: list[dict[str, Any]]) -> None:
    m = mounts(agent_container(default))
    v = volumes(default)
    assert v["bpffs"]["hostPath"]["path"] == m["bpffs"]["mountPath"] == "/sys/fs/bpf"
    assert v["cgroup"]["hostPath"] == {"path": "/sys/fs/cgroup", "type": "Directory"}
    assert m["cgroup"]["mountPath"] == "/sys/fs/cgroup"
    for name, path in (("modules", "/lib/modules"), ("headers", "/usr/src")):
        assert v[name]["hostPath"]["path"] == path
        assert m[name] == {"name": name, "mountPath": path, "readOnly": True}
    assert v["host-proc"]["hostPath"]["path"] == "/proc"
    assert m["host-proc"] == {"name": "host-proc", "mountPath": "/host/proc", "readOnly": True}
    # Nothing else from the host, and nothing else writable from the host.
    host = {n for n, vol in v.items() if "hostPath" in vol}
    assert host == {
        "bpffs",
        "cgroup",
        "modules",
        "headers",
        "host-proc",
        "run",
        "state",
        "cache",
        "identities",
    }
    writable = {n for n in host if not m[n].get("readOnly")}
    assert writable == {"bpffs", "cgroup", "run", "state", "cache", "identities"}
    # A hybrid host's cgroup v2 root is configurable and mounted where the agent finds it.
    assert volumes(custom)["cgroup"]["hostPath"]["path"] == "/sys/fs/cgroup/unified"
    assert mounts(agent_container(custom))["cgroup"]["mountPath"] == "/sys/fs/cgroup/unified"


def test_agent_identity_is_an_audience_bound_token_only(default: list[dict[str, Any]]) -> None:
    from agent.settings import AgentSettings

    pod = one(default, "DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "weft-agent"
    assert pod["automountServiceAccountToken"] is False
    (src,) = volumes(default)["sa-token"]["projected"]["sources"]
    assert src["serviceAccountToken"]["audience"] == "weft-controller"
    assert src["serviceAccountToken"]["path"] == "token"
    m = mounts(agent_container(default))["sa-token"]
    # The agent reads the token where its settings say, without a flag.
    default_file = AgentSettings.model_fields["sa_token_file"].default
    assert Path(m["mountPath"]) / "token" == default_file
    assert m["readOnly"] is True


def test_agent_trusts_the_controller_from_the_published_bundle(
    default: list[dict[str, Any]],
) -> None:
    c = agent_container(default)
    ca = volumes(default)["ca-root"]["configMap"]
    assert ca["name"] == "weft-ca-root"
    assert ca["items"] == [{"key": "trust-bundle.pem", "path": "trust-bundle.pem"}]
    bundle = Path(mounts(c)["ca-root"]["mountPath"]) / "trust-bundle.pem"
    assert f"--ca-bundle={bundle}" in c["args"]


def _parse(command: Any, args: list[str]) -> dict[str, Any]:
    ctx = command.make_context(command.name or "cmd", list(args), resilient_parsing=False)
    return dict(ctx.params)


def test_rendered_arguments_are_accepted_by_the_real_clis(
    default: list[dict[str, Any]], custom: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renamed flag fails here, not in a CrashLoopBackOff."""
    import typer.main

    from agent.cli import agentcmd, waypointcmd
    from controller import __main__ as controller_cli

    monkeypatch.setenv("NODE_NAME", "node-1")
    monkeypatch.setenv("NODE_IP", "10.0.0.11")
    agent_run = typer.main.get_command(agentcmd.app).commands["run"]  # type: ignore[attr-defined]
    controller_run = typer.main.get_command(controller_cli.app)
    for docs, ns in ((default, "weft-system"), (custom, "mesh-system")):
        params = _parse(agent_run, agent_container(docs)["args"])
        assert params["controller"] == f"weft-controller.{ns}.svc:15012"
        assert params["cgroup_mode"] == "kubelet"
        c = one(docs, "Deployment", "weft-controller")["spec"]["template"]["spec"]["containers"][0]
        params = _parse(controller_run, c["args"])
        assert params["config_source"] == "kubernetes" and params["ca_store"] == "kubernetes"
        assert params["ca_secret"] == f"{ns}/weft-ca"
        assert params["agent_service_account"] == f"{ns}/weft-agent"
        assert f"weft-controller.{ns}.svc" in params["server_name"]
        assert params["prometheus_url"] == (
            None if docs is default else "http://prometheus.monitoring:9090"
        )
        assert params["signer_processes"] == (None if docs is default else 2)
    waypoint_run = typer.main.get_command(waypointcmd.app).commands["run"]  # type: ignore[attr-defined]
    for d in custom:
        if d["kind"] == "Deployment" and d["metadata"]["labels"].get("weft.dev/waypoint"):
            c = d["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e for e in c["env"]}
            ref = env["WEFT_QUOTA_STORE"]["valueFrom"]["secretKeyRef"]
            secret = next(
                x
                for x in custom
                if x["kind"] == "Secret"
                and x["metadata"]["name"] == ref["name"]
                and x["metadata"]["namespace"] == d["metadata"]["namespace"]
            )
            monkeypatch.setenv("WEFT_QUOTA_STORE", secret["stringData"][ref["key"]])
            params = _parse(waypoint_run, [a.replace("$(POD_IP)", "10.1.2.3") for a in c["args"]])
            assert params["workload_socket"] == Path("/var/run/weft/workload.sock")
            assert params["quota_store"].startswith("redis://:")
            assert params["quota_store"].endswith("@weft-quota-redis.mesh-system.svc:6379/0")
            assert params["drain_timeout"] == 20
            assert (params["access_log_sample"], params["access_log_max_rate"]) == (0.25, 500)


# ---- RBAC -----------------------------------------------------------------------------


def rules_of(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for d in docs if d["kind"] == kind for r in d.get("rules") or []]


def test_the_socket_keeper_is_a_native_sidecar_the_agent_finds(
    default: list[dict[str, Any]],
) -> None:
    """agent/keeper.py in the agent's pod: a native sidecar (it outlives agent container
    restarts), without capabilities, sharing a per-pod memory emptyDir with the agent at
    the path the agent is told; its arguments parse with the real CLI."""
    import typer.main

    from agent.cli import agentcmd

    spec = one(default, "DaemonSet")["spec"]["template"]["spec"]
    (keeper,) = spec["initContainers"]
    assert keeper["restartPolicy"] == "Always"
    assert keeper["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    keeper_cmd = typer.main.get_command(agentcmd.app).commands["keeper"]  # type: ignore[attr-defined]
    params = _parse(keeper_cmd, keeper["args"])
    agent_args = agent_container(default)["args"]
    assert f"--keeper-socket={params['socket_path']}" in agent_args
    vol = {v["name"]: v for v in spec["volumes"]}["keeper"]
    assert vol["emptyDir"]["medium"] == "Memory"  # per pod: a surge pod has its own
    mount_dir = str(params["socket_path"].parent)
    assert {"name": "keeper", "mountPath": mount_dir} in keeper["volumeMounts"]
    assert {"name": "keeper", "mountPath": mount_dir} in agent_container(default)["volumeMounts"]
    wp = render("--set", "waypoints[0].name=wp", "--set", "waypoints[0].namespace=ai")
    wspec = one(wp, "Deployment", "wp")["spec"]["template"]["spec"]
    (wkeeper,) = wspec["initContainers"]
    assert wkeeper["args"] == keeper["args"] and wkeeper["restartPolicy"] == "Always"
    assert f"--keeper-socket={params['socket_path']}" in wspec["containers"][0]["args"]
    off = render("--set", "agent.socketKeeper.enabled=false")
    assert "initContainers" not in one(off, "DaemonSet")["spec"]["template"]["spec"]
    assert not [a for a in agent_container(off)["args"] if a.startswith("--keeper-socket")]


def test_agent_has_no_kubernetes_api_access(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    for docs in (default, custom):
        for b in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
            assert all(s["name"] != "weft-agent" for s in b["subjects"]), b["metadata"]["name"]


def test_no_wildcards_in_any_rule(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    for docs in (default, custom):
        for r in rules_of(docs, "ClusterRole") + rules_of(docs, "Role"):
            for key in ("verbs", "resources", "apiGroups", "resourceNames"):
                assert "*" not in (r.get(key) or []), r


def test_only_the_controller_touches_the_ca_secret_by_name(default: list[dict[str, Any]]) -> None:
    cluster = rules_of(default, "ClusterRole")
    assert not [r for r in cluster if "secrets" in r["resources"] or "configmaps" in r["resources"]]
    ns = rules_of(default, "Role")
    secrets = [r for r in ns if "secrets" in r["resources"]]
    assert secrets == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["weft-ca"],
            "verbs": ["get", "update"],
        }
    ]
    configmaps = [r for r in ns if "configmaps" in r["resources"]]
    assert configmaps == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["weft-ca-root"],
            "verbs": ["get", "update"],
        }
    ]
    (role,) = [d for d in default if d["kind"] == "Role"]
    (binding,) = [d for d in default if d["kind"] == "RoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "weft-controller", "namespace": "weft-system"}
    ]
    # The chart creates the CA objects empty and keeps them on uninstall.
    secret = one(default, "Secret", "weft-ca")
    assert "data" not in secret
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_controller_reads_what_it_converts_and_nothing_more(default: list[dict[str, Any]]) -> None:
    got = {
        (g, res): tuple(r["verbs"])
        for r in rules_of(default, "ClusterRole")
        for g in r["apiGroups"]
        for res in r["resources"]
    }
    read = ("get", "list", "watch")
    crd_plurals = {
        yaml.safe_load(p.read_text())["spec"]["names"]["plural"]
        for p in (CHART / "crds").glob("*.yaml")
    }
    want = {
        **{("", r): read for r in ("pods", "namespaces", "services", "nodes")},
        ("discovery.k8s.io", "endpointslices"): read,
        ("gateway.networking.k8s.io", "httproutes"): read,
        ("gateway.networking.k8s.io", "grpcroutes"): read,
        ("gateway.networking.k8s.io", "gateways"): read,
        ("security.istio.io", "authorizationpolicies"): read,
        ("security.istio.io", "peerauthentications"): read,
        ("networking.istio.io", "virtualservices"): read,
        ("networking.istio.io", "destinationrules"): read,
        **{("weft.dev", p): read for p in crd_plurals},
        # Status write-back: the status subresources only, patch only.
        **{("weft.dev", f"{p}/status"): ("patch",) for p in crd_plurals},
        ("gateway.networking.k8s.io", "httproutes/status"): ("patch",),
        ("gateway.networking.k8s.io", "grpcroutes/status"): ("patch",),
        ("gateway.networking.k8s.io", "gateways/status"): ("patch",),
        ("security.istio.io", "authorizationpolicies/status"): ("patch",),
        ("security.istio.io", "peerauthentications/status"): ("patch",),
        ("networking.istio.io", "virtualservices/status"): ("patch",),
        ("networking.istio.io", "destinationrules/status"): ("patch",),
        ("authentication.k8s.io", "tokenreviews"): ("create",),
    }
    assert got == want


def test_leases_only_with_leader_election(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    assert not [r for r in rules_of(default, "Role") if "leases" in r["resources"]]
    leases = [r for r in rules_of(custom, "Role") if "leases" in r["resources"]]
    assert {tuple(r["verbs"]) for r in leases} == {("create",), ("get", "update")}
    assert [r["resourceNames"] for r in leases if "resourceNames" in r] == [["weft-controller"]]


# ---- the controller, its Service and PDB ------------------------------------------------


def test_controller_service_and_disruption_budget(default: list[dict[str, Any]]) -> None:
    svc = one(default, "Service", "weft-controller")
    assert sorted(p["port"] for p in svc["spec"]["ports"]) == [15010, 15012, 15014]
    pdb = one(default, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1  # never blocks a drain, even with one replica
    c = one(default, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert "--leader-elect" not in c["args"]


# ---- dashboards -------------------------------------------------------------------------


def test_dashboards_configmap_takes_any_number_of_json_files(tmp_path: Path) -> None:
    chart = tmp_path / "weft"
    shutil.copytree(CHART, chart)
    (chart / "files" / "dashboards" / "weft-tokens.json").write_text('{"title": "tokens"}')
    docs = render("--set", "dashboards.enabled=true", chart=chart)
    cm = one(docs, "ConfigMap", "weft-dashboards")
    assert sorted(cm["data"]) == ["weft-ai.json", "weft-mesh.json", "weft-tokens.json"]
    for body in cm["data"].values():
        json.loads(body)
    assert not [d for d in render(chart=chart) if d["metadata"]["name"] == "weft-dashboards"]


def test_agent_upgrade_hands_over_with_a_surge(
    default: list[dict[str, Any]], custom: list[dict[str, Any]]
) -> None:
    """Default: the old agent stops first, ports declared. Surge (custom values): the new
    agent starts beside the old one, so no port may be declared (host ports would keep it
    from scheduling) and the PodMonitor scrapes by number. Both keep identities in the
    runtime directory (a tmpfs) and drain for the configured time, within the grace."""
    for docs, surge in ((default, 0), (custom, 1)):
        ds = one(docs, "DaemonSet")
        strategy = ds["spec"]["updateStrategy"]["rollingUpdate"]
        assert strategy["maxSurge"] == surge
        pod = ds["spec"]["template"]["spec"]
        (agent,) = pod["containers"]
        assert ("ports" in agent) == (surge == 0)
        args = agent["args"]
        drain = int(next(a for a in args if a.startswith("--drain-timeout=")).split("=")[1])
        assert pod["terminationGracePeriodSeconds"] > drain
        assert "--identity-dir=/run/weft-agent/identities" in args
        # Not in the runtime directory that waypoint pods mount (workload.sock).
        (vol,) = [v for v in pod["volumes"] if v["name"] == "identities"]
        assert vol["hostPath"]["path"] == "/run/weft-agent/identities"
    (endpoint,) = one(custom, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["targetPort"] == 15020


# ---- waypoints and their quota store ----------------------------------------------------


def test_no_waypoint_unless_asked(default: list[dict[str, Any]]) -> None:
    assert not [d for d in default if d["metadata"].get("labels", {}).get("weft.dev/waypoint")]
    assert not [d for d in default if d["metadata"]["name"] == "weft-quota-redis"]


def test_waypoints_render_a_deployment_service_pdb_and_autoscaler(
    custom: list[dict[str, Any]],
) -> None:
    """Each entry: a Deployment in its namespace whose pods carry weft.dev/waypoint (how
    agents find instances) and are not captured themselves, a Service, a PDB (unless
    disabled) and an HPA (with autoscaling, and then no fixed replicas); replicas spread
    over nodes; the Workload API socket from the agent's runtime directory; probes."""
    ai = one(custom, "Deployment", "ai-waypoint")
    batch = one(custom, "Deployment", "batch-waypoint")
    assert ai["metadata"]["namespace"] == "inference" and ai["spec"]["replicas"] == 3
    assert "replicas" not in batch["spec"]
    pod = ai["spec"]["template"]
    assert pod["metadata"]["labels"]["weft.dev/waypoint"] == "ai-waypoint"
    assert pod["metadata"]["labels"]["weft.dev/mesh"] == "disabled"
    spec = pod["spec"]
    assert spec["serviceAccountName"] == "ai-waypoint"
    assert batch["spec"]["template"]["spec"]["serviceAccountName"] == "batch-proxy"
    assert spec["terminationGracePeriodSeconds"] == 30  # drainSeconds 20, charges, margin
    assert spec["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert spec["securityContext"]["runAsNonRoot"] is True
    (c,) = spec["containers"]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
    assert c["resources"]["requests"]["cpu"] == "500m"  # from waypointDefaults
    vols = {v["name"]: v for v in spec["volumes"]}
    assert set(vols) == {"weft-run", "keeper"}  # the agent's sockets; the pod's keeper
    assert vols["weft-run"]["hostPath"]["path"] == "/var/run/weft"
    svc = one(custom, "Service", "ai-waypoint")
    assert svc["metadata"]["namespace"] == "inference"
    assert {p["port"] for p in svc["spec"]["ports"]} == {15008}  # not /config, /rollouts
    assert svc["spec"]["selector"]["weft.dev/waypoint"] == "ai-waypoint"
    pdbs = {d["metadata"]["name"] for d in custom if d["kind"] == "PodDisruptionBudget"}
    assert "ai-waypoint" in pdbs and "batch-waypoint" not in pdbs
    hpa = one(custom, "HorizontalPodAutoscaler", "batch-waypoint")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "batch-waypoint"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)
    assert one(custom, "ServiceAccount", "batch-proxy")["metadata"]["namespace"] == "batch"


def test_waypoints_are_gateway_api_gateways_where_the_cluster_has_the_api() -> None:
    """Istio's model: a waypoint is a Gateway (class weft-waypoint) that the controller
    reads and reports on; its pods carry Istio's gateway-name label. Rendered when the
    cluster serves the Gateway API (or forced), parsed here by the controller's own model."""
    from controller.model.base import parse_resource

    wp = ("--set", "waypoints[0].name=wp", "--set", "waypoints[0].namespace=ai")
    api = ("--api-versions", "gateway.networking.k8s.io/v1/Gateway")
    without = render(*wp)
    assert not [d for d in without if d["kind"] in ("Gateway", "GatewayClass")]
    docs = render(*wp, *api)
    gw = parse_resource(one(docs, "Gateway", "wp"))
    assert (gw.namespace, gw.spec.gateway_class_name) == ("ai", "weft-waypoint")  # type: ignore[attr-defined]
    assert one(docs, "GatewayClass", "weft-waypoint")["spec"]["controllerName"]
    pod = one(docs, "Deployment", "wp")["spec"]["template"]["metadata"]["labels"]
    assert pod["gateway.networking.k8s.io/gateway-name"] == "wp"
    assert pod["weft.dev/waypoint"] == "wp"
    off = render(*wp, *api, "--set", "gatewayAPI.waypointGateways=false")
    assert not [d for d in off if d["kind"] in ("Gateway", "GatewayClass")]
    forced = render(*wp, "--set", "gatewayAPI.waypointGateways=true")
    assert one(forced, "Gateway", "wp") and one(forced, "GatewayClass")
    # No waypoints, no class: nothing would use it.
    assert not [d for d in render(*api) if d["kind"] == "GatewayClass"]


def test_the_chart_deploys_a_redis_and_every_waypoint_counts_on_it(
    custom: list[dict[str, Any]],
) -> None:
    """A password generated once (the same in every namespace's copy of the URL), no
    eviction (a full store fails writes instead of forgetting counters), and a
    NetworkPolicy that admits only waypoint pods."""
    redis = one(custom, "Deployment", "weft-quota-redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    line = c["args"][0]
    assert "--maxmemory 128mb" in line and "--maxmemory-policy noeviction" in line
    assert '--requirepass "$REDIS_PASSWORD"' in line
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert one(custom, "Service", "weft-quota-redis")["spec"]["ports"][0]["port"] == 6379
    password = one(custom, "Secret", "weft-quota-redis")["stringData"]["password"]
    assert len(password) == 32
    for name, ns in (("ai-waypoint", "inference"), ("batch-waypoint", "batch")):
        env = one(custom, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]["env"]
        (store,) = [e for e in env if e["name"] == "WEFT_QUOTA_STORE"]
        ref = store["valueFrom"]["secretKeyRef"]
        (secret,) = [
            d
            for d in custom
            if d["kind"] == "Secret"
            and d["metadata"]["name"] == ref["name"]
            and d["metadata"]["namespace"] == ns
        ]
        assert secret["stringData"]["url"] == (
            f"redis://:{password}@weft-quota-redis.mesh-system.svc:6379/0"
        )
    np_ = one(custom, "NetworkPolicy", "weft-quota-redis")
    (rule,) = np_["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchExpressions"][0]["key"] == "weft.dev/waypoint"


def test_an_external_quota_store_from_a_secret() -> None:
    docs = render(
        "--set",
        "waypoints[0].name=wp",
        "--set",
        "waypoints[0].namespace=ai",
        "--set",
        "quotaStore.existingSecret.name=quota-redis",
    )
    env = one(docs, "Deployment", "wp")["spec"]["template"]["spec"]["containers"][0]["env"]
    (store,) = [e for e in env if e["name"] == "WEFT_QUOTA_STORE"]
    assert store["valueFrom"]["secretKeyRef"] == {"name": "quota-redis", "key": "url"}
    bad = helm("template", "--set", "quotaStore.url=http://redis:6379")
    assert bad.returncode != 0 and "quotaStore" in bad.stderr


def test_agent_and_controller_have_startup_liveness_and_readiness_probes(
    default: list[dict[str, Any]],
) -> None:
    agent = agent_container(default)
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz/live"
    assert agent["startupProbe"]["httpGet"]["path"] == "/healthz/ready"
    c = one(default, "Deployment", "weft-controller")["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(c)
