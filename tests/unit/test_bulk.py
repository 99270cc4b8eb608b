"""controller/model/bulk.py: the cyclic collector paused around bulk decoding."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest

from controller.model import bulk
from controller.model.bulk import collector_paused


@pytest.fixture(autouse=True)
def _collector_restored():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_the_collector_is_off_inside_and_back_on_after_nested_use():
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the outer user still holds it
    assert gc.isenabled()


def test_a_collector_switched_off_by_someone_else_stays_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()


def test_an_exception_inside_still_switches_it_back_on():
    gc.enable()
    with pytest.raises(ValueError), collector_paused():
        raise ValueError("bad resource")
    assert gc.isenabled()


def test_threads_overlapping_leave_it_on_only_when_the_last_one_leaves():
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with collector_paused():
            inside.set()
            release.wait(5)

    t = threading.Thread(target=other)
    t.start()
    assert inside.wait(5)
    with collector_paused():
        pass
    assert not gc.isenabled()  # the other thread is still decoding
    release.set()
    t.join(5)
    assert gc.isenabled()


class Node:
    """A cycle's member, weakly referenceable."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture
def fresh(monkeypatch):
    gc.collect()
    gc.unfreeze()
    monkeypatch.setattr(bulk, "_pause", bulk._Pause())
    yield bulk._pause
    gc.unfreeze()
    gc.collect()


def test_keep_moves_what_is_alive_out_of_later_collections(fresh):
    gc.enable()
    with collector_paused(keep=True):
        kept = [Node() for _ in range(2_000)]
    assert gc.get_freeze_count() >= len(kept)
    assert gc.isenabled()
    # Frozen objects are still freed by reference counting (a replaced snapshot is).
    ref = weakref.ref(kept[0])
    kept.clear()
    assert ref() is None


def test_a_failed_block_freezes_nothing(fresh):
    with pytest.raises(ValueError), collector_paused(keep=True):
        raise ValueError("a bad snapshot")
    assert gc.get_freeze_count() == 0


def test_a_cycle_frozen_and_dropped_is_collected_by_the_next_sweep(fresh, monkeypatch):
    gc.enable()
    a, b = Node(), Node()
    a.other, b.other = b, a
    held = weakref.ref(a)
    with collector_paused(keep=True):  # the first keep sweeps, then freezes the live cycle
        pass
    assert fresh.sweeps == 1
    del a, b  # dropped after it was frozen
    gc.collect()
    assert held() is not None  # frozen: the collector does not see it
    with collector_paused(keep=True):  # within SWEEP_EVERY: no sweep
        pass
    assert fresh.sweeps == 1 and held() is not None
    monkeypatch.setattr(bulk, "SWEEP_EVERY", 0.0)
    with collector_paused(keep=True):
        pass
    assert fresh.sweeps == 2
    assert held() is None  # swept
