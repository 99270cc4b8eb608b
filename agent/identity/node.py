"""The node's own credential: bootstrap with a token, then mutual TLS to the controller.

The node key is made here and never reaches a disk: besides the process, it is kept only
in the memory-backed identity store (identity/store.py) for the next agent process. The
certificate is renewed at half-life; if it ever expires (controller away for a day), the
agent bootstraps again with its token.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.identity import keys
from agent.identity.rpc import (
    BOOTSTRAP,
    IDENTITY,
    ControllerChannel,
    RpcError,
    Status,
    server_auth_context,
)
from agent.identity.store import NODE, IdentityStore
from agent.identity.tls import client_context
from controller.api.gen import identity_pb2
from controller.errors import EnvironmentProblem, RemoteRefused

log = logging.getLogger("weft.identity.node")


@dataclass(frozen=True)
class ControllerEndpoint:
    address: str  # host:port of the mTLS API (15012)
    bootstrap_address: str  # host:port of the bootstrap API (15010)
    server_name: str = "weft-controller.weft-system.svc"
    ca_bundle_file: Path | None = None  # initial trust in the controller (public roots)
    token_file: Path | None = None  # local store: this node's bootstrap token
    # Kubernetes: the projected service-account token (audience weft-controller), sent when
    # no bootstrap token is configured (AgentSettings.sa_token_file).
    sa_token_file: Path | None = None


class TrustBundle:
    """The roots this agent trusts, updated from the controller; version bumps on change."""

    def __init__(self, pem: bytes = b"") -> None:
        self.pem = pem
        self.version = 0
        self._listeners: list[Callable[[bytes], None]] = []

    def update(self, pem: bytes) -> None:
        if pem and pem != self.pem:
            self.pem = pem
            self.version += 1
            log.info("trust bundle updated (%d root(s))", pem.count(b"BEGIN CERTIFICATE"))
            for fn in list(self._listeners):
                fn(pem)

    def subscribe(self, fn: Callable[[bytes], None]) -> None:
        self._listeners.append(fn)


def backoff_delays(base: float = 1.0, cap: float = 300.0) -> Callable[[], float]:
    """Exponential backoff with full jitter (AWS architecture blog's recommendation)."""
    attempt = 0

    def next_delay() -> float:
        nonlocal attempt
        attempt += 1
        return random.uniform(0, min(cap, base * 2 ** min(attempt, 20)))

    return next_delay


class NodeCredential:
    def __init__(
        self,
        node: str,
        endpoint: ControllerEndpoint,
        trust: TrustBundle,
        *,
        token: str | None = None,
    ) -> None:
        self.node = node
        self.endpoint = endpoint
        self.trust = trust
        self._token = token
        self._key_pem = keys.new_key()  # PEM: agent/identity/keys.py
        self.chain_pem = b""
        self.not_after = 0.0
        self.spiffe_id = ""
        self._channel: ControllerChannel | None = None
        self._retired: list[ControllerChannel] = []  # replaced, closed a minute later
        self._channel_key: tuple[bytes, bytes] | None = None
        self.ready = asyncio.Event()
        self.store: IdentityStore | None = None

    def restore(self, store: IdentityStore | None) -> bool:
        """Take the node credential a previous agent process kept (identity/store.py), so
        this one serves before the controller answers. Saves every later one there."""
        self.store = store
        record = store.load(NODE) if store is not None else None
        if record is None:
            return False
        try:
            key_pem = record["key"].encode()
            keys.check_key(key_pem)  # an EC P-256 key, or KeyError_ (a ValueError)
            chain = record["chain"].encode()
            not_after = float(record["notAfter"])
            spiffe_id = str(record["spiffeId"])
            trust = str(record.get("trust") or "").encode()
        except (AttributeError, KeyError, ValueError, TypeError) as e:
            log.warning("identity store: node credential unusable (%s); bootstrapping", e)
            return False
        self._key_pem = key_pem
        self.chain_pem, self.not_after, self.spiffe_id = chain, not_after, spiffe_id
        if trust:
            self.trust.update(trust)
        self.ready.set()
        log.info("node credential %s restored from the identity store", self.spiffe_id)
        return True

    def _save(self) -> None:
        if self.store is None:
            return
        self.store.save(
            NODE,
            {
                "key": self._key_pem.decode(),
                "chain": self.chain_pem.decode(),
                "notAfter": self.not_after,
                "spiffeId": self.spiffe_id,
                "trust": self.trust.pem.decode(),
            },
        )

    def _initial_trust(self) -> bytes:
        if self.trust.pem:
            return self.trust.pem
        f = self.endpoint.ca_bundle_file
        if f is None:
            raise EnvironmentProblem(
                "no trust bundle to verify the controller with",
                hint="pass --ca-bundle (the controller writes "
                "trust-bundle.pem in its state directory)",
            )
        try:
            pem = f.read_bytes()
        except OSError as e:
            raise EnvironmentProblem(
                f"cannot read the controller's trust bundle {f}: {e}",
                hint="is the controller running, and its state dir shared with this node?",
            ) from None
        self.trust.update(pem)
        return pem

    def _token_value(self) -> str:
        if self._token:
            return self._token
        f = self.endpoint.token_file
        if f is None:
            raise EnvironmentProblem(
                f"node {self.node} has no bootstrap token",
                hint="create one: weft controller token --node NODE",
            )
        try:
            return f.read_text().strip()
        except OSError as e:
            raise EnvironmentProblem(f"cannot read bootstrap token {f}: {e}") from None

    def _credential(self) -> dict[str, str]:
        """The bootstrap credential: the node's token (local store) when one is configured,
        else the pod's service-account token (Kubernetes), read afresh each time because
        the kubelet rotates it."""
        if self._token or self.endpoint.token_file is not None:
            return {"token": self._token_value()}
        f = self.endpoint.sa_token_file
        if f is None or not f.exists():
            raise EnvironmentProblem(
                f"node {self.node} has no bootstrap credential: no token file, and no "
                f"service-account token at {f}",
                hint="local store: weft controller token --node NODE, then --token-file; "
                "Kubernetes: mount the projected token (audience weft-controller) there",
            )
        try:
            jwt = f.read_text().strip()
        except OSError as e:
            raise EnvironmentProblem(f"cannot read the service-account token {f}: {e}") from None
        return {"service_account_jwt": jwt}

    async def _bootstrap(self) -> None:
        # The CSR names no ID: the controller decides the node's ID from the credential.
        ch = ControllerChannel(
            self.endpoint.bootstrap_address,
            self.endpoint.server_name,
            server_auth_context(self._initial_trust()),
        )
        try:
            resp = await ch.unary(
                BOOTSTRAP,
                identity_pb2.BootstrapRequest(
                    node=self.node,
                    csr_pem=keys.make_csr(self._key_pem, None),
                    **self._credential(),
                ),
                identity_pb2.BootstrapResponse,
                deadline=10,
            )
        except RpcError as e:
            if e.code() in (
                Status.UNAUTHENTICATED,
                Status.PERMISSION_DENIED,
                Status.INVALID_ARGUMENT,
            ):
                raise RemoteRefused(
                    f"controller refused to bootstrap node {self.node}: {e.details()}"
                ) from None
            raise
        finally:
            ch.close()
        self._accept(resp)
        log.info(
            "node %s bootstrapped: %s valid until %s",
            self.node,
            self.spiffe_id,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)),
        )

    def _accept(self, resp: identity_pb2.BootstrapResponse) -> None:
        self.chain_pem = resp.certificate_chain_pem
        self.not_after = float(resp.not_after_unix)
        self.spiffe_id = resp.spiffe_id
        self.trust.update(resp.trust_bundle_pem)
        self._save()
        self.ready.set()

    async def _renew(self) -> None:
        key_pem, csr = keys.new_key_and_csr(None)
        resp = await self.channel().unary(
            IDENTITY + "RenewNodeCertificate",
            identity_pb2.RenewNodeRequest(csr_pem=csr),
            identity_pb2.BootstrapResponse,
            deadline=10,
        )
        self._key_pem = key_pem
        self._accept(resp)
        log.info(
            "node certificate renewed, valid until %s",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)),
        )

    def channel(self) -> ControllerChannel:
        """An mTLS channel with the current node certificate (rebuilt when it changes):
        the controller's certificate must chain to the trust bundle and name the
        endpoint's server name."""
        want = (self.chain_pem, self.trust.pem)
        if self._channel is None or self._channel_key != want:
            old = self._channel
            ctx = client_context(self.chain_pem, self._key_pem, self.trust.pem)
            ctx.check_hostname = True
            self._channel = ControllerChannel(self.endpoint.address, self.endpoint.server_name, ctx)
            self._channel_key = want
            if old is not None:
                # Streams on the old channel (the config stream) end within a minute: the
                # caller reopens them on the new one.
                self._retired.append(old)
                asyncio.get_running_loop().call_later(60, self._retire, old)
        return self._channel

    async def run(self) -> None:
        """Bootstrap, then keep the certificate fresh until cancelled."""
        delay = backoff_delays()
        while not self.chain_pem:
            try:
                await self._bootstrap()
            except RemoteRefused:
                raise
            except (RpcError, OSError) as e:
                wait = delay()
                if isinstance(e, RpcError) and e.code() == Status.UNAVAILABLE:
                    # The controller is away: without a node credential this node serves
                    # nothing, so ask again soon (jittered) rather than after a growing wait.
                    wait = random.uniform(0.5, 1.5)
                log.warning(
                    "bootstrap of node %s failed (%s); retrying in %.1fs",
                    self.node,
                    e.details() if isinstance(e, RpcError) else e,
                    wait,
                )
                await asyncio.sleep(wait)
        delay = backoff_delays()
        while True:
            now = time.time()
            lifetime = max(self.not_after - now, 0)
            await asyncio.sleep(max(1.0, lifetime / 2 * random.uniform(0.9, 1.0)))
            while True:
                try:
                    if time.time() >= self.not_after:
                        await self._bootstrap()  # expired: only the token can get us back
                    else:
                        await self._renew()
                    delay = backoff_delays()
                    break
                except (RpcError, OSError, RemoteRefused) as e:
                    wait = delay()
                    log.warning(
                        "node certificate renewal failed (%s); keeping the current "
                        "one, retrying in %.1fs",
                        e,
                        wait,
                    )
                    await asyncio.sleep(wait)

    def _retire(self, old: ControllerChannel) -> None:
        if old in self._retired:
            self._retired.remove(old)
            old.close()

    async def close(self) -> None:
        for old in self._retired:
            old.close()
        self._retired.clear()
        if self._channel is not None:
            self._channel.close()
