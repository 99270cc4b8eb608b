"""Active health probes: the I/O of one probe, independent of the waypoint that runs them.

The engine (agent/waypoint/engine/health.py) decides which endpoint to probe when and what a
result changes; this module performs one probe on a fresh backend connection and says
whether it passed and, if not, why:

- http: GET `probe.path`; the final status must pass `probe.passed`.
- grpc: `grpc.health.v1.Health/Check` for `probe.service`, encoded with the generated
  protobuf classes; only SERVING passes. NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN, a non-zero
  grpc-status (NOT_FOUND for a service the server does not know), a response without
  trailers, or a malformed message fail.

`run_probe` never raises (except CancelledError): a probe that cannot connect, times out,
or meets a backend that does not speak the protocol is a failed probe with its reason, so
the engine always hears back and keeps probing. `Prober` adds logging: a failure is logged
when an endpoint starts failing or its reason changes, and again when it passes, not once
per interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from agent.waypoint.codec import events as ev
from agent.waypoint.codec.errors import ProtocolError
from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.health import Probe
from agent.waypoint.upstream import UpstreamConnection, UpstreamError

log = logging.getLogger("weft.waypoint.probes")

HEALTH_CHECK_PATH: Final = "/grpc.health.v1.Health/Check"
MAX_RESPONSE_BYTES: Final = 64 * 1024  # a HealthCheckResponse is 2 bytes; this is plenty
_SERVING: Final = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
_GRPC_CODES: Final = {
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    16: "UNAUTHENTICATED",
}

Acquire = Callable[[], Awaitable[UpstreamConnection]]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome: `reason` says why it failed ("" when it passed)."""

    ok: bool
    reason: str = ""


PASSED: Final = ProbeResult(True)


class ProbeFailed(Exception):
    """The backend answered, but not with a passing answer."""


async def run_probe(acquire: Acquire, probe: Probe, *, authority: str | None = None) -> ProbeResult:
    """Run `probe` on a connection from `acquire` (a new, connected UpstreamConnection; an
    HTTP/2 one for gRPC) and close the connection afterwards. Connecting and the exchange
    together are bounded by `probe.timeout`. `authority` defaults to the endpoint's
    host:port. Every failure becomes a failed ProbeResult; only cancellation propagates."""
    conn: UpstreamConnection | None = None
    phase = "connecting"
    deadline = asyncio.timeout(probe.timeout)
    try:
        async with deadline:
            conn = await acquire()
            phase = "waiting for the answer"
            target = authority or probe.endpoint.address
            if probe.kind == "grpc":
                await _grpc_check(conn, probe, target)
            else:
                await _http_get(conn, probe, target)
        return PASSED
    except asyncio.CancelledError:
        raise
    except ProbeFailed as e:
        return ProbeResult(False, str(e))
    except TimeoutError as e:
        if not deadline.expired():  # ETIMEDOUT from connecting, not our deadline
            return ProbeResult(False, f"connect failure: {e}")
        return ProbeResult(False, f"timed out after {probe.timeout:g}s {phase}")
    except UpstreamError as e:
        return ProbeResult(False, f"{e.kind}: {e}")
    except ProtocolError as e:
        return ProbeResult(False, f"protocol error: {e.message}")
    except OSError as e:
        return ProbeResult(False, f"connect failure: {e}")
    except Exception as e:
        return ProbeResult(False, f"{type(e).__name__}: {e}")
    finally:
        if conn is not None:
            conn.close()


async def _http_get(conn: UpstreamConnection, probe: Probe, authority: str) -> None:
    sid = conn.start("GET", probe.path, authority, Headers(), end_stream=True)
    async for e in conn.events(sid):
        if isinstance(e, ev.ResponseHead) and not e.informational:
            if not probe.passed(e.status):
                raise ProbeFailed(f"HTTP {e.status}")
            return
        if isinstance(e, ev.StreamReset):
            raise ProbeFailed(_reset_reason(e))
    raise ProbeFailed("no response")


async def _grpc_check(conn: UpstreamConnection, probe: Probe, authority: str) -> None:
    if not conn.h2:
        raise ProbeFailed("a gRPC probe needs an HTTP/2 connection")
    health_pb2 = _health_pb2()
    msg = health_pb2.HealthCheckRequest(service=probe.service).SerializeToString()
    headers = Headers.of(
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", _grpc_timeout(probe.timeout)),
        ("user-agent", "weft-health-probe"),
    )
    sid = conn.start("POST", HEALTH_CHECK_PATH, authority, headers, end_stream=False)
    await conn.send(sid, encode_message(msg), True)
    body = bytearray()
    status: bytes | None = None
    message = b""
    async for e in conn.events(sid):
        if isinstance(e, ev.ResponseHead):
            if e.informational:
                continue
            if e.status != 200:
                raise ProbeFailed(f"HTTP {e.status} instead of a gRPC answer")
            ctype = e.headers.get(b"content-type", b"") or b""
            if not ctype.startswith(b"application/grpc"):
                raise ProbeFailed(f"content-type {ctype[:64]!r} is not gRPC")
            if e.end_stream:  # trailers-only: the status is in the head
                status = e.headers.get(b"grpc-status")
                message = e.headers.get(b"grpc-message", b"") or b""
        elif isinstance(e, ev.Data):
            body += e.data
            if len(body) > MAX_RESPONSE_BYTES:
                raise ProbeFailed(f"response longer than {MAX_RESPONSE_BYTES} bytes")
            if e.end_stream:
                raise ProbeFailed("response ended without trailers (no grpc-status)")
        elif isinstance(e, ev.Trailers):
            status = e.headers.get(b"grpc-status")
            message = e.headers.get(b"grpc-message", b"") or b""
        elif isinstance(e, ev.StreamReset):
            raise ProbeFailed(_reset_reason(e))
    if status is None:
        raise ProbeFailed("response without grpc-status")
    if status != b"0":
        raise ProbeFailed(_grpc_status_reason(status, message))
    messages = decode_messages(bytes(body))
    if len(messages) != 1:
        raise ProbeFailed(f"{len(messages)} response messages instead of one")
    from google.protobuf.message import DecodeError

    try:
        resp = health_pb2.HealthCheckResponse.FromString(messages[0])
    except DecodeError as e:
        raise ProbeFailed(f"malformed HealthCheckResponse: {e}") from e
    if resp.status != _SERVING:
        raise ProbeFailed(_serving_status_name(resp.status))


def encode_message(msg: bytes) -> bytes:
    """One gRPC length-prefixed message: flag 0 (not compressed), 4-byte big-endian length."""
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def decode_messages(body: bytes) -> list[bytes]:
    """Split a gRPC response body into its messages; ProbeFailed if it is not a whole number
    of uncompressed length-prefixed messages (we never ask for compression)."""
    out: list[bytes] = []
    i = 0
    while i < len(body):
        if len(body) - i < 5:
            raise ProbeFailed(f"truncated gRPC message prefix ({len(body) - i} bytes)")
        flag = body[i]
        if flag != 0:
            raise ProbeFailed(f"gRPC message with compressed flag {flag} (none was accepted)")
        n = int.from_bytes(body[i + 1 : i + 5], "big")
        if len(body) - i - 5 < n:
            raise ProbeFailed(f"truncated gRPC message ({len(body) - i - 5} of {n} bytes)")
        out.append(body[i + 5 : i + 5 + n])
        i += 5 + n
    return out


def _grpc_timeout(seconds: float) -> str:
    """The grpc-timeout header: at most 8 digits and a unit (milliseconds here)."""
    return f"{min(99_999_999, max(1, round(seconds * 1000)))}m"


def _grpc_status_reason(status: bytes, message: bytes) -> str:
    code = status.decode("latin-1")
    name = _GRPC_CODES.get(int(code)) if code.isdigit() else None
    text = f"grpc-status {code}" + (f" ({name})" if name else "")
    if message:
        text += ": " + unquote(message.decode("latin-1"))[:200]
    return text


def _health_pb2() -> Any:
    """The generated grpc.health.v1 messages, imported on the first gRPC probe: protobuf
    costs a waypoint about 3 MB that only gRPC health checking needs."""
    from controller.api.gen.grpc.health.v1 import health_pb2

    return health_pb2


def _serving_status_name(status: int) -> str:
    try:
        return str(_health_pb2().HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        return f"serving status {status}"


def _reset_reason(e: ev.StreamReset) -> str:
    who = "the backend" if e.remote else "the probe"
    return f"stream reset by {who} (code {int(e.error_code)})" + (
        f": {e.reason}" if e.reason else ""
    )


class Prober:
    """Runs probes and logs each endpoint's failures once per change: when it starts
    failing, when the reason changes, and when it passes again."""

    def __init__(self, name: str = "", *, logger: logging.Logger = log, max_tracked: int = 4096):
        self.name = name  # the waypoint's, for the log lines
        self.log = logger
        self.max_tracked = max_tracked
        self._failing: dict[tuple[str, str], str] = {}  # (backend, endpoint) -> last reason

    async def run(
        self, acquire: Acquire, probe: Probe, *, authority: str | None = None
    ) -> ProbeResult:
        """run_probe, then note the result."""
        result = await run_probe(acquire, probe, authority=authority)
        self.note(probe, result)
        return result

    def note(self, probe: Probe, result: ProbeResult) -> bool:
        """Log `result` if it changes what is known about the endpoint; True if it did."""
        key = (probe.backend, probe.endpoint.address)
        last = self._failing.get(key)
        where = f"waypoint {self.name}: " if self.name else ""
        if result.ok:
            if last is None:
                return False
            del self._failing[key]
            self.log.info("%s%s probe of %s passes again", where, probe.kind, key[1])
            return True
        if last == result.reason:
            return False
        if last is None and len(self._failing) >= self.max_tracked:
            # Endpoints that left while failing are never seen again: drop the oldest.
            del self._failing[next(iter(self._failing))]
        self._failing[key] = result.reason
        self.log.warning(
            "%s%s probe of %s (%s) failed: %s",
            where,
            probe.kind,
            key[1],
            probe.backend,
            result.reason,
        )
        return True

    def failing(self) -> dict[tuple[str, str], str]:
        """The endpoints whose last probe failed, and why: (backend, host:port) -> reason."""
        return dict(self._failing)
