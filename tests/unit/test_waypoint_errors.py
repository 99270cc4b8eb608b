"""The mesh's own answers in the caller's protocol (agent/waypoint/errors.py): OpenAI-style
JSON that the official `openai` client parses into its exceptions, gRPC trailers-only
responses with the right status, Envoy-like text for plain HTTP."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine.pool import OVERFLOW_RESPONSE
from agent.waypoint.engine.respond import Respond, plain
from agent.waypoint.errors import Style, grpc_status_of, render, snake, style_of

# Every answer the waypoint makes on its own, as the code paths build them.
MESH_ANSWERS = [
    plain(403, "RBACAccessDenied", "RBAC: access denied"),
    plain(404, "NoMatchingRoute", "no route matches"),
    Respond(404, "ModelNotFound", "The model 'gpt-9' does not exist", param="model"),
    Respond(400, "BadRequest", "messages must be a list", param="messages"),
    plain(413, "PayloadTooLarge", "request body too large for model routing"),
    Respond(
        429,
        "RateLimited",
        "rate limit ai/budget/per-user reached for tokens; retry after 12 s",
        headers=((b"retry-after", b"12"),),
    ),
    plain(500, "BackendNotFound", "no Service port ai/gone:80"),
    OVERFLOW_RESPONSE,
    plain(503, "NoHealthyEndpoint", "every endpoint of ai/llm:8000 is ejected"),
    Respond(503, "Shed", "shed: saturated", headers=((b"retry-after", b"1"),)),
    plain(503, "UpstreamFailure", "ai/llm:8000: no response from the backend (reset)"),
    plain(504, "UpstreamTimeout", "ai/llm:8000: no response from the backend (timeout)"),
]
EXCEPTION_OF = {
    400: openai.BadRequestError,
    403: openai.PermissionDeniedError,
    404: openai.NotFoundError,
    413: openai.APIStatusError,
    429: openai.RateLimitError,
    500: openai.InternalServerError,
    503: openai.InternalServerError,
    504: openai.InternalServerError,
}


def _client(resp: Respond) -> openai.OpenAI:
    status, headers, body = render(Style.OPENAI, resp)

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status, headers=[(k.decode(), v.decode()) for k, v in headers], content=body
        )

    return openai.OpenAI(
        api_key="unused",
        base_url="http://llm.ai.svc/v1",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),
    )


@pytest.mark.parametrize("resp", MESH_ANSWERS, ids=lambda r: r.code)
def test_the_openai_client_parses_every_mesh_error(resp):
    """Each answer the mesh makes on an AI route reaches the official client as its typed
    exception, with the JSON error's message, a `type` that is not server_error for a
    client error (413 included), and weft's stable code."""
    with pytest.raises(EXCEPTION_OF[resp.status]) as info:
        _client(resp).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}]
        )
    err = info.value
    assert err.status_code == resp.status
    assert err.code == snake(resp.code)
    assert err.type is not None and (resp.status >= 500) == (
        err.type in ("server_error", "service_unavailable", "timeout_error")
    )
    assert resp.reason.split(":")[0] in err.message
    if resp.param:
        assert err.param == resp.param


def test_retry_after_is_kept_where_it_applies():
    """429 from a budget and 503 from shedding keep their retry-after in every style."""
    for resp in (MESH_ANSWERS[5], MESH_ANSWERS[9]):
        for style in Style:
            _, headers, _ = render(style, resp)
            assert headers.get(b"retry-after") is not None, (resp.code, style)


@pytest.mark.parametrize(
    ("resp", "grpc_status"),
    [
        (MESH_ANSWERS[0], 7),  # PERMISSION_DENIED
        (MESH_ANSWERS[1], 12),  # UNIMPLEMENTED: the gRPC mapping of 404
        (MESH_ANSWERS[5], 8),  # RESOURCE_EXHAUSTED: a budget
        (OVERFLOW_RESPONSE, 14),  # UNAVAILABLE
        (MESH_ANSWERS[11], 4),  # DEADLINE_EXCEEDED: an upstream timeout
        (MESH_ANSWERS[6], 13),  # INTERNAL
    ],
)
def test_grpc_callers_get_trailers_only_responses(resp, grpc_status):
    """A gRPC caller gets HTTP 200, content-type application/grpc, grpc-status and a
    percent-encoded grpc-message, and no body (a trailers-only response)."""
    status, headers, body = render(Style.GRPC, resp)
    assert (status, body) == (200, b"")
    assert headers.get(b"content-type") == b"application/grpc"
    assert int(headers.get(b"grpc-status") or b"-1") == grpc_status == grpc_status_of(resp)
    message = headers.get(b"grpc-message") or b""
    assert message and all(0x20 <= c < 0x7F for c in message)
    assert headers.get(b"content-length") is None


def test_plain_http_keeps_envoy_like_text():
    """A plain HTTP caller gets the reason as text, as before."""
    status, headers, body = render(Style.TEXT, MESH_ANSWERS[0])
    assert (status, body) == (403, b"RBAC: access denied\n")
    assert headers.get(b"content-type", b"").startswith(b"text/plain")


def test_configured_answers_are_sent_as_configured():
    """A BackendPolicy fallback response and a cached answer are never re-rendered."""
    fallback = Respond(
        200, "Fallback", "", headers=((b"content-type", b"application/json"),), body=b'{"ok":1}'
    )
    for style in Style:
        status, headers, body = render(style, fallback)
        assert (status, body) == (200, b'{"ok":1}')
        assert headers.get(b"content-type") == b"application/json"


def test_the_style_follows_the_callers_protocol():
    """gRPC by content-type (whatever the Service), OpenAI JSON on AI routes, else text."""
    grpc = Headers.of(("content-type", "application/grpc+proto"))
    assert style_of(grpc, ai=True) is Style.GRPC
    assert style_of(Headers(), ai=True) is Style.OPENAI
    assert style_of(Headers.of(("content-type", "application/json")), ai=False) is Style.TEXT
    body = json.loads(render(Style.OPENAI, MESH_ANSWERS[4])[2])
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("RBACAccessDenied", "rbac_access_denied"),
        ("NoHealthyEndpoint", "no_healthy_endpoint"),
        ("UpstreamTimeout", "upstream_timeout"),
        ("Overflow", "overflow"),
    ],
)
def test_codes_are_the_documented_snake_case(code, expected):
    """The JSON error's `code` is the one docs/waypoint-engine.md lists (acronyms whole)."""
    assert snake(code) == expected
