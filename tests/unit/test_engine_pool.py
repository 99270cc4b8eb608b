"""Connection pool limits: the engine counts, the shell obeys, overflow is an immediate 503."""

from __future__ import annotations

from agent.waypoint.engine import OVERFLOW_RESPONSE, Admission, Attempt, Backend, Engine
from tests.enginetesting import FakeClock, backend_policy, service, snapshot

POOL = backend_policy(
    "llm",
    "connectionPool: {maxConnections: 2, maxPendingRequests: 1, maxRequestsPerConnection: 3}",
    port=8000,
)


def backend() -> Backend:
    e = Engine(snapshot(service("llm"), POOL), clock=FakeClock())
    b = e.backend(("ai", "llm", 8000))
    assert b is not None
    return b


def attempt(b: Backend) -> Attempt:
    att = b.attempt()
    assert isinstance(att, Attempt)
    return att


def test_connections_then_the_queue_then_overflow_503():
    """Two connections may open, one request may wait, the fourth overflows: 503 at once,
    counted, and the overflowing try holds nothing."""
    b = backend()
    verdicts = [attempt(b).admit(reusable=False) for _ in range(4)]
    assert verdicts == [Admission.OPEN, Admission.OPEN, Admission.QUEUE, Admission.OVERFLOW]
    assert b.counters.overflow == 1 and OVERFLOW_RESPONSE.status == 503
    assert (b.pool.connections, b.pool.pending, b.active) == (2, 1, 3)


def test_a_reusable_connection_needs_no_slot_and_released_slots_admit_again():
    """A try on a connection the shell already holds is always admitted; closing a
    connection and leaving the queue free their slots."""
    b = backend()
    first, second, queued = attempt(b), attempt(b), attempt(b)
    assert first.admit(False) is Admission.OPEN and second.admit(False) is Admission.OPEN
    assert queued.admit(False) is Admission.QUEUE
    assert attempt(b).admit(reusable=True) is Admission.REUSE
    b.pool.closed()
    queued.dequeued()
    queued.finish(200)
    assert attempt(b).admit(False) is Admission.OPEN
    assert b.pool.pending == 0 and b.counters.overflow == 0


def test_max_requests_per_connection_retires_connections():
    """maxRequestsPerConnection 3: the shell closes a connection after its third request."""
    pool = backend().pool
    assert [pool.retire_after(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
