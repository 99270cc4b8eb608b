"""Workload certificates for the identities of this node's workloads.

One certificate per (namespace, service account) that has a workload here. Keys are made
in memory and never written to a disk: besides the process, only to the memory-backed
identity store (identity/store.py) that lets the next agent process serve at once. Each
identity has its own renewal task:

- renew at half-life (with 10% jitter so a node's certificates do not renew in lockstep);
- on failure retry with exponential backoff and full jitter, and keep serving the current
  certificate while it is still valid — a controller outage must not take traffic down;
- an identity no longer wanted (its last workload left) is dropped after a grace period,
  so connections in flight can finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from agent.identity import keys
from agent.identity.node import NodeCredential, TrustBundle, backoff_delays
from agent.identity.rpc import IDENTITY, ControllerChannel, RpcError, Status
from agent.identity.store import IdentityStore, workload_entry
from agent.identity.tls import client_context, server_context
from controller.api.gen import identity_pb2

log = logging.getLogger("weft.identity")

DROP_GRACE = 60.0  # seconds an unwanted identity's certificate is kept for draining
MAX_BATCH = 64  # CSRs in one SignWorkloadCertificates call (the controller's limit too)
BATCH_RETRY = 600.0  # seconds before asking a controller without the batch call again


class SignRefused(RpcError):
    """The controller refused one CSR of a batch (the others are answered on their own),
    with the status a call of its own would have failed with."""


def _status(code: int) -> Status:
    try:
        return Status(code)
    except ValueError:
        return Status.UNKNOWN


class SignBatcher:
    """Certificate requests made at the same moment (a node starting, pods scheduled
    together, renewals due together) go to the controller in one SignWorkloadCertificates
    call: the gRPC exchange is most of the controller's cost per certificate, and it is
    paid once per batch. A request alone, or a controller without the batch call
    (UNIMPLEMENTED: an older version), gets one SignWorkloadCertificate call each; the
    batch call is tried again BATCH_RETRY seconds later (the controller may have been
    upgraded since)."""

    def __init__(self, node: NodeCredential) -> None:
        self.node = node
        self._unbatched_until = 0.0  # monotonic time until which batches go one by one
        self.calls = 0  # calls made to the controller (batches and single requests)
        self._pending: list[tuple[identity_pb2.SignRequest, asyncio.Future[_Signed]]] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def batch_rpc(self) -> bool:
        """Whether requests made together go in one call now."""
        return time.monotonic() >= self._unbatched_until

    async def sign(self, req: identity_pb2.SignRequest) -> _Signed:
        """The signed certificate and the trust bundle that came with it; raises
        RpcError (the call failed) or SignRefused (this request was refused)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Signed] = loop.create_future()
        self._pending.append((req, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)  # what else is asked this turn joins the batch
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        # A request whose identity was dropped meanwhile (its future cancelled) is not sent.
        pending = [(r, f) for r, f in self._pending if not f.done()]
        self._pending = []
        for i in range(0, len(pending), MAX_BATCH):
            t = asyncio.get_running_loop().create_task(self._send(pending[i : i + MAX_BATCH]))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _send(
        self, batch: list[tuple[identity_pb2.SignRequest, asyncio.Future[_Signed]]]
    ) -> None:
        try:
            ch = self.node.channel()
            if self.batch_rpc and len(batch) > 1:
                self.calls += 1
                try:
                    resp = await ch.unary(
                        IDENTITY + "SignWorkloadCertificates",
                        identity_pb2.SignBatchRequest(requests=[r for r, _ in batch]),
                        identity_pb2.SignBatchResponse,
                        deadline=10,
                    )
                except RpcError as e:
                    if e.code() != Status.UNIMPLEMENTED:
                        raise
                    self._unbatched_until = time.monotonic() + BATCH_RETRY
                    log.info(
                        "the controller has no batch signing call: one certificate per call"
                        " for the next %.0f s",
                        BATCH_RETRY,
                    )
                else:
                    if len(resp.results) != len(batch):
                        raise RuntimeError(
                            f"controller answered {len(resp.results)} of {len(batch)} requests"
                        )
                    for (_, fut), res in zip(batch, resp.results, strict=True):
                        if fut.done():
                            continue  # its identity was dropped meanwhile
                        if res.HasField("response"):
                            fut.set_result(_Signed(res.response, resp.trust_bundle_pem))
                        else:
                            fut.set_exception(SignRefused(_status(res.code), res.message))
                    return
            self.calls += len(batch)
            await asyncio.gather(*(self._one(ch, r, f) for r, f in batch))
        except Exception as e:  # the call failed: every request of it learns why
            err = (
                e
                if isinstance(e, RpcError)
                else SignRefused(Status.UNKNOWN, f"{type(e).__name__}: {e}")
            )
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
        finally:
            # Cancelled (the manager is closing) or anything else: no request is left
            # waiting for an answer that will not come.
            for _, fut in batch:
                if not fut.done():
                    fut.cancel()

    @staticmethod
    async def _one(
        ch: ControllerChannel,
        req: identity_pb2.SignRequest,
        fut: asyncio.Future[_Signed],
    ) -> None:
        try:
            resp = await ch.unary(
                IDENTITY + "SignWorkloadCertificate", req, identity_pb2.SignResponse, deadline=10
            )
        except RpcError as e:
            if not fut.done():
                fut.set_exception(e)
            return
        if not fut.done():
            fut.set_result(_Signed(resp, resp.trust_bundle_pem))

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()


class _Signed(NamedTuple):
    response: identity_pb2.SignResponse
    trust_bundle_pem: bytes


@dataclass
class WorkloadCert:
    spiffe_id: str
    namespace: str
    service_account: str
    chain_pem: bytes
    key_pem: bytes
    not_before: float
    not_after: float
    serial_hex: str
    issued_at: float = field(default_factory=time.time)
    _contexts: dict[str, tuple[int, ssl.SSLContext]] = field(default_factory=dict, repr=False)

    def valid(self, now: float | None = None) -> bool:
        return (now or time.time()) < self.not_after

    def context(self, side: str, trust: TrustBundle) -> ssl.SSLContext:
        """A client or server TLS context presenting this identity (cached per bundle)."""
        cached = self._contexts.get(side)
        if cached is None or cached[0] != trust.version:
            make = client_context if side == "client" else server_context
            cached = (trust.version, make(self.chain_pem, self.key_pem, trust.pem))
            self._contexts[side] = cached
        return cached[1]

    def to_dict(self) -> dict[str, object]:
        return {
            "spiffeId": self.spiffe_id,
            "serial": self.serial_hex,
            "notBefore": _iso(self.not_before),
            "notAfter": _iso(self.not_after),
            "expiresInSeconds": int(self.not_after - time.time()),
        }


def _renew_at(cert: WorkloadCert) -> float:
    """At half-life, with jitter so that certificates issued together renew apart."""
    half = (cert.not_after - cert.not_before) / 2
    return cert.not_before + half * random.uniform(0.9, 1.0)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class IdentityManager:
    def __init__(
        self, node: NodeCredential, trust: TrustBundle, *, trust_domain: str, ttl: int = 0
    ) -> None:
        self.node = node
        self.trust = trust
        self.trust_domain = trust_domain
        self.ttl = ttl
        self._certs: dict[tuple[str, str], WorkloadCert] = {}
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._waiters: dict[tuple[str, str], asyncio.Event] = {}
        self._drops: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.failures = 0
        self.store: IdentityStore | None = None
        self.signer = SignBatcher(node)

    def restore(self, store: IdentityStore | None) -> int:
        """Take the workload certificates a previous agent process kept (unexpired ones),
        so this one serves them before the controller answers; saves every later one
        there. How many were restored."""
        self.store = store
        if store is None:
            return 0
        n = 0
        for name in store.names("workload_"):
            r = store.load(name)
            if r is None:
                continue
            try:
                cert = WorkloadCert(
                    spiffe_id=r["spiffeId"],
                    namespace=r["namespace"],
                    service_account=r["serviceAccount"],
                    chain_pem=r["chain"].encode(),
                    key_pem=r["key"].encode(),
                    not_before=float(r["notBefore"]),
                    not_after=float(r["notAfter"]),
                    serial_hex=r["serial"],
                )
            except (AttributeError, KeyError, TypeError, ValueError) as e:
                log.warning("identity store: %s unusable (%s); ignored", name, e)
                continue
            self._certs[(cert.namespace, cert.service_account)] = cert
            n += 1
        if n:
            log.info("%d workload certificate(s) restored from the identity store", n)
        return n

    def _save(self, cert: WorkloadCert) -> None:
        if self.store is not None:
            self.store.save(
                workload_entry(cert.namespace, cert.service_account),
                {
                    "spiffeId": cert.spiffe_id,
                    "namespace": cert.namespace,
                    "serviceAccount": cert.service_account,
                    "chain": cert.chain_pem.decode(),
                    "key": cert.key_pem.decode(),
                    "notBefore": cert.not_before,
                    "notAfter": cert.not_after,
                    "serial": cert.serial_hex,
                },
            )

    # ---- what we need ------------------------------------------------------------------

    def want(self, identities: set[tuple[str, str]]) -> None:
        """Make the set of (namespace, service account) this node holds certificates for."""
        for ident in identities:
            if ident in self._drops:
                self._drops.pop(ident).cancel()
            if ident not in self._tasks:
                self._tasks[ident] = asyncio.create_task(
                    self._keep(ident), name=f"cert-{ident[0]}-{ident[1]}"
                )
        # Restored certificates (identity store) have no task until wanted: they leave too.
        for ident in set(self._tasks) | set(self._certs):
            if ident not in identities and ident not in self._drops:
                self._drops[ident] = asyncio.get_running_loop().call_later(
                    DROP_GRACE, self._drop, ident
                )

    def _drop(self, ident: tuple[str, str]) -> None:
        self._drops.pop(ident, None)
        task = self._tasks.pop(ident, None)
        if task:
            task.cancel()
        self._certs.pop(ident, None)
        if self.store is not None:
            self.store.remove(workload_entry(*ident))
        log.info("dropped certificate for ns/%s/sa/%s: no workload needs it", *ident)

    def get(self, namespace: str, service_account: str) -> WorkloadCert | None:
        c = self._certs.get((namespace, service_account))
        return c if c is not None and c.valid() else None

    def by_id(self, spiffe_id: str) -> WorkloadCert | None:
        for c in self._certs.values():
            if c.spiffe_id == spiffe_id and c.valid():
                return c
        return None

    async def wait_for(
        self, namespace: str, service_account: str, limit: float = 10.0
    ) -> WorkloadCert | None:
        """The certificate, waiting up to `limit` seconds if its first issue is under way."""
        c = self.get(namespace, service_account)
        if c is not None:
            return c
        ev = self._waiters.setdefault((namespace, service_account), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), limit)
        return self.get(namespace, service_account)

    def certs(self) -> list[WorkloadCert]:
        return sorted(self._certs.values(), key=lambda c: c.spiffe_id)

    # ---- keeping one identity fresh ----------------------------------------------------

    async def _fetch(self, ident: tuple[str, str]) -> WorkloadCert:
        await self.node.ready.wait()
        spiffe = f"spiffe://{self.trust_domain}/ns/{ident[0]}/sa/{ident[1]}"
        key_pem, csr = keys.new_key_and_csr(spiffe)
        asked = time.time()
        resp, bundle = await self.signer.sign(
            identity_pb2.SignRequest(
                namespace=ident[0],
                service_account=ident[1],
                csr_pem=csr,
                ttl_seconds=self.ttl,
            )
        )
        self.trust.update(bundle)
        return WorkloadCert(
            spiffe_id=resp.spiffe_id,
            namespace=ident[0],
            service_account=ident[1],
            chain_pem=resp.certificate_chain_pem,
            key_pem=key_pem,
            # From the controller (an older one does not say: the time it was asked).
            not_before=float(resp.not_before_unix) or asked,
            not_after=float(resp.not_after_unix),
            serial_hex=resp.serial_hex,
        )

    async def _keep(self, ident: tuple[str, str]) -> None:
        delay = backoff_delays()
        held = self._certs.get(ident)
        if held is not None and held.valid():
            # Restored from the store: renew when it is due, not at once.
            ev = self._waiters.pop(ident, None)
            if ev:
                ev.set()
            await asyncio.sleep(max(0.0, _renew_at(held) - time.time()))
        while True:
            try:
                cert = await self._fetch(ident)
            except asyncio.CancelledError:
                raise
            except RpcError as e:  # SignRefused too
                self.failures += 1
                current = self._certs.get(ident)
                wait = delay()
                if e.code() == Status.PERMISSION_DENIED:
                    wait = max(wait, 5.0)  # config may not have reached the controller yet
                log.warning(
                    "certificate for ns/%s/sa/%s: %s: %s; %s, retrying in %.1fs",
                    ident[0],
                    ident[1],
                    e.code().name,
                    e.details(),
                    f"keeping the current one (valid until {_iso(current.not_after)})"
                    if current and current.valid()
                    else "none held",
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            self._certs[ident] = cert
            self._save(cert)
            delay = backoff_delays()
            ev = self._waiters.pop(ident, None)
            if ev:
                ev.set()
            log.info(
                "certificate for %s issued (serial %s, until %s)",
                cert.spiffe_id,
                cert.serial_hex,
                _iso(cert.not_after),
            )
            await asyncio.sleep(max(1.0, _renew_at(cert) - time.time()))

    async def close(self) -> None:
        self.signer.close()
        for h in self._drops.values():
            h.cancel()
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
