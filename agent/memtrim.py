"""Giving freed heap memory back to the kernel, for long-running processes.

glibc's malloc returns memory to the kernel on its own only from the top of the heap and
when a large mmap'd block is freed. After a burst (connections opened by the thousand, a
bulk transfer's buffers, a full config snapshot parsed) the pages freed in the middle of
the heap stay resident: the process keeps its peak. `malloc_trim(0)` hands every whole
free page back (madvise DONTNEED), which is what allocators with background purging
(jemalloc, tcmalloc) do on their own. Measured on a lab agent after the benchmark's
connection-rate workloads: 64.0 -> 62.3 MB RSS; the call took 0.1-0.4 ms there and 4-6 ms on
a fragmented 284 MB heap, so it runs in a thread.

On a libc without malloc_trim (musl) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("weft.memtrim")

INTERVAL = 30.0  # seconds
CHECK = 1.0  # seconds between looks at the resident set, when trimming on growth


def _libc(name: str, *argtypes: Any) -> Any:
    """A C library function, typed for ctypes; None where the libc lacks it (musl)."""
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


_trim: Callable[[int], int] | None = _libc("malloc_trim", ctypes.c_size_t)
_mallopt: Callable[[int, int], int] | None = _libc("mallopt", ctypes.c_int, ctypes.c_int)
M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def one_arena() -> bool:
    """Have every thread allocate from the main heap (glibc's M_ARENA_MAX = 1).

    glibc gives each thread that calls malloc an arena of its own (up to 8 per CPU), a
    64 MB reservation of which the touched part stays resident: the worker threads of
    asyncio.to_thread (flow map reads, malloc_trim itself) kept about 0.8 MB each in a lab
    agent. Their allocations are few and small, so sharing the main arena's lock costs
    nothing measurable. Call it before the process starts threads. False where the libc
    has no mallopt."""
    return _mallopt is not None and bool(_mallopt(M_ARENA_MAX, 1))


def trim() -> bool:
    """Release free heap pages now; False where the libc cannot."""
    if _trim is None:
        return False
    _trim(0)
    return True


_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """This process's resident set now (one read of /proc/self/statm), or 0 if unknown."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


async def run(
    interval: float = INTERVAL, *, grown: int | None = None, check: float = CHECK
) -> None:
    """Trim every `interval` seconds, for the life of the process; with `grown` (bytes),
    also as soon as the resident set is that much larger than the last trim left it
    (looked at every `check` seconds), so what a burst freed goes back within a second
    or two rather than up to `interval` later. Memory that stays live does not bring
    trim after trim: growth is counted from what the last trim left."""
    if _trim is None:
        log.info("this libc has no malloc_trim: freed heap memory is not given back early")
        return
    step = interval if grown is None else min(check, interval)
    loop = asyncio.get_running_loop()
    due, floor = loop.time() + interval, rss_bytes()
    while True:
        await asyncio.sleep(step)
        if loop.time() < due - step / 2:
            if grown is None:
                continue
            now = rss_bytes()
            floor = min(floor, now)  # connections closed since: count from here
            if now - floor < grown:
                continue
        # In a thread (ctypes lets go of the GIL): on a large fragmented heap one call takes
        # milliseconds, which the event loop's requests would otherwise wait for.
        await asyncio.to_thread(trim)
        due, floor = loop.time() + interval, rss_bytes()
