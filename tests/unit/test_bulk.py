"""controller/model/bulk.py: the cyclic collector paused around bulk decoding."""

from __future__ import annotations

import gc
import threading

import pytest

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


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_tenure_puts_what_is_alive_in_the_oldest_generation_still_collectable():
    import weakref

    gc.enable()
    with collector_paused(tenure=True):
        a, b = _Node(), _Node()
        a.other, b.other = b, a  # a cycle alive when the pause ends
    assert gc.get_freeze_count() == 0  # nothing stays frozen
    assert any(o is a for o in gc.get_objects(generation=2))
    assert not any(o is a for o in gc.get_objects(generation=0))
    held = weakref.ref(a)
    del a, b
    gc.collect()  # a full collection finds the dropped cycle
    assert held() is None


def test_a_failed_block_tenures_nothing():
    gc.enable()
    with pytest.raises(ValueError), collector_paused(tenure=True):
        c = _Node()
        raise ValueError("a bad snapshot")
    assert not any(o is c for o in gc.get_objects(generation=2))
