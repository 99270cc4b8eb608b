"""Istio's request metrics for the waypoint, as plain numbers rendered at scrape time.

`istio_requests_total` and the three histograms (`istio_request_duration_milliseconds`,
`istio_request_bytes`, `istio_response_bytes`) are updated once per request. Through
prometheus_client that is a counter and three histograms, each with a lock and a few
calls per observation: about a tenth of the waypoint's Python work per request in a
profile of the lab (make bench, 2026-12-06). Here a request is one dict lookup, three
bisections and a few integer additions on the event loop's thread, which is also the
thread that renders a scrape (the metrics endpoint is served by the same loop), so no
lock is needed. The exposition is the same: same names, labels and buckets.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_version",
    "destination_principal",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
    "connection_security_policy",
    "source_canonical_service",
    "source_canonical_revision",
    "destination_canonical_service",
    "destination_canonical_revision",
)
# Istio's default buckets for istio_request_duration_milliseconds.
DURATION_MS = (
    0.5,
    1,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
    60000,
    300000,
    600000,
    1800000,
    3600000,
)
SIZE_BYTES = tuple(10.0**k for k in range(1, 9))


class Series:
    """One label set's numbers. `record` is the per-request call."""

    __slots__ = ("count", "dur", "dur_sum", "labels", "req", "req_sum", "resp", "resp_sum")

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self.count = 0
        self.dur = [0] * (len(DURATION_MS) + 1)  # per bucket, the last one +Inf
        self.dur_sum = 0.0
        self.req = [0] * (len(SIZE_BYTES) + 1)
        self.req_sum = 0.0
        self.resp = [0] * (len(SIZE_BYTES) + 1)
        self.resp_sum = 0.0

    def record(self, duration_ms: float, bytes_in: int, bytes_out: int) -> None:
        self.count += 1
        self.dur[bisect_left(DURATION_MS, duration_ms)] += 1
        self.dur_sum += duration_ms
        self.req[bisect_left(SIZE_BYTES, bytes_in)] += 1
        self.req_sum += bytes_in
        self.resp[bisect_left(SIZE_BYTES, bytes_out)] += 1
        self.resp_sum += bytes_out


class RequestMetrics:
    """A prometheus_client collector (register it) holding every label set's Series."""

    def __init__(self) -> None:
        self.series: dict[tuple[str, ...], Series] = {}

    def series_for(self, labels: tuple[str, ...]) -> Series:
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = Series(labels)
        return s

    def collect(self) -> Iterator[Any]:
        series = list(self.series.values())
        total = CounterMetricFamily(
            "istio_requests", "Requests through the waypoint.", labels=REQUEST_LABELS
        )
        for s in series:
            total.add_metric(s.labels, s.count)
        yield total
        for name, doc, bounds, counts, sums in (
            (
                "istio_request_duration_milliseconds",
                "Request duration at the waypoint (ms).",
                DURATION_MS,
                "dur",
                "dur_sum",
            ),
            ("istio_request_bytes", "Request body sizes (bytes).", SIZE_BYTES, "req", "req_sum"),
            (
                "istio_response_bytes",
                "Response body sizes (bytes).",
                SIZE_BYTES,
                "resp",
                "resp_sum",
            ),
        ):
            h = HistogramMetricFamily(name, doc, labels=REQUEST_LABELS)
            for s in series:
                h.add_metric(s.labels, _cumulative(bounds, getattr(s, counts)), getattr(s, sums))
            yield h

    def describe(self) -> list[Any]:
        return []


def _cumulative(bounds: Sequence[float], counts: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    acc = 0
    for b, n in zip(bounds, counts, strict=False):
        acc += n
        out.append((_le(b), acc))
    out.append(("+Inf", acc + counts[-1]))
    return out


def _le(b: float) -> str:
    # prometheus_client's own formatting of bucket bounds (floatToGoString): 0.5, 1.0, 1e+06
    from prometheus_client.utils import floatToGoString

    return str(floatToGoString(b))
