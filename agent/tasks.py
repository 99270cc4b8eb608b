"""Owning a process's background tasks (the node agent's, a waypoint's): none started
without a keeper, none lost.

Every task the agent (or a waypoint) starts goes through a TaskOwner: it is named, kept
until it ends, and awaited when cancelled. A task that ends with an exception is logged with its
traceback at once. An *essential* one (the control loops: config stream, reconcile,
readiness, certificate renewal, flow export) also calls `on_failure`, which for the
agent means: not ready, stop as on SIGTERM (drain included), then exit non-zero. A loop
that died quietly would leave the node running on a stale config or expired
certificates while reporting ready.

Why not asyncio.TaskGroup: a failing child makes a TaskGroup cancel every other task at
once, but the agent must stop in order (release the data path, close the listeners,
keep the config stream while draining the tunnel) and a crash should take the same path
as a SIGTERM. TaskOwner keeps the other half of the TaskGroup contract: nothing it
started outlives `cancel`, and cancellation of the caller itself is never swallowed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from controller.errors import WeftError

log = logging.getLogger("weft.agent")


class TaskFailed(WeftError):
    """An essential background task of the agent (or a waypoint) ended with an error."""

    def __init__(self, name: str, error: BaseException, process: str = "agent") -> None:
        super().__init__(
            f"the {process} stopped because its {name!r} task failed: {error!r}",
            hint=f"the traceback is in the {process}'s log; "
            + (
                "the node keeps its data path, and a restarted agent takes it over"
                if process == "agent"
                else "its replicas (or a restarted one) take its traffic"
            ),
        )
        self.name = name
        self.error = error


class TaskOwner:
    def __init__(self, on_failure: Callable[[TaskFailed], None], process: str = "agent") -> None:
        self.on_failure = on_failure
        self.process = process
        self._tasks: dict[asyncio.Task[Any], bool] = {}  # task -> essential

    def start(
        self, coro: Coroutine[Any, Any, Any], name: str, *, essential: bool = True
    ) -> asyncio.Task[Any]:
        """Run `coro` as a task named `name`. A failure of an essential task stops the
        agent; a failure of any task is logged with its traceback."""
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:  # no running loop: never started, so never "never awaited"
            coro.close()
            raise
        self._tasks[task] = essential
        task.add_done_callback(self._finished)
        return task

    def running(self) -> list[str]:
        """Names of the tasks not yet ended."""
        return [t.get_name() for t in self._tasks]

    async def cancel(self, *, keep: Collection[str] = ()) -> None:
        """Cancel every task not named in `keep` and wait until they have ended; their
        failures were already reported as they ended."""
        tasks = [t for t in self._tasks if t.get_name() not in keep]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks)  # raises only if *this* task is cancelled

    def _finished(self, task: asyncio.Task[Any]) -> None:
        essential = self._tasks.pop(task, False)
        if task.cancelled():
            return
        error = task.exception()
        if error is None:
            return
        log.error("task %r failed", task.get_name(), exc_info=error)
        if essential:
            self.on_failure(TaskFailed(task.get_name(), error, self.process))
