"""X.509 helpers shared by the controller and the agent (keys, CSRs, SVID parsing). The
SPIFFE ID grammar lives in controller/ca/spiffeid.py, which needs no X.509 library."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.ca.spiffeid import (
    WorkloadId,
    parse_node_id,
    parse_workload_id,
    single_spiffe_id,
)

__all__ = ["WorkloadId", "parse_node_id", "parse_workload_id"]


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
    return single_spiffe_id(uri_sans(cert))
