"""`Respond`: the engine's decision that the waypoint answers a request itself.

Every such answer (no route, an unresolvable backend, a redirect, an injected abort, an
overflow, a fallback) is one frozen object the shell turns into a response head and body.
`reason` is for logs and the `x-weft-reason` header the shell may add; `code` is a stable
token (Gateway API's condition reasons where one fits) for metrics and tests.
"""

from __future__ import annotations

from dataclasses import dataclass

HeaderList = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True, slots=True)
class Respond:
    status: int
    code: str  # NoMatchingRoute, BackendNotFound, FilterNotFound, Redirect, FaultAbort, ...
    reason: str = ""
    headers: HeaderList = ()
    body: bytes = b""
    delay: float = 0.0  # seconds to wait before answering (an injected delay came first)
    param: str = ""  # the request field at fault, for errors in OpenAI's shape

    @property
    def final_headers(self) -> list[tuple[bytes, bytes]]:
        """Headers to send, with content-type and content-length for the body."""
        out = list(self.headers)
        names = {n for n, _ in out}
        if self.body and b"content-type" not in names:
            out.append((b"content-type", b"text/plain; charset=utf-8"))
        if b"content-length" not in names:
            out.append((b"content-length", str(len(self.body)).encode()))
        return out


def plain(status: int, code: str, reason: str) -> Respond:
    """A response whose body is the reason, so a caller sees why (as Envoy's local replies)."""
    return Respond(status, code, reason, body=(reason + "\n").encode())


NO_HEALTHY_ENDPOINT = "NoHealthyEndpoint"
OVERFLOW = "Overflow"
