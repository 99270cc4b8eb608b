"""A small OpenAI-compatible client (test workload) for the lab, tests and demo.

Sends chat completions (or completions, or embeddings) over plain HTTP/1.1 to an IP:port,
optionally streaming, and prints one JSON line per request: status, the model that
answered, usage, time to first token, total time, and the response headers of interest
(every x-* header and retry-after). With --summary a last line sums them up.

    python -m agent.lab.workloads.llm_client http://10.244.2.4:8000 -n 20 -c 4 \\
        --model llama-8b --max-tokens 32 --stream --include-usage -H 'x-user: alice'

Blocking sockets, one thread and one keep-alive connection per unit of concurrency.
Responses are parsed by llhttp through httptools (a weft dependency the model server
parses its requests with), not by the waypoint's codec: this client tests the waypoint,
so it reads HTTP as an independent peer would. Exit status:
0 when every request got an HTTP response (whatever its status), 1 when any failed at the
transport level (refused, reset, timed out, malformed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools

from agent.lab.workloads.loadrun import percentile, run_threads

DEFAULT_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


class ProtocolError(Exception):
    pass


HEAD_LIMIT = 65536  # bytes of a response head still incomplete: the server is not speaking HTTP


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[str, str]] = field(default_factory=list)  # names lower case
    keep_alive: bool = False
    t_headers: float = 0.0  # perf_counter when the head was parsed
    head_done: bool = False
    until_close: bool = False  # neither length nor chunks: the body ends when the server closes
    complete: bool = False
    pieces: list[bytes] = field(default_factory=list, repr=False)  # body not yet read

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class Conn:
    """One HTTP/1.1 client connection; llhttp (httptools) parses what the server sends.

    llhttp keeps its state across reads and responses, so a keep-alive connection has one
    parser for its life; its callbacks fill in the Response being read (a queue, so bytes
    of a next response arriving with the end of one are parsed, not lost)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.used = False  # has answered a request (a stale keep-alive may then be retried)
        self._parser = httptools.HttpResponseParser(self)
        self.incoming: deque[Response] = deque()  # responses begun, oldest first
        self._head_bytes = 0

    def close(self) -> None:
        self.sock.close()

    def fill(self) -> bool:
        """Read once and parse what came; False at EOF."""
        data = self.sock.recv(65536)
        if not data:
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            raise ProtocolError(
                "the server switched protocols; this client speaks HTTP/1.1 only"
            ) from None
        except httptools.HttpParserError as e:
            raise ProtocolError(f"malformed response: {e}") from None
        if self.incoming and not self.incoming[-1].head_done:
            self._head_bytes += len(data)
            if self._head_bytes > HEAD_LIMIT:
                raise ProtocolError(f"response head longer than {HEAD_LIMIT} bytes")
        return True

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.incoming.append(Response())
        self._head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self.incoming[-1]
        if not resp.head_done:  # trailer fields after the last chunk are not reported
            resp.headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))

    def on_headers_complete(self) -> None:
        resp = self.incoming[-1]
        resp.status = self._parser.get_status_code()
        resp.keep_alive = self._parser.should_keep_alive()
        resp.t_headers = time.perf_counter()
        resp.head_done = True
        te = (resp.header("transfer-encoding") or "").lower()
        resp.until_close = "chunked" not in te and resp.header("content-length") is None

    def on_body(self, body: bytes) -> None:
        self.incoming[-1].pieces.append(body)

    def on_message_complete(self) -> None:
        self.incoming[-1].complete = True

    def restart(self) -> None:
        """Parse what follows as a new response: llhttp cannot be told that a response to
        HEAD has no body (httptools does not expose it), and requests go one at a time,
        so nothing follows that head."""
        self.incoming.clear()
        self._parser = httptools.HttpResponseParser(self)


def send_request(
    conn: Conn, method: str, host: str, path: str, *, headers: list[tuple[str, str]], body: bytes
) -> None:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    names = {k.lower() for k, _ in headers}
    if "content-type" not in names:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in headers]
    lines.append(f"Content-Length: {len(body)}")
    conn.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)


def read_head(conn: Conn) -> Response:
    """The head of the next final response (1xx skipped)."""
    while True:
        while not (conn.incoming and conn.incoming[0].head_done):
            if not conn.fill():
                raise ConnectionError("connection closed by the server")
        resp = conn.incoming[0]
        if not 100 <= resp.status < 200:
            return resp
        conn.incoming.popleft()  # 100 Continue and friends: llhttp ends them at the head


def iter_body(conn: Conn, resp: Response, method: str) -> Iterator[bytes]:
    """Yield the body in pieces as they arrive, framed by llhttp (content-length, chunked,
    or until the server closes; none for 204 and 304)."""
    if method == "HEAD":
        conn.restart()
        return
    while True:
        if resp.pieces:
            data = b"".join(resp.pieces)
            resp.pieces.clear()
            yield data
        if resp.complete:
            conn.incoming.popleft()
            return
        if not conn.fill():
            if not resp.until_close:
                raise ConnectionError("connection closed mid-body")
            resp.keep_alive = False
            conn.incoming.popleft()
            return


@dataclass
class Result:
    i: int
    status: int | None = None
    model: str | None = None
    served_by: str | None = None
    usage: dict[str, Any] | None = None
    ttft_s: float | None = None
    total_s: float | None = None
    chunks: int = 0
    done: bool | None = None
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    text: str = ""

    def as_json(self, with_text: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "i": self.i,
            "status": self.status,
            "model": self.model,
            "served_by": self.served_by,
            "usage": self.usage,
            "ttft_s": _r(self.ttft_s),
            "total_s": _r(self.total_s),
        }
        if self.done is not None:
            d["chunks"] = self.chunks
            d["done"] = self.done
        d["headers"] = self.headers
        d["error"] = self.error
        if with_text:
            d["text"] = self.text
        return d


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def _chunk_piece(obj: dict[str, Any]) -> str:
    """The text a streamed chunk carries (chat delta content or completion text)."""
    out = []
    for c in obj.get("choices") or []:
        if not isinstance(c, dict):
            continue
        delta = c.get("delta")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            out.append(delta["content"])
        elif isinstance(c.get("text"), str):
            out.append(c["text"])
    return "".join(out)


class SSE:
    """Incremental parser for a stream of `data:` events; records TTFT, usage, text."""

    def __init__(self, res: Result, t0: float) -> None:
        self.res, self.t0 = res, t0
        self.buf = b""
        res.done = False

    def feed(self, data: bytes) -> None:
        self.buf += data.replace(b"\r\n", b"\n")
        while True:
            i = self.buf.find(b"\n\n")
            if i < 0:
                return
            event, self.buf = self.buf[:i], self.buf[i + 2 :]
            payload = b"\n".join(
                line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")
            )
            if payload:
                self._event(payload)

    def _event(self, payload: bytes) -> None:
        res = self.res
        if payload.strip() == b"[DONE]":
            res.done = True
            return
        res.chunks += 1
        try:
            obj = json.loads(payload)
        except ValueError:
            res.error = res.error or "unparsable stream event"
            return
        if not isinstance(obj, dict):
            return
        if "error" in obj:
            res.error = _error_message(obj)
        piece = _chunk_piece(obj)
        if piece and res.ttft_s is None:
            res.ttft_s = time.perf_counter() - self.t0
        res.text += piece
        if isinstance(obj.get("model"), str):
            res.model = obj["model"]
        if isinstance(obj.get("usage"), dict):
            res.usage = obj["usage"]


def _error_message(obj: dict[str, Any]) -> str:
    err = obj.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err)


def _interesting(name: str, extra: set[str], all_headers: bool) -> bool:
    return all_headers or name.startswith("x-") or name == "retry-after" or name in extra


def do_request(
    conn: Conn, args: argparse.Namespace, target: tuple[str, str], i: int, body: bytes
) -> Result:
    host, path = target
    res = Result(i)
    t0 = time.perf_counter()
    send_request(conn, "POST", host, path, headers=args.header_pairs, body=body)
    resp = read_head(conn)
    conn.used = True
    res.status = resp.status
    extra = {h.lower() for h in args.show_header}
    merged: dict[str, str] = {}
    for k, v in resp.headers:
        if _interesting(k, extra, args.all_headers):
            merged[k] = f"{merged[k]}, {v}" if k in merged else v
    res.headers = merged
    res.served_by = resp.header("x-weft-served-by")
    ctype = (resp.header("content-type") or "").lower()
    if ctype.startswith("text/event-stream"):
        sse = SSE(res, t0)
        for piece in iter_body(conn, resp, "POST"):
            sse.feed(piece)
    else:
        raw = b"".join(iter_body(conn, resp, "POST"))
        res.ttft_s = time.perf_counter() - t0  # whole answer at once: first token = last
        try:
            obj = json.loads(raw) if raw else None
        except ValueError:
            obj = None
            if resp.status < 400:
                res.error = "response body is not JSON"
        if isinstance(obj, dict):
            if isinstance(obj.get("model"), str):
                res.model = obj["model"]
            if isinstance(obj.get("usage"), dict):
                res.usage = obj["usage"]
            if "error" in obj:
                res.error = _error_message(obj)
            choices = obj.get("choices")
            if isinstance(choices, list) and choices and isinstance(choices[0], dict):
                msg = choices[0].get("message")
                if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                    res.text = msg["content"]
                elif isinstance(choices[0].get("text"), str):
                    res.text = choices[0]["text"]
        elif resp.status >= 400:
            res.error = raw[:200].decode("utf-8", "replace")
    res.total_s = time.perf_counter() - t0
    if not resp.keep_alive or args.no_keepalive:
        conn.close()
        conn.used = False
        raise _Reconnect(res)
    return res


class _Reconnect(Exception):
    """The request finished, but its connection cannot be reused."""

    def __init__(self, res: Result) -> None:
        super().__init__()
        self.res = res


def parse_headers(specs: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for h in specs:
        k, sep, v = h.partition(":")
        if not sep or not k.strip():
            raise ValueError(f"header {h!r} is not 'Name: value'")
        pairs.append((k.strip(), v.strip()))
    return pairs


def build_body(args: argparse.Namespace) -> bytes:
    if args.body is not None:
        text = args.body
        if text.startswith("@"):
            with open(text[1:]) as f:
                text = f.read()
        json.loads(text)  # fail early on a typo
        return text.encode()
    body: dict[str, Any] = {}
    if args.model:
        body["model"] = args.model
    if args.api == "embeddings":
        body["input"] = args.prompt
        return json.dumps(body).encode()
    if args.api == "chat":
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        body["prompt"] = args.prompt
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    if args.stream:
        body["stream"] = True
        if args.include_usage:
            body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


def _p(values: list[float], p: float) -> float | None:
    """Rounded percentile of the values; None (JSON null) when there are none."""
    return _r(percentile(sorted(values), p)) if values else None


def summarize(results: list[Result], seconds: float) -> dict[str, Any]:
    ttft = [r.ttft_s for r in results if r.ttft_s is not None and r.status == 200]
    total = [r.total_s for r in results if r.total_s is not None and r.status == 200]
    usage = [r.usage for r in results if r.usage]
    return {
        "summary": True,
        "requests": len(results),
        "ok": sum(1 for r in results if r.status is not None and 200 <= r.status < 300),
        "statuses": dict(Counter(str(r.status) for r in results)),
        "transport_errors": sum(1 for r in results if r.status is None),
        "served_by": dict(Counter(r.served_by or "" for r in results if r.status is not None)),
        "models": dict(Counter(r.model or "" for r in results if r.status is not None)),
        "prompt_tokens": sum(int(u.get("prompt_tokens") or 0) for u in usage),
        "completion_tokens": sum(int(u.get("completion_tokens") or 0) for u in usage),
        "ttft_p50_s": _p(ttft, 50),
        "ttft_p99_s": _p(ttft, 99),
        "total_p50_s": _p(total, 50),
        "total_p99_s": _p(total, 99),
        "seconds": round(seconds, 6),
        "rps": round(len(results) / seconds, 2) if seconds > 0 else None,
    }


def run(args: argparse.Namespace, out: Any = None) -> list[Result]:
    """Send args.count requests with args.concurrency workers; print a JSON line for each."""
    out = out or sys.stdout
    u = urlsplit(args.url if "://" in args.url else "http://" + args.url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"need an http:// URL with a host, got {args.url!r}")
    port = u.port or 80
    path = u.path if u.path not in ("", "/") else DEFAULT_PATHS[args.api]
    if u.query:
        path += "?" + u.query
    target = (u.netloc, path)
    body = build_body(args)
    args.header_pairs = parse_headers(args.header)
    results: list[Result] = []
    lock = threading.Lock()
    next_i = [0]

    def emit(res: Result) -> None:
        with lock:
            results.append(res)
            if not args.quiet:
                out.write(json.dumps(res.as_json(args.text)) + "\n")
                out.flush()

    def take() -> int | None:
        with lock:
            if next_i[0] >= args.count:
                return None
            next_i[0] += 1
            return next_i[0] - 1

    def worker(_: int, start: threading.Barrier) -> None:
        start.wait()
        conn: Conn | None = None
        while (i := take()) is not None:
            if i and args.interval > 0:
                time.sleep(args.interval)
            reused = False
            for attempt in (0, 1):
                try:
                    if conn is None:
                        conn = Conn(u.hostname or "", port, args.timeout)
                    reused = conn.used
                    emit(do_request(conn, args, target, i, body))
                    break
                except _Reconnect as r:
                    conn = None
                    emit(r.res)
                    break
                except (OSError, ProtocolError) as e:
                    if conn is not None:
                        conn.close()
                    conn = None
                    # A keep-alive connection the server closed while idle: retry once, anew.
                    if attempt == 0 and reused and isinstance(e, ConnectionError):
                        continue
                    emit(Result(i, error=f"{type(e).__name__}: {e}"))
                    break
        if conn is not None:
            conn.close()

    seconds = run_threads(max(1, args.concurrency), worker)
    if args.summary:
        out.write(json.dumps(summarize(results, seconds)) + "\n")
        out.flush()
    return results


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m agent.lab.workloads.llm_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    a = ap.add_argument
    a("url", help="http://HOST:PORT[/path]; the path defaults to the --api endpoint")
    a("-n", "--count", type=int, default=1, help="requests in total (default 1)")
    a("-c", "--concurrency", type=int, default=1, help="parallel connections (default 1)")
    a("--api", choices=sorted(DEFAULT_PATHS), default="chat", help="default: chat")
    a("--model", default="", help="the model asked for (omitted when empty)")
    a("--prompt", default="Say hello to the mesh", help="user message / prompt / input")
    a("--max-tokens", type=int, default=None)
    a("--temperature", type=float, default=None)
    a("--stream", action="store_true", help="ask for an SSE stream")
    a("--include-usage", action="store_true", help="with --stream: stream_options.include_usage")
    a("--body", default=None, help="the whole JSON body instead (or @file)")
    a("-H", "--header", action="append", default=[], help="'Name: value' to add (repeatable)")
    a("--show-header", action="append", default=[], help="also report this response header")
    a("--all-headers", action="store_true", help="report every response header")
    a("--text", action="store_true", help="include the generated text")
    a("--interval", type=float, default=0.0, help="seconds between a worker's requests")
    a("--timeout", type=float, default=30.0, help="socket timeout, seconds (default 30)")
    a("--no-keepalive", action="store_true", help="a new connection per request")
    a("--summary", action="store_true", help="print a summary line at the end")
    a("-q", "--quiet", action="store_true", help="no per-request lines")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        results = run(args)
    except (ValueError, OSError) as e:
        ap.error(str(e))
    return 1 if any(r.status is None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
