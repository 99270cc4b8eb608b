"""The mesh CA: ECDSA P-256 roots that sign SPIFFE X.509 identities.

- Workload certificates carry exactly one URI SAN, spiffe://<td>/ns/<ns>/sa/<sa>, an empty
  subject (so the SAN extension is critical, RFC 5280 4.2.1.6), and both server and client
  auth: the same certificate terminates HBONE inbound and originates it outbound.
- Node certificates carry spiffe://<td>/weft/node/<name>. That path cannot parse as a
  workload identity, so a node certificate never passes a workload authorization check.
- Rotation: `rotate()` makes a new root that signs from then on; the old root stays in the
  trust bundle for an overlap period, so certificates it signed keep verifying until
  they are renewed under the new root.

The CA state (roots, the active key) is one JSON document persisted by a CAStore: a file
with 0600 permissions locally, a Kubernetes Secret in a cluster.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.errors import WeftError

log = logging.getLogger("weft.ca")

ROOT_LIFETIME = 10 * 365 * 86400  # seconds; roots are rotated deliberately, not by expiry
DEFAULT_WORKLOAD_TTL = 24 * 3600  # seconds; renewed at half-life by the agent
MAX_WORKLOAD_TTL = 7 * 24 * 3600  # a cap on what an agent may ask for
NODE_CERT_TTL = 24 * 3600
CLOCK_SKEW = 300  # seconds backdated on notBefore so a node with a slow clock accepts it
DEFAULT_OVERLAP = 7 * 24 * 3600  # the old root stays trusted this long after a rotation


class CertificateRequestRejected(WeftError):
    exit_code = 5


class CAStore(Protocol):
    """Where the CA state lives. `load` returns None when there is none yet."""

    def load(self) -> bytes | None: ...

    def save(self, data: bytes) -> None: ...

    def describe(self) -> str: ...


class FileCAStore:
    """CA state in one file readable only by its owner (0600), written atomically."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def describe(self) -> str:
        return f"file {self.path}"

    def load(self) -> bytes | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        if st.st_mode & 0o077:
            # Someone widened the permissions: the CA key may have leaked. Refuse rather
            # than keep signing with a key we cannot vouch for.
            raise WeftError(
                f"CA state {self.path} has mode {oct(st.st_mode & 0o777)}; it must be 0600",
                hint=f"check who read it, then: chmod 600 {self.path} (or rotate the root)",
            )
        with open(self.path, "rb") as f:
            return f.read()

    def save(self, data: bytes) -> None:
        d = os.path.dirname(self.path) or "."
        os.makedirs(d, mode=0o700, exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


@dataclass
class Root:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | None  # only the active root keeps its key
    retire_after: float | None  # unix time after which it leaves the bundle

    @property
    def not_after(self) -> float:
        return self.cert.not_valid_after_utc.timestamp()


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes
    not_after: float
    serial_hex: str
    spiffe_id: str
    not_before: float = 0.0  # backdated by CLOCK_SKEW


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _serial() -> int:
    # 127 random bits: positive, under 20 bytes, unpredictable (CA/B BR 7.1).
    return secrets.randbits(127) | 1


def _in_bundle(roots: list[Root], now: float) -> list[x509.Certificate]:
    """The roots trusted at `now`: neither retired nor expired."""
    return [
        r.cert
        for r in roots
        if (r.retire_after is None or r.retire_after > now) and r.not_after > now
    ]


MAX_CSR_BYTES = 64 * 1024  # a P-384 or RSA-4096 CSR is 1-2 KB of PEM


def _sized(csr_pem: bytes, spiffe_id: str) -> bytes:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise CertificateRequestRejected(
            f"CSR for {spiffe_id} is {len(csr_pem)} bytes, over the {MAX_CSR_BYTES} limit"
        )
    return csr_pem


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class SigningRequest:
    """One certificate to issue: the CSR (its key is proven by its signature) and what the
    caller is authorized for."""

    csr_pem: bytes
    spiffe_id: str
    ttl: int
    dns_names: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()


# Extensions every issued certificate carries (built once: they are immutable values).
_LEAF = x509.BasicConstraints(ca=False, path_length=None)
_EKU = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])


def _key_usage(key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_KEY_USAGE = {True: _key_usage(True), False: _key_usage(False)}


@dataclass(frozen=True)
class SigningKey:
    """The active root as signing needs it; `der` is what a signer process is sent."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    aki: x509.AuthorityKeyIdentifier
    der: tuple[bytes, bytes]  # (PKCS#8 key, certificate)

    @classmethod
    def of(cls, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> SigningKey:
        der = (
            key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
            cert.public_bytes(serialization.Encoding.DER),
        )
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key())
        return cls(key, cert, aki, der)

    @classmethod
    def from_der(cls, key_der: bytes, cert_der: bytes) -> SigningKey:
        key = serialization.load_der_private_key(key_der, None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the signing key is not an ECDSA key")
        return cls.of(key, x509.load_der_x509_certificate(cert_der))


def issue(root: SigningKey, req: SigningRequest) -> Issued:
    """Check the CSR and sign its key for `req.spiffe_id` under `root`: the one signing
    function, run by the CA in-process and by the signer processes."""
    csr = check_csr(req.csr_pem, req.spiffe_id)
    now = _now().replace(microsecond=0)  # X.509 times are whole seconds; Issued says the same
    not_after = min(now + dt.timedelta(seconds=req.ttl), root.cert.not_valid_after_utc)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(req.spiffe_id)]
    sans += [x509.DNSName(d) for d in req.dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in req.ips]
    serial = _serial()
    public_key = csr.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(root.cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW))
        .not_valid_after(not_after)
        .add_extension(_LEAF, critical=True)
        .add_extension(_KEY_USAGE[isinstance(public_key, rsa.RSAPublicKey)], critical=True)
        .add_extension(_EKU, critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .add_extension(root.aki, critical=False)
        .sign(root.key, hashes.SHA256())
    )
    return Issued(
        chain_pem=_pem(cert),
        not_after=not_after.timestamp(),
        serial_hex=f"{serial:x}",
        spiffe_id=req.spiffe_id,
        not_before=(now - dt.timedelta(seconds=CLOCK_SKEW)).timestamp(),
    )


class CertificateAuthority:
    def __init__(
        self,
        store: CAStore,
        trust_domain: str,
        *,
        workload_ttl: int = DEFAULT_WORKLOAD_TTL,
        max_ttl: int = MAX_WORKLOAD_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.workload_ttl = workload_ttl
        self.max_ttl = max_ttl
        self.clock = clock
        self.roots: list[Root] = []
        self._lock = threading.Lock()
        self.issued = 0
        self._signing_key: SigningKey | None = None
        self._bundle_pem: tuple[list[Root], float, bytes] | None = None  # (roots, until, PEM)

    # ---- lifecycle -------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, store: CAStore, trust_domain: str, **kw: object
    ) -> CertificateAuthority:
        ca = cls(store, trust_domain, **kw)  # type: ignore[arg-type]
        data = store.load()
        if data is None:
            ca.roots = [ca._new_root()]
            ca._save()
            log.info("created a new root CA for %s in %s", trust_domain, store.describe())
        else:
            ca._restore(data)
            log.info(
                "loaded root CA for %s from %s (%d roots in bundle)",
                trust_domain,
                store.describe(),
                len(ca.roots),
            )
        return ca

    def _new_root(self) -> Root:
        key = ec.generate_private_key(ec.SECP256R1())
        serial = _serial()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "weft"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"weft root {serial:032x}"[:64]),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - dt.timedelta(seconds=CLOCK_SKEW))
            .not_valid_after(now + dt.timedelta(seconds=ROOT_LIFETIME))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return Root(cert=cert, key=key, retire_after=None)

    def _save(self) -> None:
        doc = {
            "version": 1,
            "trustDomain": self.trust_domain,
            "roots": [
                {
                    "cert": _pem(r.cert).decode(),
                    "key": base64.b64encode(
                        r.key.private_bytes(
                            serialization.Encoding.DER,
                            serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption(),
                        )
                    ).decode()
                    if r.key
                    else None,
                    "retireAfter": r.retire_after,
                }
                for r in self.roots
            ],
        }
        self.store.save(json.dumps(doc, indent=1).encode())

    def _restore(self, data: bytes) -> None:
        try:
            doc = json.loads(data)
            if doc.get("trustDomain") != self.trust_domain:
                raise WeftError(
                    f"CA state in {self.store.describe()} is for trust domain "
                    f"{doc.get('trustDomain')!r}, not {self.trust_domain!r}",
                    hint="a trust domain change needs a new CA; move the old state away",
                )
            roots = []
            for r in doc["roots"]:
                cert = x509.load_pem_x509_certificate(r["cert"].encode())
                key = None
                if r.get("key"):
                    k = serialization.load_der_private_key(base64.b64decode(r["key"]), None)
                    if not isinstance(k, ec.EllipticCurvePrivateKey):
                        raise ValueError("root key is not an EC key")
                    key = k
                roots.append(Root(cert=cert, key=key, retire_after=r.get("retireAfter")))
        except (KeyError, ValueError, TypeError) as e:
            raise WeftError(
                f"CA state in {self.store.describe()} is unreadable: {e}",
                hint="restore it from backup; a new root would untrust every "
                "workload certificate in the mesh",
            ) from None
        if not roots or roots[0].key is None:
            raise WeftError(f"CA state in {self.store.describe()} has no active root key")
        self.roots = roots

    # ---- trust bundle ----------------------------------------------------------------

    @property
    def active(self) -> Root:
        return self.roots[0]

    def bundle(self) -> list[x509.Certificate]:
        return _in_bundle(self.roots, self.clock())

    def bundle_pem(self) -> bytes:
        """The bundle as PEM; every answer to an agent carries it, so it is made again only
        when the roots change or one of them leaves it (its retirement or expiry). One
        read of `roots` serves the PEM, its expiry and the cache key: a rotation on another
        thread replaces the list, and must not leave the old bundle cached under the new."""
        roots = self.roots
        now = self.clock()
        cached = self._bundle_pem
        if cached is not None and cached[0] is roots and now < cached[1]:
            return cached[2]
        pem = b"".join(_pem(c) for c in _in_bundle(roots, now))
        ends = [t for r in roots for t in (r.retire_after, r.not_after) if t and t > now]
        self._bundle_pem = (roots, min(ends, default=now), pem)
        return pem

    def rotate(self, overlap: float = DEFAULT_OVERLAP) -> None:
        """Make a new active root; keep the old ones trusted for `overlap` seconds."""
        with self._lock:
            new = self._new_root()
            retire = self.clock() + overlap
            kept = []
            for r in self.roots:
                kept.append(
                    Root(cert=r.cert, key=None, retire_after=min(r.retire_after or retire, retire))
                )
            self.roots = [
                new,
                *[r for r in kept if r.retire_after and r.retire_after > self.clock()],
            ]
            self._save()
        log.info(
            "rotated root CA: new root %x; %d old root(s) trusted until %s",
            new.cert.serial_number,
            len(self.roots) - 1,
            dt.datetime.fromtimestamp(retire, dt.UTC).isoformat(),
        )

    # ---- signing ---------------------------------------------------------------------

    def workload_id(self, namespace: str, service_account: str) -> str:
        return f"spiffe://{self.trust_domain}/ns/{namespace}/sa/{service_account}"

    def node_id(self, node: str) -> str:
        return f"spiffe://{self.trust_domain}/weft/node/{node}"

    def workload_request(
        self, csr_pem: bytes, namespace: str, service_account: str, ttl: int = 0
    ) -> SigningRequest:
        """What signing a workload's CSR means: its SPIFFE ID, and the TTL it asked for
        within this CA's cap (0: the default). Raises CertificateRequestRejected for a
        negative TTL or an oversized CSR."""
        spiffe_id = self.workload_id(namespace, service_account)
        if ttl < 0:
            raise CertificateRequestRejected(f"ttl_seconds {ttl} for {spiffe_id} is negative")
        ttl = min(ttl or self.workload_ttl, self.max_ttl)
        return SigningRequest(_sized(csr_pem, spiffe_id), spiffe_id, ttl)

    def node_request(self, csr_pem: bytes, node: str) -> SigningRequest:
        spiffe_id = self.node_id(node)
        return SigningRequest(_sized(csr_pem, spiffe_id), spiffe_id, NODE_CERT_TTL)

    def sign_workload(
        self, csr_pem: bytes, namespace: str, service_account: str, ttl: int = 0
    ) -> Issued:
        return self.sign(self.workload_request(csr_pem, namespace, service_account, ttl))

    def sign_node(self, csr_pem: bytes, node: str) -> Issued:
        return self.sign(self.node_request(csr_pem, node))

    def sign_server(
        self, csr_pem: bytes, spiffe_id: str, dns_names: list[str], ips: list[str], ttl: int
    ) -> Issued:
        """The controller's own serving certificate (DNS/IP SANs for gRPC clients)."""
        return self.sign(SigningRequest(csr_pem, spiffe_id, ttl, tuple(dns_names), tuple(ips)))

    def signing_key(self) -> SigningKey:
        """The active root's key and certificate, as the signer processes take them (DER,
        made once per root)."""
        root = self.active
        cached = self._signing_key
        if cached is None or cached.cert is not root.cert:
            assert root.key is not None
            cached = SigningKey.of(root.key, root.cert)
            self._signing_key = cached
        return cached

    def sign(self, req: SigningRequest) -> Issued:
        """Sign in this thread (controller/ca/signer.py signs in worker processes with the
        same function)."""
        issued = issue(self.signing_key(), req)
        self.issued += 1
        return issued


def check_csr(csr_pem: bytes, spiffe_id: str) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise CertificateRequestRejected(f"CSR for {spiffe_id} is not valid PEM: {e}") from None
    try:
        if not csr.is_signature_valid:
            raise CertificateRequestRejected(f"CSR for {spiffe_id} has a bad signature")
    except InvalidSignature:
        raise CertificateRequestRejected(f"CSR for {spiffe_id} has a bad signature") from None
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ("secp256r1", "secp384r1"):
            raise CertificateRequestRejected(
                f"CSR key curve {key.curve.name} is not allowed (use P-256 or P-384)"
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise CertificateRequestRejected(
                f"CSR RSA key of {key.key_size} bits is too small (2048 minimum)"
            )
    else:
        raise CertificateRequestRejected("CSR key type must be ECDSA or RSA")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        if uris and uris != [spiffe_id]:
            raise CertificateRequestRejected(
                f"CSR asks for {', '.join(uris)} but the caller is authorized for {spiffe_id}"
            )
    except x509.ExtensionNotFound:
        pass
    return csr
