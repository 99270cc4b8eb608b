"""A handle on one pinned map: bytes in, bytes out, per-CPU values summed on request."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from agent.datapath import bpfsys


@dataclass
class Map:
    name: str
    fd: int
    type: int
    key_size: int
    value_size: int

    @property
    def percpu(self) -> bool:
        return self.type in bpfsys.PERCPU_MAP_TYPES

    @property
    def _stored_value_size(self) -> int:
        # Per-CPU lookups return one 8-byte-aligned slot per possible CPU.
        if self.percpu:
            return ((self.value_size + 7) // 8 * 8) * bpfsys.possible_cpus()
        return self.value_size

    def get(self, key: bytes) -> bytes | None:
        return bpfsys.map_lookup(self.fd, key, self._stored_value_size)

    def get_percpu_sum(self, key: bytes) -> int:
        """Sum of a per-CPU u64 value over every CPU (0 when absent)."""
        raw = self.get(key)
        if raw is None:
            return 0
        return sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))

    def put(self, key: bytes, value: bytes, flags: int = bpfsys.ANY) -> None:
        bpfsys.map_update(self.fd, key, value, flags)

    def delete(self, key: bytes) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def all_keys(self) -> list[bytes]:
        return list(bpfsys.map_keys(self.fd, self.key_size))

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        for key in self.all_keys():
            value = self.get(key)
            if value is not None:  # deleted since the walk listed it
                yield key, value

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
