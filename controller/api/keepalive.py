"""gRPC keepalive between agents and the controller, set on both ends together.

Agents (agent/identity/rpc.py, client_config) ping every CLIENT_PING_MS so that a dead
controller (or a dropped NAT mapping) is noticed within a minute, including on the config
stream, which is idle most of the time. gRPC's server default only accepts pings five
minutes apart when no data flows, and closes the connection with GOAWAY "too_many_pings"
after two early ones: the config stream was dropped several times an hour (issue 18). The
server accepts pings SERVER_MIN_PING_MS apart, with or without calls, which is below the
clients' interval with room for timer jitter.
"""

from __future__ import annotations

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


SERVER_OPTIONS = server_options()
