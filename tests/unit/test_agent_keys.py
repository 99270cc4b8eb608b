"""agent/identity/keys.py: the node agent's keys and certificate requests, made with the
libcrypto the ssl module is linked against, checked here with `cryptography` (which the
controller uses to read them)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from agent.identity import keys

SPIFFE = "spiffe://cluster.local/ns/ai/sa/llm"


def _load(pem: bytes) -> ec.EllipticCurvePrivateKey:
    k = serialization.load_pem_private_key(pem, None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    return k


def test_a_new_key_is_an_unencrypted_pkcs8_p256_key_and_never_the_same():
    a, b = keys.new_key(), keys.new_key()
    assert a.startswith(b"-----BEGIN PRIVATE KEY-----\n") and a != b
    assert _load(a).curve.name == "secp256r1"
    keys.check_key(a)


def test_a_request_is_signed_by_its_key_and_names_the_spiffe_id_as_its_one_critical_san():
    alone = keys.new_key()
    for key, csr in ((alone, keys.make_csr(alone, SPIFFE)), keys.new_key_and_csr(SPIFFE)):
        req = x509.load_pem_x509_csr(csr)
        assert req.is_signature_valid
        assert isinstance(req.signature_hash_algorithm, hashes.SHA256)
        assert req.public_key().public_numbers() == _load(key).public_key().public_numbers()
        assert len(req.subject) == 0
        (ext,) = req.extensions
        assert ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME and ext.critical
        assert ext.value.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE]
        assert len(ext.value) == 1


def test_a_node_request_names_no_id():
    """The node's CSR names nothing: the controller decides its ID from the credential."""
    key, csr = keys.new_key_and_csr(None)
    req = x509.load_pem_x509_csr(csr)
    assert req.is_signature_valid and len(req.extensions) == 0
    assert x509.load_pem_x509_csr(keys.make_csr(key, None)).is_signature_valid


@pytest.mark.parametrize(
    "bad",
    [
        "spiffe://cluster.local/ns/a,URI:spiffe://evil/ns/x/sa/y",  # a second SAN entry
        "spiffe://cluster.local/ns/a/sa/b\n",
        "spiffe://cluster.local/ns/a/sa/b,critical",
        "URI:spiffe://cluster.local/ns/a/sa/b",
        "@section",
        "spiffe://cluster.local/ns/ä/sa/b",
        "",
    ],
)
def test_what_is_not_a_spiffe_id_never_reaches_openssls_config_syntax(bad):
    """The SAN is given to OpenSSL in its config syntax, where "," starts another entry
    and "@" names a section: only a SPIFFE ID's characters are let through."""
    with pytest.raises(keys.KeyError_, match="not a SPIFFE ID"):
        keys.make_csr(keys.new_key(), bad)


def test_a_kept_key_that_is_not_p256_or_not_a_key_is_refused_with_the_reason():
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    p384 = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    encrypted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    good = keys.new_key()
    for pem, why in (
        (rsa_pem, "not an EC P-256 key"),
        (p384, "not an EC P-256 key"),
        (b"not a key", "reading the private key"),
        (good[:120], "reading the private key"),
        (encrypted, "reading the private key"),
    ):
        with pytest.raises(keys.KeyError_, match=why):
            keys.check_key(pem)
        if why == "reading the private key":
            with pytest.raises(keys.KeyError_, match=why):
                keys.make_csr(pem, SPIFFE)


def test_a_key_made_by_cryptography_is_accepted():
    """A node credential kept by an agent of an earlier version (made with cryptography,
    PKCS #8 or the traditional SEC1 form) is still usable after an upgrade."""
    k = ec.generate_private_key(ec.SECP256R1())
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        pem = k.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
        keys.check_key(pem)
        req = x509.load_pem_x509_csr(keys.make_csr(pem, SPIFFE))
        assert req.public_key().public_numbers() == k.public_key().public_numbers()
