"""`Channel`: a lean queue from a protocol callback to the one task that reads it.

asyncio.Queue is general (many getters and putters, maxsize, task accounting): in a
cProfile of the waypoint on the lab (2026-12-06) it was 48 Python calls and 4 % of the
waypoint's Python time per request. A request's body has exactly one producer (the
caller connection's data_received) and one consumer (the request's task): a deque and
one waiting future are enough. (The backend stream's events have their own receiver of
the same shape, upstream.StreamEvents, which also keeps the stream's flow control.)
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Channel(Generic[T]):
    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

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

    def get_nowait(self) -> T:
        """The oldest item; IndexError when there is none (check qsize first)."""
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)
