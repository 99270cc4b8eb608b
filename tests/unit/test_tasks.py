"""The node agent's background tasks are owned (agent/tasks.py): a crash surfaces, a
cancel waits for the end, and the agent stops and fails when a control loop dies."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.tasks import TaskFailed, TaskOwner


def test_a_crashing_essential_task_is_logged_with_its_traceback_and_reported(caplog) -> None:
    """The failure reaches on_failure, named, and the log carries the traceback."""
    failures: list[TaskFailed] = []

    async def loop() -> None:
        await asyncio.sleep(0)
        raise KeyError("gone")

    async def main() -> None:
        owner = TaskOwner(failures.append)
        owner.start(loop(), "reconcile")
        await asyncio.sleep(0.05)
        assert owner.running() == []

    with caplog.at_level(logging.ERROR, "weft.agent"):
        asyncio.run(main())
    (failure,) = failures
    assert failure.name == "reconcile" and isinstance(failure.error, KeyError)
    assert "'reconcile'" in str(failure)
    (record,) = caplog.records
    assert record.exc_info is not None and record.exc_info[0] is KeyError


def test_a_failed_helper_task_is_logged_but_does_not_stop_the_agent(caplog) -> None:
    """essential=False: a one-shot helper's error is logged, not fatal."""
    failures: list[TaskFailed] = []

    async def main() -> None:
        owner = TaskOwner(failures.append)
        owner.start(asyncio.to_thread(int, "x"), "revoke-spliced", essential=False)
        for _ in range(1000):  # until it has ended in its thread, however late: 10 s or more
            if not owner.running():
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.ERROR, "weft.agent"):
        asyncio.run(main())
    assert failures == []
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ValueError]


def test_cancel_waits_for_each_task_to_end_and_keeps_the_named_ones() -> None:
    """A cancelled task's cleanup has run when cancel returns; `keep` survives."""
    cleaned: list[str] = []

    async def loop(name: str) -> None:
        try:
            await asyncio.sleep(60)
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            cleaned.append(name)

    async def main() -> None:
        owner = TaskOwner(lambda f: pytest.fail(str(f)))
        for name in ("config", "reconcile", "readiness"):
            owner.start(loop(name), name)
        await asyncio.sleep(0)
        await owner.cancel(keep={"config"})
        assert sorted(cleaned) == ["readiness", "reconcile"]
        assert owner.running() == ["config"]
        await owner.cancel()
        assert owner.running() == []

    asyncio.run(main())


def test_a_crash_in_the_reconcile_loop_makes_the_agent_unready_stop_and_fail(caplog) -> None:
    """Agent._reconcile_loop dying does not vanish: the agent turns not ready, asks to
    stop as on SIGTERM, and keeps the failure that `run` raises (exit non-zero)."""
    from agent.main import Agent
    from agent.settings import AgentSettings

    async def main() -> Agent:
        agent = Agent(AgentSettings(node="n", node_ip="10.0.0.1", reconcile_interval=0.01))
        agent.ready = True

        def broken() -> None:
            raise RuntimeError("gauge exploded")

        agent.refresh_gauges = broken  # type: ignore[method-assign]
        agent.tasks.start(agent._reconcile_loop(), "reconcile")
        await asyncio.wait_for(agent.stop_requested.wait(), 5)
        return agent

    with caplog.at_level(logging.ERROR, "weft.agent"):
        agent = asyncio.run(main())
    assert not agent.ready
    assert agent.failure is not None and agent.failure.name == "reconcile"
    assert "gauge exploded" in str(agent.failure)
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)
