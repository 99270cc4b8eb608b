"""The waypoint's per-key cache of metric series and access log fields (server._log)
never serves a record built for another snapshot's workloads."""

from __future__ import annotations

import gc
import io
import json
import time
import types

from agent.accesslog import AccessLog
from agent.waypoint.codec import events as ev
from agent.waypoint.codec.headers import Headers
from agent.waypoint.downstream import CallerInfo
from agent.waypoint.reqmetrics import RequestMetrics
from agent.waypoint.server import Waypoint


class _Workload:
    """Stands for controller.model.workloads.Workload: what _log reads of a destination."""

    __slots__ = ("labels", "name", "namespace")

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self.labels: dict[str, str] = {}


class _Snapshot:
    def __init__(self, epoch: str, revision: int) -> None:
        self.epoch = epoch
        self.revision = revision
        self.workloads_by_ip: dict[str, object] = {}

    def workload_identity(self, w: _Workload) -> str:
        return f"spiffe://cluster.local/ns/{w.namespace}/sa/default"


def _waypoint(out: io.StringIO) -> types.SimpleNamespace:
    """The parts of a Waypoint that Waypoint._log uses."""
    return types.SimpleNamespace(
        snapshot=None,
        traces=None,
        _children={},
        _children_of=None,
        metrics=types.SimpleNamespace(requests=RequestMetrics()),
        s=types.SimpleNamespace(name="wp"),
        access=AccessLog(out),
    )


def _exchange() -> types.SimpleNamespace:
    caller = CallerInfo(
        "spiffe://cluster.local/ns/apps/sa/client", "10.0.0.9", "ai", "llm", "10.96.0.1", 80
    )
    head = ev.RequestHead(1, "GET", "/v1/models", "llm", "http", Headers(), True)
    return types.SimpleNamespace(
        span=None,
        started=time.monotonic(),
        conn=types.SimpleNamespace(codec=None),
        caller=caller,
        status=200,
        bytes_in=0,
        bytes_out=2,
        annotations={},
        trace=None,
        head=head,
    )


def test_access_log_destination_is_the_workload_the_request_went_to_after_a_new_epoch():
    """_log caches the access log's "destination" (and the metric series) under a key
    naming the destination Workload by id(). Revisions restart with every controller
    process (controller/store.py new_epoch) and a freed Workload's id is reused by later
    objects: keyed by the revision, requests under revision 3 of a new epoch were logged
    with the destinations of an earlier epoch's revision 3 (found by review). The cache now
    holds entries for one snapshot object at a time."""
    out = io.StringIO()
    wp = _waypoint(out)
    want: list[str] = []
    for i in range(50):
        # Epoch A, revision 3: a request to a pod, which then goes away.
        wp.snapshot = _Snapshot("epoch-a", 3)
        old = _Workload("ai", f"old-{i}")
        Waypoint._log(wp, _exchange(), old, "-")
        del old
        gc.collect()
        # The controller restarted: epoch B counts revisions from 1 again and reaches 3;
        # its new Workload object is usually made where the freed one was (same id).
        wp.snapshot = _Snapshot("epoch-b", 3)
        new = _Workload("ai", f"new-{i}")
        Waypoint._log(wp, _exchange(), new, "-")
        want.append(f"ai/{new.name}")
    wp.access.flush()
    lines = [json.loads(line)["destination"] for line in out.getvalue().splitlines()]
    logged = lines[1::2]  # the second request of each round
    wrong = [(got, w) for got, w in zip(logged, want, strict=True) if got != w]
    assert not wrong, wrong[:3]
