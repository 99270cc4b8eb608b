"""Read a model response as it passes: token usage, the model that answered, time to first
token and time per output token. Sans-IO and incremental: `feed` each body chunk as it
arrives and forward what it returns; call `end` when the body is over.

Two shapes:

- JSON (non-streaming): bytes pass through untouched. The reader keeps at most
  `max_json_bytes` to parse at the end; a larger body keeps only its head (for `model`) and
  its tail (OpenAI servers write `usage` last), so memory stays bounded whatever the size.
- SSE (`text/event-stream`): bytes pass through as they come. The reader only holds the
  part of an event not yet complete, never the stream. Per event it does a few byte searches
  (C speed): `"usage":` (JSON-decoding only the event that carries a usage object), whether
  the event carries generated content (for TTFT and TPOT), and the model once. Content
  chunks are never JSON-decoded.

With `strip_usage` (the waypoint added `stream_options.include_usage` for its own
accounting) the reader also removes what the client did not ask for: the final usage-only
chunk (`"choices": []`) and the `"usage": null` member of every other chunk. It then forwards
whole events (a partial event waits for its end), so the client receives byte for byte the
stream the backend would have sent without include_usage.

TTFT is the time from `started` (when the request was sent upstream) to the first event with
generated content; TPOT is (last content event - first) / (completion_tokens - 1), the
definition vLLM and the sample model server use. Both are for streams only.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

MiB = 1024 * 1024
JSON_HEAD = 4096  # where "model" is, in every OpenAI-compatible server's output
JSON_TAIL = 16384  # usage with its details objects fits many times over

_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_USAGE_OBJ = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
# A chunk with generated text, reasoning text or a tool call; `"content":""` (vLLM's
# role-only first chunk) and `"content":null` are not content.
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content)"\s*:\s*"[^"]|"tool_calls"\s*:\s*\[')
_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null\s*,?')
_DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = 0
    estimated: bool = False  # no usage arrived; counted from what passed (see usage_or_estimate)

    @classmethod
    def from_obj(cls, u: Any) -> Usage | None:
        if not isinstance(u, dict):
            return None
        p, c = _nat(u.get("prompt_tokens")), _nat(u.get("completion_tokens"))
        t = _nat(u.get("total_tokens")) or p + c
        details = u.get("prompt_tokens_details")
        cached = _nat(details.get("cached_tokens")) if isinstance(details, dict) else 0
        return cls(p, c, t, cached)


def _nat(v: Any) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _model(data: bytes) -> str | None:
    m = _MODEL.search(data)
    if m is None:
        return None
    try:
        return str(json.loads(b'"' + m.group(1) + b'"'))
    except ValueError:
        return None


class ResponseReader:
    """One response body. Forward `feed()`'s and `end()`'s return values, in order."""

    __slots__ = (
        "_buf",
        "_head",
        "_overflow",
        "_sep",
        "body_bytes",
        "chunks",
        "content_events",
        "done",
        "first_token_at",
        "last_token_at",
        "max_bytes",
        "model",
        "sse",
        "started",
        "strip_usage",
        "stripped",
        "usage",
    )

    def __init__(
        self,
        started: float,
        content_type: bytes | None,
        *,
        strip_usage: bool = False,
        max_json_bytes: int = MiB,
    ) -> None:
        self.started = started
        ctype = (content_type or b"").split(b";", 1)[0].strip().lower()
        self.sse = ctype == b"text/event-stream"
        self.strip_usage = strip_usage and self.sse
        # JSON: the body so far (up to max_bytes), then only a rolling tail. SSE: the part
        # of an event not yet ended.
        self._buf = bytearray()
        self._head = b""
        self._overflow = False
        self._sep = b""  # b"\n\n" or b"\r\n\r\n", decided by the first line ending
        self.max_bytes = max_json_bytes
        self.usage: Usage | None = None
        self.model: str | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.content_events = 0
        self.chunks = 0  # SSE events seen
        self.done = False  # data: [DONE] seen
        self.stripped = 0  # bytes removed for the client
        self.body_bytes = 0  # bytes of the body read so far

    # ---- results -------------------------------------------------------------------

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    @property
    def tpot(self) -> float | None:
        u, first, last = self.usage, self.first_token_at, self.last_token_at
        n = u.completion_tokens if u is not None else self.content_events
        if first is None or last is None or n < 2:
            return None
        return (last - first) / (n - 1)

    def usage_or_estimate(self, prompt_tokens: int) -> Usage:
        """The backend's usage, or (a cut answer, a server that sends none) an estimate:
        the request's prompt estimate, and one token per content event of a stream (as vLLM
        streams) or, for a JSON body that did not arrive whole, one per four bytes of it."""
        if self.usage is not None:
            return self.usage
        c = self.content_events if self.sse else max(self.content_events, self.body_bytes // 4)
        return Usage(prompt_tokens, c, prompt_tokens + c, estimated=True)

    # ---- feeding -------------------------------------------------------------------

    def feed(self, data: bytes, now: float) -> bytes:
        self.body_bytes += len(data)
        if not self.sse:
            self._feed_json(data)
            return data
        if not self.strip_usage:
            self._scan(data, now)
            return data
        return self._strip(data, now)

    def end(self, now: float) -> bytes:
        """The body is over: settle what is buffered; returns the last bytes to forward."""
        if not self.sse:
            self._end_json()
            return b""
        rest = bytes(self._buf)
        self._buf.clear()
        if not rest:
            return b""
        kept = self._event(rest, now)  # a last event without its blank line
        if not self.strip_usage:
            return b""
        return rest if kept is None else kept

    # ---- JSON ----------------------------------------------------------------------

    def _feed_json(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if len(buf) > self.max_bytes:
            if not self._overflow:
                self._head = bytes(buf[:JSON_HEAD])
                self._overflow = True
            del buf[: len(buf) - JSON_TAIL]

    def _end_json(self) -> None:
        buf = bytes(self._buf)
        self._buf.clear()
        if not self._overflow:
            try:
                obj = json.loads(buf)
            except (ValueError, UnicodeDecodeError):
                return
            if isinstance(obj, dict):
                self.usage = Usage.from_obj(obj.get("usage"))
                m = obj.get("model")
                self.model = m if isinstance(m, str) else None
            return
        self.model = _model(self._head)
        # The last match: an object in the data could also have a "usage" member.
        found = [m.group(1) for m in _USAGE_OBJ.finditer(buf)]
        if found:
            with contextlib.suppress(ValueError):
                self.usage = Usage.from_obj(json.loads(found[-1]))

    # ---- SSE -----------------------------------------------------------------------

    def _separator(self, data: bytes | bytearray) -> bytes:
        i = data.find(b"\n")
        if i < 0:
            return b""
        self._sep = b"\r\n\r\n" if i > 0 and data[i - 1] == 13 else b"\n\n"
        return self._sep

    def _scan(self, data: bytes, now: float) -> None:
        """Pass-through mode: find the complete events in buffer + data."""
        buf = self._buf
        sep = self._sep
        if not buf:
            if not sep and not (sep := self._separator(data)):
                buf += data
                return
            if data.endswith(sep):  # the usual case: whole events, no copy
                for ev in data.split(sep)[:-1]:
                    self._event(ev, now)
                return
            i = data.rfind(sep)
            if i >= 0:
                for ev in data[:i].split(sep):
                    self._event(ev, now)
                data = data[i + len(sep) :]
            buf += data
            self._bound()
            return
        buf += data
        if not sep and not (sep := self._separator(buf)):
            self._bound()
            return
        end = buf.rfind(sep)
        if end < 0:
            self._bound()
            return
        whole = bytes(buf[:end])
        del buf[: end + len(sep)]
        for ev in whole.split(sep):
            self._event(ev, now)

    def _bound(self) -> None:
        # One event larger than the limit (no server sends that): stop reading it rather
        # than hold it; the usage may then be estimated.
        if len(self._buf) > self.max_bytes:
            self._buf.clear()
            self._overflow = True

    def _strip(self, data: bytes, now: float) -> bytes:
        """Strip mode: forward whole events, minus what the client did not ask for."""
        buf = self._buf
        buf += data
        sep = self._sep or self._separator(buf)
        if not sep:
            return b""
        end = buf.rfind(sep)
        if end < 0:
            if len(buf) > self.max_bytes:  # give up stripping this event; never hold it
                out = bytes(buf)
                buf.clear()
                return out
            return b""
        whole = bytes(buf[:end])
        del buf[: end + len(sep)]
        parts: list[bytes] = []
        for ev in whole.split(sep):
            kept = self._event(ev, now)
            if kept is not None:
                parts.append(kept)
                parts.append(sep)
        return b"".join(parts)

    def _event(self, ev: bytes, now: float) -> bytes | None:
        """Read one event (without its blank line). Returns the event as the client should
        see it (strip mode), or None to drop it."""
        self.chunks += 1
        if ev.startswith(b"data: ") and b"\n" not in ev:
            payload = ev[6:]
        elif b"data:" not in ev:
            return ev  # comments, keep-alives, event:/id:/retry: only
        else:
            payload = b"\n".join(
                line[5:].lstrip(b" ") if line.startswith(b"data:") else b""
                for line in ev.replace(b"\r\n", b"\n").split(b"\n")
                if line.startswith(b"data:")
            )
        if payload == _DONE:
            self.done = True
            return ev
        if self.model is None:
            self.model = _model(payload)
        if _CONTENT.search(payload) is not None:
            self.content_events += 1
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
        m = _USAGE_KEY.search(payload)
        if m is None:
            return ev
        if payload[m.end() : m.end() + 1] == b"{":
            try:
                obj = json.loads(payload)
            except (ValueError, UnicodeDecodeError):
                return ev
            if isinstance(obj, dict):
                self.usage = Usage.from_obj(obj.get("usage")) or self.usage
                if self.strip_usage and obj.get("choices") == []:
                    self.stripped += len(ev) + len(self._sep)
                    return None
            return ev
        if self.strip_usage:
            out = _USAGE_NULL.sub(b"", ev, count=1)
            self.stripped += len(ev) - len(out)
            return out
        return ev
