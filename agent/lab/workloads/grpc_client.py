"""A gRPC client (test workload) for weft.bench.Echo (agent.lab.workloads.grpc_echo).

    python -m agent.lab.workloads.grpc_client HOST:PORT [--timeout S] CALL [CALL ...]

grpcio (the C core) makes every CALL in order on one channel (one HTTP/2 connection) and
prints one JSON line per call: `call` (the spec), `code` (the gRPC status name),
`details`, `replies` (the answer messages, decoded as UTF-8) and `served_by` (the
`x-served-by` initial metadata, when the server sent any). CALLs:

- `unary:MSG`: one Unary call.
- `stream:MSG:N`: ServerStream asking for N copies of MSG.
- `client-stream:M1,M2,...`: ClientStream with those messages.
- `bidi:M1,M2,...`: Bidi as ping-pong: each message is sent only after the answer to the
  one before it has arrived (so a proxy that waits for the end of the request stream
  before forwarding it would never answer: the deadline ends the call instead).
- `sleep:SECONDS[:DEADLINE]`: Sleep with that deadline (default: --timeout).

Every call has a deadline (--timeout, default 10 s). Exit status 0 once all calls were
made, whatever their statuses; 2 for a bad CALL.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
from collections.abc import Iterator
from typing import Any

import grpc

from agent.lab.workloads.grpc_echo import (
    BIDI,
    CLIENT_STREAM,
    MESSAGES_KEY,
    SERVED_BY_KEY,
    SERVER_STREAM,
    SLEEP,
    UNARY,
)

CHANNEL_OPTIONS = (
    ("grpc.enable_http_proxy", 0),
    ("grpc.enable_retries", 0),
)


def _served_by(call: Any) -> str | None:
    for k, v in call.initial_metadata() or ():
        if k == SERVED_BY_KEY:
            return str(v)
    return None


def _text(replies: list[bytes]) -> list[str]:
    return [r.decode("utf-8", "replace") for r in replies]


def _bidi(ch: grpc.Channel, msgs: list[bytes], timeout: float) -> tuple[list[bytes], Any]:
    q: queue.Queue[bytes | None] = queue.Queue()

    def requests() -> Iterator[bytes]:
        while (m := q.get()) is not None:
            yield m

    call = ch.stream_stream(BIDI)(requests(), timeout=timeout)
    replies: list[bytes] = []
    try:
        for m in msgs:
            q.put(m)
            replies.append(next(call))
        q.put(None)
        replies += list(call)
    finally:
        q.put(None)
    return replies, call


def make_call(ch: grpc.Channel, spec: str, timeout: float) -> dict[str, Any]:
    kind, _, arg = spec.partition(":")
    out: dict[str, Any] = {"call": spec, "code": "OK", "details": "", "replies": []}
    call: Any = None
    try:
        if kind == "unary":
            reply, call = ch.unary_unary(UNARY).with_call(arg.encode(), timeout=timeout)
            out["replies"] = _text([reply])
        elif kind == "stream":
            msg, _, n = arg.rpartition(":")
            call = ch.unary_stream(SERVER_STREAM)(
                msg.encode(), metadata=((MESSAGES_KEY, n),), timeout=timeout
            )
            out["replies"] = _text(list(call))
        elif kind == "client-stream":
            msgs = [m.encode() for m in arg.split(",")]
            reply, call = ch.stream_unary(CLIENT_STREAM).with_call(iter(msgs), timeout=timeout)
            out["replies"] = _text([reply])
        elif kind == "bidi":
            replies, call = _bidi(ch, [m.encode() for m in arg.split(",")], timeout)
            out["replies"] = _text(replies)
        elif kind == "sleep":
            seconds, _, deadline = arg.partition(":")
            reply, call = ch.unary_unary(SLEEP).with_call(
                seconds.encode(), timeout=float(deadline) if deadline else timeout
            )
            out["replies"] = _text([reply])
        else:
            raise ValueError(f"unknown call {spec!r}")
    except grpc.RpcError as e:
        out["code"] = e.code().name
        out["details"] = e.details()
        call = e  # the failed call itself
    try:
        out["served_by"] = _served_by(call) if call is not None else None
    except grpc.RpcError:
        out["served_by"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m agent.lab.workloads.grpc_client",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("target", help="HOST:PORT")
    ap.add_argument("calls", nargs="+", metavar="CALL")
    ap.add_argument("--timeout", type=float, default=10.0, help="deadline of every call, s")
    args = ap.parse_args(argv)
    with grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) as ch:
        for spec in args.calls:
            try:
                out = make_call(ch, spec, args.timeout)
            except ValueError as e:
                print(f"bad call {spec!r}: {e}", file=sys.stderr)
                return 2
            sys.stdout.write(json.dumps(out) + "\n")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
