"""SPIFFE IDs and X.509 helpers shared by the controller and the agent."""

from __future__ import annotations

import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

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


def parse_workload_id(uri: str) -> WorkloadId | None:
    m = _WORKLOAD.match(uri)
    return WorkloadId(*m.groups()) if m else None


def parse_node_id(uri: str) -> tuple[str, str] | None:
    """(trust domain, node name) of a node identity, else None."""
    m = _NODE.match(uri)
    return (m.group(1), m.group(2)) if m else None


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_csr(key: ec.EllipticCurvePrivateKey, spiffe_id: str | None) -> bytes:
    """A CSR for `key`; names `spiffe_id` in a URI SAN when given (the CA checks it)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=True,
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def load_chain(pem: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem)


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> str | None:
    """The certificate's single SPIFFE ID; None if it has none or several (invalid SVID)."""
    uris = [u for u in uri_sans(cert) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def spiffe_id_of_der(der: bytes) -> str | None:
    return spiffe_id_of(x509.load_der_x509_certificate(der))
