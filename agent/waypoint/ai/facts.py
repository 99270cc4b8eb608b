"""What AI policies match on: who is calling, which model, which path, which headers.

`RequestFacts` is built once per request by the shell (after the body is parsed) and read
by every policy; `compile_match` turns a `CallerMatch` into a predicate so the request path
does no pattern parsing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from agent.waypoint.codec.headers import Headers
from controller.model.ai import CallerMatch, pattern_matches

Predicate = Callable[["RequestFacts"], bool]


@dataclass(slots=True)
class RequestFacts:
    principal: str  # the caller's SPIFFE ID ("" when unknown)
    namespace: str  # the caller's namespace, its tenant ("" when unknown)
    model: str | None  # the model asked for (body, else the model header)
    path: str  # without the query
    headers: Headers
    # The model name the chosen backend is asked for (a ModelRoute's modelName), once a
    # target is chosen: what a by-model limit counts, so that names a pattern rule maps to
    # one model share its counters.
    served: str | None = None

    def header(self, name: bytes) -> str | None:
        v = self.headers.get(name)
        return None if v is None else v.decode("latin-1")


def _any(patterns: list[str]) -> Callable[[str | None], bool]:
    if "*" in patterns:
        return lambda v: v is not None
    return lambda v: v is not None and any(pattern_matches(p, v) for p in patterns)


def always(_: RequestFacts) -> bool:
    return True


def compile_match(m: CallerMatch | None) -> Predicate:
    """A predicate for `m`: every field set must hold, any listed value within a field."""
    if m is None:
        return always
    checks: list[Predicate] = []
    if m.principals:
        f = _any(m.principals)
        checks.append(lambda r: f(r.principal))
    if m.namespaces:
        g = _any(m.namespaces)
        checks.append(lambda r: g(r.namespace))
    if m.models:
        # The model asked for, or the one the chosen backend is asked for: a name that a
        # pattern rule maps to a matched model (big-model-x served as big-model) must not
        # slip past a limit or class set on that model.
        h = _any(m.models)
        checks.append(lambda r: h(r.model) or h(r.served))
    if m.paths:
        p = _any(m.paths)
        checks.append(lambda r: p(r.path))
    for hm in m.headers or []:
        name, values = hm.name.lower().encode(), frozenset(v.encode() for v in hm.values)
        checks.append(lambda r, n=name, vs=values: r.headers.get(n) in vs)  # type: ignore[misc]
    if not checks:
        return always
    if len(checks) == 1:
        return checks[0]
    return lambda r: all(c(r) for c in checks)
