"""The sidecar-style baselines: certificates, stunnel and HAProxy configurations.

Both baselines put one proxy in the client pod and one in the server pod, as a sidecar mesh
does, with mutual TLS 1.3 between them using ECDSA P-256 certificates signed by weft's own CA
code (the same key type, chain and signature algorithm weft's tunnel uses):

    client ─ 127.0.0.1 ─▶ proxy (client pod) ═ mTLS over the node link ═▶ proxy (server pod)
                                                            ─ 127.0.0.1 ─▶ server

- stunnel (C, OpenSSL): an L4 TLS relay; one service per workload port.
- HAProxy (C, OpenSSL) in HTTP mode: an L7 proxy parsing every request and response, with
  keep-alive and server-side connection reuse on each side (`http-reuse always`), as Envoy
  sidecars do, and `option http-no-delay` (no MSG_MORE coalescing: without it HAProxy holds
  a streamed response's first chunk back by about a millisecond, which SSE would show).
  An HTTP/2 route (gRPC) speaks h2 on every leg: h2c (`proto h2`) from the app and to the
  server, h2 over mTLS (ALPN `h2`) between the two proxies, so trailers pass end to end.

Neither checks the peer's SPIFFE ID (they cannot match URI SANs); both verify the chain.
The render functions are pure so the unit tests can read the configurations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from controller.ca.authority import CertificateAuthority, FileCAStore
from controller.ca.spiffe import key_pem, make_csr, new_key


@dataclass(frozen=True)
class Route:
    """One forwarded port: `listen` (host:port) on this proxy to `upstream` (host:port);
    `h2`: HTTP/2 on every leg (gRPC), else HTTP/1.1."""

    name: str
    listen: str
    upstream: str
    h2: bool = False


@dataclass(frozen=True)
class CertFiles:
    root: Path  # the CA certificate (trust anchor for both sides)
    cert: Path  # leaf certificate
    key: Path  # its private key
    bundle: Path  # leaf + key in one PEM (HAProxy's crt)


def make_certs(directory: Path, trust_domain: str = "cluster.local") -> dict[str, CertFiles]:
    """A throw-away CA and a client and a server workload certificate, 0600 on disk."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca = CertificateAuthority.load_or_create(FileCAStore(directory / "ca.json"), trust_domain)
    root = directory / "root.pem"
    root.write_bytes(ca.bundle_pem())
    out = {}
    for role, (ns, sa) in {"client": ("bench", "client"), "server": ("bench", "server")}.items():
        key = new_key()
        issued = ca.sign_workload(make_csr(key, ca.workload_id(ns, sa)), ns, sa)
        cert, keyf, bundle = (directory / f"{role}.{x}" for x in ("crt", "key", "pem"))
        cert.write_bytes(issued.chain_pem)
        for f, data in ((keyf, key_pem(key)), (bundle, issued.chain_pem + key_pem(key))):
            f.touch(mode=0o600)
            f.write_bytes(data)
        out[role] = CertFiles(root=root, cert=cert, key=keyf, bundle=bundle)
    return out


def stunnel_config(role: str, routes: Sequence[Route], certs: CertFiles) -> str:
    """stunnel.conf for the client side (plaintext in, TLS out) or the server side."""
    if role not in ("client", "server"):
        raise ValueError(f"role must be client or server, not {role!r}")
    lines = [
        "foreground = yes",
        "pid =",
        "debug = err",
        "syslog = no",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
        "",
    ]
    for r in routes:
        lines += [
            f"[{r.name}]",
            f"client = {'yes' if role == 'client' else 'no'}",
            f"accept = {r.listen}",
            f"connect = {r.upstream}",
            f"cert = {certs.cert}",
            f"key = {certs.key}",
            f"CAfile = {certs.root}",
            "verifyChain = yes",
            *(["requireCert = yes"] if role == "server" else []),
            "sslVersionMin = TLSv1.3",
            "",
        ]
    return "\n".join(lines)


def haproxy_config(role: str, routes: Sequence[Route], certs: CertFiles) -> str:
    """haproxy.cfg: HTTP mode, one thread; the client side originates mTLS to the server
    side, which terminates it and forwards plaintext to the app on loopback. Each side
    logs every request (HTTP log format, to stdout: the lab's process log), as weft's
    waypoint writes an access log line per request and Istio's sidecars do with access
    logging on: both sides of the comparison do that work."""
    if role not in ("client", "server"):
        raise ValueError(f"role must be client or server, not {role!r}")
    tls = f"crt {certs.bundle} ca-file {certs.root} verify required ssl-min-ver TLSv1.3"
    lines = [
        "global",
        "    nbthread 1",
        "    maxconn 4000",
        "    log stdout format raw local0 info",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option httplog",
        "    timeout connect 5s",
        "    timeout client 60s",
        "    timeout server 60s",
        "    timeout http-keep-alive 60s",
        "    option http-keep-alive",
        "    option http-no-delay",
        "    http-reuse always",
        "",
    ]
    for r in routes:
        bind = f"    bind {r.listen}"
        server = f"    server up {r.upstream}"
        alpn = "h2" if r.h2 else "http/1.1"
        if role == "client":
            server += f" ssl {tls} alpn {alpn}"
            if r.h2:
                bind += " proto h2"  # h2c prior knowledge from the app
        else:
            bind += f" ssl {tls} alpn {alpn}"
            if r.h2:
                server += " proto h2"  # h2c to the app
        lines += [
            f"frontend {r.name}_in",
            bind,
            f"    default_backend {r.name}_out",
            "",
            f"backend {r.name}_out",
            server,
            "",
        ]
    return "\n".join(lines)


WRK_POST_LUA = """\
-- 1 KB POST per request (the HTTP echo answers with the same 1 KB)
wrk.method = "POST"
wrk.body = string.rep("x", 1024)
wrk.headers["Content-Type"] = "application/octet-stream"
"""
