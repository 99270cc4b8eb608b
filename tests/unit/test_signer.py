"""controller/ca/signer.py: certificates signed in real child processes, and what happens
when a child is not there, dies, or the root rotates."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Awaitable, Callable

import pytest
from cryptography.hazmat.primitives import serialization

from controller.ca.authority import CertificateAuthority, CertificateRequestRejected, FileCAStore
from controller.ca.signer import Signer
from controller.ca.spiffe import load_chain, make_csr, new_key, spiffe_id_of
from tests.unit.test_ca import verify


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.load_or_create(FileCAStore(tmp_path / "ca.json"), "cluster.local")


def run(ca: CertificateAuthority, processes: int, body: Callable[[Signer], Awaitable[None]]):
    async def main() -> None:
        signer = Signer(ca, processes)
        await signer.start()
        try:
            await asyncio.wait_for(body(signer), 60)
        finally:
            await signer.stop()
        for child in signer._children:  # nothing left running
            assert child.proc is None or child.proc.returncode is not None

    asyncio.run(main())


async def ready(signer: Signer, n: int = 1) -> None:
    for _ in range(300):
        if signer.ready_children >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("no signer process became ready")


def child_pid(signer: Signer) -> int:
    (child,) = [c for c in signer._children if c.ready]
    assert child.proc is not None
    return child.proc.pid


def test_a_child_signs_what_the_ca_would_and_it_verifies(ca):
    async def body(signer: Signer) -> None:
        await ready(signer)
        key = new_key()
        issued = await signer.sign(ca.workload_request(make_csr(key, None), "ai", "llm", 3600))
        (cert,) = load_chain(issued.chain_pem)
        assert spiffe_id_of(cert) == issued.spiffe_id == "spiffe://cluster.local/ns/ai/sa/llm"
        assert cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert int(issued.serial_hex, 16) == cert.serial_number
        assert issued.not_after == cert.not_valid_after_utc.timestamp()
        verify(cert, ca.bundle())
        assert (signer.in_process, ca.issued) == (0, 1)
        # Many at once, over one child, each answered with its own identity.
        reqs = [ca.workload_request(make_csr(key, None), "ns", f"sa-{i}") for i in range(50)]
        got = await asyncio.gather(*(signer.sign(r) for r in reqs))
        assert [g.spiffe_id for g in got] == [r.spiffe_id for r in reqs]
        assert signer.in_process == 0

    run(ca, 1, body)


def test_a_bad_csr_is_refused_with_the_childs_reason(ca):
    async def body(signer: Signer) -> None:
        await ready(signer)
        other = ca.workload_id("ai", "admin")
        csr = make_csr(new_key(), other)
        with pytest.raises(CertificateRequestRejected, match="caller is authorized for"):
            await signer.sign(ca.workload_request(csr, "ai", "llm"))
        with pytest.raises(CertificateRequestRejected, match="not valid PEM"):
            await signer.sign(
                ca.workload_request(b"-----BEGIN CERTIFICATE REQUEST-----\n", "a", "b")
            )
        assert signer.in_process == 0 and ca.issued == 0

    run(ca, 1, body)


def test_a_killed_child_loses_no_request_and_comes_back(ca):
    async def body(signer: Signer) -> None:
        await ready(signer)
        key = new_key()
        csr = make_csr(key, None)
        pid = child_pid(signer)
        flight = [
            asyncio.create_task(signer.sign(ca.workload_request(csr, "a", f"s{i}")))
            for i in range(20)
        ]
        os.kill(pid, signal.SIGKILL)
        flight += [
            asyncio.create_task(signer.sign(ca.workload_request(csr, "a", f"t{i}")))
            for i in range(20)
        ]
        got = await asyncio.gather(*flight)
        assert len({g.serial_hex for g in got}) == 40  # every one signed, none twice
        await ready(signer)  # started again
        assert child_pid(signer) != pid and signer.restarts >= 1
        before = signer.in_process
        await signer.sign(ca.workload_request(csr, "a", "after"))
        assert signer.in_process == before

    run(ca, 1, body)


def test_after_a_rotation_the_child_signs_under_the_new_root(ca):
    async def body(signer: Signer) -> None:
        await ready(signer)
        csr = make_csr(new_key(), None)
        old = load_chain((await signer.sign(ca.workload_request(csr, "a", "b"))).chain_pem)[0]
        ca.rotate(overlap=60)
        new = load_chain((await signer.sign(ca.workload_request(csr, "a", "b"))).chain_pem)[0]
        assert old.issuer == ca.roots[1].cert.subject
        assert new.issuer == ca.active.cert.subject
        verify(new, [ca.active.cert])
        with pytest.raises(Exception):  # noqa: B017  the old root did not sign it
            verify(new, [r.cert for r in ca.roots[1:]])
        assert signer.in_process == 0

    run(ca, 1, body)


def test_without_children_or_before_one_is_ready_the_controller_signs(ca):
    async def body(signer: Signer) -> None:
        issued = await signer.sign(ca.workload_request(make_csr(new_key(), None), "a", "b"))
        verify(load_chain(issued.chain_pem)[0], ca.bundle())
        assert signer.in_process == 1 and signer.ready_children == 0

    run(ca, 0, body)
