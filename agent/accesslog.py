"""Access logs: one JSON object per line, per request (waypoint) or connection (tunnel).

A proxy logs every request, so the log is on the hot path. Going through `logging` costs a
LogRecord, a formatter and a locked write per line; here a line costs one `json.dumps`, and
lines gather in a buffer written every quarter second (FLUSH_INTERVAL), or sooner when it
passes 64 KiB: at 1,000 requests/s that is four write(2)s a second, not a thousand (Envoy's
access logs flush once a second by default). Every request still gets its line; what a
crash can lose is the last quarter second, and `close()` (drain, SIGTERM) writes the rest.

Destinations: `stdout` (the default, what Kubernetes collects), `stderr`, a file path
(appended to), or `off`.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

from controller.errors import EnvironmentProblem

FLUSH_BYTES = 64 * 1024
FLUSH_INTERVAL = 0.25  # seconds
# One encoder: json.dumps with non-default options builds a new JSONEncoder per line.
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


class AccessLog:
    def __init__(self, out: IO[str] | None) -> None:
        self.out = out
        self._buf: list[str] = []
        self._size = 0
        self._scheduled = False
        self._second = -1
        self._stamp = ""
        self.lines = 0  # written since start (tests, /stats)

    @classmethod
    def open(cls, where: str) -> AccessLog:
        """`stdout`, `stderr`, `off` or a file path."""
        if where == "off":
            return cls(None)
        if where == "stdout":
            return cls(sys.stdout)
        if where == "stderr":
            return cls(sys.stderr)
        p = Path(where)
        if not p.parent.is_dir():
            raise EnvironmentProblem(
                f"access log {where!r}: directory {str(p.parent)!r} does not exist",
                hint="create it, or use --access-log stdout, stderr or off",
            )
        try:
            return cls(p.open("a", encoding="utf-8", buffering=1 << 16))
        except OSError as e:
            raise EnvironmentProblem(f"access log {where!r}: {e.strerror}") from e

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

    def write(self, record: dict[str, Any]) -> None:
        if self.out is None:
            return
        line = _encode(record) + "\n"
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
        except (OSError, ValueError):
            # A closed or broken stdout (the collector went away) must not fail requests.
            pass

    def close(self) -> None:
        self.flush()
        if self.out is not None and self.out not in (sys.stdout, sys.stderr):
            self.out.close()
        self.out = None
