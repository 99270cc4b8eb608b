"""CustomResourceDefinitions for weft's own kinds, generated from the model registry.

Every kind registered in `controller.model` whose apiVersion is in the `weft.dev` group gets
a CRD whose OpenAPI v3 schema is derived from the same pydantic model that validates the
resource in the controller and the agent, so the API server and weft agree on the shape.
The Helm chart ships the output in helm/weft/crds/; a unit test fails when they differ, so
registering a new kind (or changing a field) forces a regeneration:

    .venv/bin/python -m controller.crds --out-dir helm/weft/crds     # one file per CRD
    .venv/bin/python -m controller.crds > weft-crds.yaml             # one YAML stream

Kubernetes requires *structural* schemas (a type on every node, no $ref, no
`additionalProperties` next to `properties`, `anyOf` branches without types). The
translation from JSON Schema (what pydantic emits) to that dialect is `structural()`.
Defaults are left out on purpose: the API server would apply them and store objects that
differ from what the user wrote, while pydantic applies the very same defaults anyway.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from controller.model.base import Resource, kinds

GROUP = "weft.dev"
CATEGORY = "weft"  # `kubectl get weft` lists every weft resource

# JSON Schema keywords the apiextensions/v1 dialect accepts unchanged.
_KEEP = (
    "description",
    "format",
    "pattern",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "uniqueItems",
    "minimum",
    "maximum",
    "multipleOf",
    "minProperties",
    "maxProperties",
    "required",
    "enum",
)


class SchemaError(ValueError):
    """A model uses a construct that has no structural OpenAPI equivalent."""


def _resolve(node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    name = ref.rsplit("/", 1)[-1]
    if name in seen:
        raise SchemaError(f"recursive model {name}: CRD schemas cannot refer to themselves")
    target = dict(defs[name])
    # Siblings of $ref (pydantic puts a field's description there) override the target's.
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


_FIRST = ("type", "description")


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    """type and description first, nested schemas last: the CRD reads top-down."""
    nested = ("properties", "additionalProperties", "items", "anyOf", "required")
    head = {k: node[k] for k in _FIRST if k in node}
    mid = {k: v for k, v in node.items() if k not in _FIRST and k not in nested}
    tail = {k: node[k] for k in nested if k in node}
    return {**head, **mid, **tail}


def structural(
    node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node into a structural OpenAPI v3 schema node."""
    return _ordered(_structural(node, defs, seen))


def _structural(
    node: dict[str, Any], defs: dict[str, Any], seen: tuple[str, ...]
) -> dict[str, Any]:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return structural(_resolve(node, defs, seen), defs, (*seen, name))
    out: dict[str, Any] = {k: node[k] for k in _KEEP if k in node}
    if "description" in out:  # docstrings wrap lines; a CRD reads better without them
        out["description"] = " ".join(str(out["description"]).split())
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:  # JSON Schema 2020-12 number -> OpenAPI v3 boolean form
        out["minimum"], out["exclusiveMinimum"] = node["exclusiveMinimum"], True
    if "exclusiveMaximum" in node:
        out["maximum"], out["exclusiveMaximum"] = node["exclusiveMaximum"], True

    branches = node.get("anyOf") or node.get("oneOf")
    if branches is not None:
        real = [b for b in branches if b.get("type") != "null"]
        if len(real) == 1:  # Optional[X]: absence is how Kubernetes spells null
            merged = structural(real[0], defs, seen)
            if "description" in out:
                merged["description"] = out["description"]
            return merged
        real = [_resolve(b, defs, seen) for b in real]
        types = {b.get("type") for b in real}
        if types == {"integer", "string"}:
            # int | str, as in Service targetPort: Kubernetes' own int-or-string marker.
            return {**out, "x-kubernetes-int-or-string": True}
        if types == {"string"}:
            # e.g. IPv4Address | IPv6Address: one type, alternatives only in format/pattern.
            alts = [{k: b[k] for k in ("format", "pattern", "enum") if k in b} for b in real]
            out["type"] = "string"
            if all(alts):
                out["anyOf"] = alts
            return out
        raise SchemaError(f"union of {sorted(str(t) for t in types)} has no structural form")

    typ = node.get("type")
    if typ == "object" or "properties" in node or "additionalProperties" in node:
        out["type"] = "object"
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {
                k: structural(v, defs, seen) for k, v in sorted(props.items(), key=lambda i: i[0])
            }
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs, seen)
        elif extra is True or (not props and extra is None):
            # dict[str, object]: a free-form map (status written by other controllers).
            out["x-kubernetes-preserve-unknown-fields"] = True
        return out
    if typ == "array":
        out["type"] = "array"
        out["items"] = structural(node.get("items", {}), defs, seen)
        return out
    if typ in ("string", "integer", "number", "boolean"):
        out["type"] = typ
        return out
    if typ is None and not set(node) - {"default", "title", "description"}:
        # Any: free-form (Istio fields weft refuses when set are typed so).
        return {"x-kubernetes-preserve-unknown-fields": True}
    raise SchemaError(f"schema node {node!r} has no structural form")


def plural(kind: str) -> str:
    low = kind.lower()
    return low[:-1] + "ies" if low.endswith("y") else low + "s"


def weft_kinds() -> list[type[Resource]]:
    """Registered kinds served under weft.dev, in a stable order."""
    out = [
        cls
        for cls in kinds().values()
        if not cls.INTERNAL
        and any(v.split("/", 1)[0] == GROUP for v in cls.API_VERSIONS if "/" in v)
    ]
    return sorted(out, key=lambda c: c.KIND)


def crd_for(cls: type[Resource]) -> dict[str, Any]:
    """The apiextensions.k8s.io/v1 CustomResourceDefinition of one weft.dev kind."""
    schema = cls.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    props = schema.get("properties", {})
    top: dict[str, Any] = {
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # The API server owns metadata's schema; a CRD may only say it is an object.
            "metadata": {"type": "object"},
        },
    }
    doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ").strip()
    if doc:
        top["description"] = doc
    required = []
    for name, sub in sorted(props.items(), key=lambda i: i[0]):
        if name in ("apiVersion", "kind", "metadata"):
            continue
        top["properties"][name] = structural(sub, defs, (name,))
        if name in schema.get("required", []):
            required.append(name)
    if required:
        top["required"] = required
    # The controller's conditions (Accepted, ResolvedRefs) go to status, as Gateway API's
    # do; the API server keeps status apart from spec (the status subresource).
    top["properties"]["status"] = {
        "type": "object",
        "description": "Written by the weft controller: conditions (Accepted, ResolvedRefs).",
        "properties": {
            "conditions": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "type": {"type": "string"},
                        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                        "reason": {"type": "string"},
                        "message": {"type": "string"},
                        "lastTransitionTime": {"type": "string", "format": "date-time"},
                        "observedGeneration": {"type": "integer"},
                    },
                    "required": ["type", "status"],
                },
            },
        },
    }
    if cls.KIND == "Rollout":
        # Where a controller-judged canary stands (a RolloutState's spec), written by the
        # leading controller and read back by every replica.
        top["properties"]["status"]["properties"]["rollout"] = {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
        }
    versions = [v.split("/", 1)[1] for v in cls.API_VERSIONS if v.startswith(GROUP + "/")]
    names: dict[str, Any] = {
        "kind": cls.KIND,
        "listKind": f"{cls.KIND}List",
        "plural": plural(cls.KIND),
        "singular": cls.KIND.lower(),
        "categories": [CATEGORY],
    }
    if SHORT_NAMES.get(cls.KIND):
        names["shortNames"] = SHORT_NAMES[cls.KIND]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{names['plural']}.{GROUP}",
            "labels": {"app.kubernetes.io/part-of": "weft"},
            "annotations": {
                "weft.dev/generated-by": "python -m controller.crds (do not edit by hand)"
            },
        },
        "spec": {
            "group": GROUP,
            "names": names,
            "scope": "Namespaced" if cls.NAMESPACED else "Cluster",
            "versions": [
                {
                    "name": v,
                    "served": True,
                    "storage": i == 0,  # the first listed version is the one stored
                    "schema": {"openAPIV3Schema": top},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
                for i, v in enumerate(versions)
            ],
        },
    }


# kubectl get's short names (none clash with Kubernetes' own or Istio's).
SHORT_NAMES: dict[str, list[str]] = {
    "BackendPolicy": ["bp"],
    "RetryPolicy": ["retrypol"],
    "FaultInjection": ["fault"],
    "TokenRateLimit": ["trl"],
    "ModelRoute": ["mroute"],
    "LoadShedding": ["shed"],
    "ResponseCache": ["rcache"],
    "Rollout": ["wro"],
    "Workload": ["wl"],
}

# What `kubectl get` shows beside the name: whether the controller accepted it, and why not.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Accepted",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Accepted")].reason',
        "priority": 1,
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def file_name(crd: dict[str, Any]) -> str:
    return f"{crd['metadata']['name']}.yaml"


def render(crd: dict[str, Any]) -> str:
    head = "# Generated by `python -m controller.crds` from the weft model; do not edit.\n"
    return head + yaml.safe_dump(crd, sort_keys=False, width=100)


def all_crds(classes: Iterable[type[Resource]] | None = None) -> list[dict[str, Any]]:
    return [crd_for(c) for c in (weft_kinds() if classes is None else classes)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m controller.crds", description=__doc__)
    p.add_argument("--out-dir", type=Path, help="write one <plural>.weft.dev.yaml per CRD here")
    args = p.parse_args(argv)
    crds = all_crds()
    if args.out_dir is None:
        sys.stdout.write("---\n".join(render(c) for c in crds))
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {file_name(c) for c in crds}
    for old in args.out_dir.glob(f"*.{GROUP}.yaml"):
        if old.name not in wanted:
            old.unlink()  # a kind that left the registry leaves the chart too
    for c in crds:
        (args.out_dir / file_name(c)).write_text(render(c))
    print(f"wrote {len(crds)} CRD(s) to {args.out_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
