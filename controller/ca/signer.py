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
coordination: a child loads the key it is sent once and keeps only that one.

Signing never depends on a child being up: before a child says it is ready, after it
dies (it is started again, with backoff), or when it has work and has answered nothing for
STALL_TIMEOUT (it is killed as hung: a busy child that keeps answering is not), its
requests go to another child, else are signed in-process. At most MAX_PENDING requests
wait on each child; more wait for a slot. The decisions the caller must make -- which
identity, which TTL, how large a CSR may be -- are made before a request is sent
(CertificateAuthority.workload_request); a child only checks and signs, and answers
whatever it cannot parse or sign with an error rather than exiting.

A child is started with `python -P` (the working directory is not on its path) and the
directory this package was loaded from on PYTHONPATH: what it imports is the code the
controller runs, and a file planted in the working directory never sees the CA key.
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
from pathlib import Path
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

STALL_TIMEOUT = 10.0  # seconds a child with work may go without answering before it is killed
MAX_PENDING = 256  # requests waiting on one child
MAX_FRAME = 1 << 20
_ROOT = str(Path(__file__).resolve().parents[2])  # where `controller` was loaded from
_LEN = struct.Struct("!I")


def available_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    pod's limit, as the container sees its own cgroup), rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cpus


def default_processes() -> int:
    """One signer per CPU this process may use beyond the one the event loop needs (at
    least one, at most 4)."""
    return max(1, min(4, available_cpus() - 1))


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
        self.answered_at = 0.0  # loop time of its last answer, or of work given to it idle

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

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
        self._slots = asyncio.Semaphore(max(1, self.processes) * MAX_PENDING)
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
        self._stopping = False
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
        path = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "controller.ca.signer",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        child.proc = proc
        writer: asyncio.StreamWriter | None = None
        watchdog = asyncio.create_task(self._watch(child), name=f"signer-{child.index}-watch")
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            child.writer = writer
            await self._read(child, reader)
        finally:
            watchdog.cancel()
            child.ready = False
            child.writer = None
            child.fail_pending("the signer process ended")
            if writer is not None:
                writer.close()
            else:
                ours.close()
            child.kill()
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())

    async def _watch(self, child: _Child) -> None:
        """Kill the child if it has work and has answered nothing for STALL_TIMEOUT (its
        requests then fail over: another child, or this process)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(STALL_TIMEOUT / 4)
            if child.pending and loop.time() - child.answered_at > STALL_TIMEOUT:
                log.error(
                    "signer process %d has answered nothing for %.0f s with %d request(s) "
                    "waiting: killing it",
                    child.index,
                    STALL_TIMEOUT,
                    len(child.pending),
                )
                child.ready = False  # no new work goes to it
                child.kill()
                return

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
            child.answered_at = asyncio.get_running_loop().time()
            fut = child.pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result((status, payload))

    # ---- signing ---------------------------------------------------------------------

    async def sign(self, req: SigningRequest) -> Issued:
        """Issue `req` (raises CertificateRequestRejected for a bad CSR)."""
        async with self._slots:
            tried: set[int] = set()
            while (child := self._pick(tried)) is not None:
                tried.add(child.index)
                try:
                    status, payload = await self._ask(child, req)
                except ConnectionError:
                    continue  # that child ended (or was killed as hung): another, or here
                if status == "ok":
                    chain_pem, not_after, serial_hex, not_before = payload
                    self.ca.issued += 1
                    return Issued(chain_pem, not_after, serial_hex, req.spiffe_id, not_before)
                if status == "rejected":
                    raise CertificateRequestRejected(payload)
                log.error("signer process %d failed a request: %s", child.index, payload)
                break  # signed here, which raises the same error if it is the request's
            return self._here(req)

    def _pick(self, tried: set[int]) -> _Child | None:
        ready = [
            c for c in self._children if c.ready and c.writer is not None and c.index not in tried
        ]
        return min(ready, key=lambda c: len(c.pending)) if ready else None

    async def _ask(self, child: _Child, req: SigningRequest) -> tuple[str, Any]:
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        fut: asyncio.Future[tuple[str, Any]] = loop.create_future()
        if not child.pending:
            child.answered_at = loop.time()  # the stall clock starts with the work
        child.pending[rid] = fut
        assert child.writer is not None
        key_der, cert_der = self.ca.signing_key().der
        child.writer.write(
            _frame((rid, key_der, cert_der, req.csr_pem, req.spiffe_id, req.ttl,
                    req.dns_names, req.ips))
        )  # fmt: skip
        try:
            return await fut  # the child's watchdog fails it if the child stalls
        finally:
            child.pending.pop(rid, None)

    def _here(self, req: SigningRequest) -> Issued:
        self.in_process += 1
        return self.ca.sign(req)


# ---- the child ---------------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    """Answer requests until the controller closes its end. Requests that arrived together
    are answered in one write (one wakeup of the controller, not one each)."""
    keys: dict[tuple[bytes, bytes], SigningKey] = {}
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
            if n > MAX_FRAME:  # the controller never sends one: nothing to answer to
                raise SystemExit(f"signer: a {n}-byte request frame")
            if len(buf) < _LEN.size + n:
                break
            data = bytes(memoryview(buf)[_LEN.size : _LEN.size + n])
            del buf[: _LEN.size + n]
            out.append(_frame(_answer(keys, data)))
        if out:
            sock.sendall(b"".join(out))


def _answer(keys: dict[tuple[bytes, bytes], SigningKey], data: bytes) -> tuple[Any, ...]:
    try:
        rid, key_der, cert_der, csr_pem, spiffe_id, ttl, dns_names, ips = pickle.loads(data)
    except Exception as e:  # not a request this version understands: said, not fatal
        return (0, "error", f"unreadable request: {type(e).__name__}: {e}")
    try:
        root = keys.get((key_der, cert_der))
        if root is None:
            keys.clear()  # only the active root's key is kept (a rotated-out key goes)
            root = keys[(key_der, cert_der)] = SigningKey.from_der(key_der, cert_der)
        issued = issue(root, SigningRequest(csr_pem, spiffe_id, ttl, dns_names, ips))
    except CertificateRequestRejected as e:
        return (rid, "rejected", str(e))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # said to the controller (a Rust panic included)
        return (rid, "error", f"{type(e).__name__}: {e}")
    return (
        rid,
        "ok",
        (issued.chain_pem, issued.not_after, issued.serial_hex, issued.not_before),
    )


def main(argv: list[str]) -> None:
    if len(argv) != 1 or not argv[0].isdigit():
        raise SystemExit("usage: python -m controller.ca.signer FD (started by the controller)")
    sock = socket.socket(fileno=int(argv[0]))
    with contextlib.suppress(KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        _serve(sock)


if __name__ == "__main__":
    main(sys.argv[1:])
