"""SignBatcher (agent/identity/manager.py) on its own: what it sends and that every
request gets an answer. The controller's side, over real mTLS gRPC, is in
test_controller_grpc.py; here the node's channel is replaced to drive the failure paths."""

from __future__ import annotations

import asyncio
import types

import pytest

from agent.identity import manager as M
from controller.api.gen import identity_pb2


def test_a_broken_channel_fails_the_request_instead_of_leaving_it_waiting():
    """If the node's channel cannot be had, the requests of that batch fail (and the
    renewal loop retries them); none waits forever."""

    def channel():
        raise RuntimeError("channel being rebuilt")

    async def main():
        b = M.SignBatcher(types.SimpleNamespace(channel=channel))
        with pytest.raises(M.SignRefused, match="channel being rebuilt"):
            await asyncio.wait_for(b.sign(identity_pb2.SignRequest(namespace="ai")), 5)

    asyncio.run(main())


def test_a_request_dropped_before_the_flush_is_not_sent():
    """An identity dropped while its request waits for the batch (its renewal task is
    cancelled) is left out of the call: the controller signs nothing nobody uses."""
    sent: list[list[str]] = []

    class Channel:
        """The node's channel, answering as the controller would."""

        async def unary(self, method, req, reply_type, *, deadline):
            if method.endswith("/SignWorkloadCertificates"):
                sent.append([r.namespace for r in req.requests])
                ok = identity_pb2.SignResponse(spiffe_id="spiffe://cluster.local/ns/kept/sa/x")
                return identity_pb2.SignBatchResponse(
                    results=[identity_pb2.SignResult(response=ok)] * len(req.requests)
                )
            sent.append([req.namespace])
            return identity_pb2.SignResponse(spiffe_id="spiffe://cluster.local/ns/kept/sa/x")

    async def main():
        b = M.SignBatcher(types.SimpleNamespace(channel=Channel))
        names = ("dropped", "kept-1", "kept-2")
        tasks = [asyncio.create_task(b.sign(identity_pb2.SignRequest(namespace=n))) for n in names]
        await asyncio.sleep(0)  # all three queued, the flush not run yet
        tasks[0].cancel()
        signed = await asyncio.gather(tasks[1], tasks[2])
        return signed, b.calls

    signed, calls = asyncio.run(main())
    assert sent == [["kept-1", "kept-2"]] and calls == 1
    assert all(s.response.spiffe_id.endswith("/ns/kept/sa/x") for s in signed)
