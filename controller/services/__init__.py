"""The controller's gRPC services, one module each; controller/server.py starts the
listeners that serve them (bootstrap.py alone on the bootstrap port, identity.py and
config.py on the main port, admin.py on the admin socket).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from controller.server import Controller


class Abort(Exception):
    """An RPC fails with this gRPC status and message (raised below a handler, which
    answers it with `abort`)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


async def abort(context: grpc.aio.ServicerContext, e: Abort) -> None:
    await context.abort(e.code, e.message)


async def caller_node(c: Controller, context: grpc.aio.ServicerContext) -> str:
    """The node making this call, from its certificate; a caller that is not a weft node
    gets the RPC aborted with the reason (context.abort raises)."""
    try:
        return c.node_of(context)
    except Abort as e:
        await abort(context, e)
        raise
