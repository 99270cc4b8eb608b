"""Who may say whom it speaks for (agent/tunnel/tunnel.py `caller_address`): a node tunnel
for its own pods, a waypoint for the destinations it routes to; nobody else's
`Forwarded: for=` is believed, and the stream is judged by the address it comes from."""

from __future__ import annotations

import pytest

from agent.tunnel.tunnel import caller_address
from tests.enginetesting import snapshot

CONFIG = """\
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: node-1}
spec: {addresses: [10.0.0.11]}
---
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: node-2}
spec: {addresses: [10.0.0.12]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: client, namespace: apps, labels: {app: client}}
spec: {serviceAccount: client, node: node-1, addresses: [10.244.1.2]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: batch, namespace: apps, labels: {app: batch}}
spec: {serviceAccount: batch, node: node-1, addresses: [10.244.1.3]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: waypoint, namespace: ai, labels: {weft.dev/waypoint: ai-waypoint}}
spec: {serviceAccount: waypoint, node: node-1, addresses: [10.244.1.9], mesh: false}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: llm, namespace: ai, labels: {app: llm}}
spec: {serviceAccount: llm, node: node-2, addresses: [10.244.2.2]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: pool, namespace: ai, labels: {app: pool}}
spec: {serviceAccount: pool, node: node-2, addresses: [10.244.2.3]}
---
apiVersion: weft.dev/v1alpha1
kind: Workload
metadata: {name: other, namespace: ai, labels: {app: other}}
spec: {serviceAccount: other, node: node-2, addresses: [10.244.2.4]}
---
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: ai, labels: {weft.dev/use-waypoint: ai-waypoint}}
spec: {selector: {app: llm}, clusterIP: 10.96.0.10, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: pool, namespace: ai}
spec: {selector: {app: pool}, clusterIP: 10.96.0.11, ports: [{port: 8000}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: ai}
spec: {selector: {app: other}, clusterIP: 10.96.0.12, ports: [{port: 8000}]}
---
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  rules: [{models: [llama], backendRefs: [{name: pool, port: 8000}]}]
"""
CLIENT = "spiffe://cluster.local/ns/apps/sa/client"
BATCH = "spiffe://cluster.local/ns/apps/sa/batch"
WAYPOINT = "spiffe://cluster.local/ns/ai/sa/waypoint"


@pytest.fixture(scope="module")
def snap():
    return snapshot(CONFIG)


def dest(snap, name):
    return next(w for w in snap.workloads_by_ip.values() if w.name == name)


@pytest.mark.parametrize(
    ("peer", "peer_ip", "asserted", "to", "expected"),
    [
        # node-1's tunnel for its pod client, as client: believed
        (CLIENT, "10.0.0.11", "10.244.1.2", "llm", ("10.244.1.2", True)),
        # batch's identity claiming client's address: judged by where it comes from
        (BATCH, "10.0.0.11", "10.244.1.2", "llm", ("10.0.0.11", False)),
        (BATCH, "10.244.1.3", "10.244.1.2", "llm", ("10.244.1.3", False)),
        # client's identity but from node-2, where client does not run
        (CLIENT, "10.0.0.12", "10.244.1.2", "llm", ("10.0.0.12", False)),
        # client's identity dialling from its own pod (it fetched its certificate)
        (CLIENT, "10.244.1.2", "10.244.1.2", "llm", ("10.244.1.2", False)),
        # the waypoint, for a destination of a Service that uses it, and of its ModelRoute
        (WAYPOINT, "10.244.1.9", "10.244.1.2", "llm", ("10.244.1.2", True)),
        (WAYPOINT, "10.244.1.9", "10.244.1.2", "pool", ("10.244.1.2", True)),
        # the waypoint for a Service it does not serve, or its identity from elsewhere
        (WAYPOINT, "10.244.1.9", "10.244.1.2", "other", ("10.244.1.9", False)),
        (WAYPOINT, "10.0.0.11", "10.244.1.2", "llm", ("10.0.0.11", False)),
        # nothing asserted: the connecting address
        (CLIENT, "10.0.0.11", None, "llm", ("10.0.0.11", False)),
    ],
)
def test_forwarded_is_believed_only_from_who_can_vouch_for_it(
    snap, peer, peer_ip, asserted, to, expected
):
    """Each row: who connects (identity and address), what it asserts, to whom."""
    assert caller_address(snap, peer, peer_ip, asserted, dest(snap, to)) == expected
