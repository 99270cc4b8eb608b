"""Deadline (agent/waypoint/deadline.py): asyncio.timeout's behaviour with one lazy timer.

Each test runs a task under a deadline on a real event loop with short times; they assert
what happened (expired or not, which cancellation reached whom), never how long it took.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from agent.waypoint.deadline import RESOLUTION, Deadline


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Each test on the stdlib loop and on uvloop (the waypoint's), whose timers differ:
    millisecond clock, and a plain Handle for a delay under half a millisecond."""
    return asyncio.run if request.param == "asyncio" else uvloop.run


async def expires(dl: Deadline) -> bool:
    """Wait far longer than any deadline here: True when `dl` ended the wait."""
    try:
        await asyncio.sleep(5)
    except asyncio.CancelledError:
        return dl.expired()
    finally:
        dl.close()
    return False


def test_a_wait_past_the_deadline_is_cancelled_and_reported_as_expired(run):
    """The timer cancels the waiting task; expired() says it was the deadline and consumes
    the cancellation (the task is not left cancelling)."""

    async def main():
        dl = Deadline()
        dl.arm(asyncio.get_running_loop().time() + 0.01)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert dl.expired()
            task = asyncio.current_task()
            assert task is not None and task.cancelling() == 0
            return "timed out"
        finally:
            dl.close()
        return "finished"

    assert run(main()) == "timed out"


def test_moving_the_deadline_later_keeps_a_busy_stream_alive(run):
    """Re-arming later on every event (an idle timeout) never fires while events come
    faster than the timeout, although the first timer was set for the first deadline."""

    async def main():
        dl = Deadline()
        loop = asyncio.get_running_loop()
        due = 0.0
        try:
            for _ in range(20):
                due = loop.time() + 0.05
                dl.arm(due)
                await asyncio.sleep(0.01)  # 0.2 s in all, four times the idle timeout
        except asyncio.CancelledError:
            if dl.expired():
                # A loop stalled for a whole timeout between two events may really see it
                # pass; what must never happen is a cut before the latest deadline (at the
                # first one, say).
                return "cut early" if loop.time() < due - RESOLUTION else "stalled past it"
            raise
        finally:
            dl.close()
        return "kept"

    assert run(main()) in ("kept", "stalled past it")


def test_an_idle_stream_expires_after_the_last_move(run):
    async def main():
        dl = Deadline()
        loop = asyncio.get_running_loop()
        dl.arm(loop.time() + 0.05)
        await asyncio.sleep(0.01)
        dl.arm(loop.time() + 0.05)  # moved later: stored, the first timer re-arms itself
        return await expires(dl)

    assert run(main()) is True


def test_an_earlier_deadline_re_arms_the_timer(run):
    async def main():
        dl = Deadline()
        loop = asyncio.get_running_loop()
        dl.arm(loop.time() + 60)
        dl.arm(loop.time() + 0.01)
        return await expires(dl)

    assert run(main()) is True


def test_a_disarmed_or_closed_deadline_never_cancels(run):
    """arm(None) (between the response head and the stream) and close() leave the task
    alone even when the old timer comes due."""

    async def main():
        dl = Deadline()
        loop = asyncio.get_running_loop()
        dl.arm(loop.time() + 0.01)
        dl.arm(None)
        await asyncio.sleep(0.05)
        dl.arm(loop.time() + 0.01)
        dl.close()
        await asyncio.sleep(0.05)
        return "alive"

    assert run(main()) == "alive"


def test_a_cancellation_from_elsewhere_is_not_taken_for_a_timeout(run):
    """The caller's own cancel (the connection went away) passes through: expired() is
    False and the task ends cancelled, as with asyncio.timeout."""

    async def victim():
        dl = Deadline()
        dl.arm(asyncio.get_running_loop().time() + 60)
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            assert not dl.expired()
            raise
        finally:
            dl.close()

    async def main():
        t = asyncio.get_running_loop().create_task(victim())
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    run(main())


def test_a_deadline_needs_a_task():
    with pytest.raises(RuntimeError):
        Deadline()


def test_a_deadline_already_spent_can_be_moved_and_expires_without_spinning(run):
    """A response head that arrives when the route's time is used up arms the deadline in
    the past (uvloop schedules that as a plain Handle, without when()); moving it again
    must work, and it expires once rather than re-arming itself while the millisecond
    clock catches up."""

    class Counting(Deadline):
        fired = 0

        def _fire(self) -> None:
            self.fired += 1
            super()._fire()

    async def main():
        dl = Counting()
        loop = asyncio.get_running_loop()
        dl.arm(loop.time() - 0.001)
        dl.arm(loop.time() + 0.0004)  # moved: within the clock's resolution
        expired = await expires(dl)
        return expired, dl.fired

    expired, fired = run(main())
    assert expired
    assert fired <= 2


def test_a_lazy_timer_calls_back_once_at_its_last_deadline_and_not_after_close(run):
    """LazyTimer with a callback (a downstream connection's head and idle timeouts): moved
    later while waiting, it calls back once, at the later time; disarmed (None) or closed,
    never."""

    async def main():
        from agent.waypoint.deadline import LazyTimer

        loop = asyncio.get_running_loop()
        calls: list[float] = []
        t = LazyTimer(lambda: calls.append(loop.time()))
        start = loop.time()
        t.arm(start + 0.02)  # the loop timer is set for this
        t.arm(start + 0.08)  # moved later before it is due, however slow the loop: stored
        await asyncio.sleep(0.15)
        fired_once = len(calls) == 1 and calls[0] >= start + 0.08 - 0.002
        quiet = LazyTimer(lambda: calls.append(-1.0))
        quiet.arm(loop.time() + 0.01)
        quiet.arm(None)
        closed = LazyTimer(lambda: calls.append(-2.0))
        closed.arm(loop.time() + 0.01)
        closed.close()
        await asyncio.sleep(0.05)
        return fired_once, calls[1:]

    assert run(main()) == (True, [])
