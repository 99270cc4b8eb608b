"""NodeBootstrap: a node proves itself with a token and gets its node certificate.

Served alone on the bootstrap listener (TLS, server-authenticated only): the caller has
no certificate yet, so nothing else may be reachable there.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc

from controller.api.gen import identity_pb2, identity_pb2_grpc
from controller.ca.authority import CertificateRequestRejected

if TYPE_CHECKING:
    from controller.server import Controller

log = logging.getLogger("weft.controller")


class BootstrapService(identity_pb2_grpc.NodeBootstrapServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c

    async def Bootstrap(
        self, request: identity_pb2.BootstrapRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.BootstrapResponse:
        c = self.c
        which = request.WhichOneof("credential")
        if which == "token":
            ok = await asyncio.to_thread(c.tokens.verify, request.token, request.node)
        elif which == "service_account_jwt" and c.sa_auth is not None:
            # Kubernetes: a TokenReview decides (controller/auth/kubernetes.py).
            ok = await asyncio.to_thread(
                c.sa_auth.verify, request.service_account_jwt, request.node
            )
        else:
            ok = False  # a JWT without the Kubernetes source, or no credential at all
        if not ok:
            c.metrics.refused.labels("bad_bootstrap_credential").inc()
            log.warning(
                "refused bootstrap of node %r from %s: %s credential not valid for that node",
                request.node,
                context.peer(),
                which or "no",
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"bootstrap credential is not valid for node {request.node!r}",
            )
        try:
            issued = await c.signer.sign(c.ca.node_request(request.csr_pem, request.node))
        except CertificateRequestRejected as e:
            c.metrics.refused.labels("bad_csr").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        c.metrics.certs.labels("node").inc()
        log.info("bootstrapped node %s (%s)", request.node, context.peer())
        return identity_pb2.BootstrapResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=c.ca.bundle_pem(),
            not_after_unix=int(issued.not_after),
            spiffe_id=issued.spiffe_id,
        )
