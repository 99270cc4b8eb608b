"""Responses the mesh makes itself, in the caller's protocol.

Every answer the waypoint gives on its own (403 from L7 authorization, 404 no route, 413,
429 from a token budget, 503 overflow or no healthy endpoint, 504 timeout...) is an engine
`Respond`. How it is written depends on who asked:

- **gRPC** (request content-type application/grpc): a trailers-only response, HTTP 200 with
  `grpc-status` and `grpc-message` and no body, as gRPC's HTTP/2 protocol requires; the
  status code follows grpc's http-grpc-status-mapping, refined by what the mesh knows (an
  upstream timeout is DEADLINE_EXCEEDED, a budget RESOURCE_EXHAUSTED).
- **OpenAI** (a Service with AI policy): a JSON error object `{"error": {"message", "type",
  "param", "code"}}` with the status, which the official SDKs parse into their exceptions
  (`type` and `code` are what they expose); `retry-after` where it applies.
- **plain HTTP**: Envoy-like text, the reason in the body.

A response the user configured (a BackendPolicy fallback response) and a redirect are sent
exactly as configured, in every style.
"""

from __future__ import annotations

import json
import re
from enum import Enum
from urllib.parse import quote

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.respond import Respond


class Style(Enum):
    TEXT = "text"
    OPENAI = "openai"
    GRPC = "grpc"


# Answers sent as configured, never re-rendered.
_VERBATIM = frozenset({"Redirect", "Fallback", "CacheHit", "ModelList"})

# gRPC status codes (grpc/doc/statuscodes.md).
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
PERMISSION_DENIED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 7, 8, 12, 13, 14
UNAUTHENTICATED = 16

# grpc/doc/http-grpc-status-mapping.md, for a status the mesh did not refine below.
_GRPC_OF_HTTP = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    500: INTERNAL,  # not in grpc's table (UNKNOWN): a 500 the mesh makes is its own error
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}
# What the mesh knows better than the HTTP status.
_GRPC_OF_CODE = {
    "UpstreamTimeout": DEADLINE_EXCEEDED,
    "RequestTimeout": DEADLINE_EXCEEDED,
    "RateLimited": RESOURCE_EXHAUSTED,
    "PayloadTooLarge": RESOURCE_EXHAUSTED,
    "Shed": UNAVAILABLE,
    "BadRequest": INVALID_ARGUMENT,
}

# OpenAI's error `type` by status; the SDKs choose their exception class by status and
# show `type` and `code`.
_OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# A word starts at a capital after a lowercase letter or digit, or at the last capital of
# an acronym followed by lowercase: RBACAccessDenied -> RBAC_Access_Denied.
_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def snake(code: str) -> str:
    """'NoHealthyEndpoint' -> 'no_healthy_endpoint' (the JSON error's `code`)."""
    return _SNAKE.sub("_", code).lower()


def style_of(headers: Headers, ai: bool) -> Style:
    """The style of the mesh's own answers to a request with these headers."""
    ctype = headers.get(b"content-type") or b""
    if ctype.startswith(b"application/grpc"):
        return Style.GRPC
    return Style.OPENAI if ai else Style.TEXT


def openai_error(
    status: int,
    message: str,
    *,
    type_: str | None = None,
    param: str | None = None,
    code: str | int | None = None,
) -> bytes:
    """An OpenAI-style error body (the one mapping of status to error type in weft)."""
    kind = type_ or _OPENAI_TYPE.get(status)
    if kind is None:
        kind = "server_error" if status >= 500 else "invalid_request_error"
    err = {"message": message, "type": kind, "param": param, "code": code}
    return json.dumps({"error": err}, separators=(",", ":")).encode()


def grpc_status_of(resp: Respond) -> int:
    if resp.code in _GRPC_OF_CODE:
        return _GRPC_OF_CODE[resp.code]
    return _GRPC_OF_HTTP.get(resp.status, UNKNOWN)


def render(style: Style, resp: Respond) -> tuple[int, Headers, bytes]:
    """(status, headers, body) to send for `resp` to a caller of this style."""
    h = Headers()
    if resp.code in _VERBATIM or style is Style.TEXT:
        for k, v in resp.final_headers:
            h.add(k, v)
        return resp.status, h, resp.body
    message = resp.reason or resp.body.decode("utf-8", "replace").strip() or resp.code
    for k, v in resp.headers:
        if k not in (b"content-type", b"content-length"):
            h.add(k, v)
    if style is Style.GRPC:
        h.set(b"content-type", b"application/grpc")
        h.set(b"grpc-status", str(grpc_status_of(resp)).encode())
        # grpc-message is percent-encoded UTF-8 (gRPC over HTTP/2, "Responses").
        h.set(b"grpc-message", quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode())
        h.set(b"x-weft-http-status", str(resp.status).encode())
        return 200, h, b""
    if style is Style.OPENAI:
        body = openai_error(resp.status, message, param=resp.param or None, code=snake(resp.code))
        h.set(b"content-type", b"application/json")
    else:
        body = (message + "\n").encode()
        h.set(b"content-type", b"text/plain; charset=utf-8")
    h.set(b"content-length", str(len(body)).encode())
    return resp.status, h, body
