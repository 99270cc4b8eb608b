"""Decoding a mesh's worth of resources without the cyclic garbage collector chasing it.

A full snapshot at 10,000 workloads creates a few hundred thousand objects (models, their
dicts, lists and strings) that all survive. CPython's collector counts those allocations
and, every time the long-lived heap has grown by a quarter, walks *every* tracked object
in the process: building one snapshot next to the one it replaces ran several full
collections and took 0.35 s instead of 0.13 s (most of an agent's initial sync, and the
controller's scan). The collector finds nothing to free in them: a snapshot is a tree
of acyclic models, freed by reference counting when it is replaced.

`collector_paused()` switches the cyclic collector off for such a bounded piece of work and
back on after it (nested and multi-threaded use count; it is only re-enabled by the last
user, and only if it was on). Garbage made meanwhile is still freed by reference counting;
any cycle among it waits for the next collection, which runs as usual after the pause.

With `keep=True` (a full snapshot that now serves) what is alive at the end is moved out
of the collector's reach (`gc.freeze()`), so that later collections stop walking it:
without that, the first full collection after a snapshot walks all of it (about 0.1 s
at 10,000 workloads), and so does every later one; in the controller benchmark, where
one process holds 25 agents' snapshots, the agents used 30-34 s of CPU for the initial
sync instead of 22-25 s. Frozen objects are still freed by reference counting (the
snapshot a later one replaces is). What freezing costs is a reference cycle alive at
that moment and dropped later (an asyncio task, a connection's objects): it is not
collected while frozen. So a `keep` first sweeps -- unfreezes, collects, then freezes
what is left -- when SWEEP_EVERY has passed since the last sweep: what can be held back
is what was alive at the full snapshots of the last ten minutes. (Sweeping at every
snapshot would walk everything each time: the benchmark's 25-agent workers then took
42 s of CPU.)
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator

SWEEP_EVERY = 600.0  # seconds: a keep sweeps the frozen objects if this long has passed


class _Pause:
    """Who is inside a pause, and whether the collector goes back on after the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.reenable = False
        self.keep = False
        self.swept_at: float | None = None  # monotonic time of the last sweep
        self.sweeps = 0


_pause = _Pause()


@contextlib.contextmanager
def collector_paused(*, keep: bool = False) -> Iterator[None]:
    """No cyclic garbage collection while the block runs (reference counting goes on);
    with `keep`, what is alive when the last pause ends is kept out of later collections."""
    p = _pause
    with p.lock:
        if p.users == 0:
            p.reenable = gc.isenabled()
            gc.disable()
        p.users += 1
    ok = False
    try:
        yield
        ok = True
    finally:
        with p.lock:
            p.users -= 1
            p.keep = p.keep or (keep and ok)
            if p.users == 0:
                if p.keep:
                    p.keep = False
                    _freeze(p)
                if p.reenable:
                    gc.enable()


def _freeze(p: _Pause) -> None:
    now = time.monotonic()
    if p.swept_at is None or now - p.swept_at >= SWEEP_EVERY:
        gc.unfreeze()
        gc.collect()
        p.sweeps += 1
        p.swept_at = now
    gc.freeze()
