"""Resources: Kubernetes-shaped documents (apiVersion, kind, metadata, spec) and their registry.

Every config source (YAML files, the Kubernetes API, `weft policy apply`) produces the same
validated `Resource` objects, and the controller ships them to agents as their canonical
JSON, which the agent validates again with these same classes. One model, one set of rules.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from typing import Annotated, Any, ClassVar, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from controller.model.problems import InvalidConfig, Problem, problems_from_validation
from controller.model.yamldoc import Document

DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DnsLabel = Annotated[str, Field(pattern=DNS_LABEL_RE, max_length=63)]
ObjectName = Annotated[str, Field(pattern=DNS_SUBDOMAIN_RE, max_length=253)]

_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")


@functools.lru_cache(maxsize=65536)
def _label_ok(k: str, val: str) -> str | None:
    """Why a label is invalid, or None. Cached: a mesh's labels repeat (app, version,
    pod-template-hash), and an agent validates every workload of a full snapshot."""
    if not _LABEL_KEY.match(k) or len(k) > 316:
        return f"label key {k!r} is not a valid Kubernetes label key"
    if not _LABEL_VALUE.match(val) or len(val) > 63:
        return f"label {k}={val!r}: value is not a valid Kubernetes label value"
    return None


def check_labels(v: dict[str, str]) -> dict[str, str]:
    for k, val in v.items():
        if not isinstance(val, str) or not isinstance(k, str):
            raise ValueError(f"label {k}={val!r}: value is not a valid Kubernetes label value")
        why = _label_ok(k, val)
        if why is not None:
            raise ValueError(why)
    return v


class _cached(functools.cached_property):
    """functools.cached_property without the lock CPython 3.11 takes on every first access
    (one RLock shared by all instances: 3.12 dropped it). Two threads computing the same
    frozen model's value at once just store equal values. A subclass, so pydantic treats it
    as a cached property (left out of fields, equality and dumps)."""

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        if instance is None:
            return self
        value = instance.__dict__[self.attrname] = self.func(instance)
        return value


class Model(BaseModel):
    """Strict by default: an unknown field is an error, not silently ignored."""

    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        frozen=True,
        defer_build=True,
        ignored_types=(_cached,),
    )


class Metadata(Model):
    name: ObjectName
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    # Kept from the Kubernetes API when present; not required from files.
    uid: str | None = None
    resource_version: str | None = Field(None, alias="resourceVersion")
    generation: int | None = None

    _labels = field_validator("labels")(check_labels)


class LabelSelector(Model):
    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")

    _labels = field_validator("match_labels")(check_labels)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items())


class ResourceKey(NamedTuple):
    """What names a resource. A named tuple, not a dataclass: snapshots and the store look
    resources up by key tens of thousands of times per full snapshot, and a tuple hashes,
    compares and sorts in C (a dataclass's generated __hash__, __eq__ and __lt__ are Python
    calls each)."""

    kind: str
    namespace: str  # "" for cluster-scoped kinds
    name: str

    def __str__(self) -> str:
        return (
            f"{self.kind} {self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind} {self.name}")
        )

    @property
    def ref(self) -> str:
        """KIND/NAMESPACE/NAME, the CLI's way of naming one resource."""
        return (
            f"{self.kind}/{self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind}/{self.name}")
        )


class Resource(Model):
    """Base of every kind. Subclasses set KIND, API_VERSIONS and NAMESPACED."""

    KIND: ClassVar[str]
    API_VERSIONS: ClassVar[tuple[str, ...]]
    NAMESPACED: ClassVar[bool] = True
    DEFAULT_NAMESPACE: ClassVar[str] = "default"
    # Written by the controller itself (RolloutState): no source may provide one.
    INTERNAL: ClassVar[bool] = False

    api_version: str = Field(alias="apiVersion")
    kind: str
    metadata: Metadata

    @field_validator("api_version")
    @classmethod
    def _api_version(cls, v: str) -> str:
        if v not in cls.API_VERSIONS:
            raise ValueError(f"{cls.KIND} supports apiVersion {', '.join(cls.API_VERSIONS)}")
        return v

    @_cached
    def key(self) -> ResourceKey:
        # Cached (the model is frozen): indexing a snapshot asks each resource for its key
        # several times. pydantic leaves cached properties out of ==, dumps and copies.
        # Made by tuple.__new__, as the named tuple's own __new__ does, without its Python
        # frame: an agent asks for 10,000 keys first when it takes a full snapshot.
        m = self.metadata
        ns = (m.namespace or self.DEFAULT_NAMESPACE) if self.NAMESPACED else ""
        return tuple.__new__(ResourceKey, (self.KIND, ns, m.name))

    @property
    def namespace(self) -> str:
        return self.key.namespace

    @property
    def name(self) -> str:
        return self.metadata.name

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def semantic_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Checks that need the whole resource; (field path, reason) pairs. Override."""
        return []


# ---- registry -----------------------------------------------------------------------

_KINDS: dict[str, type[Resource]] = {}


def register(cls: type[Resource]) -> type[Resource]:
    _KINDS[cls.KIND] = cls
    return cls


def kinds() -> dict[str, type[Resource]]:
    _load_all()
    return dict(_KINDS)


def kind_named(name: str) -> type[Resource] | None:
    """A kind by name, case-insensitively, also accepting plurals (`httproutes`)."""
    _load_all()
    low = name.lower()
    for k, cls in _KINDS.items():
        plural = k.lower()[:-1] + "ies" if k.endswith("y") else k.lower() + "s"
        if low in (k.lower(), plural, k.lower() + "es"):
            return cls
    return None


@functools.cache
def _load_all() -> None:
    # The kind modules register themselves on import; import them once, lazily, so that
    # base.py stays importable from them without a cycle. (Cached: a snapshot's decode
    # calls this per resource, and an import statement is not free even when cached.)
    from controller.model import (  # noqa: F401
        ai,
        gateway,
        grpcroute,
        istio_networking,
        routing,
        security,
        traffic,
        workloads,
    )


def build_validators() -> int:
    """Build every config model's validator and serializer now; returns how many were built.

    Models are deferred (`defer_build`): a process builds a kind when it first validates
    one, so an agent pays for the kinds it receives, not for all of them. A process that
    validates on several threads at once (the controller: file scans and Kubernetes watches
    run in threads) calls this first, on one thread: pydantic releases this project allows
    have had races when two threads build the same deferred model (pydantic#11849,
    #13419)."""
    _load_all()
    built = 0
    todo: list[type[Model]] = [Model]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__pydantic_complete__:
            cls.model_rebuild()
            built += 1
    return built


def describe(data: Any) -> str | None:
    """'Kind namespace/name' from raw data, for error messages about invalid documents."""
    if not isinstance(data, dict):
        return None
    kind = data.get("kind") if isinstance(data.get("kind"), str) else "resource"
    raw_meta = data.get("metadata")
    meta: dict[str, Any] = raw_meta if isinstance(raw_meta, dict) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else None
    ns = meta.get("namespace") if isinstance(meta.get("namespace"), str) else None
    if name is None:
        return str(kind)
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


# Kinds users bring from Istio, and what to write instead.
INSTEAD_OF = {
    "ServiceEntry": "weft has no egress registry: hosts outside the mesh are reached "
    "directly, and in-cluster Services need no entry",
    "Sidecar": "weft runs no sidecars; each node's agent serves every pod on its node",
    "EnvoyFilter": "weft runs no Envoy; L7 behaviour comes from HTTPRoute and GRPCRoute "
    "filters and the weft.dev policies",
    "WorkloadEntry": "weft meshes Kubernetes pods (and lab pods) only",
    "WorkloadGroup": "weft meshes Kubernetes pods (and lab pods) only",
    "GatewayClass": "the chart installs weft's (weft-waypoint); declare a waypoint with a "
    "Gateway of that class",
}

# What the Kubernetes API server adds to an object: accepted on input and dropped, so that
# `kubectl get -o yaml` output can be applied again.
_SERVER_METADATA = (
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)
_LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _without_server_fields(data: dict[str, Any]) -> dict[str, Any]:
    meta = data.get("metadata")
    if "status" not in data and not (
        isinstance(meta, dict)
        and (
            any(k in meta for k in _SERVER_METADATA)
            or _LAST_APPLIED in (meta.get("annotations") or {})
        )
    ):
        return data
    out = {k: v for k, v in data.items() if k != "status"}
    if isinstance(meta, dict):
        m = {k: v for k, v in meta.items() if k not in _SERVER_METADATA}
        if isinstance(m.get("annotations"), dict) and _LAST_APPLIED in m["annotations"]:
            m["annotations"] = {k: v for k, v in m["annotations"].items() if k != _LAST_APPLIED}
        out["metadata"] = m
    return out


def parse_resource(
    data: Any,
    *,
    file: str | None = None,
    doc: Document | None = None,
    default_namespace: str | None = None,
) -> Resource:
    """Validate one document into its kind's model; InvalidConfig names what and where."""
    lines = doc.lines if doc else None
    line = doc.line if doc else None
    what = describe(data)
    if not isinstance(data, dict):
        raise InvalidConfig(
            [
                Problem(
                    "a resource must be a mapping with apiVersion, kind, metadata and spec",
                    file=file,
                    line=line,
                )
            ]
        )
    kind = data.get("kind")
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        _load_all()
        cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        known = ", ".join(sorted(_KINDS))
        instead = INSTEAD_OF.get(kind) if isinstance(kind, str) else None
        raise InvalidConfig(
            [
                Problem(
                    f"unknown kind {kind!r}"
                    + (f": {instead}" if instead else "")
                    + f" (weft reads: {known})",
                    file=file,
                    line=(lines or {}).get(("kind",), line),
                    resource=what,
                    field="kind",
                )
            ]
        )
    if (
        default_namespace
        and cls.NAMESPACED
        and isinstance(data.get("metadata"), dict)
        and not data["metadata"].get("namespace")
    ):
        data = {**data, "metadata": {**data["metadata"], "namespace": default_namespace}}
    data = _without_server_fields(data)
    try:
        res = cls.model_validate(data)
    except ValidationError as e:
        raise InvalidConfig(
            problems_from_validation(e, file=file, resource=what, lines=lines)
        ) from None
    semantic = res.semantic_check()
    if semantic:
        from controller.model.problems import format_loc, line_of

        raise InvalidConfig(
            [
                Problem(
                    reason,
                    file=file,
                    line=line_of(lines, loc) if lines else line,
                    resource=what,
                    field=format_loc(loc),
                )
                for loc, reason in semantic
            ]
        )
    return res


def resource_from_json(kind: str, body: str | bytes) -> Resource:
    """Decode a resource shipped by the controller (canonical JSON of a validated model)."""
    return resources_from_json(((kind, body),))[0]


def resources_from_json(items: Iterable[tuple[str, str | bytes]]) -> list[Resource]:
    """Decode resources shipped by the controller (canonical JSON of validated models),
    each a (kind, body), in order; InvalidConfig for the first that fails (a kind this
    agent does not know, or a body its model refuses).

    For a full snapshot (10,000 of one kind): each kind's validator is looked up once and
    called directly, the call model_validate_json makes. The lookups and the Python frames
    of resource_from_json and model_validate_json around each call were about a fifth of
    an agent's time to decode a snapshot."""
    _load_all()
    out: list[Resource] = []
    append = out.append
    decoders: dict[str, Callable[[str | bytes], Any]] = {}
    for kind, body in items:
        decode = decoders.get(kind)
        if decode is None:
            cls = _KINDS.get(kind)
            if cls is None:
                raise InvalidConfig(
                    [Problem(f"unknown kind {kind!r}; this agent may be older than the controller")]
                )
            decode = decoders[kind] = cls.__pydantic_validator__.validate_json
        try:
            append(decode(body))
        except ValidationError as e:
            raise InvalidConfig(problems_from_validation(e, resource=kind)) from None
    return out


# ---- durations (Gateway API GEP-2257 style: "1h", "10s", "500ms", "1m30s") -------------

_DURATION = re.compile(r"^(?:(\d{1,5})h)?(?:(\d{1,5})m(?!s))?(?:(\d{1,5})s)?(?:(\d{1,5})ms)?$")


def parse_duration(v: Any) -> float:
    """Seconds from a Gateway API duration string; numbers are taken as seconds."""
    if isinstance(v, bool):
        raise ValueError("a duration must be a string like '10s' or '500ms'")
    if isinstance(v, int | float):
        if v < 0:
            raise ValueError("a duration cannot be negative")
        return float(v)
    if not isinstance(v, str) or not v or not (m := _DURATION.match(v)) or not any(m.groups()):
        raise ValueError(f"{v!r} is not a duration like '10s', '1m30s' or '500ms'")
    h, mi, s, ms = (int(x) if x else 0 for x in m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000.0


def duration_validator(*fields: str) -> Callable[..., Any]:
    def check(cls: Any, v: Any) -> Any:
        return None if v is None else parse_duration(v)

    return field_validator(*fields, mode="before")(classmethod(check))  # type: ignore[return-value]
