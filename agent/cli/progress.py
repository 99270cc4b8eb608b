"""Numbered progress steps for long CLI commands (the demo, lab bring-up)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from controller.errors import WeftError


class StepFailed(WeftError):
    exit_code = 1


class Steps:
    def __init__(self, total: int, *, stream=sys.stderr) -> None:  # type: ignore[no-untyped-def]
        self.total, self.n, self.stream = total, 0, stream

    @contextmanager
    def step(self, title: str) -> Iterator[None]:
        self.n += 1
        self.stream.write(f"[{self.n}/{self.total}] {title} ... ")
        self.stream.flush()
        t0 = time.monotonic()
        try:
            yield
        except BaseException as e:
            self.stream.write("FAILED\n")
            self.stream.flush()
            if isinstance(e, WeftError | KeyboardInterrupt):
                raise
            raise StepFailed(f"step {self.n} ({title}) failed: {type(e).__name__}: {e}") from e
        self.stream.write(f"ok ({time.monotonic() - t0:.1f}s)\n")
        self.stream.flush()
