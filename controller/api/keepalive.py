"""gRPC keepalive and reconnection between agents and the controller, set on both ends
together.

Agents ping every CLIENT_PING_MS so a dead controller (or a dropped NAT mapping) is noticed
within a minute, including on the config stream, which is idle most of the time. gRPC's
server default only accepts pings five minutes apart when no data flows, and closes the
connection with GOAWAY "too_many_pings" after two early ones: the config stream was dropped
several times an hour (issue 18). The server accepts pings SERVER_MIN_PING_MS apart, with or
without calls, which is below the clients' interval with room for timer jitter.
"""

from __future__ import annotations

# How fast an agent's channel dials the controller again: gRPC's defaults (1 s, growing to
# 120 s) stacked on the agent's own retry made agents take 45-79 s to come back after an
# outage (issue 18). Capped at a second, an agent is back about a second after the
# controller is; a hundred agents dialling a down controller once a second cost nothing.
RECONNECT_INITIAL_MS = 250
RECONNECT_MAX_MS = 1_000

CLIENT_PING_MS = 30_000
CLIENT_PING_TIMEOUT_MS = 10_000
SERVER_MIN_PING_MS = 20_000


def server_options(min_ping_ms: int = SERVER_MIN_PING_MS) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", CLIENT_PING_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", min_ping_ms),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def client_options(
    ping_ms: int = CLIENT_PING_MS, timeout_ms: int = CLIENT_PING_TIMEOUT_MS
) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", ping_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_MS),
    ]


SERVER_OPTIONS = server_options()
CLIENT_OPTIONS = client_options()
