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
from collections.abc import Callable
from typing import Any

log = logging.getLogger("weft.memtrim")

INTERVAL = 30.0  # seconds


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


async def run(interval: float = INTERVAL) -> None:
    """Trim every `interval` seconds, for the life of the process."""
    if _trim is None:
        log.info("this libc has no malloc_trim: freed heap memory is not given back early")
        return
    while True:
        await asyncio.sleep(interval)
        # In a thread (ctypes lets go of the GIL): on a large fragmented heap one call takes
        # milliseconds, which the event loop's requests would otherwise wait for.
        await asyncio.to_thread(trim)
