"""agent.lab.workloads.llm_client against a scripted HTTP/1.1 server: how it frames
responses (llhttp through httptools) and when it reuses or replaces a connection."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.lab.workloads import llm_client

ANSWER = json.dumps({"model": "m", "usage": {"prompt_tokens": 1}, "choices": []}).encode()


def ok(extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n%scontent-length: %d\r\n\r\n%s"
        % (
            extra,
            len(ANSWER),
            ANSWER,
        )
    )


@contextmanager
def scripted(connections: list[list[tuple[bytes, bool]]]) -> Iterator[str]:
    """A server that, on each accepted connection in turn, reads a request and sends the
    next reply, closing after a reply marked True. Yields its URL."""
    ls = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for replies in connections:
            conn, _ = ls.accept()
            with conn:
                for reply, close in replies:
                    data = b""
                    while b"\r\n\r\n" not in data:
                        data += conn.recv(65536)
                    head, _, body = data.partition(b"\r\n\r\n")
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    while len(body) < length:
                        body += conn.recv(65536)
                    conn.sendall(reply)
                    if close:
                        break

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{ls.getsockname()[1]}"
    finally:
        t.join(5)
        ls.close()


def run(url: str, *argv: str) -> list[dict[str, Any]]:
    out = io.StringIO()
    args = llm_client.build_parser().parse_args([url, "--timeout", "5", *argv])
    llm_client.run(args, out)
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_interim_responses_skipped_and_trailers_not_reported() -> None:
    """A 100 Continue before the answer is skipped; a chunked answer's trailer fields are
    not reported as headers; the connection is kept for the next request."""
    chunked = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n"
        b"x-head: 1\r\n\r\n%x\r\n%s\r\n0\r\nx-trailer: t\r\n\r\n" % (len(ANSWER), ANSWER)
    )
    with scripted([[(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(), False), (chunked, False)]]) as url:
        first, second = run(url, "-n", "2")
    assert first["status"] == 200 and first["usage"] == {"prompt_tokens": 1}
    assert second["headers"] == {"x-head": "1"} and second["model"] == "m"


def test_body_until_close_then_a_new_connection() -> None:
    """An answer with neither length nor chunks ends when the server closes; the next
    request goes on a new connection, without an error."""
    until_close = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n" + ANSWER
    with scripted([[(until_close, True)], [(ok(), False)]]) as url:
        rs = run(url, "-n", "2")
    assert [r["status"] for r in rs] == [200, 200] and all(r["error"] is None for r in rs)
    assert rs[0]["model"] == "m"


def test_stale_keep_alive_connection_retried_once() -> None:
    """A kept-alive connection that the server closed while idle is retried once on a new
    connection; the request does not fail."""
    with scripted([[(ok(), True)], [(ok(), False)]]) as url:
        rs = run(url, "-n", "2")
    assert [(r["status"], r["error"]) for r in rs] == [(200, None), (200, None)]


def test_malformed_response_is_a_transport_failure() -> None:
    """What llhttp rejects is a ProtocolError: no status, an error, exit status 1."""
    with scripted([[(b"SPAM\r\n\r\n", True)]]) as url:
        (r,) = run(url)
    assert r["status"] is None and r["error"].startswith("ProtocolError: malformed response")


def test_body_cut_short_is_a_transport_failure() -> None:
    """A server that closes before the content-length is complete fails the request."""
    with scripted([[(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nabc", True)]]) as url:
        (r,) = run(url)
    assert r["status"] is None and r["error"] == "ConnectionError: connection closed mid-body"
