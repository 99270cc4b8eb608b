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
snapshot a later one replaces is). What freezing would cost is a reference cycle alive
at that moment and dropped later: it is not collected while frozen. That is bounded:
when the frozen population has doubled since the last sweep, and SWEEP_EVERY has passed,
the next `keep` unfreezes, collects once, and freezes what is left. (Not at every
doubling: a process holding many snapshots, as the benchmark's agent workers do, would
then walk them all again and again; with the time bound the agents' CPU for the initial
sync stayed at 22-25 s where sweeping at each doubling took 42 s.)
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator

MIN_SWEEP_BASE = 50_000  # frozen objects: below twice this, no sweep
SWEEP_EVERY = 600.0  # seconds: at most one sweep of the frozen objects this often


class _Pause:
    """Who is inside a pause, and whether the collector goes back on after the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.reenable = False
        self.keep = False
        self.swept: int | None = None  # frozen objects right after the first or last sweep
        self.swept_at = 0.0
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
    if (
        p.swept is not None
        and gc.get_freeze_count() > 2 * max(p.swept, MIN_SWEEP_BASE)
        and now - p.swept_at >= SWEEP_EVERY
    ):
        gc.unfreeze()
        gc.collect()
        p.sweeps += 1
        p.swept = None
    gc.freeze()
    if p.swept is None:
        p.swept, p.swept_at = gc.get_freeze_count(), now
