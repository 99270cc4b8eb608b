"""Gateway API's GRPCRoute: derived into the HTTPRoute the waypoint enforces (a method
match is a path match on the POST every call is), and routing real grpcio calls by method
and header through a waypoint (in-process, over loopback)."""

from __future__ import annotations

import textwrap

import pytest
import uvloop

from controller.model.derived import derive
from controller.model.loader import parse_text
from tests.unit.waypoint_mesh import GRPC_STREAM, GRPC_UNARY, Backend, WaypointMesh

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: ai}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-echo, port: 9000}]
  rules:
  - matches:
    - method: {service: weft.test.Echo, method: ServerStream}
    - headers: [{name: x-canary, value: "yes"}]
    backendRefs: [{name: grpc-echo-b, port: 9000}]
  - backendRefs:
    - {name: grpc-echo-a, port: 9000, weight: 100}
"""


def parse(text: str) -> list:
    offer = parse_text(textwrap.dedent(text), "grpc.yaml")
    assert not offer.problems, offer.problems
    return offer.resources


def test_method_matches_become_path_matches_on_post():
    (route,) = [r for r in derive(parse(ROUTE))[0] if r.KIND == "HTTPRoute"]
    first, default = route.spec.rules
    by_method, by_header = first.matches
    assert (by_method.method, by_method.path.type, by_method.path.value) == (
        "POST",
        "Exact",
        "/weft.test.Echo/ServerStream",
    )
    assert by_header.headers[0].name == "x-canary" and by_header.path is None
    assert [b.name for b in default.backend_refs] == ["grpc-echo-a"]


@pytest.mark.parametrize(
    ("match", "path"),
    [
        ("{service: pkg.Svc}", ("PathPrefix", "/pkg.Svc")),
        ("{method: Get}", ("RegularExpression", "/[^/]+/Get")),
        (
            "{type: RegularExpression, service: 'pkg\\..*'}",
            ("RegularExpression", "/(?:pkg\\..*)/(?:[^/]+)"),
        ),
    ],
)
def test_service_only_method_only_and_regex_matches(match, path):
    text = ROUTE.replace("{service: weft.test.Echo, method: ServerStream}", match)
    (route,) = [r for r in derive(parse(text))[0] if r.KIND == "HTTPRoute"]
    m = route.spec.rules[0].matches[0]
    assert (m.path.type, m.path.value) == path


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("{service: 'not a service'}", "not a gRPC service name"),
        ("{}", "set service, method or both"),
    ],
)
def test_a_bad_method_match_names_the_problem(bad, says):
    text = ROUTE.replace("{service: weft.test.Echo, method: ServerStream}", bad)
    offer = parse_text(text, "grpc.yaml")
    assert offer.problems and says in offer.problems[0].reason, offer.problems


def test_grpc_calls_are_routed_by_method_and_header_through_the_waypoint(tmp_path):
    async def main() -> None:
        backends = [
            Backend("grpc-a", app="grpc-echo", version="a", kind="grpc"),
            Backend("grpc-b", app="grpc-echo", version="b", kind="grpc"),
        ]
        async with WaypointMesh(tmp_path, backends=backends) as m:
            await m.apply("grpc.yaml", ROUTE)
            ch = await m.grpc_channel()
            for _ in range(4):  # the default rule: every unary call to version a
                call = ch.unary_unary(GRPC_UNARY)(b"ping", timeout=20)
                assert await call == b"ping"
                md = dict(await call.initial_metadata())
                assert md["x-served-by"] == "ai/grpc-a", md
            # The method rule: server streaming goes to version b.
            got = [m async for m in ch.unary_stream(GRPC_STREAM)(b"3", timeout=20)]
            assert got == [b"grpc-b-0", b"grpc-b-1", b"grpc-b-2"]
            # The header rule: a unary call with x-canary: yes goes to version b.
            call = ch.unary_unary(GRPC_UNARY)(b"ping", timeout=20, metadata=(("x-canary", "yes"),))
            assert await call == b"ping"
            assert dict(await call.initial_metadata())["x-served-by"] == "ai/grpc-b"

    uvloop.run(main())


def test_a_grpcroute_gets_conditions_like_an_httproute():
    """`weft policy get` and the status writer compute conditions for every route kind."""
    from controller.model.status import conditions

    (route,) = parse(ROUTE)
    conds = {c.type: c for c in conditions([route])[route.key]}
    assert not conds["ResolvedRefs"].status  # its Services are not in this config
    assert "ai/grpc-echo" in conds["ResolvedRefs"].message
