"""Access logs: one JSON object per line, per request (waypoint) or connection (tunnel).

A proxy logs every request, so the log is on the hot path. Going through `logging` costs a
LogRecord, a formatter and a locked write per line; here a line costs one `json.dumps`, and
lines gather in a buffer written every quarter second (FLUSH_INTERVAL), or sooner when it
passes 64 KiB: at 1,000 requests/s that is four write(2)s a second, not a thousand (Envoy's
access logs flush once a second by default). Every request still gets its line; what a
crash can lose is the last quarter second, and `close()` (drain, SIGTERM) writes the rest.

Destinations: `stdout` (the default, what Kubernetes collects), `stderr`, a file path
(appended to; rotated to `PATH.1` when it passes `max_bytes`, one old file kept), or `off`.

Volume is bounded by configuration, as Envoy's access log filters and Istio's Telemetry API
bound it: `sample` (0..1) is the share of ordinary lines written, while important ones (an
error status, a denial, a revoked or refused connection) are always written;
`max_per_second` caps the ordinary lines of any second (important ones are never capped),
and the lines a cap suppressed are counted in one `{"kind": "suppressed"}` line when the
next second starts, and at close.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import IO, Any

from controller.errors import EnvironmentProblem

FLUSH_BYTES = 64 * 1024
FLUSH_INTERVAL = 0.25  # seconds
# One encoder: json.dumps with non-default options builds a new JSONEncoder per line.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode
# A str (never None) as a JSON value, escaped as `_encode` escapes it: quote() without
# the Python call around this C function, for a template's per-request fields.
quote_str = json.encoder.encode_basestring_ascii


def quote(s: str | None) -> str:
    """A string (or None) as a JSON value, escaped as `_encode` escapes it: for templates
    of a hot path's fixed fields (AccessLog.write_json)."""
    return "null" if s is None else quote_str(s)


def members(record: dict[str, Any]) -> str:
    """The members of `record` as JSON text without the braces ("" if empty), to follow
    a template's fixed fields."""
    return _encode(record)[1:-1] if record else ""


class AccessLog:
    def __init__(
        self,
        out: IO[str] | None,
        *,
        sample: float = 1.0,
        max_per_second: int = 0,
        path: Path | None = None,
        max_bytes: int = 0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"access log sample {sample!r}: a share between 0 and 1")
        self.out = out
        self.sample = sample
        self.max_per_second = max_per_second
        self.path = path  # a file destination, rotated at max_bytes (0: never)
        self.max_bytes = max_bytes
        self._rng = (rng or random.Random()).random
        self._buf: list[str] = []
        self._size = 0
        self._scheduled = False
        self._second = -1
        self._stamp = ""
        self._cap_second = -1
        self._cap_count = 0
        self.lines = 0  # written since start (tests, /stats)
        self.sampled_out = 0  # ordinary lines left out by sampling
        self.suppressed = 0  # lines the per-second cap left out
        self._pending = 0  # of those, not reported yet

    @classmethod
    def open(
        cls, where: str, *, sample: float = 1.0, max_per_second: int = 0, max_mb: float = 0
    ) -> AccessLog:
        """`stdout`, `stderr`, `off` or a file path (rotated past `max_mb`, 0: never)."""
        kw = {"sample": sample, "max_per_second": max_per_second}
        if where == "off":
            return cls(None)
        if where == "stdout":
            return cls(sys.stdout, **kw)  # type: ignore[arg-type]
        if where == "stderr":
            return cls(sys.stderr, **kw)  # type: ignore[arg-type]
        p = Path(where)
        if not p.parent.is_dir():
            raise EnvironmentProblem(
                f"access log {where!r}: directory {str(p.parent)!r} does not exist",
                hint="create it, or use --access-log stdout, stderr or off",
            )
        try:
            out = p.open("a", encoding="utf-8", buffering=1 << 16)
        except OSError as e:
            raise EnvironmentProblem(f"access log {where!r}: {e.strerror}") from e
        return cls(out, path=p, max_bytes=int(max_mb * 1024 * 1024), **kw)  # type: ignore[arg-type]

    @property
    def enabled(self) -> bool:
        return self.out is not None

    def timestamp(self) -> str:
        """UTC, second resolution (the record's durationMs carries the precision); formatted
        once per second, not once per line."""
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return self._stamp

    def write(self, record: dict[str, Any], *, important: bool = False) -> None:
        """One record; `important` (an error, a denial) is never sampled out."""
        if self._admit(important):
            self._append(record)

    def write_json(self, text: str, *, important: bool = False) -> None:
        """One record already encoded as a JSON object (no newline): for a hot path that
        renders its fixed fields with a template instead of building a dict."""
        if self._admit(important):
            self._append_line(text + "\n")

    def _admit(self, important: bool) -> bool:
        """Whether a line is written: sampling and the per-second cap (counted here)."""
        if self.out is None:
            return False
        if not important and self.sample < 1.0 and self._rng() >= self.sample:
            self.sampled_out += 1
            return False
        if self.max_per_second and not important:
            # The cap bounds ordinary lines only: a flood of cheap requests must not crowd
            # out the errors and denials that matter.
            second = int(time.monotonic())
            if second != self._cap_second:
                self._report_suppressed()
                self._cap_second, self._cap_count = second, 0
            self._cap_count += 1
            if self._cap_count > self.max_per_second:
                self.suppressed += 1
                self._pending += 1
                return False
        return True

    def _report_suppressed(self) -> None:
        if self._pending:
            self._append(
                {
                    "time": self.timestamp(),
                    "kind": "suppressed",
                    "lines": self._pending,
                    "maxPerSecond": self.max_per_second,
                }
            )
            self._pending = 0

    def _append(self, record: dict[str, Any]) -> None:
        self._append_line(_encode(record) + "\n")

    def _append_line(self, line: str) -> None:
        self._buf.append(line)
        self._size += len(line)
        self.lines += 1
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._scheduled = True
            loop.call_later(FLUSH_INTERVAL, self._timer)

    def _timer(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        if not self._buf or self.out is None:
            return
        data = "".join(self._buf)
        self._buf.clear()
        self._size = 0
        try:
            self.out.write(data)
            self.out.flush()
            if self.max_bytes and self.path is not None and self.out.tell() >= self.max_bytes:
                self._rotate()
        except (OSError, ValueError):
            # A closed or broken stdout (the collector went away) must not fail requests.
            pass

    def _rotate(self) -> None:
        """PATH -> PATH.1 (replacing the older one), and a new PATH: at most twice max_bytes
        on disk. If the rename fails, the log goes on in PATH."""
        assert self.out is not None and self.path is not None
        self.out.close()
        try:
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        finally:
            self.out = self.path.open("a", encoding="utf-8", buffering=1 << 16)

    def close(self) -> None:
        if self.out is not None:
            self._report_suppressed()
        self.flush()
        if self.out is not None and self.out not in (sys.stdout, sys.stderr):
            self.out.close()
        self.out = None
