"""`weft demo` (`make demo`): the mesh end to end, told as a newcomer should see it.

It builds its own lab (weft-demo: two nodes, a client, a batch job, an embedding service
and two versions of a chat model behind a waypoint), installs the controller and an agent
per node, applies policies (STRICT mTLS, an authorization rule, a 90/10 canary, a token
budget), drives traffic, prints what happened, and always tears down. Exit code 0 means
every step did what it should; otherwise the failing step is named.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import typer

from agent.cli.output import table
from agent.cli.progress import StepFailed, Steps
from agent.lab import mesh
from agent.lab.manifest import load_manifest
from agent.lab.topology import Lab, LabState
from agent.netns import call_in

DEMO_LAB = "weft-demo"
MODELS = {"ai/embedder": "embed-small", "ai/llm-v1": "llama-v1", "ai/llm-v2": "llama-v2"}


def _asset(name: str) -> Path:
    return Path(str(resources.files("agent.lab").joinpath(name)))


def _wait(pred: Any, what: str, limit: float = 15.0) -> None:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise StepFailed(f"timed out waiting for {what}")


def _listening(state: LabState, pod: str, port: int = 8000) -> bool:
    p = state.pod(pod)

    def probe() -> bool:
        try:
            socket.create_connection((p.ip, port), timeout=0.5).close()
            return True
        except OSError:
            return False

    return call_in(p.netns, probe)


def _vip(state: LabState, name: str) -> str:
    return next(s["clusterIP"] for s in state.services if s["name"] == name)


def _llm_client(
    lab: Lab, pod: str, url: str, *args: str, timeout: float = 120
) -> list[dict[str, Any]]:
    out = lab.run(
        pod,
        [sys.executable, "-m", "agent.lab.workloads.llm_client", url, "--all-headers", *args],
        timeout=timeout,
    )
    if out.returncode != 0:
        raise StepFailed(f"client in {pod} failed: {out.stderr.decode()[-400:]}")
    return [json.loads(x) for x in out.stdout.decode().splitlines() if x.strip()]


def _metrics(state: LabState, netns: str, ip: str, port: int = 15020) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://{ip}:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    return call_in(netns, get)


def _sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def demo(
    keep: bool = typer.Option(
        False,
        "--keep",
        help="Leave the lab up afterwards (then explore with weft --lab weft-demo ...).",
    ),
) -> None:
    """Run the mesh end to end on this machine and print what a newcomer should see.

    Example: weft demo
    """
    steps = Steps(8)
    plan = load_manifest(_asset("demo-lab.yaml"))
    lab = Lab(DEMO_LAB)
    report: dict[str, Any] = {}
    try:
        with steps.step("building the lab: 2 nodes, 8 pods, network namespaces and cgroups"):
            state = lab.up(plan)
        with steps.step(
            "installing weft: controller, an agent per node (eBPF), a waypoint on each node"
        ):
            mesh.install(lab, state, wait=90)
            state = lab.state()
        with steps.step("starting the AI pipeline: an embedding service, chat model v1 and v2"):
            for pod, model in MODELS.items():
                lab.start_process(
                    state,
                    f"model-{pod.split('/')[1]}",
                    [
                        sys.executable,
                        "-m",
                        "agent.lab.workloads.model_server",
                        "--port",
                        "8000",
                        "--model",
                        model,
                        "--name",
                        pod,
                        "--ttft",
                        "0.02",
                        "--tpot",
                        "0.005",
                        "--max-concurrency",
                        "0",
                    ],
                    pod=pod,
                )
            for pod in MODELS:
                _wait(lambda pod=pod: _listening(state, pod), f"{pod} to serve")
        with steps.step(
            "applying policies: STRICT mTLS, an authorization rule, a 90/10 canary, a token budget"
        ):
            _apply_policies(state)
            report["policies"] = [
                "PeerAuthentication weft-system/default (STRICT)",
                "AuthorizationPolicy ai/embedder-callers",
                "HTTPRoute ai/llm-canary (90/10)",
                "TokenRateLimit ai/batch-budget (150 tokens/min)",
            ]
        with steps.step("client -> embedding service: captured by eBPF, carried over mTLS"):
            rs = _llm_client(
                lab,
                "apps/client",
                f"http://{_vip(state, 'embedder')}:8000",
                "--api",
                "embeddings",
                "--model",
                "embed-small",
                "-n",
                "20",
            )
            if any(r["status"] != 200 for r in rs):
                raise StepFailed(f"embedding calls failed: {[r['status'] for r in rs]}")
            report["embeddings_ok"] = len(rs)
        with steps.step("client -> chat model through the waypoint: 200 requests, a stream"):
            rs = _llm_client(
                lab,
                "apps/client",
                f"http://{_vip(state, 'llm')}:8000",
                "--model",
                "llama",
                "--max-tokens",
                "4",
                "-n",
                "200",
                "-c",
                "8",
            )
            if any(r["status"] != 200 for r in rs):
                raise StepFailed(f"chat calls failed: {Counter(r['status'] for r in rs)}")
            report["split"] = Counter(r["served_by"] for r in rs)
            (stream,) = _llm_client(
                lab,
                "apps/client",
                f"http://{_vip(state, 'llm')}:8000",
                "--model",
                "llama",
                "--stream",
                "--include-usage",
                "--max-tokens",
                "12",
            )
            report["stream"] = stream
        with steps.step(
            "batch job: denied by policy at the embedding service, then over its token budget"
        ):
            out = lab.run(
                "apps/batch",
                [
                    sys.executable,
                    "-m",
                    "agent.lab.workloads.llm_client",
                    f"http://{_vip(state, 'embedder')}:8000",
                    "--api",
                    "embeddings",
                    "--model",
                    "embed-small",
                ],
            )
            denied = [json.loads(x) for x in out.stdout.decode().splitlines() if x.strip()]
            if not denied or denied[0].get("status") == 200:
                raise StepFailed(
                    "the batch job reached the embedding service; the "
                    "AuthorizationPolicy should have refused it"
                )
            report["denied"] = denied[0]
            rs = _llm_client(
                lab,
                "apps/batch",
                f"http://{_vip(state, 'llm')}:8000",
                "--model",
                "llama",
                "--max-tokens",
                "16",
                "-n",
                "12",
            )
            codes = [r["status"] for r in rs]
            if 429 not in codes:
                raise StepFailed(f"the token budget never answered 429: {codes}")
            report["budget"] = (codes, next(r for r in rs if r["status"] == 429))
        with steps.step("collecting what the mesh saw (flows, metrics, drops)"):
            report.update(_observe(lab, state))
            if keep:
                typer.echo("", err=True)
            else:
                lab.down()
    except BaseException:
        if not keep:
            lab.down()
        raise
    _print(report, keep)


def _apply_policies(state: LabState) -> None:
    import grpc

    from controller.api.gen import admin_pb2, admin_pb2_grpc

    sock = mesh.paths(state)["admin"]
    text = _asset("demo-policies.yaml").read_text()
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        resp = admin_pb2_grpc.AdminStub(ch).Apply(
            admin_pb2.ApplyRequest(
                documents=[admin_pb2.ApplyRequest.Document(file="demo-policies.yaml", text=text)]
            ),
            timeout=30,
        )
    if resp.problems:
        raise StepFailed("policies rejected: " + "; ".join(p.reason for p in resp.problems))

    def applied() -> bool:
        revs = [
            mesh.admin_get(mesh.admin_socket(state, n.name), "/config")["revision"]
            for n in state.nodes
        ]
        return min(revs) >= resp.revision

    _wait(applied, "every agent to run the new policies")
    time.sleep(1.0)  # the waypoint follows its node agent by long poll


def _observe(lab: Lab, state: LabState) -> dict[str, Any]:
    n1, n2 = state.node("node-1"), state.node("node-2")

    # A plaintext connection that bypasses the tunnel: node-1 dials a STRICT pod directly.
    def bypass() -> str:
        try:
            socket.create_connection((state.pod("ai/embedder").ip, 8000), timeout=1).close()
            return "connected"
        except OSError:
            return "dropped"

    out: dict[str, Any] = {"bypass": call_in(n1.netns, bypass)}
    node2 = _metrics(state, n2.netns, n2.ip)
    out["mtls"] = {
        "client->embedder": _sum(
            node2,
            "istio_tcp_connections_opened_total",
            reporter="destination",
            source_principal="spiffe://cluster.local/ns/apps/sa/client",
            connection_security_policy="mutual_tls",
        ),
        # batch and the embedder share node-2: its tunnel refuses the connection there.
        "denied": _sum(node2, "weft_tunnel_denied_connections_total"),
    }

    flows = mesh.admin_get(mesh.admin_socket(state, "node-1"), "/flows")
    seen: set[str] = set()
    out["flows"] = []
    for f in flows:  # one flow per destination the client reached
        if f.get("workload") == "apps/client" and f["originalDst"] not in seen:
            seen.add(f["originalDst"])
            out["flows"].append(f)
    drops = mesh.admin_get(mesh.admin_socket(state, "node-2"), "/datapath")["drops"]
    out["drops"] = sum(d["count"] for d in drops)
    texts = {}
    for ref in ("ai/waypoint", "ai/waypoint-2"):
        wp = state.pod(ref)
        texts[wp.node] = _metrics(state, wp.netns, wp.ip)

    def total(name: str, **labels: str) -> float:
        return sum(_sum(t, name, **labels) for t in texts.values())

    out["requests"] = total("istio_requests_total", destination_service_name="llm")
    out["tokens"] = {
        t: total("gen_ai_client_token_usage_sum", gen_ai_token_type=t) for t in ("input", "output")
    }
    out["ttft_count"] = total("gen_ai_server_time_to_first_token_count")
    out["quota_ops"] = {
        node: _sum(t, "weft_ai_quota_store_duration_seconds_count", store="redis")
        for node, t in texts.items()
    }
    return out


def _print(r: dict[str, Any], keep: bool) -> None:
    echo = typer.echo
    echo("")
    echo("What weft did")
    echo("=============")
    echo("\nPolicies in force:\n  " + "\n  ".join(r["policies"]))
    echo("\nmTLS flows the eBPF flow map saw from apps/client (node-1):")
    rows = [
        {
            "original": f["originalDst"],
            "peer": f["peer"],
            "tunnel": f["remote"],
            "sent": f["bytesSent"],
            "received": f["bytesReceived"],
            "srtt": f["srttUs"],
        }
        for f in r["flows"]
    ]
    echo(
        table(
            rows,
            [
                ("ORIGINAL DESTINATION", "original"),
                ("PEER", "peer"),
                ("REDIRECTED TO", "tunnel"),
                ("BYTES SENT", "sent"),
                ("BYTES RECEIVED", "received"),
                ("SRTT (us)", "srtt"),
            ],
        ).rstrip()
    )
    echo(
        f"\nConnections into node-2 over mTLS from spiffe://cluster.local/ns/apps/sa/client: "
        f"{r['mtls']['client->embedder']:.0f} (istio_tcp_connections_opened_total)"
    )
    split = r["split"]
    total = sum(split.values())
    echo("\nThe 90/10 canary, 200 requests through the waypoint:")
    for pod in ("ai/llm-v1", "ai/llm-v2"):
        echo(f"  {pod}: {split.get(pod, 0):4d}  ({100 * split.get(pod, 0) / total:.1f}%)")
    s = r["stream"]
    echo(
        f"\nA streamed answer: {s['usage']['completion_tokens']} tokens, first token after "
        f"{1000 * s['ttft_s']:.1f} ms, complete after {1000 * s['total_s']:.1f} ms "
        f"(served by {s['served_by']})"
    )
    d = r["denied"]
    echo(
        f"\nDenied: apps/batch -> ai/embedder was refused by AuthorizationPolicy "
        f"ai/embedder-callers ({d.get('error') or d.get('status')}); "
        f"{r['mtls']['denied']:.0f} denial(s) counted"
    )
    codes, first = r["budget"]
    echo(
        f"\nToken budget: apps/batch's calls answered {' '.join(map(str, codes))}; the first "
        f"429 said retry-after {first['headers'].get('retry-after')} s"
    )
    ops = ", ".join(f"{node} {n:.0f}" for node, n in sorted(r["quota_ops"].items()))
    echo(
        f"  counted in Redis (pod infra/redis), the store both waypoint replicas share, so "
        f"the budget holds across nodes; store ops per replica: {ops}"
    )
    echo(
        f"\nSTRICT mTLS: a plaintext connection from node-1 straight to ai/embedder was "
        f"{r['bypass']}; node-2's data path counted {r['drops']} dropped packet(s)"
    )
    echo(
        f"\nWaypoint metrics: istio_requests_total for ai/llm = {r['requests']:.0f}; "
        f"GenAI tokens in {r['tokens']['input']:.0f} / out {r['tokens']['output']:.0f}; "
        f"{r['ttft_count']:.0f} time-to-first-token samples"
    )
    echo(
        "\nThe lab is still up: try  weft --help  with WEFT_LAB=weft-demo"
        if keep
        else "\nThe lab was removed. Run it yourself: weft lab up, then weft --help."
    )
