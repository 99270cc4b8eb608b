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
from controller.model.istio_networking import istio_documents
from controller.model.problems import InvalidConfig, Problem


def derive(resources: Iterable[Resource]) -> tuple[list[Resource], list[Problem]]:
    """The resources derived from `resources`, and the problems of those that could not be."""
    res = list(resources)
    docs, problems = istio_documents(res)
    docs += [(r, r.to_httproute()) for r in res if isinstance(r, GRPCRoute)]
    if not docs:
        return [], problems
    taken = {r.key for r in res}
    out: list[Resource] = []
    for src, doc in docs:
        try:
            derived = parse_resource(doc, file=f"{src.KIND} {src.namespace}/{src.name}")
        except InvalidConfig as e:
            problems += [
                Problem(f"derived {doc['kind']}: {p.reason}", resource=str(src.key), field=p.field)
                for p in e.problems
            ]
            continue
        if derived.key in taken:
            problems.append(
                Problem(
                    f"derives {derived.key}, which exists already; rename one of them",
                    resource=str(src.key),
                )
            )
            continue
        taken.add(derived.key)
        out.append(derived)
    return out, problems


def documents(resources: Iterable[Resource]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """`derive` as YAML-ready documents (for `weft policy convert`)."""
    derived, problems = derive(resources)
    return [
        r.model_dump(by_alias=True, exclude_none=True, exclude_defaults=True) for r in derived
    ], problems
