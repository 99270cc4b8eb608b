"""Node bootstrap with a Kubernetes service-account token (TokenReview).

The agent sends its projected token (audience `weft-controller`, bound to its pod). The
controller asks the API server who that is (a TokenReview with the same audience) and
accepts the request only when all of these hold:

1. the API server authenticated the token for our audience (a token minted for the API
   server itself, or for another audience, is refused: it may have been replayed to us);
2. it belongs to the agents' service account, and no other (settings.agent_service_account);
3. the token is bound to a pod whose node is the node asked for: the API server puts the
   pod's node in `status.user.extra["authentication.kubernetes.io/node-name"]`
   (ServiceAccountTokenPodNodeInfo, on by default since Kubernetes 1.30, GA in 1.32). An
   agent on node A therefore cannot obtain node B's certificate, even with a valid token.

Every refusal is logged with its reason; the caller only learns that it was refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from controller.sources.kubernetes import KubeAPI, KubeAPIError

log = logging.getLogger("weft.auth.kubernetes")

NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
POD_NAME_KEY = "authentication.kubernetes.io/pod-name"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"


@dataclass(frozen=True)
class Decision:
    ok: bool
    reason: str
    username: str = ""
    node: str | None = None
    pod: str | None = None


def token_review(token: str, audience: str) -> dict[str, Any]:
    return {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    }


def decide(
    review: dict[str, Any], *, audience: str, agent_service_account: str, node: str
) -> Decision:
    """Whether a TokenReview response lets its bearer bootstrap `node`. Pure."""
    status = review.get("status") or {}
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    extra = user.get("extra") or {}
    token_node = (extra.get(NODE_NAME_KEY) or [None])[0]
    pod = (extra.get(POD_NAME_KEY) or [None])[0]
    if status.get("error"):
        return Decision(False, f"token review failed: {status['error']}", username)
    if not status.get("authenticated"):
        return Decision(False, "the API server did not authenticate the token", username)
    if audience not in (status.get("audiences") or []):
        # An empty list means "valid for the API server's own audience", not ours.
        return Decision(
            False,
            f"the token is not for audience {audience!r} "
            f"(it is for {status.get('audiences') or 'the API server'})",
            username,
        )
    ns, _, sa = agent_service_account.partition("/")
    want = f"system:serviceaccount:{ns}:{sa}"
    if username != want:
        return Decision(
            False, f"the token is {username or 'anonymous'}, not the agents' {want}", username
        )
    if token_node is None:
        return Decision(
            False,
            "the token carries no node (a token bound to a pod on Kubernetes >= 1.30 does; "
            "legacy Secret tokens and TokenRequests without a pod do not)",
            username,
            pod=pod,
        )
    if token_node != node:
        return Decision(
            False,
            f"the token's pod runs on node {token_node!r}, not {node!r}",
            username,
            token_node,
            pod,
        )
    return Decision(True, "ok", username, token_node, pod)


class ServiceAccountAuthenticator:
    """`verify(token, node)`: the bootstrap check for service-account tokens."""

    def __init__(self, api: KubeAPI, *, audience: str, agent_service_account: str) -> None:
        self.api = api
        self.audience = audience
        self.agent_service_account = agent_service_account

    def review(self, token: str) -> dict[str, Any]:
        return self.api.request("POST", TOKEN_REVIEWS, body=token_review(token, self.audience))

    def verify(self, token: str, node: str) -> bool:
        if not token:
            log.warning("refused bootstrap of node %r: empty service-account token", node)
            return False
        try:
            review = self.review(token)
        except KubeAPIError as e:
            hint = " (RBAC: the controller needs create on tokenreviews)" if e.status == 403 else ""
            log.error("refused bootstrap of node %r: TokenReview failed: %s%s", node, e, hint)
            return False
        d = decide(
            review,
            audience=self.audience,
            agent_service_account=self.agent_service_account,
            node=node,
        )
        if d.ok:
            log.info("node %s authenticated by the token of pod %s (%s)", node, d.pod, d.username)
        else:
            log.warning("refused bootstrap of node %r: %s", node, d.reason)
        return d.ok
