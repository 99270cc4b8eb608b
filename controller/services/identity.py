"""Identity: workload certificates signed for the identities a node holds, node
certificate renewal, and the trust bundle; on the main (mutual TLS) listener.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import grpc

from controller.api.gen import identity_pb2, identity_pb2_grpc
from controller.ca.authority import CertificateRequestRejected
from controller.services import caller_node

if TYPE_CHECKING:
    from controller.server import Controller

log = logging.getLogger("weft.controller")


class IdentityService(identity_pb2_grpc.IdentityServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c

    async def SignWorkloadCertificate(
        self,
        request: identity_pb2.SignRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.SignResponse:
        c = self.c
        node = await caller_node(c, context)
        ident = (request.namespace, request.service_account)
        if ident not in c.identities_on(node):
            c.metrics.refused.labels("not_on_node").inc()
            log.warning(
                "refused certificate for ns/%s/sa/%s to node %s: no such workload is "
                "scheduled on that node",
                request.namespace,
                request.service_account,
                node,
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node} hosts no workload with namespace "
                f"{request.namespace!r} and service account "
                f"{request.service_account!r}",
            )
        try:
            issued = await c.signer.sign(
                c.ca.workload_request(
                    request.csr_pem,
                    request.namespace,
                    request.service_account,
                    int(request.ttl_seconds),
                )
            )
        except CertificateRequestRejected as e:
            c.metrics.refused.labels("bad_csr").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        c.metrics.certs.labels("workload").inc()
        return identity_pb2.SignResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=c.ca.bundle_pem(),
            not_after_unix=int(issued.not_after),
            spiffe_id=issued.spiffe_id,
            serial_hex=issued.serial_hex,
        )

    async def RenewNodeCertificate(
        self,
        request: identity_pb2.RenewNodeRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.BootstrapResponse:
        node = await caller_node(self.c, context)
        try:
            issued = await self.c.signer.sign(self.c.ca.node_request(request.csr_pem, node))
        except CertificateRequestRejected as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        self.c.metrics.certs.labels("node").inc()
        return identity_pb2.BootstrapResponse(
            certificate_chain_pem=issued.chain_pem,
            trust_bundle_pem=self.c.ca.bundle_pem(),
            not_after_unix=int(issued.not_after),
            spiffe_id=issued.spiffe_id,
        )

    async def GetTrustBundle(
        self, request: identity_pb2.TrustBundleRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.TrustBundle:
        return identity_pb2.TrustBundle(
            pem=self.c.ca.bundle_pem(), trust_domain=self.c.settings.trust_domain
        )
