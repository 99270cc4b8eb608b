"""Service-account token bootstrap: a recorded TokenReview response (tests/data/k8s/README),
the decision rules, and the whole path over real gRPC: the agent sends its projected token,
the controller's BootstrapService asks a (fake) API server, and a node certificate comes
back only for the token's own node."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from agent.identity.node import ControllerEndpoint, NodeCredential, TrustBundle
from controller.auth.kubernetes import (
    NODE_NAME_KEY,
    TOKEN_REVIEWS,
    ServiceAccountAuthenticator,
    decide,
)
from controller.ca.spiffe import load_chain, spiffe_id_of
from controller.errors import EnvironmentProblem, RemoteRefused
from controller.server import Controller
from controller.settings import ControllerSettings
from controller.sources.kubernetes import KubeAPIError

DATA = Path(__file__).resolve().parents[2] / "tests" / "data" / "k8s"
SA = "weft-system/weft-agent"
AUD = "weft-controller"
NODE = "kind-control-plane"


def review() -> dict[str, Any]:
    return json.loads((DATA / "tokenreview-node-bound.json").read_text())


def check(r: dict[str, Any], node: str = NODE) -> tuple[bool, str]:
    d = decide(r, audience=AUD, agent_service_account=SA, node=node)
    return d.ok, d.reason


def test_the_recorded_review_admits_its_own_node() -> None:
    assert check(review()) == (True, "ok")


def test_another_node_is_refused() -> None:
    ok, why = check(review(), node="worker-2")
    assert not ok and "'kind-control-plane', not 'worker-2'" in why


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda s: s.update(authenticated=False), "did not authenticate"),
        (lambda s: s.update(error="token expired"), "token expired"),
        (lambda s: s.update(audiences=[]), "not for audience"),
        (lambda s: s.update(audiences=["https://kubernetes.default.svc"]), "not for audience"),
        (
            lambda s: s["user"].update(username="system:serviceaccount:apps:default"),
            "not the agents'",
        ),
        (lambda s: s["user"]["extra"].pop(NODE_NAME_KEY), "carries no node"),
    ],
)
def test_refusals(change: Any, reason: str) -> None:
    r = review()
    change(r["status"])
    ok, why = check(r)
    assert not ok and reason in why


class FakeReviews:
    """The API server's TokenReview endpoint: answers with the recorded review for the
    token it was recorded with, and an unauthenticated review otherwise."""

    def __init__(self, token: str = "projected-token", status: int = 201) -> None:
        self.token, self.status = token, status
        self.bodies: list[dict[str, Any]] = []

    def request(self, method: str, path: str, *, query: Any = None, body: Any = None) -> Any:
        assert (method, path) == ("POST", TOKEN_REVIEWS)
        self.bodies.append(body)
        if self.status == 403:
            raise KubeAPIError(403, "tokenreviews.authentication.k8s.io is forbidden")
        r = review()
        if body["spec"]["token"] != self.token:
            r["status"] = {"authenticated": False, "error": "invalid bearer token"}
        return r

    def stream(self, path: str, *, query: Any) -> Any:
        raise AssertionError


def test_authenticator_asks_with_our_audience_and_logs_refusals(
    caplog: pytest.LogCaptureFixture,
) -> None:
    api = FakeReviews()
    auth = ServiceAccountAuthenticator(api, audience=AUD, agent_service_account=SA)
    assert auth.verify("projected-token", NODE)
    assert api.bodies[0]["spec"] == {"token": "projected-token", "audiences": [AUD]}
    caplog.set_level(logging.WARNING)
    assert not auth.verify("projected-token", "worker-2")
    assert not auth.verify("", NODE)
    assert any("worker-2" in r.getMessage() for r in caplog.records)
    forbidden = ServiceAccountAuthenticator(
        FakeReviews(status=403), audience=AUD, agent_service_account=SA
    )
    assert not forbidden.verify("projected-token", NODE)
    assert "create on tokenreviews" in caplog.text


# ---- end to end: agent -> bootstrap gRPC -> TokenReview -----------------------------------


def controller_settings(tmp: Path) -> ControllerSettings:
    return ControllerSettings(
        config_dir=tmp / "config",
        state_dir=tmp / "state",
        listen="127.0.0.1:0",
        bootstrap_listen="127.0.0.1:0",
        admin_socket=tmp / "admin.sock",
        metrics_listen="127.0.0.1:0",
    )


def agent(c: Controller, node: str, token_file: Path) -> NodeCredential:
    ep = ControllerEndpoint(
        address=f"127.0.0.1:{c.ports['main']}",
        bootstrap_address=f"127.0.0.1:{c.ports['bootstrap']}",
        server_name="localhost",
        ca_bundle_file=c.trust_bundle_path(),
        sa_token_file=token_file,
    )
    return NodeCredential(node, ep, TrustBundle())


def test_bootstrap_with_a_projected_token_over_grpc(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("projected-token\n")

    async def main() -> None:
        (tmp_path / "config").mkdir()
        c = Controller(controller_settings(tmp_path))
        # What Controller.__init__ wires up with --config-source kubernetes.
        c.sa_auth = ServiceAccountAuthenticator(
            FakeReviews(), audience=AUD, agent_service_account=SA
        )
        await c.start()
        try:
            good = agent(c, NODE, token)
            await asyncio.wait_for(good._bootstrap(), 10)
            (leaf, *_) = load_chain(good.chain_pem)
            assert spiffe_id_of(leaf) == f"spiffe://cluster.local/weft/node/{NODE}"
            with pytest.raises(RemoteRefused):
                await asyncio.wait_for(agent(c, "worker-2", token)._bootstrap(), 10)
            token.write_text("someone-elses-token")  # re-read on every bootstrap
            with pytest.raises(RemoteRefused):
                await asyncio.wait_for(agent(c, NODE, token)._bootstrap(), 10)
        finally:
            await c.stop(0.1)

    asyncio.run(main())


def test_without_the_kubernetes_source_a_jwt_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("projected-token")

    async def main() -> None:
        (tmp_path / "config").mkdir()
        c = Controller(controller_settings(tmp_path))
        await c.start()
        try:
            with pytest.raises(RemoteRefused):
                await asyncio.wait_for(agent(c, NODE, token)._bootstrap(), 10)
        finally:
            await c.stop(0.1)

    asyncio.run(main())


def test_agent_prefers_a_configured_token_and_explains_a_missing_credential(tmp_path: Path) -> None:
    ep = ControllerEndpoint("a:1", "a:2", sa_token_file=tmp_path / "token")
    (tmp_path / "token").write_text("jwt")
    assert NodeCredential("n", ep, TrustBundle())._credential() == {"service_account_jwt": "jwt"}
    assert NodeCredential("n", ep, TrustBundle(), token="t")._credential() == {"token": "t"}
    missing = ControllerEndpoint("a:1", "a:2", sa_token_file=tmp_path / "absent")
    with pytest.raises(EnvironmentProblem, match="no bootstrap credential"):
        NodeCredential("n", missing, TrustBundle())._credential()


def test_controller_wires_the_kubernetes_pieces_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--config-source kubernetes --ca-store kubernetes: the Secret CA store, the Kubernetes
    source (with the config directory beside it) and TokenReview bootstrap."""
    from controller.sources import kubernetes as k8s
    from tests.unit.test_k8s_ca_store import SECRET, FakeObjects

    api = FakeObjects()
    monkeypatch.setattr(k8s.KubeRest, "connect", classmethod(lambda cls, kubeconfig=None: api))
    s = controller_settings(tmp_path).model_copy(
        update={"config_source": "kubernetes", "ca_store": "kubernetes"}
    )
    c = Controller(s)
    assert isinstance(c.source, k8s.KubernetesSource) and c.source.files is not None
    assert isinstance(c.sa_auth, ServiceAccountAuthenticator)
    assert c.sa_auth.audience == "weft-controller"
    assert SECRET in api.objects and c.ca.store.describe() == "Secret weft-system/weft-ca"
    files = Controller(controller_settings(tmp_path / "files"))
    assert files.sa_auth is None and not isinstance(files.source, k8s.KubernetesSource)
