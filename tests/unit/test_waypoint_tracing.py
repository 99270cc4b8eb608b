"""Trace context ids and traceparent formatting (agent/waypoint/tracing.py)."""

from __future__ import annotations

import re

from agent.waypoint.tracing import TraceContext, new_span_id, random_hex, traceparent

TP = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


def test_a_new_trace_has_a_random_128_bit_id() -> None:
    a = TraceContext.from_headers(None, None)
    b = TraceContext.from_headers(b"", b"x=1")
    assert re.fullmatch("[0-9a-f]{32}", a.trace_id) and a.trace_id != b.trace_id
    assert (a.parent_id, a.sampled, a.tracestate) == (None, True, None)
    assert b.tracestate is None  # no traceparent: the caller's tracestate is not kept


def test_a_callers_trace_is_continued() -> None:
    t = TraceContext.from_headers(
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00", b"k=v"
    )
    assert t == TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", False, "k=v")


def test_invalid_traceparents_start_a_new_trace() -> None:
    for bad in (
        b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        b"00-00000000000000000000000000000000-b7ad6b7169203331-01",
        b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
    ):
        t = TraceContext.from_headers(bad, None)
        assert t.parent_id is None and t.trace_id != "0af7651916cd43dd8448eb211c80319c"


def test_child_traceparent_names_a_new_span_of_the_trace() -> None:
    t = TraceContext("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", False)
    first, second = t.child_traceparent(), t.child_traceparent()
    m = TP.fullmatch(first)
    assert m is not None and m.group(1) == t.trace_id.encode() and m.group(3) == b"00"
    assert m.group(2) != b"b7ad6b7169203331" and first != second
    sampled = TraceContext(t.trace_id, None, True).child_traceparent()
    assert sampled.endswith(b"-01")
    # The same format as traceparent() with a new span id.
    assert TP.fullmatch(traceparent(t.trace_id, new_span_id(), True))


def test_random_ids_are_lowercase_hex_of_their_width() -> None:
    assert re.fullmatch("[0-9a-f]{16}", new_span_id())
    assert re.fullmatch("[0-9a-f]{32}", random_hex(128))
    assert re.fullmatch("[0-9a-f]{8}", random_hex(32))
