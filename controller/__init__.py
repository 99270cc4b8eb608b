"""weft control plane: CA, workload registry, policy store, gRPC distribution.

The config model (controller.model) and the wire API (controller.api) are shared with the agent:
the controller is the source of truth for both.
"""

__version__ = "0.1.0"
