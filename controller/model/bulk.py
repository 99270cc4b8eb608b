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

With `tenure=True` (a full snapshot that now serves), what is alive when the pause ends
is moved straight into the oldest generation (`gc.freeze()` then `gc.unfreeze()`, which
puts the frozen objects back "into the oldest generation", as the gc module documents).
Otherwise the new snapshot is walked by a young collection, then by a middle one, and
counted as newly long-lived, which starts a full collection of the whole heap (about
0.1 s at 10,000 workloads; in the controller benchmark, whose worker processes hold 25
agents' snapshots each, those full collections walked all of them again and again).
Tenured objects stay collectable: a cycle among them is found by the next full
collection, which the process's other allocations start as usual. (Leaving them frozen
was tried and taken out: a cycle alive at that moment and dropped later was never
collected; a test counting threads caught a gRPC poller thread held for good.) The
freeze/unfreeze pair would also unfreeze anything someone else froze: nothing in weft
freezes.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator


class _Pause:
    """Who is inside a pause, and whether the collector goes back on after the last."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.reenable = False
        self.tenure = False


_pause = _Pause()


@contextlib.contextmanager
def collector_paused(*, tenure: bool = False) -> Iterator[None]:
    """No cyclic garbage collection while the block runs (reference counting goes on).
    With `tenure`, what is alive when the last pause ends goes straight to the oldest
    generation (a snapshot that now serves is long-lived)."""
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
            p.tenure = p.tenure or (tenure and ok)
            if p.users == 0:
                if p.tenure:
                    p.tenure = False
                    # freeze moves every tracked object to the permanent generation,
                    # unfreeze puts them all in the oldest one (documented), without
                    # counting them as newly long-lived.
                    gc.freeze()
                    gc.unfreeze()
                if p.reenable:
                    gc.enable()
