"""ZeroMQ sockets with CurveZMQ authentication."""

from nbcluster.transport.sockets import Transport, wait_for_handshake

__all__ = ["Transport", "wait_for_handshake"]
