"""`frozen`: a dataclass that is frozen to the type checker and plain at run time.

`@dataclass(frozen=True)` makes `__init__` set every field through `object.__setattr__`,
about eight bytecodes per field against three for a plain assignment, and the waypoint
makes several such objects per request (codec events, the trace context): 165 of the 7,000
bytecodes a request executed. Immutability of these value objects is a contract checked
where it matters, by mypy, which treats a `@frozen` class as frozen (PEP 681).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar, dataclass_transform

T = TypeVar("T")


@dataclass_transform(frozen_default=True)
def frozen(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True, slots=True)` to the type checker; at run time the same
    slots dataclass without the frozen `__init__`, hashed by its fields like a frozen one."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
