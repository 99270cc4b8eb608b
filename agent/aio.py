"""asyncio helpers shared by weft's daemons.

`cache_running_loop(loop)`: CPython 3.11's `asyncio.get_running_loop()` (and the private
`_get_running_loop()` that asyncio.Queue, Event, Lock and timeout() call) compares the
loop's pid with `getpid()` on every call, to notice a fork. That is a system call, five to
six per request through the waypoint: in a profile of `make bench` (run
20261206-070006) getpid was 5 % of the waypoint's CPU, more than routing and policy
together. CPython 3.12 dropped the check (it resets the loop in an at-fork hook instead).
weft's daemons never fork after starting their loop, so on 3.11 the main thread's running
loop is remembered; other threads, and the main thread once the loop stopped, get the
standard answer.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from asyncio import events


def cache_running_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Answer get_running_loop() from memory for `loop`'s thread (CPython < 3.12 only).
    Call it from inside the running loop; it is undone when the loop stops running."""
    if sys.version_info >= (3, 12) or getattr(events, "_weft_cached", None) is not None:
        return
    thread = threading.get_ident()
    slow_get = events._get_running_loop
    slow_running = events.get_running_loop
    get_ident = threading.get_ident

    def _get_running_loop() -> asyncio.AbstractEventLoop | None:
        if get_ident() == thread and loop.is_running():
            return loop
        return slow_get()

    def get_running_loop() -> asyncio.AbstractEventLoop:
        if get_ident() == thread and loop.is_running():
            return loop
        return slow_running()

    events._weft_cached = loop  # type: ignore[attr-defined]
    events._get_running_loop = _get_running_loop
    events.get_running_loop = get_running_loop
    asyncio.get_running_loop = get_running_loop
    asyncio._get_running_loop = _get_running_loop
