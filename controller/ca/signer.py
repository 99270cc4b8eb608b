"""Certificates signed in worker processes, so signing does not hold the event loop.

The controller's event loop serves every agent's gRPC calls and config streams; a
signature (check the CSR's proof of possession, build and sign the certificate) is about
0.25 ms of CPU under the GIL, which threads cannot spread (measured: 3,060 certificates/s
in one thread, 2,828 in two). `Signer` runs `authority.issue` -- the same function the CA
calls in-process -- in `processes` children started with `python -m controller.ca.signer`,
each on its own socketpair, driven by the loop without helper threads (a
ProcessPoolExecutor cost the parent 0.22 ms per call in queues and threads, as much as
the signing it saved).

Wire: frames of a 4-byte big-endian length and a pickled tuple, between this process and
children it started itself (nothing else holds either end of a socketpair).
  request  (id, key DER, certificate DER, CSR PEM, SPIFFE ID, TTL, DNS names, IPs)
  response (id, "ok", (chain PEM, not after, serial hex)) | (id, "rejected", reason)
           | (id, "error", text)
The active root travels with each request (about 0.7 KB), so a rotation needs no
coordination: a child loads each key it is sent once and keeps the last few.

Signing never depends on a child being up: before a child says it is ready, after it
dies (it is started again, with backoff), when a request to it fails or takes longer than
REQUEST_TIMEOUT (the child is killed), the request is signed in-process instead. The
decisions the caller must make -- which identity, which TTL -- are made before a request
is sent (CertificateAuthority.workload_request); a child only checks and signs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import pickle
import socket
import struct
import sys
from collections import OrderedDict
from typing import Any

from controller.ca.authority import (
    CertificateAuthority,
    CertificateRequestRejected,
    Issued,
    SigningKey,
    SigningRequest,
    issue,
)

log = logging.getLogger("weft.ca")

REQUEST_TIMEOUT = 10.0  # seconds; a child slower than this is taken as hung
MAX_FRAME = 1 << 20
_LEN = struct.Struct("!I")


def default_processes() -> int:
    """One signer per CPU this process may run on beyond the one the event loop needs (at
    least one, at most 4)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus - 1))


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


class _Child:
    """One signer process and the requests it has in flight."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.ready = False
        self.pending: dict[int, asyncio.Future[tuple[str, Any]]] = {}

    def fail_pending(self, why: str) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionError(why))
        self.pending.clear()


class Signer:
    """Signs SigningRequests for `ca`: in `processes` children, else in this process."""

    def __init__(self, ca: CertificateAuthority, processes: int | None = None) -> None:
        self.ca = ca
        self.processes = default_processes() if processes is None else processes
        self._children = [_Child(i) for i in range(self.processes)]
        self._tasks: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._stopping = False
        self.in_process = 0  # requests signed here (no child ready, or one failed)
        self.restarts = 0

    @property
    def ready_children(self) -> int:
        return sum(c.ready for c in self._children)

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the children (their readiness is not waited for: until a child says it is
        ready, its share is signed here)."""
        for child in self._children:
            self._tasks.append(asyncio.create_task(self._keep(child), name=f"signer-{child.index}"))

    async def stop(self) -> None:
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()

    async def _keep(self, child: _Child) -> None:
        """Run one child; start it again when it ends (1 s, doubling to 30 s, apart)."""
        delay = 1.0
        while True:
            started = asyncio.get_running_loop().time()
            try:
                await self._run(child)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a child that cannot start is said, and tried again
                log.warning("signer process %d: %s", child.index, e)
            if self._stopping:
                return
            if asyncio.get_running_loop().time() - started > 60:
                delay = 1.0
            self.restarts += 1
            log.warning(
                "signer process %d ended; certificates are signed in the controller's "
                "process until it is back (in %.0f s)",
                child.index,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def _run(self, child: _Child) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "controller.ca.signer",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        child.proc = proc
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            child.writer = writer
            await self._read(child, reader)
        finally:
            child.ready = False
            child.writer = None
            child.fail_pending("the signer process ended")
            with contextlib.suppress(Exception):
                ours.close()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())

    async def _read(self, child: _Child, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                head = await reader.readexactly(_LEN.size)
                (n,) = _LEN.unpack(head)
                if n > MAX_FRAME:
                    raise ValueError(f"a {n}-byte frame from the signer process")
                msg = pickle.loads(await reader.readexactly(n))
            except asyncio.IncompleteReadError:
                return
            if msg == "ready":
                child.ready = True
                pid = child.proc.pid if child.proc else 0
                log.info("signer process %d is ready (pid %d)", child.index, pid)
                continue
            rid, status, payload = msg
            fut = child.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result((status, payload))

    # ---- signing ---------------------------------------------------------------------

    def _pick(self) -> _Child | None:
        ready = [c for c in self._children if c.ready and c.writer is not None]
        return min(ready, key=lambda c: len(c.pending)) if ready else None

    async def sign(self, req: SigningRequest) -> Issued:
        """Issue `req` (raises CertificateRequestRejected for a bad CSR)."""
        child = self._pick()
        if child is None:
            return self._here(req)
        root = self.ca.signing_key()
        rid = next(self._ids)
        fut: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        child.pending[rid] = fut
        assert child.writer is not None
        child.writer.write(
            _frame((rid, *root.der, req.csr_pem, req.spiffe_id, req.ttl, req.dns_names, req.ips))
        )
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, payload = await fut
        except TimeoutError:
            log.error(
                "signer process %d did not answer in %.0f s: killing it",
                child.index,
                REQUEST_TIMEOUT,
            )
            child.pending.pop(rid, None)
            if child.proc is not None and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            return self._here(req)
        except ConnectionError:
            return self._here(req)
        if status == "ok":
            chain_pem, not_after, serial_hex = payload
            self.ca.issued += 1
            return Issued(chain_pem, not_after, serial_hex, req.spiffe_id)
        if status == "rejected":
            raise CertificateRequestRejected(payload)
        log.error("signer process %d failed a request: %s", child.index, payload)
        return self._here(req)

    def _here(self, req: SigningRequest) -> Issued:
        self.in_process += 1
        return self.ca.sign(req)


# ---- the child ---------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    """Answer requests until the controller closes its end. Requests that arrived together
    are answered in one write (one wakeup of the controller, not one each)."""
    keys: OrderedDict[tuple[bytes, bytes], SigningKey] = OrderedDict()
    sock.sendall(_frame("ready"))
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        buf += chunk
        out: list[bytes] = []
        while len(buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(buf)
            if n > MAX_FRAME:
                raise SystemExit(f"signer: a {n}-byte request frame")
            if len(buf) < _LEN.size + n:
                break
            request = pickle.loads(memoryview(buf)[_LEN.size : _LEN.size + n])
            del buf[: _LEN.size + n]
            out.append(_frame(_answer(keys, request)))
        if out:
            sock.sendall(b"".join(out))


def _answer(keys: OrderedDict[tuple[bytes, bytes], SigningKey], request: Any) -> tuple[Any, ...]:
    rid, key_der, cert_der, csr_pem, spiffe_id, ttl, dns_names, ips = request
    try:
        root = keys.get((key_der, cert_der))
        if root is None:
            root = keys[(key_der, cert_der)] = SigningKey.from_der(key_der, cert_der)
            while len(keys) > 4:
                keys.popitem(last=False)
        issued = issue(root, SigningRequest(csr_pem, spiffe_id, ttl, dns_names, ips))
    except CertificateRequestRejected as e:
        return (rid, "rejected", str(e))
    except Exception as e:  # said to the controller, which signs it itself
        return (rid, "error", f"{type(e).__name__}: {e}")
    return (rid, "ok", (issued.chain_pem, issued.not_after, issued.serial_hex))


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].isdigit():
        raise SystemExit("usage: python -m controller.ca.signer FD (started by the controller)")
    sock = socket.socket(fileno=int(argv[0]))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        _serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
