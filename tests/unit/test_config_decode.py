"""What an agent makes of a full snapshot: the resources the controller shipped, decoded in
one pass (`resources_from_json`) exactly as each alone (`resource_from_json`), indexed as
`ConfigSnapshot.build` indexes them; a response with bad resources is refused naming every
one; an address keeps the text it came as, and is an IPv4Address in every other way."""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.config.client import ConfigClient, ConfigRejected
from agent.identity.node import TrustBundle
from agent.state import ConfigSnapshot
from controller.api.gen import config_pb2
from controller.model.base import Resource, resource_from_json, resources_from_json
from controller.model.loader import parse_text
from controller.model.problems import InvalidConfig
from controller.model.workloads import Workload, ip_text

MESH = """\
apiVersion: weft.dev/v1alpha1
kind: Node
metadata: {name: n1}
spec: {addresses: [10.0.0.11]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: ns1}
spec: {selector: {app: a}, clusterIP: 10.96.0.1, ports: [{port: 80}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-a, namespace: ns1}
spec: {selector: {matchLabels: {app: a}}, rules: [{from: [{source: {namespaces: [ns1]}}]}]}
"""


def workload(i: int, address: str | None = None) -> str:
    return (
        "apiVersion: weft.dev/v1alpha1\nkind: Workload\n"
        f"metadata: {{name: w{i}, namespace: ns1, labels: {{app: {'a' if i % 2 else 'b'}}}}}\n"
        f"spec: {{node: n1, addresses: [{address or f'10.1.{i // 250}.{i % 250 + 1}'}]}}\n"
    )


def mesh(n: int) -> list[Resource]:
    text = MESH + "".join(f"---\n{workload(i)}" for i in range(n))
    return parse_text(text, "mesh.yaml").resources


def shipped(resources: list[Resource]) -> list[tuple[str, bytes]]:
    """As the controller ships them: each kind with its canonical JSON."""
    return [(r.KIND, r.to_json().encode()) for r in resources]


def response(items: list[tuple[str, bytes]], revision: int = 1) -> config_pb2.ConfigResponse:
    return config_pb2.ConfigResponse(
        epoch="e1",
        revision=revision,
        full=True,
        resources=[
            config_pb2.Resource(kind=kind, namespace="ns1", name=f"r{n}", body=body)
            for n, (kind, body) in enumerate(items)
        ],
    )


def client() -> ConfigClient:
    return ConfigClient(None, TrustBundle(), lambda snap: None)  # type: ignore[arg-type]


def test_one_pass_decodes_every_resource_as_it_decodes_alone():
    """Every kind of a snapshot, in order, equal to what resource_from_json makes of each
    and to what the controller validated."""
    items = shipped(original := mesh(20))
    decoded = resources_from_json(items)
    assert decoded == [resource_from_json(kind, body) for kind, body in items] == original
    assert [type(r) for r in decoded] == [type(r) for r in original]


def test_one_pass_refuses_as_resource_from_json_does():
    """A bad body or an unknown kind raises what resource_from_json raises for it."""
    (good,) = shipped(parse_text(workload(0), "w.yaml").resources)
    body = good[1].replace(b"10.1.0.1", b"10.1.0.300")
    for items in ([good, ("Workload", body)], [good, ("Nope", b"{}")]):
        with pytest.raises(InvalidConfig) as fast:
            resources_from_json(items)
        with pytest.raises(InvalidConfig) as alone:
            resource_from_json(*items[1])
        assert fast.value.problems == alone.value.problems


def test_a_full_snapshot_applies_indexed_as_a_build_of_what_was_sent():
    """The applied snapshot has the shipped resources, and the indexes `build` makes of
    them: by address, by node, a Service's endpoints, the policies."""
    original = mesh(30)
    c = client()
    asyncio.run(c.apply_response(response(shipped(original))))
    want = ConfigSnapshot.build("e1", 1, "cluster.local", {r.key: r for r in original})
    got = c.snapshot
    assert dict(got.sources) == dict(want.sources)
    assert dict(got.workloads_by_ip) == dict(want.workloads_by_ip)
    assert dict(got.ip_holders) == dict(want.ip_holders)
    assert dict(got.workloads_by_node) == dict(want.workloads_by_node)
    assert dict(got.endpoints) == dict(want.endpoints)
    assert len(got.endpoints[("ns1", "a")]) == 15
    assert got.authorization == want.authorization and len(got.authorization) == 1
    assert set(got.workloads_by_ip) == {f"10.1.0.{i + 1}" for i in range(30)}


def test_a_response_with_bad_resources_is_refused_naming_each_and_nothing_applies():
    """Every bad resource is named (the response's kind, namespace and name), and the
    snapshot that served keeps serving."""
    c = client()
    asyncio.run(c.apply_response(response(shipped(mesh(3)))))
    before = c.snapshot
    items = shipped(mesh(3))
    wl = next(i for i, (kind, _) in enumerate(items) if kind == "Workload")
    items[wl] = ("Workload", items[wl][1].replace(b'"10.1.0.1"', b'"10.1.0.300"'))
    items.append(("Nope", b"{}"))
    with pytest.raises(ConfigRejected) as e:
        asyncio.run(c.apply_response(response(items, revision=2)))
    named = {p.resource for p in e.value.problems}
    assert named == {f"Workload ns1/r{wl}", f"Nope ns1/r{len(items) - 1}"}
    assert c.snapshot is before


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_an_address_keeps_its_text_and_is_an_ipv4address_otherwise(n):
    """The text an address came as is the text str() gives, and the address is equal,
    hashed, ordered, formatted, copied and pickled as the plain IPv4Address."""
    plain = ipaddress.IPv4Address(n)
    (w,) = parse_text(workload(0, address=str(plain)), "w.yaml").resources
    assert isinstance(w, Workload)
    a = w.spec.addresses[0]
    assert isinstance(a, ipaddress.IPv4Address)
    assert str(a) == ip_text(a) == str(plain) and repr(a) == repr(plain)
    assert a == plain and hash(a) == hash(plain) and not a < plain and a.packed == plain.packed
    assert f"{a}" == f"{plain}" and f"{a:b}" == f"{plain:b}"
    for other in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        assert type(other) is ipaddress.IPv4Address and other == plain
    assert w.to_json() == w.model_validate_json(w.to_json()).to_json()
    assert f'"addresses":["{plain}"]' in w.to_json()


@pytest.mark.parametrize("text", ["010.1.2.3", "10.1.2", "10.1.2.256", "10.1.2.3.4", "1..2.3"])
def test_an_address_not_in_canonical_form_is_refused(text):
    """Leading zeros, too few or too many octets: refused (as ipaddress refuses them)."""
    offer = parse_text(workload(0, address=text), "w.yaml")
    assert not offer.resources
    assert offer.problems and all(
        (p.field or "").startswith("spec.addresses[0]") for p in offer.problems
    )
