"""One authenticated ZeroMQ context per process, and the sockets made from it."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from nbcluster.exceptions import AuthenticationError, ConnectionFailedError
from nbcluster.protocol.security import CurveKeys

log = logging.getLogger(__name__)

ZAP_DOMAIN = "nbcluster"


class _ClientKeyAllowlist:
    """ZAP credentials provider: only the cluster's derived client key may connect."""

    def __init__(self, allowed: bytes) -> None:
        self._allowed = allowed

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._allowed


class Transport:
    """A process's ZeroMQ context, with a ZAP handler that admits only cluster peers.

    Parameters
    ----------
    keys
        The CurveZMQ keys derived from the cluster secret.
    """

    def __init__(self, keys: CurveKeys) -> None:
        self.keys = keys
        self.ctx = zmq.Context()
        self.actx: zmq.asyncio.Context = zmq.asyncio.Context.shadow(self.ctx.underlying)
        self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("nbcluster.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, _ClientKeyAllowlist(keys.client_public))
        self._closed = False
        self._sockets: weakref.WeakSet[Any] = weakref.WeakSet()

    def _tune(self, sock: zmq.Socket[Any]) -> None:
        self._sockets.add(sock)
        sock.setsockopt(zmq.LINGER, 0)
        # Our own flow control bounds what is queued; never drop silently at a high-water mark.
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)

    def server(self, kind: int, endpoint: str, *, aio: bool = True) -> tuple[Any, str]:
        """Bind an authenticated server socket; return it and the endpoint actually bound."""
        ctx: zmq.Context[Any] = self.actx if aio else self.ctx
        sock = ctx.socket(kind)
        self._tune(sock)
        sock.curve_server = True
        sock.curve_secretkey = self.keys.server_secret
        sock.curve_publickey = self.keys.server_public
        sock.zap_domain = ZAP_DOMAIN.encode()
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            raise ConnectionFailedError(f"could not bind {endpoint}: {exc}") from None
        bound = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        return sock, bound

    async def connect_verified(self, kind: int, endpoint: str, timeout: float) -> Any:
        """Connect like :meth:`client` and wait until the CURVE handshake succeeded.

        The handshake monitor is attached before connecting: attached after, it could miss a
        handshake that completed in between and wait for nothing.
        """
        sock = self.client(kind, endpoint, connect=False)
        mon = sock.get_monitor_socket()
        sock.connect(endpoint)
        await wait_for_handshake(sock, endpoint, timeout, mon)
        return sock

    def client(self, kind: int, endpoint: str, *, aio: bool = True, connect: bool = True) -> Any:
        """Connect an authenticated client socket to ``endpoint``."""
        ctx: zmq.Context[Any] = self.actx if aio else self.ctx
        sock = ctx.socket(kind)
        self._tune(sock)
        sock.curve_secretkey = self.keys.client_secret
        sock.curve_publickey = self.keys.client_public
        sock.curve_serverkey = self.keys.server_public
        # A peer that went away (a restarting head) is retried with exponential backoff.
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if connect:
            sock.connect(endpoint)
        return sock

    def close(self) -> None:
        """Stop the ZAP handler and destroy the context (sockets are closed with linger 0)."""
        if self._closed:
            return
        self._closed = True
        # Sockets of the asyncio shadow context are not tracked by ``ctx``: close them ourselves,
        # or terminating the context waits for them forever.
        for sock in list(self._sockets):
            if not sock.closed:
                sock.close(linger=0)
        try:
            self._auth.stop()
        finally:
            self.ctx.destroy(linger=0)


_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)


async def wait_for_handshake(sock: Any, endpoint: str, timeout: float, mon: Any = None) -> None:
    """Wait until the CURVE handshake of ``sock`` with ``endpoint`` succeeded.

    ``mon`` is ``sock``'s monitor socket when it was attached before connecting (see
    :meth:`Transport.connect_verified`); without it one is attached now.

    Raises
    ------
    AuthenticationError
        If the peer refused us or we refused it (the cluster secrets differ).
    ConnectionFailedError
        If nothing answered within ``timeout`` seconds.
    """
    if mon is None:
        mon = sock.get_monitor_socket()
    disconnects = 0
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise ConnectionFailedError(
                    f"no nbcluster head answered at {endpoint} within {timeout:.0f} s"
                )
            try:
                frames = await asyncio.wait_for(mon.recv_multipart(), left)
            except TimeoutError:
                continue
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event in _FAILED:
                raise AuthenticationError(
                    f"the peer at {endpoint} refused the connection: the cluster secret "
                    "(token) does not match"
                )
            if event == zmq.EVENT_DISCONNECTED:
                # A CURVE server that cannot decrypt our HELLO just drops the connection.
                disconnects += 1
                if disconnects >= 2:
                    raise AuthenticationError(
                        f"the peer at {endpoint} dropped the handshake: the cluster secret "
                        "(token) does not match, or it is not an nbcluster service"
                    )
    finally:
        sock.disable_monitor()
        mon.close(linger=0)
