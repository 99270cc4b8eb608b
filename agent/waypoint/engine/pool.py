"""Connection pool limits as accounting: the shell owns connections, the engine counts them.

Per backend (Service port) and per waypoint worker, like Envoy's circuit breakers:

- `maxConnections` bounds the connections open or opening to all of the backend's endpoints;
- `maxPendingRequests` bounds the requests waiting for a connection when none can be opened;
- `maxRequestsPerConnection` tells the shell when to retire a connection.

The shell asks `admit(reusable)` once per try, after the endpoint is chosen: `reusable` says
whether it already holds a connection to that endpoint that can take the request now (an
idle HTTP/1.1 connection, or an HTTP/2 one with a free stream). The answer is what to do;
every count is released by the matching call (`closed`, `dequeued`).
"""

from __future__ import annotations

from enum import Enum

from agent.waypoint.engine.events import BackendCounters
from agent.waypoint.engine.respond import OVERFLOW, Respond


class Admission(Enum):
    REUSE = "reuse"  # send it on the connection you have
    OPEN = "open"  # open a new connection (counted until `closed()`)
    QUEUE = "queue"  # wait for a connection to free up; `dequeued()` when it leaves the queue
    OVERFLOW = "overflow"  # answer `OVERFLOW_RESPONSE` now; nothing is counted


# What Envoy answers on overflow: 503 with x-envoy-overloaded; ours names itself.
OVERFLOW_RESPONSE = Respond(
    503,
    OVERFLOW,
    "the backend's connection pool is full (maxConnections and maxPendingRequests)",
    headers=((b"x-weft-overloaded", b"true"),),
    body=b"upstream connection pool overflow\n",
)


class ConnectionPool:
    __slots__ = (
        "connections",
        "counters",
        "max_connections",
        "max_pending",
        "max_requests_per_connection",
        "pending",
    )

    def __init__(
        self,
        counters: BackendCounters,
        *,
        max_connections: int = 1024,
        max_pending: int = 1024,
        max_requests_per_connection: int = 0,
    ) -> None:
        self.counters = counters
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_requests_per_connection = max_requests_per_connection
        self.connections = 0
        self.pending = 0

    def admit(self, reusable: bool) -> Admission:
        if reusable:
            return Admission.REUSE
        if self.connections < self.max_connections:
            self.connections += 1
            return Admission.OPEN
        if self.pending < self.max_pending:
            self.pending += 1
            return Admission.QUEUE
        self.counters.overflow += 1
        return Admission.OVERFLOW

    def closed(self) -> None:
        """A connection this pool counted (an OPEN admission) closed, or failed to open."""
        if self.connections > 0:
            self.connections -= 1

    def dequeued(self) -> None:
        """A QUEUE'd request got a connection, or gave up waiting."""
        if self.pending > 0:
            self.pending -= 1

    def retire_after(self, requests_served: int) -> bool:
        """Whether a connection that has served this many requests must close now."""
        m = self.max_requests_per_connection
        return m > 0 and requests_served >= m

    def reconfigure(
        self, *, max_connections: int, max_pending: int, max_requests_per_connection: int
    ) -> None:
        """New limits from a new config; counts in flight carry over."""
        self.max_connections = max_connections
        self.max_pending = max_pending
        self.max_requests_per_connection = max_requests_per_connection
