"""Turn YAML/JSON text into validated resources and precise problems."""

from __future__ import annotations

from controller.model.base import ResourceKey, _load_all, describe, kinds, parse_resource
from controller.model.problems import InvalidConfig, Problem
from controller.model.yamldoc import Document, load_documents
from controller.store import Offer


def _claimed_key(data: object, default_namespace: str | None) -> ResourceKey | None:
    """The identity of an invalid document, when readable, so its last good version stays."""
    if not isinstance(data, dict) or not isinstance(data.get("metadata"), dict):
        return None
    kind = data.get("kind")
    cls = kinds().get(kind) if isinstance(kind, str) else None
    name = data["metadata"].get("name")
    if cls is None or not isinstance(name, str):
        return None
    ns = data["metadata"].get("namespace") or default_namespace or cls.DEFAULT_NAMESPACE
    return ResourceKey(cls.KIND, ns if cls.NAMESPACED else "", name)


def parse_text(text: str | bytes, file: str, *, default_namespace: str | None = None) -> Offer:
    """Every document of a YAML stream, validated; never raises for content problems."""
    _load_all()
    offer = Offer()
    try:
        docs = load_documents(text, file)
    except InvalidConfig as e:
        offer.problems.extend(e.problems)
        offer.unreadable = True
        return offer
    for doc in docs:
        data = doc.data
        # A Kubernetes List (kubectl get -o yaml) holds its resources in items.
        if (
            isinstance(data, dict)
            and data.get("kind") == "List"
            and isinstance(data.get("items"), list)
        ):
            items: list[tuple[object, Document | None]] = [(i, None) for i in data["items"]]
        else:
            items = [(data, doc)]
        for i, (item, d) in enumerate(items):
            try:
                res = parse_resource(item, file=file, doc=d, default_namespace=default_namespace)
                if res.INTERNAL:
                    raise InvalidConfig(
                        [
                            Problem(
                                f"{res.KIND} is written by the controller, not applied "
                                "(it reports what the controller decided)",
                                file=file,
                                line=doc.line,
                                resource=str(res.key),
                                field="kind",
                            )
                        ]
                    )
                offer.resources.append(res)
                where = f"{file}:{doc.line}" if doc.line else file
                offer.origins.append(where if d is not None else f"{where} (List item {i + 1})")
            except InvalidConfig as e:
                offer.problems.extend(e.problems)
                key = _claimed_key(item, default_namespace)
                if key is not None:
                    offer.claimed.add(key)
    return offer


def duplicates(offers: list[Offer]) -> list[Problem]:
    """One problem per resource defined more than once across `offers` (one apply, one
    validation), naming every place: otherwise the last would silently replace the
    others (a DENY becoming an ALLOW)."""
    seen: dict[ResourceKey, list[str]] = {}
    for offer in offers:
        for res, where in zip(offer.resources, offer.origins, strict=True):
            seen.setdefault(res.key, []).append(where)
    return [
        Problem(
            f"defined {len(places)} times ({', '.join(places)}); each resource may appear "
            "once, or the last would silently replace the others",
            resource=str(key),
            file=places[-1].split(":", 1)[0],
        )
        for key, places in seen.items()
        if len(places) > 1
    ]


__all__ = ["describe", "duplicates", "parse_text"]
