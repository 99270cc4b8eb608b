"""The CA: SPIFFE certificates that verify against the bundle, rotation, persistence."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from controller.ca.authority import (
    CertificateAuthority,
    CertificateRequestRejected,
    FileCAStore,
)
from controller.ca.spiffe import (
    key_pem,
    load_chain,
    make_csr,
    new_key,
    parse_node_id,
    parse_workload_id,
    spiffe_id_of,
)
from controller.errors import WeftError


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.load_or_create(FileCAStore(tmp_path / "ca.json"), "cluster.local")


def verify(cert: x509.Certificate, roots: list[x509.Certificate]) -> None:
    """Chain verification the way a TLS peer does it (cryptography's verifier)."""
    from cryptography.x509.verification import PolicyBuilder, Store

    store = Store(roots)
    verifier = PolicyBuilder().store(store).build_client_verifier()
    verifier.verify(cert, [])


def test_workload_cert_has_the_spiffe_id_lifetime_and_verifies(ca):
    key = new_key()
    issued = ca.sign_workload(make_csr(key, None), "ai", "llm")
    (cert,) = load_chain(issued.chain_pem)
    assert spiffe_id_of(cert) == "spiffe://cluster.local/ns/ai/sa/llm"
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life == dt.timedelta(hours=24, minutes=5)  # 24 h + the 5 min clock-skew backdate
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    verify(cert, ca.bundle())


def test_lifetime_is_configurable_and_capped(tmp_path):
    ca = CertificateAuthority.load_or_create(
        FileCAStore(tmp_path / "c.json"), "td.example", workload_ttl=3600
    )
    (c,) = load_chain(ca.sign_workload(make_csr(new_key(), None), "a", "b").chain_pem)
    assert c.not_valid_after_utc - c.not_valid_before_utc == dt.timedelta(hours=1, minutes=5)
    (c,) = load_chain(ca.sign_workload(make_csr(new_key(), None), "a", "b", ttl=10**9).chain_pem)
    assert c.not_valid_after_utc - c.not_valid_before_utc == dt.timedelta(days=7, minutes=5)


def test_csr_naming_another_identity_is_refused(ca):
    csr = make_csr(new_key(), "spiffe://cluster.local/ns/ai/sa/admin")
    with pytest.raises(CertificateRequestRejected, match="caller is authorized for"):
        ca.sign_workload(csr, "ai", "llm")


def test_weak_keys_and_garbage_are_refused(ca):
    with pytest.raises(CertificateRequestRejected, match="not valid PEM"):
        ca.sign_workload(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "a", "b")
    from cryptography.hazmat.primitives import hashes, serialization

    weak = rsa.generate_private_key(65537, 1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(weak, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CertificateRequestRejected, match="too small"):
        ca.sign_workload(csr, "a", "b")
    k = ec.generate_private_key(ec.SECP256K1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(k, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CertificateRequestRejected, match="curve"):
        ca.sign_workload(csr, "a", "b")


def test_node_ids_never_parse_as_workload_ids(ca):
    (c,) = load_chain(ca.sign_node(make_csr(new_key(), None), "node-1").chain_pem)
    sid = spiffe_id_of(c)
    assert parse_node_id(sid) == ("cluster.local", "node-1")
    assert parse_workload_id(sid) is None


def test_state_persists_with_0600_and_reloads_the_same_root(tmp_path, ca):
    path = tmp_path / "ca.json"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = CertificateAuthority.load_or_create(FileCAStore(path), "cluster.local")
    assert again.bundle_pem() == ca.bundle_pem()
    (c,) = load_chain(again.sign_workload(make_csr(new_key(), None), "a", "b").chain_pem)
    verify(c, ca.bundle())


def test_widened_permissions_are_refused(tmp_path, ca):
    os.chmod(tmp_path / "ca.json", 0o644)
    with pytest.raises(WeftError, match="must be 0600"):
        CertificateAuthority.load_or_create(FileCAStore(tmp_path / "ca.json"), "cluster.local")


def test_other_trust_domain_state_is_refused(tmp_path, ca):
    with pytest.raises(WeftError, match=r"is for trust domain 'cluster.local'"):
        CertificateAuthority.load_or_create(FileCAStore(tmp_path / "ca.json"), "other.td")


def test_rotation_keeps_old_root_trusted_during_overlap_then_drops_it(tmp_path):
    now = [1_900_000_000.0]
    ca = CertificateAuthority.load_or_create(
        FileCAStore(tmp_path / "ca.json"), "cluster.local", clock=lambda: now[0]
    )
    (old_cert,) = load_chain(ca.sign_workload(make_csr(new_key(), None), "a", "b").chain_pem)
    old_root = ca.active.cert
    ca.rotate(overlap=3600)
    assert [r.serial_number for r in ca.bundle()][1] == old_root.serial_number
    (new_cert,) = load_chain(ca.sign_workload(make_csr(new_key(), None), "a", "b").chain_pem)
    assert new_cert.issuer != old_cert.issuer
    verify(old_cert, ca.bundle())  # still trusted in the overlap
    verify(new_cert, ca.bundle())
    again = CertificateAuthority.load_or_create(
        FileCAStore(tmp_path / "ca.json"), "cluster.local", clock=lambda: now[0]
    )
    assert len(again.bundle()) == 2  # the overlap survives a restart
    now[0] += 3601
    assert [r.serial_number for r in again.bundle()] == [ca.active.cert.serial_number]


def _connected(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[Any, ...]:
    """A real TLS 1.3 handshake between two in-memory endpoints: the client's and the
    server's SSLObjects, then the client's incoming and outgoing BIOs and the server's."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = {c: False, s: False}
    for _ in range(10):
        for obj in (c, s):
            if not done[obj]:
                try:
                    obj.do_handshake()
                    done[obj] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            return c, s, c_in, c_out, s_in, s_out
    raise AssertionError("handshake did not finish")


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[ssl.SSLObject, ...]:
    """A real TLS 1.3 handshake between two in-memory endpoints; the finished SSLObjects."""
    return _connected(client, server)[:2]


def test_peer_spiffe_id_reads_the_verified_leaf_without_an_x509_library(ca):
    """What the tunnel and the waypoint use on every HBONE connection: the peer's one SPIFFE
    ID, from the certificate OpenSSL verified in the handshake."""
    from agent.identity.tls import client_context, server_context
    from controller.ca.spiffeid import peer_spiffe_id

    def ctxs(ns: str, sa: str) -> tuple[bytes, bytes]:
        key = new_key()
        return ca.sign_workload(make_csr(key, None), ns, sa).chain_pem, key_pem(key)

    bundle = ca.bundle_pem()
    client = client_context(*ctxs("ai", "caller"), bundle)
    server = server_context(*ctxs("ai", "llm"), bundle)
    c, s = _handshake(client, server)
    assert peer_spiffe_id(c) == "spiffe://cluster.local/ns/ai/sa/llm"
    assert peer_spiffe_id(s) == "spiffe://cluster.local/ns/ai/sa/caller"
    assert peer_spiffe_id(None) is None


def test_a_node_tunnel_server_keeps_no_session_and_sends_no_ticket(ca):
    """TLS 1.3 with OP_NO_TICKET alone still sends two stateful tickets per handshake: the
    server keeps both sessions (with the peer's chain) in its cache for two hours, the
    client holds them for its connection's life, and nobody resumes. server_context sends
    none; with two (the check that the test can tell), the cache fills and the client
    gets a ticket."""
    from agent.identity.tls import client_context, server_context

    key = new_key()
    chain = ca.sign_workload(make_csr(key, None), "ai", "llm").chain_pem

    def cached_and_ticket(tickets: int | None) -> tuple[int, bool]:
        server = server_context(chain, key_pem(key), ca.bundle_pem())
        if tickets is not None:
            server.num_tickets = tickets
        client = client_context(chain, key_pem(key), ca.bundle_pem())
        c, s, c_in, _, _, s_out = _connected(client, server)
        s.write(b"x")  # the client reads what follows the handshake (tickets), then this
        c_in.write(s_out.read())
        assert c.read(1) == b"x"
        return server.session_stats()["number"], c.session is not None and c.session.has_ticket

    assert cached_and_ticket(None) == (0, False)
    assert cached_and_ticket(2) == (2, True)


def test_peer_spiffe_id_is_none_for_an_unverified_peer(ca):
    """A context that does not verify its peer yields no ID at all (getpeercert gives the
    fields of verified certificates only), so an unchecked certificate never names anyone."""
    from agent.identity.tls import client_context, server_context
    from controller.ca.spiffeid import peer_spiffe_id

    key = new_key()
    chain = ca.sign_workload(make_csr(key, None), "ai", "llm").chain_pem
    server = server_context(chain, key_pem(key), ca.bundle_pem())
    server.verify_mode = ssl.CERT_NONE  # asks for no client certificate
    client = client_context(chain, key_pem(key), ca.bundle_pem())
    c, s = _handshake(client, server)
    assert peer_spiffe_id(s) is None
    assert peer_spiffe_id(c) == "spiffe://cluster.local/ns/ai/sa/llm"


@pytest.mark.parametrize(
    ("uris", "want"),
    [
        (["spiffe://td/ns/a/sa/b"], "spiffe://td/ns/a/sa/b"),
        (["https://example.com/", "spiffe://td/ns/a/sa/b"], "spiffe://td/ns/a/sa/b"),
        (["spiffe://td/ns/a/sa/b", "spiffe://td/ns/a/sa/c"], None),  # two IDs: not an SVID
        ([], None),
        (["https://example.com/"], None),
    ],
)
def test_single_spiffe_id(uris, want):
    from controller.ca.spiffeid import single_spiffe_id

    assert single_spiffe_id(uris) == want


def test_tls_objects_call_openssl_directly_and_behave_as_the_stdlib_ones(ca):
    """Every context weft builds makes DirectSSLObjects: read, write and pending are the C
    methods (no Python wrapper per TLS record on the data path), with the stdlib's
    arguments, results and errors: data both ways, read into a buffer, pending bytes, and
    SSLWantReadError when nothing is there."""
    from agent.identity.tls import DirectSSLObject, client_context, server_context

    key = new_key()
    chain = ca.sign_workload(make_csr(key, None), "ai", "llm").chain_pem
    client = client_context(chain, key_pem(key), ca.bundle_pem())
    server = server_context(chain, key_pem(key), ca.bundle_pem())
    c, s, c_in, c_out, s_in, s_out = _connected(client, server)
    for obj in (c, s):
        assert isinstance(obj, DirectSSLObject)
        assert type(obj.read).__name__ == "builtin_function_or_method"
    with pytest.raises(ssl.SSLWantReadError):
        s.read(10)
    assert c.write(b"hello world") == 11
    s_in.write(c_out.read())
    assert s.read(5) == b"hello"
    assert s.pending() == 6
    buf = bytearray(16)
    assert s.read(16, buf) == 6 and bytes(buf[:6]) == b" world"
    assert s.pending() == 0
    s.write(b"ok")
    c_in.write(s_out.read())
    assert c.read(1024) == b"ok"
