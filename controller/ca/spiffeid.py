"""SPIFFE IDs: parsing, and reading a TLS peer's ID from a verified handshake.

No X.509 library here: the waypoint and the tunnel read peers' IDs from what OpenSSL
already decoded during the handshake, and the waypoint does not load `cryptography` at all
(a second OpenSSL and about 10 MB of RSS). Certificate building and parsing for the CA and
the agent's CSRs is in controller/ca/spiffe.py.
"""

from __future__ import annotations

import functools
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

_WORKLOAD = re.compile(r"^spiffe://([a-z0-9.\-_]+)/ns/([a-z0-9-]+)/sa/([a-z0-9.-]+)$")
_NODE = re.compile(r"^spiffe://([a-z0-9.\-_]+)/weft/node/([a-z0-9.-]+)$")


@dataclass(frozen=True)
class WorkloadId:
    trust_domain: str
    namespace: str
    service_account: str

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's principal form: the SPIFFE ID without the scheme."""
        return str(self)[len("spiffe://") :]


@functools.lru_cache(maxsize=4096)  # per request in the waypoint; a few callers per node
def parse_workload_id(uri: str) -> WorkloadId | None:
    m = _WORKLOAD.match(uri)
    return WorkloadId(*m.groups()) if m else None


def parse_node_id(uri: str) -> tuple[str, str] | None:
    """(trust domain, node name) of a node identity, else None."""
    m = _NODE.match(uri)
    return (m.group(1), m.group(2)) if m else None


def single_spiffe_id(uris: Iterable[str]) -> str | None:
    """The one SPIFFE ID among a certificate's URI SANs; None if it has none or several
    (not a valid SVID)."""
    ids = [u for u in uris if u.startswith("spiffe://")]
    return ids[0] if len(ids) == 1 else None


def peer_spiffe_id(sslobj: ssl.SSLObject | ssl.SSLSocket | None) -> str | None:
    """The SPIFFE ID of the peer of a finished handshake, from its leaf certificate as
    OpenSSL decoded it. `getpeercert()` returns the fields only for a certificate that was
    verified (every weft context requires verification); an unverified or absent peer
    certificate gives None, never an ID."""
    if sslobj is None:
        return None
    cert = sslobj.getpeercert()
    if not cert:
        return None
    sans = cast("tuple[tuple[str, str], ...]", cert.get("subjectAltName", ()))
    return single_spiffe_id(value for kind, value in sans if kind == "URI")
