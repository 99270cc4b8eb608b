"""Token limits through a real waypoint (in-process, over loopback): what a caller that
hangs up is charged. A 2xx answer is charged what it used, or at least its reservation,
never 0: hanging up before the last bytes is not a way to use tokens for free."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import struct
from typing import Any

import pytest
import uvloop

from agent.lab.workloads import model_server as ms
from agent.lab.workloads.model_server import Behaviour
from tests.unit.waypoint_mesh import Backend, WaypointMesh

ROUTE = """\
apiVersion: weft.dev/v1alpha1
kind: ModelRoute
metadata: {name: models, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  rules:
    - {name: small, models: [small-model], backendRefs: [{name: small, port: 8000}]}
"""
LIMIT = """\
apiVersion: weft.dev/v1alpha1
kind: TokenRateLimit
metadata: {name: per-caller, namespace: ai}
spec:
  targetRefs: [{name: llm}]
  limits: [{name: tpm, by: principal, tokensPerMinute: 400}]
"""


@pytest.fixture
def slow_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model server sends a JSON answer in two writes 0.5 s apart, the usage last (as a
    large body on a slow link arrives), so a caller can hang up in between."""
    orig = ms.Connection.respond

    def respond(
        self: Any,
        req: Any,
        status: int,
        body: bytes,
        ctype: bytes = b"application/json",
        extra: Any = None,
    ) -> Any:
        if b'"usage"' not in body:
            return orig(self, req, status, body, ctype, extra)
        keep = self.keep_alive(req)
        head = self._head(req, status, ctype, extra, keep)
        head += [b"content-length: ", str(len(body)).encode(), b"\r\n\r\n"]
        cut = body.index(b'"usage"')
        self.transport.write(b"".join(head) + body[:cut])
        asyncio.get_running_loop().call_later(
            0.5, lambda: self.transport.is_closing() or self.transport.write(body[cut:])
        )
        return keep

    monkeypatch.setattr(ms.Connection, "respond", respond)


def test_a_caller_hanging_up_before_the_usage_is_still_charged(tmp_path, slow_tail):
    """Answers of 150 tokens against 400 a minute: a caller that reads the whole completion
    and resets the connection before the last bytes gets no more answers than an honest
    one (before the fix: 8 of 8, charged 16 tokens in all)."""

    async def main() -> None:
        b = Backend(
            "small-a",
            app="small",
            model="small-model",
            waypoint=False,
            behaviour=Behaviour(tokens=150, ttft=0.0, tpot=0.0, max_concurrency=0),
        )
        async with WaypointMesh(
            tmp_path, backends=[b], frontends=["llm"], extra={"r.yaml": ROUTE, "l.yaml": LIMIT}
        ) as m:
            req = json.dumps(
                {
                    "model": "small-model",
                    "max_tokens": 150,
                    "messages": [{"role": "user", "content": "hello"}],
                }
            ).encode()
            got = []
            for _ in range(8):
                r, w = await m.dial("client", (m.vip("llm"), 8000))
                w.write(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: llm\r\n"
                    + f"content-length: {len(req)}\r\n\r\n".encode()
                    + req
                )
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
                status = int(head.split(b" ")[1])
                words = 0
                if status == 200:
                    data = await asyncio.wait_for(r.readuntil(b'"finish_reason"'), 10)
                    m_ = re.search(rb'"content":("(?:[^"\\]|\\.)*")', data)
                    assert m_ is not None
                    words = len(json.loads(m_.group(1)).split())
                    sock = w.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()  # hang up (TCP RST) before the usage arrives
                got.append((status, words))
                await asyncio.sleep(0.7)
            served = [s for s, _ in got if s == 200]
            assert len(served) <= 3, got  # 400 tokens a minute: at most 3 answers of 150
            assert got[-1][0] == 429, got

    uvloop.run(main())


@pytest.mark.parametrize(
    ("store", "replicas", "nodes", "warned"),
    [
        ("memory", 2, 1, "per-replica"),
        ("memory", 1, 1, None),
        ("{tmp}/q.db", 2, 1, None),
        ("{tmp}/q.db", 2, 2, "per-node"),
    ],
)
def test_a_budget_split_across_replicas_is_said(tmp_path, store, replicas, nodes, warned):
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from agent.waypoint.aiflow import AiFlow
    from controller.model.loader import parse_text

    wp = SimpleNamespace(s=SimpleNamespace(name="ai-waypoint"))
    flow = AiFlow(wp, store.format(tmp=tmp_path), CollectorRegistry())  # type: ignore[arg-type]
    resources = parse_text(LIMIT, "l.yaml").resources
    flow.update(resources, replicas, nodes)
    said = [c for c in flow.policies.conflicts if "each counts its own budget" in c]
    assert bool(said) == (warned is not None), said
    if warned:
        assert warned in said[0]
    if flow._store is not None and hasattr(flow._store, "close_now"):
        flow._store.close_now()
