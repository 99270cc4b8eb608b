"""The waypoint's request metrics (agent/waypoint/reqmetrics.py) expose exactly what
prometheus_client's own Counter and Histograms expose for the same observations."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.waypoint.reqmetrics import DURATION_MS, REQUEST_LABELS, SIZE_BYTES, RequestMetrics


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.endswith("_created"):
                continue  # prometheus_client's creation timestamps: not part of the data
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_the_exposition_matches_prometheus_clients_for_the_same_observations():
    """Same names, labels, cumulative buckets (bounds included: a value on a bound counts
    in it), counts and sums as a Counter and three Histograms given the same requests."""
    ours = CollectorRegistry()
    m = RequestMetrics()
    ours.register(m)
    theirs = CollectorRegistry()
    total = Counter(
        "istio_requests", "Requests through the waypoint.", REQUEST_LABELS, registry=theirs
    )
    dur = Histogram(
        "istio_request_duration_milliseconds",
        "Request duration at the waypoint (ms).",
        REQUEST_LABELS,
        buckets=DURATION_MS,
        registry=theirs,
    )
    req = Histogram(
        "istio_request_bytes",
        "Request body sizes (bytes).",
        REQUEST_LABELS,
        buckets=SIZE_BYTES,
        registry=theirs,
    )
    resp = Histogram(
        "istio_response_bytes",
        "Response body sizes (bytes).",
        REQUEST_LABELS,
        buckets=SIZE_BYTES,
        registry=theirs,
    )
    rng = random.Random(7)
    label_sets = [tuple(f"{n}-{i}" for n in REQUEST_LABELS) for i in range(3)]
    for _ in range(500):
        labels = rng.choice(label_sets)
        ms = rng.choice([0.5, 1, 4.99, 5, 250, 3600000, 5e6, rng.random() * 100])
        bin_, bout = rng.choice([0, 10, 11, 1024, 10**8, 10**9]), rng.randrange(0, 20000)
        m.series_for(labels).record(ms, bin_, bout)
        total.labels(*labels).inc()
        dur.labels(*labels).observe(ms)
        req.labels(*labels).observe(bin_)
        resp.labels(*labels).observe(bout)
    a, b = _samples(generate_latest(ours)), _samples(generate_latest(theirs))
    assert a.keys() == b.keys()
    for k, v in b.items():
        assert abs(a[k] - v) <= 1e-6 * max(1.0, abs(v)), k
