"""Outcomes of one try at a backend, as one int: an HTTP status, or a negative `Failure`.

The shell reports each try's outcome with a single int so that retry classification,
outlier detection and metrics are set lookups and comparisons, with no objects per try.
"""

from __future__ import annotations

from enum import IntEnum


class Failure(IntEnum):
    """A try that produced no response head. Values are negative so they never collide with
    an HTTP status."""

    CONNECT_FAILURE = -1  # no connection: refused, unreachable, or the connect timeout fired
    RESET = -2  # the stream or connection was reset or closed before a response head
    REFUSED_STREAM = -3  # HTTP/2 REFUSED_STREAM (or above GOAWAY's last id): never processed
    TIMEOUT = -4  # the per-try timeout fired before the response head


FAILURES = frozenset(int(f) for f in Failure)

# Gateway errors (Envoy's definition): the backend, or the way to it, failed rather than the
# application answering. They count towards consecutiveGatewayErrors and consecutive 5xx.
GATEWAY_ERRORS = frozenset({502, 503, 504, *FAILURES})


def is_5xx(outcome: int) -> bool:
    """A server error for outlier detection: any 5xx, and any failure (which the client would
    see as a 502, 503 or 504)."""
    return outcome >= 500 or outcome < 0


def status_for_failure(outcome: int) -> int:
    """The status a client gets when a try failed and no retry follows: 504 for a timeout,
    503 otherwise (Envoy's choice: the backend is unavailable, not broken)."""
    return 504 if outcome == Failure.TIMEOUT else 503
