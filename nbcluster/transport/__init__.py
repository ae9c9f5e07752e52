"""Message transport: ZeroMQ sockets with CurveZMQ authentication (``sockets``), the
listener/channel seam with a ZeroMQ and an in-memory implementation (``channel``), and the one
receive loop with its malformed-message policy (``serve``)."""

from nbcluster.transport.sockets import Transport, wait_for_handshake

__all__ = ["Transport", "wait_for_handshake"]
