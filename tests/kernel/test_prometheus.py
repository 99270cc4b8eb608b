"""A real Prometheus server (Debian's) scrapes the lab's agents and answers PromQL with the
mesh's Istio-named series. Needs root and the prometheus package (make setup)."""

from __future__ import annotations

import json
import shutil
import textwrap
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from agent.netns import call_in
from tests.kernel.conftest import Mesh, wait_until

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.kernel

ONE = """
import socket, sys
s = socket.create_connection((sys.argv[1], 8000), timeout=5)
s.sendall(b"ping"); s.shutdown(socket.SHUT_WR)
assert s.recv(10) == b"ping"
"""


@pytest.fixture(scope="module")
def prometheus(meshed: Mesh, tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("prometheus") is None:
        pytest.fail("prometheus is not installed; make setup installs Debian's package")
    d = tmp_path_factory.mktemp("prom")
    targets = [f"{n.ip}:15020" for n in meshed.state.nodes]
    (d / "prometheus.yml").write_text(
        textwrap.dedent(f"""\
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        scrape_configs:
          - job_name: weft-agents
            static_configs: [{{targets: {json.dumps(targets)}}}]
        """)
    )
    addr = f"{meshed.state.fabric_ip}:9090"
    meshed.lab.start_process(
        meshed.state,
        "prometheus",
        [
            "prometheus",
            f"--config.file={d / 'prometheus.yml'}",
            f"--storage.tsdb.path={d / 'data'}",
            f"--web.listen-address={addr}",
            "--storage.tsdb.retention.time=1h",
        ],
    )
    url = f"http://{addr}"
    wait_until(lambda: _get(meshed, url + "/-/ready") is not None, "prometheus ready", 30)
    return url


def _get(m: Mesh, url: str) -> str | None:
    def fetch() -> str | None:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.read().decode()  # type: ignore[no-any-return]
        except OSError:
            return None

    return call_in(m.state.fabric_netns, fetch)


def query(m: Mesh, base: str, promql: str) -> list[dict[str, object]]:
    body = _get(m, f"{base}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert body is not None
    doc = json.loads(body)
    assert doc["status"] == "success", doc
    return doc["data"]["result"]  # type: ignore[no-any-return]


def test_prometheus_scrapes_agents_and_promql_finds_mesh_traffic(
    meshed: Mesh, prometheus: str
) -> None:
    meshed.start_server("ai/far")
    for _ in range(3):
        out = meshed.run("apps/client", ONE, meshed.ip("ai/far"))
        assert out.returncode == 0, out.stderr.decode()
    wait_until(
        lambda: (
            len(
                [
                    r
                    for r in query(meshed, prometheus, 'up{job="weft-agents"}')
                    if r["value"][1] == "1"
                ]
            )
            == 2
        ),
        "both agents up",
        20,
    )  # type: ignore[index]
    promql = (
        "sum by (source_principal, destination_principal) "
        '(istio_tcp_connections_opened_total{reporter="destination",'
        'connection_security_policy="mutual_tls"})'
    )
    series = wait_until(lambda: query(meshed, prometheus, promql), "the mesh series", 20)
    got = {
        (
            s["metric"]["source_principal"],
            s["metric"]["destination_principal"],
        ):  # type: ignore[index]
        float(s["value"][1])
        for s in series
    }  # type: ignore[index]
    key = ("spiffe://cluster.local/ns/apps/sa/client", "spiffe://cluster.local/ns/ai/sa/model")
    assert got.get(key, 0) >= 3, got
    closed = wait_until(
        lambda: query(meshed, prometheus, 'sum(istio_tcp_received_bytes_total{reporter="source"})'),
        "byte counters",
        20,
    )
    assert float(closed[0]["value"][1]) >= 12  # type: ignore[index]  (3 x "ping" back)
    assert query(meshed, prometheus, "weft_agent_config_revision") != []
    # The flow exporter's RTT histogram, from the kernel's own measurement, is queryable.
    rtt = wait_until(
        lambda: query(
            meshed,
            prometheus,
            "histogram_quantile(0.9, sum by (le) "
            '(weft_flow_srtt_seconds_bucket{workload="client",direction="outbound"}))',
        ),
        "flow RTT histogram",
        20,
    )
    assert 0 < float(rtt[0]["value"][1]) < 1.0  # type: ignore[index]


def test_every_dashboard_query_is_valid_promql(meshed: Mesh, prometheus: str) -> None:
    """Grafana's queries, with its variables filled in, run on the real Prometheus."""
    fill = {"$namespace": ".*", "$model": ".*", "$__rate_interval": "1m"}
    for path in sorted((ROOT / "helm/weft/files/dashboards").glob("*.json")):
        for p in json.loads(path.read_text())["panels"]:
            for t in p["targets"]:
                expr = t["expr"]
                for k, v in fill.items():
                    expr = expr.replace(k, v)
                query(meshed, prometheus, expr)  # asserts status "success"
