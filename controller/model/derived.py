"""Resources that take effect as other resources: one place that derives them.

Users write some kinds in the shape they know, and weft enforces them as the kinds its
engine already implements (one path for one job):

- Istio's VirtualService and DestinationRule (controller/model/istio_networking.py) become
  HTTPRoutes, BackendPolicies, RetryPolicies, FaultInjections and subset Services;
- Gateway API's GRPCRoute (controller/model/grpcroute.py) becomes an HTTPRoute.

`derive` runs wherever a config snapshot is built (agent/state.py), for the controller's
conditions (controller/model/status.py) and for `weft policy convert`. The originals stay
stored as written; what cannot be derived is a problem on the original, and a derived
resource that would replace an existing one is refused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from controller.model.base import Resource, parse_resource
from controller.model.grpcroute import GRPCRoute
from controller.model.istio_networking import DestinationRule, VirtualService, istio_documents
from controller.model.problems import InvalidConfig, Problem

# The kinds that derive into others: `derive` finds nothing to do without one of them (a
# snapshot's builder skips it then, rather than look at 10,000 workloads for them).
DERIVING_KINDS = frozenset({VirtualService.KIND, DestinationRule.KIND, GRPCRoute.KIND})


def derive(resources: Iterable[Resource]) -> tuple[list[Resource], list[Problem]]:
    """The resources derived from `resources`, and the problems of those that could not be."""
    res = list(resources)
    problems: list[Problem] = []
    try:
        docs, problems = istio_documents(res)
    except Exception as e:  # a derivation must never stop a snapshot from being built
        docs = []
        problems = [Problem(f"Istio resources could not be derived: {e!r}")]
    for r in res:
        if isinstance(r, GRPCRoute):
            try:
                docs.append((r, r.to_httproute()))
            except Exception as e:
                problems.append(Problem(f"could not be derived: {e!r}", resource=str(r.key)))
    if not docs:
        return [], problems
    # All or nothing per source: a source with any problem derives nothing, so a rule that
    # cannot be routed never leaves its retry policy or fault behind, and a route never
    # points at a policy of the same name that someone else wrote.
    failed = {p.resource for p in problems if p.resource}
    parsed: dict[str, list[Resource]] = {}
    taken = {r.key for r in res}
    for src, doc in docs:
        owner = str(src.key)
        if owner in failed:
            continue
        try:
            derived = parse_resource(doc, file=f"{src.KIND} {src.namespace}/{src.name}")
        except InvalidConfig as e:
            problems += [
                Problem(f"derived {doc['kind']}: {p.reason}", resource=owner, field=p.field)
                for p in e.problems
            ]
            failed.add(owner)
            continue
        if derived.key in taken:
            problems.append(
                Problem(
                    f"derives {derived.key}, which exists already; rename one of them",
                    resource=owner,
                )
            )
            failed.add(owner)
            continue
        taken.add(derived.key)
        parsed.setdefault(owner, []).append(derived)
    out = [r for owner, rs in parsed.items() if owner not in failed for r in rs]
    return out, problems


def documents(resources: Iterable[Resource]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """`derive` as YAML-ready documents (for `weft policy convert`)."""
    derived, problems = derive(resources)
    return [
        r.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True) for r in derived
    ], problems
