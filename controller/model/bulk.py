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

Nothing is frozen afterwards. `gc.freeze()` would keep later collections from walking a
snapshot (in the controller benchmark, whose worker processes hold 25 agents' snapshots
each, the agents spent 25-26 s of CPU on the initial sync frozen, 30-34 s not), but it
also keeps every reference cycle alive at that moment from being collected once
dropped: tried, it held a gRPC poller thread of a channel alive at a waypoint's first
config for good (a test that counts threads caught it), and an attack pass counted an
asyncio task and ~75 objects kept per agent reconnect. A process holding one snapshot
pays one full collection after a full snapshot (about 0.1 s at 10,000 workloads), and
full snapshots are rare (start, a reconnect to a new controller epoch); later ones only
when the long-lived heap has grown by a quarter.
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


_pause = _Pause()


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection while the block runs (reference counting goes on)."""
    p = _pause
    with p.lock:
        if p.users == 0:
            p.reenable = gc.isenabled()
            gc.disable()
        p.users += 1
    try:
        yield
    finally:
        with p.lock:
            p.users -= 1
            if p.users == 0 and p.reenable:
                gc.enable()
