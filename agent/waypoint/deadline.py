"""`Deadline`: asyncio.timeout for the request path, with one timer per try.

A request through the waypoint waits twice under a timeout: for the response head (the
per-try timeout, bounded by the route's deadline) and then for each piece of the response
(an idle timeout that restarts on every byte received, so a long generation is never cut
while tokens arrive). With asyncio.timeout that was two Timeout objects per request and,
while streaming, a cancelled and re-created timer each time the deadline moved: a few
percent of the waypoint's CPU per request in a cProfile of the lab's waypoint.

Here one timer serves the whole try (a LazyTimer, below). Moving the deadline later only
stores the new time; when the timer fires early it re-arms itself for what is left (the
way Envoy and nginx keep idle timeouts). When it expires it cancels the task, as
asyncio.timeout does, and `expired()` (asked where the CancelledError is caught) tells
that cancellation apart from one that came from elsewhere and consumes it, so the caller
raises or handles a timeout.

    dl = Deadline()
    dl.arm(loop.time() + 5)
    try:
        head = await events.next()
    except asyncio.CancelledError:
        if not dl.expired():
            raise
        ...  # timed out
    finally:
        dl.close()
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

RESOLUTION = 0.001  # seconds: a deadline this close is due (uvloop's clock is in ms)


class LazyTimer:
    """One loop timer for a deadline that mostly moves later (an idle timeout restarting
    with each byte or request). Moving it later only stores the new time; when the timer
    fires early it re-arms itself for what is left. When the deadline is reached, `_due()`
    runs once (here: the `on_due` given; Deadline cancels its task instead).

    Used by Deadline (a request's try) and by a downstream connection (its head and idle
    timeouts): a new loop timer and a cancellation per request cost more than the rest of
    the timeout handling."""

    __slots__ = ("_at", "_handle", "_on_due", "loop", "when")

    def __init__(
        self,
        on_due: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._on_due = on_due
        # The armed timer and the loop time it was set for (kept here: for a delay under
        # half a millisecond uvloop returns a plain Handle, which has no when()).
        self._handle: asyncio.Handle | None = None
        self._at = 0.0
        self.when: float | None = None  # loop time of the deadline; None: disarmed

    def arm(self, when: float | None) -> None:
        """Due at loop time `when` (None: not at all, until armed again). A later time
        costs an assignment; an earlier one re-arms the timer."""
        self.when = when
        if when is None:
            return
        h = self._handle
        if h is None or self._at > when:
            if h is not None:
                h.cancel()
            self._at = when
            self._handle = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        when = self.when
        if when is None:
            return
        if when - self.loop.time() > RESOLUTION:
            self._at = when
            self._handle = self.loop.call_at(when, self._fire)
            return
        # Due, or due within the loop's timer resolution: uvloop keeps time in whole
        # milliseconds and may fire up to half of one early; re-arming for the rest would
        # spin through call_soon until the clock ticks.
        self.when = None
        self._due()

    def _due(self) -> None:
        if self._on_due is not None:
            self._on_due()

    def close(self) -> None:
        """No longer waiting: the timer is cancelled."""
        self.when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Deadline(LazyTimer):
    __slots__ = ("_cancelling", "_fired", "_task")

    def __init__(self) -> None:
        super().__init__()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("Deadline must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._fired = False

    def _due(self) -> None:
        if not self._fired:
            self._fired = True
            self._task.cancel()

    def expired(self) -> bool:
        """Called with a CancelledError in hand: True when this deadline cancelled the task
        (and no one else did), in which case the cancellation is consumed."""
        if self._fired:
            self._fired = False
            self.when = None
            if self._task.uncancel() <= self._cancelling:
                return True
        return False

    def close(self) -> None:
        """Done waiting under this deadline: the timer is cancelled. If it had cancelled
        the task and no one took that as a timeout (expired()), its count is taken back
        with uncancel(), as asyncio.timeout does on exit (on 3.11 a cancellation not yet
        delivered still arrives at the next await, with asyncio.timeout too)."""
        if self._fired:
            self._fired = False
            self._task.uncancel()
        super().close()
