"""Identity: workload certificates signed for the identities a node holds, node
certificate renewal, and the trust bundle; on the main (mutual TLS) listener.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, NamedTuple

import grpc

from controller.api.gen import identity_pb2, identity_pb2_grpc
from controller.ca.authority import CertificateRequestRejected
from controller.services import caller_node

if TYPE_CHECKING:
    from controller.server import Controller

log = logging.getLogger("weft.controller")

MAX_BATCH = 64  # CSRs in one SignWorkloadCertificates call
# Certificate requests one node may have in progress at once, single calls and batch items
# alike: a node cannot fill the signers' queue (and starve the other nodes) by sending
# many batches at once. A node renews one certificate per service account it hosts.
MAX_IN_FLIGHT_PER_NODE = 256


class Refusal(NamedTuple):
    code: grpc.StatusCode
    message: str


class IdentityService(identity_pb2_grpc.IdentityServicer):
    def __init__(self, c: Controller) -> None:
        self.c = c
        self._in_flight: dict[str, int] = {}  # node -> certificate requests in progress

    async def SignWorkloadCertificate(
        self,
        request: identity_pb2.SignRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.SignResponse:
        node = await caller_node(self.c, context)
        result = await self._sign(node, request)
        if isinstance(result, Refusal):
            await context.abort(result.code, result.message)
            raise AssertionError("unreachable: context.abort raises")
        result.trust_bundle_pem = self.c.ca.bundle_pem()
        return result

    async def SignWorkloadCertificates(
        self,
        request: identity_pb2.SignBatchRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.SignBatchResponse:
        """Several CSRs in one call, each checked and answered as SignWorkloadCertificate
        would: one refused item does not fail the others. The gRPC exchange (about half of
        the controller's CPU per certificate when each comes in its own call) is paid once
        per batch; the signer processes take the items concurrently."""
        node = await caller_node(self.c, context)
        n = len(request.requests)
        if n > MAX_BATCH:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{n} requests in one batch; at most {MAX_BATCH}",
            )
        results = await asyncio.gather(
            *(self._sign(node, r) for r in request.requests), return_exceptions=True
        )
        out = identity_pb2.SignBatchResponse(trust_bundle_pem=self.c.ca.bundle_pem())
        for req, r in zip(request.requests, results, strict=True):
            if isinstance(r, asyncio.CancelledError):
                raise r
            if isinstance(r, BaseException):
                # One item's failure is that item's: the others are signed and answered.
                log.error(
                    "signing ns/%s/sa/%s for node %s failed: %s",
                    req.namespace,
                    req.service_account,
                    node,
                    r,
                )
                out.results.add(
                    code=grpc.StatusCode.INTERNAL.value[0],
                    message="signing failed in the controller",
                )
            elif isinstance(r, Refusal):
                out.results.add(code=r.code.value[0], message=r.message)
            else:
                out.results.add(response=r)
        return out

    async def _sign(
        self, node: str, request: identity_pb2.SignRequest
    ) -> identity_pb2.SignResponse | Refusal:
        """One workload certificate for `node`, or why not."""
        c = self.c
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
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {node} hosts no workload with namespace "
                f"{request.namespace!r} and service account "
                f"{request.service_account!r}",
            )
        busy = self._in_flight.get(node, 0)
        if busy >= MAX_IN_FLIGHT_PER_NODE:
            c.metrics.refused.labels("too_many_in_flight").inc()
            return Refusal(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"node {node} has {busy} certificate requests in progress; "
                f"at most {MAX_IN_FLIGHT_PER_NODE}",
            )
        self._in_flight[node] = busy + 1
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
            return Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            left = self._in_flight[node] - 1
            if left:
                self._in_flight[node] = left
            else:
                del self._in_flight[node]
        c.metrics.certs.labels("workload").inc()
        return identity_pb2.SignResponse(
            certificate_chain_pem=issued.chain_pem,
            not_after_unix=int(issued.not_after),
            not_before_unix=int(issued.not_before),
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
