"""A delta applied to a snapshot (`ConfigSnapshot.with_changes`) gives the same indexes as
building the new config from scratch, for any mix of workload and node changes; other
changes rebuild. Derived resources (Istio's networking kinds) stay derived once."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.state import ConfigSnapshot
from controller.model.loader import parse_text
from controller.model.workloads import Workload

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {selector: {app: a}, clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: ns1}
spec: {selector: {app: b, tier: x}, clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns2}
spec: {selector: {app: a}, clusterIP: 10.96.0.3, ports: [{port: 80}]}
"""


def workload(i: int, ns: str, app: str, node: str, ready: bool, tier: str | None) -> Workload:
    labels = {"app": app, **({"tier": tier} if tier else {})}
    text = (
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\n"
        f"metadata: {{name: w{i}, namespace: {ns}, labels: {labels}}}\n"
        f"spec: {{node: {node}, addresses: [10.{ns[-1]}.{i // 250}.{i % 250 + 1}], "
        f"ready: {ready}}}\n"
    )
    (w,) = parse_text(text, "w.yaml").resources
    assert isinstance(w, Workload)
    return w


def node(n: str) -> object:
    (r,) = parse_text(
        f"apiVersion: weft.dev/v1alpha1\nkind: Node\nmetadata: {{name: {n}}}\n"
        f"spec: {{addresses: [10.0.0.{int(n[1:]) + 1}]}}\n",
        "n.yaml",
    ).resources
    return r


def summary(s: ConfigSnapshot) -> dict[str, object]:
    return {
        "by_ip": {ip: str(w.key) for ip, w in s.workloads_by_ip.items()},
        "by_node": {n: [str(w.key) for w in ws] for n, ws in s.workloads_by_node.items()},
        "endpoints": {k: [str(w.key) for w in ws] for k, ws in s.endpoints.items()},
        "nodes": sorted(s.nodes),
        "sources": sorted(str(k) for k in s.sources),
        "resources": sorted(str(k) for k in s.resources),
    }


change = st.tuples(
    st.integers(0, 30),  # which workload
    st.sampled_from(["ns1", "ns2"]),
    st.sampled_from(["a", "b"]),
    st.sampled_from(["n0", "n1", "n2"]),
    st.booleans(),  # ready
    st.sampled_from([None, "x"]),
    st.booleans(),  # remove instead
)


@settings(max_examples=60, deadline=None)
@given(st.lists(change, min_size=1, max_size=12), st.integers(0, 2**32))
def test_a_delta_of_workloads_and_nodes_indexes_like_a_rebuild(changes, seed):
    rng = random.Random(seed)
    base = {r.key: r for r in parse_text(SERVICES, "s.yaml").resources}
    for i in range(20):
        w = workload(i, rng.choice(["ns1", "ns2"]), rng.choice("ab"), f"n{i % 3}", True, None)
        base[w.key] = w
    for n in ("n0", "n1"):
        nd = node(n)
        base[nd.key] = nd  # type: ignore[attr-defined]
    snap = ConfigSnapshot.build("e", 1, "cluster.local", base)
    upserts, removed, want = [], [], dict(base)
    for i, ns, app, nd_, ready, tier, remove in changes:
        w = workload(i, ns, app, nd_, ready, tier)
        if remove:
            removed.append(w.key)
            want.pop(w.key, None)
            upserts = [u for u in upserts if u.key != w.key]
        else:
            removed = [k for k in removed if k != w.key]
            upserts = [u for u in upserts if u.key != w.key] + [w]
            want[w.key] = w
    if rng.random() < 0.3:
        n2 = node("n2")
        upserts.append(n2)  # type: ignore[arg-type]
        want[n2.key] = n2  # type: ignore[attr-defined]
    got = snap.with_changes("e", 2, upserts, removed)
    assert summary(got) == summary(ConfigSnapshot.build("e", 2, "cluster.local", want))


ISTIO = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: a, namespace: ns1}
spec:
  host: a
  subsets: [{name: v2, labels: {version: v2}}]
"""


def test_derived_resources_are_derived_once_and_follow_workload_deltas():
    base = {r.key: r for r in parse_text(SERVICES + "---\n" + ISTIO, "s.yaml").resources}
    snap = ConfigSnapshot.build("e", 1, "cluster.local", base)
    assert not any(k.name == "a--v2" for k in snap.sources)  # sources: as sent
    assert any(k.name == "a--v2" for k in snap.resources)  # resources: with the derived
    (w,) = parse_text(
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\n"
        "metadata: {name: p, namespace: ns1, labels: {app: a, version: v2}}\n"
        "spec: {node: n0, addresses: [10.244.9.9]}\n",
        "w.yaml",
    ).resources
    after = snap.with_changes("e", 2, [w], [])
    assert [x.name for x in after.endpoints[("ns1", "a--v2")]] == ["p"]
    # A change of another kind rebuilds from the sources: nothing derived twice.
    (dr,) = parse_text(ISTIO.replace("v2}", "v3}"), "d.yaml").resources
    again = after.with_changes("e", 3, [dr], [])
    assert [x.name for x in again.endpoints[("ns1", "a--v2")]] == []


def test_an_address_two_workloads_list_stays_held_when_one_goes():
    """IP reuse: the old pod and the new one both list the address for a moment; when the
    holder goes, the other holds it (as a rebuild says), not nobody."""

    def w(name: str) -> Workload:
        (r,) = parse_text(
            "apiVersion: weft.dev/v1alpha1\nkind: Workload\n"
            f"metadata: {{name: {name}, namespace: ns1, labels: {{app: a}}}}\n"
            "spec: {node: n0, addresses: [10.244.0.1]}\n",
            "w.yaml",
        ).resources
        assert isinstance(r, Workload)
        return r

    new, old = w("new"), w("old")
    base = {new.key: new, old.key: old}
    snap = ConfigSnapshot.build("e", 1, "cluster.local", base)
    assert snap.workloads_by_ip["10.244.0.1"].name == "old"  # the last by key
    after = snap.with_changes("e", 2, [], [old.key])
    assert after.workloads_by_ip["10.244.0.1"].name == "new"
    assert summary(after) == summary(ConfigSnapshot.build("e", 2, "cluster.local", {new.key: new}))


def test_the_config_cache_never_goes_back_to_an_older_snapshot(tmp_path):
    """The churn saver's thread may finish after a newer (urgent) save, even of another
    epoch: the newer snapshot stays in the file. A failed write is said, not raised."""
    import json as _json

    from agent.config.client import ConfigClient

    cache = tmp_path / "config.json"
    c = ConfigClient(None, None, lambda snap: None, cache=cache)  # type: ignore[arg-type]
    base = {r.key: r for r in parse_text(SERVICES, "s.yaml").resources}
    older = ConfigSnapshot.build("epoch-1", 9, "cluster.local", base)
    newer = ConfigSnapshot.build("epoch-2", 1, "cluster.local", base)
    c._save(newer, 2)
    c._save(older, 1)  # late
    assert _json.loads(cache.read_text())["epoch"] == "epoch-2"
