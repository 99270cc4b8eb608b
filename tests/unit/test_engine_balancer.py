"""Load balancers: who gets the next try, under load, latency, weights and consistent hashing."""

from __future__ import annotations

import random
from collections import Counter

from agent.waypoint.codec.headers import Headers
from agent.waypoint.engine import Attempt, Endpoint, Engine, Forward, hash64, make_balancer
from agent.waypoint.engine.balancer import Balancer
from tests.enginetesting import FakeClock, address, backend_policy, service, snapshot

LLM = ("ai", "llm")


def policy(lb: str) -> str:
    return backend_policy("llm", f"loadBalancer: {lb}")


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}", 8000) for i in range(n)]


def balancer(kind: str, eps: list[Endpoint], **kw: int) -> Balancer:
    b = make_balancer(kind, random.Random(3), **kw)
    b.rebuild(eps)
    b.refresh([e for e in eps if e.available])
    return b


def test_round_robin_cycles_through_every_endpoint():
    """Round robin visits each endpoint once per cycle."""
    b = balancer("RoundRobin", endpoints(4))
    picks = [b.pick(None, 0.0).address for _ in range(8)]
    assert picks[:4] != picks[1:5] and sorted(picks[:4]) == sorted(picks[4:])
    assert len(set(picks[:4])) == 4


def test_power_of_two_choices_prefers_less_loaded_endpoints():
    """With one endpoint carrying 10 requests, P2C almost never picks it; it is only chosen
    when both draws land on it, which P2C's distinct draws rule out."""
    eps = endpoints(5)
    eps[0].active = 10
    eps[1].active = 5
    b = balancer("LeastRequest", eps)
    got = Counter(b.pick(None, 0.0).address for _ in range(5000))
    assert got[eps[0].address] == 0
    assert got[eps[1].address] < got[eps[2].address] / 2


def test_peak_ewma_reacts_to_a_slow_endpoint_at_once_and_forgives_it_as_it_decays():
    """One 2 s answer makes an endpoint lose every comparison; 60 s of quiet later its decayed
    estimate is below the others' default and it takes traffic again."""
    eps = endpoints(3)
    b = balancer("PeakEWMA", eps)
    for e in eps:
        e.observe_rtt(0.020, 0.0)
    eps[0].observe_rtt(2.0, 1.0)
    assert eps[0].rtt == 2.0  # the peak is taken at once
    assert eps[0].address not in {b.pick(None, 1.0).address for _ in range(500)}
    eps[1].observe_rtt(0.020, 61.0)
    eps[2].observe_rtt(0.020, 61.0)
    assert eps[0].cost(61.0) < 2.0 * 0.01
    later = Counter(b.pick(None, 61.0).address for _ in range(600))
    assert later[eps[0].address] > 0


def test_weighted_follows_the_weight_annotation():
    """Weighted balances by the weft.dev/weight annotation; weight 0 gets nothing."""
    e = Engine(
        snapshot(service("llm", weights=[1, 3, 0]), policy("{type: Weighted}")),
        rng=random.Random(5),
    )
    got: Counter[str] = Counter()
    for _ in range(8000):
        fwd = e.route(LLM, 8000, "GET", "/", Headers())
        assert isinstance(fwd, Forward)
        att = fwd.attempt()
        assert isinstance(att, Attempt)
        got[att.endpoint.address] += 1
        att.finish(200)
    assert got[address(2)] == 0 and 2.7 < got[address(1)] / got[address(0)] < 3.3


def consistent_map(kind: str, eps: list[Endpoint], keys: list[int]) -> dict[int, str]:
    b = balancer(kind, eps, **({"table_size": 4099} if kind == "Maglev" else {}))
    return {k: b.pick(k, 0.0).address for k in keys}


def test_ring_hash_and_maglev_are_stable_and_spread_keys():
    """One key always maps to one endpoint while the set is stable, the same from two
    independently built balancers (as two waypoint replicas), and keys spread evenly."""
    keys = [hash64(f"session-{i}".encode()) for i in range(4000)]
    for kind in ("RingHash", "Maglev"):
        first = consistent_map(kind, endpoints(8), keys)
        assert consistent_map(kind, endpoints(8), keys) == first
        load = Counter(first.values())
        assert len(load) == 8 and max(load.values()) < 2 * min(load.values()), (kind, load)


def test_one_endpoint_leaving_moves_only_its_keys():
    """Minimal disruption: when one of 8 endpoints becomes unavailable, only keys it owned
    move (~1/8), and they come back when it returns."""
    keys = [hash64(f"user-{i}".encode()) for i in range(4000)]
    for kind in ("RingHash", "Maglev"):
        eps = endpoints(8)
        b = balancer(kind, eps, **({"table_size": 4099} if kind == "Maglev" else {}))
        before = {k: b.pick(k, 0.0) for k in keys}
        eps[3].available = False
        b.refresh([e for e in eps if e.available])
        after = {k: b.pick(k, 0.0) for k in keys}
        moved = [k for k in keys if before[k] is not after[k]]
        assert all(before[k] is eps[3] for k in moved) and 0.08 < len(moved) / len(keys) < 0.18
        assert eps[3] not in after.values()
        eps[3].available = True
        b.refresh(eps)
        assert {k: b.pick(k, 0.0) for k in keys} == before


def test_maglev_table_rebuilt_without_an_endpoint_keeps_most_keys():
    """When an endpoint leaves the Service (a new config), Maglev's rebuilt table moves
    little more than that endpoint's share of keys."""
    keys = [hash64(f"k{i}".encode()) for i in range(4000)]
    eps = endpoints(10)
    before = consistent_map("Maglev", eps, keys)
    after = consistent_map("Maglev", eps[:4] + eps[5:], keys)
    moved = sum(1 for k in keys if before[k] != after[k])
    assert moved / len(keys) < 0.10 + 0.05  # ideal is 1/10


def test_consistent_hash_on_a_header_sends_one_value_to_one_endpoint():
    """RingHash on x-session-id: every request of one session reaches the same endpoint;
    a request without the header is still served."""
    e = Engine(
        snapshot(
            service("llm", pods=5),
            policy("{type: RingHash, consistentHash: {header: x-session-id}}"),
        ),
        clock=FakeClock(),
        rng=random.Random(1),
    )

    def pick(*headers: tuple[str, str]) -> str:
        fwd = e.route(LLM, 8000, "POST", "/v1/chat/completions", Headers.of(*headers))
        assert isinstance(fwd, Forward)
        att = fwd.attempt()
        assert isinstance(att, Attempt)
        att.finish(200)
        return att.endpoint.address

    assert len({pick(("x-session-id", "conv-42")) for _ in range(50)}) == 1
    assert len({pick(("x-session-id", f"conv-{i}")) for i in range(50)}) == 5
    assert pick() in {address(i) for i in range(5)}


def test_cookie_hash_with_ttl_mints_a_cookie_that_sticks():
    """A cookie hash with a ttl gives a caller without the cookie a Set-Cookie; sending it
    back reaches the same endpoint."""
    e = Engine(
        snapshot(
            service("llm", pods=5),
            policy(
                "{type: Maglev, tableSize: 4099, consistentHash: {cookie: {name: aff, ttl: 1h}}}"
            ),
        ),
        rng=random.Random(2),
    )
    fwd = e.route(LLM, 8000, "GET", "/", Headers())
    assert isinstance(fwd, Forward) and fwd.set_cookie is not None
    assert fwd.set_cookie.endswith(b"; Max-Age=3600; Path=/; HttpOnly")
    value = fwd.set_cookie.split(b";")[0].decode()
    again = e.route(LLM, 8000, "GET", "/", Headers.of(("cookie", f"x=1; {value}")))
    assert (
        isinstance(again, Forward) and again.hash_key == fwd.hash_key and again.set_cookie is None
    )
