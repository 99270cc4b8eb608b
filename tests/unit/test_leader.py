"""Leader election on a Lease (controller/leader.py): one leader among replicas, takeover
after the lease expires, optimistic updates that lose races instead of overwriting, and a
leader that steps down when it cannot renew. The API is a fake with the API server's
Lease semantics (resourceVersion, 404, 409), written from the coordination.k8s.io/v1
reference (no recorded Lease with a traceable source turned up; see tests/data/k8s)."""

from __future__ import annotations

import copy
from typing import Any

from controller.leader import LeaseElector, micro_time, parse_time
from controller.sources.kubernetes import KubeAPIError

PATH = "/apis/coordination.k8s.io/v1/namespaces/weft-system/leases/weft-controller"


class LeaseAPI:
    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.rv = 100
        self.down = False
        self.puts: list[dict[str, Any]] = []
        self.before_put: Any = None  # a hook: another replica's write lands first

    def request(self, method: str, path: str, *, query: Any = None, body: Any = None) -> Any:
        if self.down:
            raise OSError("connection refused")
        if method == "GET":
            assert path == PATH
            if self.lease is None:
                raise KubeAPIError(404, 'leases.coordination.k8s.io "weft-controller" not found')
            return copy.deepcopy(self.lease)
        if method == "POST":
            if self.lease is not None:
                raise KubeAPIError(409, "already exists")
            self._store(body)
            return copy.deepcopy(self.lease)
        if method == "PUT":
            if self.before_put is not None:
                hook, self.before_put = self.before_put, None
                hook()
            assert self.lease is not None
            if body["metadata"].get("resourceVersion") != self.lease["metadata"]["resourceVersion"]:
                raise KubeAPIError(409, "the object has been modified; please apply your changes")
            self.puts.append(body)
            self._store(body)
            return copy.deepcopy(self.lease)
        raise AssertionError(method)

    def _store(self, body: dict[str, Any]) -> None:
        self.rv += 1
        self.lease = copy.deepcopy(body)
        self.lease["metadata"]["resourceVersion"] = str(self.rv)

    def stream(self, path: str, *, query: Any) -> Any:
        raise AssertionError("not used")


def electors(api: LeaseAPI, clock: list[float]) -> tuple[LeaseElector, LeaseElector]:
    return tuple(  # type: ignore[return-value]
        LeaseElector(api, "weft-system", "weft-controller", name, clock=lambda: clock[0])
        for name in ("controller-a", "controller-b")
    )


def test_one_leader_then_a_takeover_when_its_lease_expires():
    api, clock = LeaseAPI(), [1_800_000_000.0]
    a, b = electors(api, clock)
    assert a.step() and not b.step()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "controller-a"
    for _ in range(5):  # a renews every retry period; b keeps following
        clock[0] += 2
        assert a.step() and not b.step()
    assert api.lease["spec"]["leaseTransitions"] == 0
    # a stops (crashed): after leaseDurationSeconds without a renewal, b takes over.
    clock[0] += 14
    assert not b.step()
    clock[0] += 2
    assert b.step()
    assert api.lease["spec"]["holderIdentity"] == "controller-b"
    assert api.lease["spec"]["leaseTransitions"] == 1
    # a comes back: it sees b's lease and follows.
    assert not a.step() and a.holder == "controller-b"


def test_an_update_that_lost_a_race_is_refused_not_written_over():
    api, clock = LeaseAPI(), [1_800_000_000.0]
    a, b = electors(api, clock)
    assert a.step() and not b.step()  # b has seen a's lease
    clock[0] += 20  # a's lease expired: both see it free and try to take it
    api.before_put = b.step  # b's takeover lands between a's read and a's write
    assert not a.step()
    assert api.lease is not None and api.lease["spec"]["holderIdentity"] == "controller-b"


def test_a_leader_that_cannot_renew_steps_down_before_its_lease_can_expire():
    api, clock = LeaseAPI(), [1_800_000_000.0]
    a, _ = electors(api, clock)
    assert a.step()
    api.down = True
    clock[0] += 4
    assert a.step()  # a blip: still within the renew deadline (10 s)
    clock[0] += 7
    assert not a.step()  # 11 s without renewing: steps down (the lease lasts 15)
    api.down = False
    clock[0] += 1
    assert a.step()  # its own lease, renewed


def test_clocks_that_disagree_do_not_make_two_leaders():
    """b's clock runs 20 s ahead: judged by renewTime, a's fresh lease would look expired
    to b. Expiry counts on b's own clock from when b saw the lease change."""
    api, t = LeaseAPI(), [1_800_000_000.0]
    a = LeaseElector(api, "weft-system", "weft-controller", "a", clock=lambda: t[0])
    b = LeaseElector(api, "weft-system", "weft-controller", "b", clock=lambda: t[0] + 20)
    assert a.step()
    t[0] += 1
    assert not b.step() and a.leader


def test_a_leader_whose_call_hangs_steps_down_before_another_can_take_over():
    api, t = LeaseAPI(), [1_800_000_000.0]
    a = LeaseElector(api, "weft-system", "weft-controller", "a", clock=lambda: t[0])
    assert a.step()
    real = api.request

    def hang(method: str, path: str, **kw: Any) -> Any:
        t[0] += 70  # the call returns (or fails) a minute later
        raise OSError("read timed out")

    api.request = hang  # type: ignore[method-assign]
    t[0] += 2
    assert not a.step()  # not renewed within the deadline, as of after the call
    api.request = real  # type: ignore[method-assign]


def test_lease_times_are_microtime():
    s = micro_time(1_800_000_000.123456)
    assert s == "2027-01-15T08:00:00.123456Z"
    assert abs(parse_time(s) - 1_800_000_000.123456) < 1e-5  # type: ignore[operator]
