"""controller/ca/signer.py: certificates signed in real child processes, and what happens
when a child is not there, dies, or the root rotates."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable

import pytest
from cryptography.hazmat.primitives import serialization

from controller.ca import signer as signer_module
from controller.ca.authority import (
    MAX_CSR_BYTES,
    CertificateAuthority,
    CertificateRequestRejected,
    FileCAStore,
)
from controller.ca.signer import Signer, _answer, available_cpus
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


def test_what_the_controller_refuses_never_reaches_a_child(ca):
    """An oversized CSR (over a child's frame limit it would have ended the child) and a
    negative TTL are refused when the request is made, before any process sees them."""
    with pytest.raises(CertificateRequestRejected, match="over the 65536 limit"):
        ca.workload_request(b"x" * (MAX_CSR_BYTES + 1), "a", "b")
    with pytest.raises(CertificateRequestRejected, match="over the 65536 limit"):
        ca.node_request(b"x" * (2 << 20), "node-1")
    with pytest.raises(CertificateRequestRejected, match="negative"):
        ca.workload_request(make_csr(new_key(), None), "a", "b", ttl=-1)


def test_a_child_answers_what_it_cannot_read_instead_of_exiting():
    rid, status, text = _answer({}, b"not a pickle")
    assert (rid, status) == (0, "error") and "unreadable request" in text


def test_a_busy_child_that_keeps_answering_is_not_taken_for_hung(ca, monkeypatch):
    monkeypatch.setattr(signer_module, "STALL_TIMEOUT", 0.4)

    async def body(signer: Signer) -> None:
        await ready(signer)
        csr = make_csr(new_key(), None)
        reqs = [ca.workload_request(csr, "a", f"s{i % 50}") for i in range(1_500)]
        got = await asyncio.gather(*(signer.sign(r) for r in reqs))
        assert len({g.serial_hex for g in got}) == 1_500
        assert signer.restarts == 0 and signer.in_process == 0

    run(ca, 1, body)


def test_a_hung_child_is_killed_and_its_requests_signed_anyway(ca, monkeypatch):
    monkeypatch.setattr(signer_module, "STALL_TIMEOUT", 0.4)

    async def body(signer: Signer) -> None:
        await ready(signer)
        pid = child_pid(signer)
        os.kill(pid, signal.SIGSTOP)  # alive, answering nothing
        try:
            csr = make_csr(new_key(), None)
            got = await asyncio.gather(
                *(signer.sign(ca.workload_request(csr, "a", f"h{i}")) for i in range(5))
            )
            assert [g.spiffe_id for g in got] == [
                f"spiffe://cluster.local/ns/a/sa/h{i}" for i in range(5)
            ]
            assert signer.in_process == 5
            await ready(signer)  # a new one
            assert child_pid(signer) != pid
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    run(ca, 1, body)


def test_a_child_does_not_import_from_the_working_directory(ca, tmp_path, monkeypatch):
    """`python -m` would put the working directory first on the child's path; a planted
    package there must not run inside the process that is sent the CA key."""
    planted = tmp_path / "cwd" / "controller"
    (planted / "ca").mkdir(parents=True)
    marker = tmp_path / "imported"
    (planted / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('planted')\n")
    (planted / "ca" / "__init__.py").write_text("")
    (planted / "ca" / "signer.py").write_text("")
    monkeypatch.chdir(tmp_path / "cwd")

    async def body(signer: Signer) -> None:
        await ready(signer)
        await signer.sign(ca.workload_request(make_csr(new_key(), None), "a", "b"))
        assert signer.in_process == 0

    run(ca, 1, body)
    assert not marker.exists()


def test_the_default_signer_count_follows_the_cpu_quota(tmp_path):
    mine = available_cpus(tmp_path / "absent")
    assert mine >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert available_cpus(quota) == mine
    quota.write_text("10000 100000\n")  # 100m: one CPU, rounded up
    assert available_cpus(quota) == 1
    quota.write_text("250000 100000\n")
    assert available_cpus(quota) == min(mine, 3)
