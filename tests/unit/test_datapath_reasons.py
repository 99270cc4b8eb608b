"""The codes user space shares with the C programs match, number for number."""

from __future__ import annotations

import re
from enum import IntEnum
from pathlib import Path

import pytest

from agent.datapath.reasons import Counter, DropReason

LIB = Path(__file__).resolve().parents[2] / "bpf" / "lib"


def c_enum(header: str, enum: str, prefix: str) -> dict[str, int]:
    text = (LIB / header).read_text()
    body = re.search(rf"enum {enum} \{{(.*?)\}};", text, re.S)
    assert body, f"enum {enum} not found in bpf/lib/{header}"
    return {
        m.group(1): int(m.group(2))
        for m in re.finditer(rf"\b{prefix}(\w+)\s*=\s*(\d+)", body.group(1))
    }


@pytest.mark.parametrize(
    ("header", "enum", "prefix", "py"),
    [
        ("drop.h", "weft_drop_reason", "WEFT_DROP_", DropReason),
        ("counters.h", "weft_counter", "WEFT_CTR_", Counter),
    ],
    ids=["drop-reasons", "counters"],
)
def test_python_enum_mirrors_c_enum(header, enum, prefix, py: type[IntEnum]):
    """Every C code has a Python member of the same name and number, and vice versa."""
    c = c_enum(header, enum, prefix)
    assert c, f"no codes parsed from {header}"
    assert {m.name: m.value for m in py} == c


def test_every_c_code_is_explicitly_numbered():
    """Append-only codes must be numbered by hand, so reordering can never renumber one."""
    text = (LIB / "drop.h").read_text()
    body = re.search(r"enum weft_drop_reason \{(.*?)\};", text, re.S)
    assert body
    for line in body.group(1).splitlines():
        name = re.match(r"\s*(WEFT_DROP_\w+)", line)
        if name:
            assert "=" in line, f"{name.group(1)} has no explicit number"


def test_drop_reason_labels_are_stable():
    assert DropReason.NOT_FROM_TUNNEL.label == "not_from_tunnel"
