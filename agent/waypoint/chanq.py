"""`Channel`: a lean queue from a protocol callback to the one task that reads it.

asyncio.Queue is general (many getters and putters, maxsize, task accounting): in a
cProfile of the waypoint on the lab (2026-12-06) it was 48 Python calls and 4 % of the
waypoint's Python time per request. A request's body and its backend stream's events
(upstream.StreamEvents, a subclass that also keeps the stream's flow control) each have
exactly one producer (a protocol's data_received) and one consumer (the request's task):
a deque and one waiting future are enough.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from typing import Final, Generic, TypeVar

T = TypeVar("T")


class Empty(enum.Enum):
    EMPTY = enum.auto()


EMPTY: Final = Empty.EMPTY  # what Channel.poll returns when nothing is queued


class Channel(Generic[T]):
    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> int:
        """Queue `item` (waking the reader); how many items are queued now."""
        items = self._items
        items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)
        return len(items)

    async def get(self) -> T:
        items = self._items
        while not items:
            w = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await w
            finally:
                if self._waiter is w:
                    self._waiter = None
        return items.popleft()

    def poll(self) -> T | Empty:
        """The oldest item, or EMPTY when there is none (one call, no exception)."""
        items = self._items
        return items.popleft() if items else EMPTY

    def qsize(self) -> int:
        return len(self._items)
