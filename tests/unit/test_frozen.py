"""agent/frozen.py: value classes frozen to mypy, plain slots dataclasses at run time."""

from __future__ import annotations

from agent.frozen import frozen
from agent.waypoint.codec.events import Data, RequestHead
from agent.waypoint.codec.headers import Headers


def test_a_frozen_class_compares_and_hashes_by_its_fields_and_has_no_dict():
    """What code may rely on from a frozen dataclass still holds: equality and hash by
    fields (usable as a key), slots and no instance dict; only the frozen __init__'s
    object.__setattr__ per field is gone."""

    @frozen
    class P:
        a: int
        b: bytes

    assert P(1, b"x") == P(1, b"x") != P(2, b"x")
    assert hash(P(1, b"x")) == hash(P(1, b"x"))
    assert {P(1, b"x"): 1}[P(1, b"x")] == 1
    assert not hasattr(P(1, b"x"), "__dict__")
    assert Data(1, b"x", True) == Data(1, b"x", True)
    h = Headers()
    assert RequestHead(1, "GET", "/", "a", "http", h, True).headers is h
    assert "__setattr__" not in P.__init__.__code__.co_names  # a plain __init__
