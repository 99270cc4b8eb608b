"""Controller and agent over real gRPC and real mTLS on loopback (no root needed).

Each test runs one event loop holding the controller and one or more agent-side clients,
as separate objects talking through sockets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import textwrap
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from cryptography.x509.verification import PolicyBuilder, Store

from agent.config.client import ConfigClient
from agent.identity.manager import IdentityManager
from agent.identity.node import ControllerEndpoint, NodeCredential, TrustBundle
from agent.identity.rpc import IDENTITY, RpcError, Status
from agent.state import ConfigSnapshot
from controller.api.gen import admin_pb2, admin_pb2_grpc, identity_pb2, identity_pb2_grpc
from controller.ca.spiffe import load_chain, make_csr, new_key, spiffe_id_of
from controller.errors import RemoteRefused
from controller.model.problems import InvalidConfig, Problem
from controller.server import Controller
from controller.settings import ControllerSettings

WORKLOADS = textwrap.dedent("""\
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: llm-a, namespace: ai, labels: {app: llm}}
    spec: {serviceAccount: llm, node: node-1, addresses: [10.244.1.2]}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: client, namespace: apps, labels: {app: client}}
    spec: {serviceAccount: client, node: node-2, addresses: [10.244.2.2]}
    """)
POLICY = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: allow-apps, namespace: ai}
    spec:
      action: ALLOW
      rules: [{from: [{source: {namespaces: [apps]}}]}]
    """)


def settings(tmp: Path) -> ControllerSettings:
    return ControllerSettings(
        config_dir=tmp / "config",
        state_dir=tmp / "state",
        listen="127.0.0.1:0",
        bootstrap_listen="127.0.0.1:0",
        admin_socket=tmp / "admin.sock",
        metrics_listen="127.0.0.1:0",
        poll_interval=0.05,
    )


async def start(tmp: Path) -> Controller:
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "workloads.yaml").write_text(WORKLOADS)
    c = Controller(settings(tmp))
    await c.start()
    return c


def node_cred(
    c: Controller, node: str, trust: TrustBundle | None = None, token: str | None = None
) -> NodeCredential:
    tok = token or c.tokens.create(node, 600)[0]
    ep = ControllerEndpoint(
        address=f"127.0.0.1:{c.ports['main']}",
        bootstrap_address=f"127.0.0.1:{c.ports['bootstrap']}",
        server_name="localhost",
        ca_bundle_file=c.trust_bundle_path(),
    )
    return NodeCredential(node, ep, trust or TrustBundle(), token=tok)


def run(tmp: Path, body: Callable[[Controller], Awaitable[None]]) -> None:
    async def main() -> None:
        c = await start(tmp)
        try:
            await asyncio.wait_for(body(c), 30)
        finally:
            await c.stop(0.1)

    asyncio.run(main())


async def eventually(pred: Callable[[], bool], what: str, limit: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def test_workload_cert_is_issued_for_own_node_and_verifies(tmp_path):
    async def body(c: Controller) -> None:
        trust = TrustBundle()
        node = node_cred(c, "node-1", trust)
        task = asyncio.create_task(node.run())
        ids = IdentityManager(node, trust, trust_domain="cluster.local")
        ids.want({("ai", "llm")})
        cert = await ids.wait_for("ai", "llm")
        assert cert is not None and cert.spiffe_id == "spiffe://cluster.local/ns/ai/sa/llm"
        (leaf,) = load_chain(cert.chain_pem)
        assert spiffe_id_of(leaf) == cert.spiffe_id
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == dt.timedelta(
            hours=24, minutes=5
        )
        roots = load_chain(trust.pem)
        PolicyBuilder().store(Store(roots)).build_client_verifier().verify(leaf, [])
        assert cert.context("client", trust) is cert.context("client", trust)  # cached
        await ids.close()
        task.cancel()
        await node.close()

    run(tmp_path, body)


def test_a_node_asking_for_another_nodes_workload_is_refused(tmp_path, caplog):
    async def body(c: Controller) -> None:
        node = node_cred(c, "node-1")
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        with pytest.raises(RpcError) as e:
            await node.channel().unary(
                IDENTITY + "SignWorkloadCertificate",
                identity_pb2.SignRequest(
                    namespace="apps", service_account="client", csr_pem=make_csr(new_key(), None)
                ),
                identity_pb2.SignResponse,
                deadline=10,
            )
        assert e.value.code() == Status.PERMISSION_DENIED
        assert "node node-1 hosts no workload with namespace 'apps'" in e.value.details()
        task.cancel()
        await node.close()

    run(tmp_path, body)
    assert "refused certificate for ns/apps/sa/client to node node-1" in caplog.text


def test_bootstrap_with_another_nodes_token_is_refused(tmp_path):
    async def body(c: Controller) -> None:
        tok, _ = c.tokens.create("node-2", 600)
        node = node_cred(c, "node-1", token=tok)
        with pytest.raises(RemoteRefused, match="refused to bootstrap node node-1"):
            await node.run()

    run(tmp_path, body)


def test_unauthenticated_caller_is_refused_on_the_main_port(tmp_path):
    async def body(c: Controller) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=c.ca.bundle_pem())
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{c.ports['main']}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as ch:
            stub = identity_pb2_grpc.IdentityStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.GetTrustBundle(identity_pb2.TrustBundleRequest(), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # no client cert: no TLS

    run(tmp_path, body)


def test_config_stream_snapshot_then_delta_then_bad_file_keeps_last_good(tmp_path):
    async def body(c: Controller) -> None:
        trust = TrustBundle()
        node = node_cred(c, "node-1", trust)
        seen: list[ConfigSnapshot] = []
        client = ConfigClient(node, trust, seen.append, cache=tmp_path / "cache.json")
        tasks = [asyncio.create_task(node.run()), asyncio.create_task(client.run())]
        await eventually(lambda: client.snapshot.revision == c.store.revision > 0, "snapshot")
        assert set(client.snapshot.workloads_by_ip) == {"10.244.1.2", "10.244.2.2"}
        policy = tmp_path / "config" / "policy.yaml"
        policy.write_text(POLICY)
        await eventually(lambda: len(client.snapshot.authorization) == 1, "delta")
        rev = client.snapshot.revision
        policy.write_text(POLICY.replace("ALLOW", "PERMIT"))
        await eventually(lambda: bool(c.store.rejections()), "rejection")
        await asyncio.sleep(0.2)
        assert client.snapshot.revision == rev
        assert client.snapshot.authorization[0].spec.action == "ALLOW"
        admin = grpc.aio.insecure_channel(f"unix:{c.settings.admin_socket}")
        rej = await admin_pb2_grpc.AdminStub(admin).ListRejections(
            admin_pb2.ListRejectionsRequest()
        )
        (p,) = rej.problems
        assert (p.file, p.line, p.field) == ("policy.yaml", 5, "spec.action")
        await admin.close()
        for t in tasks:
            t.cancel()
        await node.close()

    run(tmp_path, body)


def test_nack_is_surfaced_and_other_nodes_keep_going(tmp_path, caplog):
    async def body(c: Controller) -> None:
        def picky(snap: ConfigSnapshot) -> None:
            if snap.authorization:
                raise InvalidConfig(
                    [
                        Problem(
                            "this agent cannot enforce it",
                            resource="AuthorizationPolicy ai/allow-apps",
                        )
                    ]
                )

        t1, t2 = TrustBundle(), TrustBundle()
        n1, n2 = node_cred(c, "node-1", t1), node_cred(c, "node-2", t2)
        bad = ConfigClient(n1, t1, picky)
        good = ConfigClient(n2, t2, lambda s: None)
        tasks = [asyncio.create_task(x) for x in (n1.run(), n2.run(), bad.run(), good.run())]
        await eventually(
            lambda: good.snapshot.revision > 0 and bad.snapshot.revision > 0, "both subscribed"
        )
        (tmp_path / "config" / "policy.yaml").write_text(POLICY)
        await eventually(lambda: len(good.snapshot.authorization) == 1, "good node applies")
        await eventually(lambda: bad.nacks == 1, "bad node nacks")
        assert not bad.snapshot.authorization
        await eventually(lambda: c.sessions["node-1"].last_nack != "", "nack recorded")
        assert "this agent cannot enforce it" in c.sessions["node-1"].last_nack
        assert c.sessions["node-2"].acked_revision == c.store.revision
        nacks = c.registry.get_sample_value(
            "weft_controller_config_nacks_total", {"node": "node-1"}
        )
        assert nacks == 1.0
        for t in tasks:
            t.cancel()
        await n1.close()
        await n2.close()

    run(tmp_path, body)
    assert "node node-1 rejected config revision" in caplog.text


def test_controller_restart_keeps_the_root_and_agents_resume(tmp_path):
    async def main() -> None:
        c = await start(tmp_path)
        trust = TrustBundle()
        node = node_cred(c, "node-1", trust)
        client = ConfigClient(node, trust, lambda s: None)
        tasks = [asyncio.create_task(node.run()), asyncio.create_task(client.run())]
        await eventually(lambda: client.snapshot.revision > 0, "first snapshot")
        bundle, epoch = c.ca.bundle_pem(), client.snapshot.epoch
        ports = dict(c.ports)
        await c.stop(0.1)
        s = settings(tmp_path).model_copy(
            update={
                "listen": f"127.0.0.1:{ports['main']}",
                "bootstrap_listen": f"127.0.0.1:{ports['bootstrap']}",
            }
        )
        (tmp_path / "config" / "policy.yaml").write_text(POLICY)
        c2 = Controller(s)
        await c2.start()
        try:
            assert c2.ca.bundle_pem() == bundle
            await eventually(
                lambda: client.snapshot.epoch == c2.store.epoch != epoch,
                "resumed against the new controller",
                limit=20,
            )
            assert len(client.snapshot.authorization) == 1
            assert c2.sessions["node-1"].connected
        finally:
            for t in tasks:
                t.cancel()
            await node.close()
            await c2.stop(0.1)

    asyncio.run(main())


def test_wrong_node_subscription_is_refused(tmp_path):
    async def body(c: Controller) -> None:
        trust = TrustBundle()
        node = node_cred(c, "node-1", trust)
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        node.node = "node-2"  # the certificate still says node-1
        client = ConfigClient(node, trust, lambda s: None)
        with pytest.raises(RpcError) as e:
            await client._stream()
        assert e.value.code() == Status.PERMISSION_DENIED
        task.cancel()
        await node.close()

    run(tmp_path, body)


def test_admin_apply_get_delete_round_trip(tmp_path):
    async def body(c: Controller) -> None:
        async with grpc.aio.insecure_channel(f"unix:{c.settings.admin_socket}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            bad = await admin.Apply(
                admin_pb2.ApplyRequest(
                    documents=[
                        admin_pb2.ApplyRequest.Document(
                            file="p.yaml", text=POLICY.replace("ALLOW", "NOPE")
                        )
                    ]
                )
            )
            assert bad.problems and not bad.applied
            ok = await admin.Apply(
                admin_pb2.ApplyRequest(
                    documents=[admin_pb2.ApplyRequest.Document(file="p.yaml", text=POLICY)]
                )
            )
            assert [(a.name, a.action) for a in ok.applied] == [("allow-apps", "created")]
            again = await admin.Apply(
                admin_pb2.ApplyRequest(
                    documents=[admin_pb2.ApplyRequest.Document(file="p.yaml", text=POLICY)]
                )
            )
            assert again.applied[0].action == "unchanged"
            got = await admin.Get(admin_pb2.GetRequest(kind="authorizationpolicies"))
            assert [r.name for r in got.resources] == ["allow-apps"]
            conflict = await admin.Apply(
                admin_pb2.ApplyRequest(
                    documents=[admin_pb2.ApplyRequest.Document(file="w.yaml", text=WORKLOADS)]
                )
            )
            assert "already defined by file:workloads.yaml" in conflict.problems[0].reason
            gone = await admin.Delete(
                admin_pb2.DeleteRequest(
                    kind="AuthorizationPolicy", namespace="ai", name="allow-apps"
                )
            )
            assert gone.deleted and not c.store.resources("AuthorizationPolicy")

    run(tmp_path, body)


def test_one_apply_with_the_same_resource_twice_is_refused_naming_both_places(tmp_path):
    """Issue 14: two documents of one apply (in one file or in two) defining the same
    kind, namespace and name are an error naming both places, and nothing is applied:
    the last used to win silently (a DENY became an ALLOW)."""
    deny = POLICY.replace("ALLOW", "DENY")

    async def body(c: Controller) -> None:
        async with grpc.aio.insecure_channel(f"unix:{c.settings.admin_socket}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            for docs in (
                [admin_pb2.ApplyRequest.Document(file="p.yaml", text=deny + "---\n" + POLICY)],
                [
                    admin_pb2.ApplyRequest.Document(file="a.yaml", text=deny),
                    admin_pb2.ApplyRequest.Document(file="b.yaml", text=POLICY),
                ],
            ):
                r = await admin.Apply(admin_pb2.ApplyRequest(documents=docs))
                assert not r.applied and len(r.problems) == 1, r
                (p,) = r.problems
                assert "defined 2 times" in p.reason and "allow-apps" in p.resource
                for d in docs:
                    assert d.file in p.reason
            assert not c.store.resources("AuthorizationPolicy")

    run(tmp_path, body)


def test_a_policy_that_would_be_enforced_nowhere_is_applied_with_a_warning(tmp_path):
    """An L7 AuthorizationPolicy on a Service that does not exist: applied (the Service may
    come later), with a warning, and `Get` shows its False conditions."""
    l7 = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: ai}
spec:
  targetRefs: [{kind: Service, group: "", name: no-such-service}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
"""

    async def body(c: Controller) -> None:
        async with grpc.aio.insecure_channel(f"unix:{c.settings.admin_socket}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            r = await admin.Apply(
                admin_pb2.ApplyRequest(
                    documents=[admin_pb2.ApplyRequest.Document(file="l7.yaml", text=l7)]
                )
            )
            assert r.applied and not r.problems
            assert any("ServiceNotFound" in w.reason for w in r.warnings), r.warnings
            got = await admin.Get(admin_pb2.GetRequest(kind="authorizationpolicies"))
            (res,) = [x for x in got.resources if x.name == "deny-admin"]
            conds = {cd.type: (cd.status, cd.reason) for cd in res.conditions}
            assert conds["ResolvedRefs"] == (False, "ServiceNotFound")

    run(tmp_path, body)


def test_apply_with_a_namespace_puts_documents_without_one_there(tmp_path):
    """kubectl's -n: a document naming no namespace goes to the one given, and stays there
    after the controller re-reads what it stored."""
    no_ns = POLICY.replace("{name: allow-apps, namespace: ai}", "{name: allow-apps}")

    async def body(c: Controller) -> None:
        async with grpc.aio.insecure_channel(f"unix:{c.settings.admin_socket}") as ch:
            admin = admin_pb2_grpc.AdminStub(ch)
            ok = await admin.Apply(
                admin_pb2.ApplyRequest(
                    documents=[admin_pb2.ApplyRequest.Document(file="p.yaml", text=no_ns)],
                    namespace="team-a",
                )
            )
            assert not ok.problems, ok.problems
            assert [(a.namespace, a.name) for a in ok.applied] == [("team-a", "allow-apps")]
            c.source.scan()
            (p,) = c.store.resources("AuthorizationPolicy")
            assert p.namespace == "team-a"

    run(tmp_path, body)


def test_a_full_snapshot_is_the_store_at_each_agents_connect(tmp_path):
    """Full snapshots are built once per revision and shared by every agent connecting at
    it: an agent connecting after a change must still get the new revision, and two
    agents at one revision the same resources (each with its own stream fields)."""

    async def body(c: Controller) -> None:
        tasks: list[asyncio.Task[None]] = []
        creds: list[NodeCredential] = []

        async def connect(node: str) -> ConfigClient:
            trust = TrustBundle()
            cred = node_cred(c, node, trust)
            client = ConfigClient(cred, trust, lambda snap: None)
            creds.append(cred)
            tasks.extend([asyncio.create_task(cred.run()), asyncio.create_task(client.run())])
            await eventually(lambda: client.snapshot.revision == c.store.revision > 0, node)
            return client

        first = await connect("node-1")
        second = await connect("node-2")
        assert first.snapshot.revision == second.snapshot.revision
        assert dict(first.snapshot.resources) == dict(second.snapshot.resources)
        assert first.snapshot.trust_domain == second.snapshot.trust_domain == "cluster.local"
        (tmp_path / "config" / "policy.yaml").write_text(POLICY)
        await eventually(lambda: len(first.snapshot.authorization) == 1, "delta to node-1")
        third = await connect("node-3")
        assert third.snapshot.revision == first.snapshot.revision
        assert [p.key for p in third.snapshot.authorization] == [
            p.key for p in first.snapshot.authorization
        ]
        for t in tasks:
            t.cancel()
        for cred in creds:
            await cred.close()

    run(tmp_path, body)


MORE_ON_NODE_1 = textwrap.dedent("""\
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: embed-a, namespace: ai, labels: {app: embed}}
    spec: {serviceAccount: embed, node: node-1, addresses: [10.244.1.3]}
    ---
    apiVersion: weft.dev/v1alpha1
    kind: Workload
    metadata: {name: rank-a, namespace: ai, labels: {app: rank}}
    spec: {serviceAccount: rank, node: node-1, addresses: [10.244.1.4]}
    """)
NODE_1_IDENTITIES = {("ai", "llm"), ("ai", "embed"), ("ai", "rank")}


async def _certs_for(c: Controller, wanted: set[tuple[str, str]]) -> IdentityManager:
    trust = TrustBundle()
    node = node_cred(c, "node-1", trust)
    task = asyncio.create_task(node.run())
    ids = IdentityManager(node, trust, trust_domain="cluster.local")
    ids.want(wanted)
    for ns, sa in sorted(wanted):
        cert = await ids.wait_for(ns, sa)
        assert cert is not None and cert.spiffe_id == f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
        (leaf,) = load_chain(cert.chain_pem)
        assert spiffe_id_of(leaf) == cert.spiffe_id
    await ids.close()
    task.cancel()
    await node.close()
    return ids


def test_identities_wanted_together_are_signed_in_one_call(tmp_path):
    """A node that needs several certificates at once (it starts, pods land together)
    asks for them in one SignWorkloadCertificates call; each comes back for its own
    identity."""
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "more.yaml").write_text(MORE_ON_NODE_1)

    async def body(c: Controller) -> None:
        ids = await _certs_for(c, NODE_1_IDENTITIES)
        assert ids.signer.calls == 1 and ids.signer.batch_rpc

    run(tmp_path, body)


BATCH = IDENTITY + "SignWorkloadCertificates"


def test_a_refused_item_does_not_fail_the_rest_of_its_batch(tmp_path):
    """Each item is checked as the single call would check it: another node's workload is
    PERMISSION_DENIED, a broken CSR INVALID_ARGUMENT, and the good one is signed."""

    async def body(c: Controller) -> None:
        node = node_cred(c, "node-1")
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        ch = node.channel()
        good = make_csr(new_key(), "spiffe://cluster.local/ns/ai/sa/llm")
        resp = await ch.unary(
            BATCH,
            identity_pb2.SignBatchRequest(
                requests=[
                    identity_pb2.SignRequest(namespace="ai", service_account="llm", csr_pem=good),
                    identity_pb2.SignRequest(
                        namespace="apps", service_account="client", csr_pem=good
                    ),
                    identity_pb2.SignRequest(
                        namespace="ai", service_account="llm", csr_pem=b"not a CSR"
                    ),
                ]
            ),
            identity_pb2.SignBatchResponse,
            deadline=10,
        )
        ok, other_node, broken = resp.results
        assert ok.response.spiffe_id == "spiffe://cluster.local/ns/ai/sa/llm"
        assert load_chain(ok.response.certificate_chain_pem)
        assert other_node.code == Status.PERMISSION_DENIED.value
        assert "node node-1 hosts no workload with namespace 'apps'" in other_node.message
        assert not other_node.HasField("response")
        assert broken.code == Status.INVALID_ARGUMENT.value and broken.message
        assert load_chain(resp.trust_bundle_pem)
        too_many = identity_pb2.SignBatchRequest(
            requests=[identity_pb2.SignRequest(namespace="ai", service_account="llm")] * 65
        )
        with pytest.raises(RpcError) as e:
            await ch.unary(BATCH, too_many, identity_pb2.SignBatchResponse, deadline=10)
        assert e.value.code() == Status.INVALID_ARGUMENT
        assert "at most 64" in e.value.details()
        task.cancel()
        await node.close()

    run(tmp_path, body)


def test_a_controller_without_the_batch_call_signs_one_per_call(tmp_path, monkeypatch):
    """An older controller answers the batch call UNIMPLEMENTED (the generated servicer's
    default): the agent signs each identity with its own call from then on."""
    from controller.services.identity import IdentityService

    monkeypatch.setattr(
        IdentityService,
        "SignWorkloadCertificates",
        identity_pb2_grpc.IdentityServicer.SignWorkloadCertificates,
    )
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "more.yaml").write_text(MORE_ON_NODE_1)

    async def body(c: Controller) -> None:
        ids = await _certs_for(c, NODE_1_IDENTITIES)
        assert not ids.signer.batch_rpc
        assert ids.signer.calls == 1 + len(NODE_1_IDENTITIES)

    run(tmp_path, body)


def test_a_node_cannot_have_more_than_its_share_of_signing_in_progress(tmp_path, monkeypatch):
    """Batches do not let one node fill the signers' queue: past the per-node limit of
    requests in progress an item is answered RESOURCE_EXHAUSTED (the agent retries it),
    the others are signed, and the count goes back down once they are done."""
    from controller.services import identity as svc

    monkeypatch.setattr(svc, "MAX_IN_FLIGHT_PER_NODE", 2)

    async def body(c: Controller) -> None:
        # Signing takes a while (as in the signer processes under load): the three items
        # are in progress together.
        sign = c.signer.sign

        async def slow_sign(req):
            await asyncio.sleep(0.05)
            return await sign(req)

        monkeypatch.setattr(c.signer, "sign", slow_sign)
        node = node_cred(c, "node-1")
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        ch = node.channel()
        csr = make_csr(new_key(), "spiffe://cluster.local/ns/ai/sa/llm")
        one = identity_pb2.SignRequest(namespace="ai", service_account="llm", csr_pem=csr)
        resp = await ch.unary(
            BATCH,
            identity_pb2.SignBatchRequest(requests=[one, one, one]),
            identity_pb2.SignBatchResponse,
            deadline=10,
        )
        first, second, third = resp.results
        assert first.HasField("response") and second.HasField("response")
        assert third.code == Status.RESOURCE_EXHAUSTED.value
        assert "node node-1 has 2 certificate requests in progress" in third.message
        again = await ch.unary(  # the count went back down
            IDENTITY + "SignWorkloadCertificate", one, identity_pb2.SignResponse, deadline=10
        )
        assert again.spiffe_id == "spiffe://cluster.local/ns/ai/sa/llm"
        task.cancel()
        await node.close()

    run(tmp_path, body)
