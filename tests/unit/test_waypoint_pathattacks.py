"""L7 policy cannot be bypassed by spelling the path differently (issue 14, point 1),
through the real waypoint over loopback (tests/unit/waypoint_mesh.py): over HTTP/1.1 with
the harness's raw client and over h2c with curl --path-as-is; the backend receives the
canonical path the policy matched."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import uvloop

from tests.unit.waypoint_mesh import WaypointMesh

pytestmark = pytest.mark.timeout(120)

DENY_ADMIN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-debug, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: llm}]
  action: DENY
  rules:
    - to: [{operation: {paths: ["/debug/headers"]}}]
"""
# Every spelling a backend resolves to /debug/headers; each must meet the DENY.
SPELLINGS = [
    "/debug/headers",
    "//debug/headers",
    "/debug//headers",
    "/./debug/headers",
    "/v1/../debug/headers",
    "/v1/%2e%2e/debug/headers",
    "/%64ebug/headers",
    "/debug/%68eaders",
    "/debug/headers#x",
    "/x/y/../../debug/headers",
]
# Spellings whose meaning depends on the backend: refused outright.
REFUSED = ["/debug%2fheaders", "/debug%2Fheaders", "/debug%5cheaders"]


def test_every_spelling_of_a_denied_path_is_denied_over_http1(tmp_path):
    """Dot segments, merged slashes, escaped unreserved characters and fragments all meet
    the DENY on /debug/headers (403); encoded slashes get 400; and an allowed path sent
    with extra slashes and dot segments reaches the backend in its canonical form."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            r = await m.http("GET", "//x/../debug/headers")
            assert r.status == 200, r
            assert r.json()["path"] == "/debug/headers"  # forwarded as matched
            await m.apply("deny.yaml", DENY_ADMIN)
            for path in SPELLINGS:
                r = await m.http("GET", path)
                assert r.status == 403, (path, r)
            for path in REFUSED:
                r = await m.http("GET", path)
                assert r.status == 400, (path, r)
                assert b"encoded" in r.body
            r = await m.http("GET", "/v1/models")
            assert r.status == 200, r

    uvloop.run(main())


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_every_spelling_of_a_denied_path_is_denied_over_h2c(tmp_path):
    """The same spellings as HTTP/2 :path values (curl --http2-prior-knowledge
    --path-as-is sends them verbatim) meet the same DENY."""

    async def main() -> None:
        async with WaypointMesh(tmp_path) as m:
            await m.apply("deny.yaml", DENY_ADMIN)
            port = await m.listen("llm")
            for path in [p for p in SPELLINGS if "#" not in p] + REFUSED:
                proc = await asyncio.create_subprocess_exec(
                    "curl",
                    "-s",
                    "--http2-prior-knowledge",
                    "--path-as-is",
                    "--max-time",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{http_version}",
                    f"http://127.0.0.1:{port}{path}",
                    stdout=asyncio.subprocess.PIPE,
                )
                out, _ = await proc.communicate()
                code, version = out.decode().split()
                expected = "400" if path in REFUSED else "403"
                assert (code, version) == (expected, "2"), path

    uvloop.run(main())
