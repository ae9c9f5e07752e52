"""One authenticated ZeroMQ context per process, and the sockets made from it."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import Iterable
from typing import Any

import zmq
import zmq.asyncio
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from nbcluster.exceptions import (
    AddressInUseError,
    AuthenticationError,
    ConfigurationError,
    ConnectionFailedError,
    NbclusterError,
)
from nbcluster.protocol.security import CurveKeys

log = logging.getLogger(__name__)

ZAP_DOMAIN = "nbcluster"

#: Environment variable: the largest frame (one part of a message) a listening socket accepts.
MAX_MESSAGE_ENV = "NBCLUSTER_MAX_MESSAGE_BYTES"
#: Its default. The largest frames that legitimately reach a listening socket are values that
#: travel inline: an actor's constructor arguments and class (``ACTOR_CREATE``, through the
#: head), and the arguments and ``put`` values of a driver without an object store. Store chunks
#: (``STORE_CHUNK``, at most 64 MiB) go to connecting sockets, and values over 100 KiB that have
#: a store travel as a small marker. 512 MiB leaves a wide margin over all of these while
#: bounding what a peer that has not authenticated yet can make a process buffer.
DEFAULT_MAX_MESSAGE_BYTES = 512 << 20
#: How long a connecting peer has to complete the CURVE handshake (libzmq's default is 30 s).
HANDSHAKE_TIMEOUT_MS = 10_000


class MessageTooLargeError(NbclusterError, ValueError):
    """A frame is larger than listening sockets accept (:func:`max_message_bytes`)."""


def max_message_bytes() -> int:
    """The largest frame a listening socket accepts: ``$NBCLUSTER_MAX_MESSAGE_BYTES`` (bytes;
    ``0`` or negative: no limit), else :data:`DEFAULT_MAX_MESSAGE_BYTES`. ``-1`` means none."""
    global _parsed
    raw = os.environ.get(MAX_MESSAGE_ENV, "")
    if raw == _parsed[0]:  # checked on every submit: parse only when the setting changed
        return _parsed[1]
    text = raw.strip()
    if not text:
        value = DEFAULT_MAX_MESSAGE_BYTES
    else:
        try:
            value = int(text)
        except ValueError:
            raise ConfigurationError(
                f"{MAX_MESSAGE_ENV}={raw!r} is not a number of bytes"
            ) from None
        value = value if value > 0 else -1
    _parsed = (raw, value)
    return value


_parsed: tuple[str, int] = ("", DEFAULT_MAX_MESSAGE_BYTES)  # the last setting read, its value


def check_frame_sizes(frames: Iterable[Any], what: str) -> None:
    """Refuse, with a clear error, frames a listening socket would drop the connection for.

    Called where a user's value is about to travel inline, so that a value over the limit is an
    error in the user's call rather than a peer disconnected by libzmq.

    Raises
    ------
    MessageTooLargeError
        If a frame is larger than :func:`max_message_bytes`.
    """
    limit = max_message_bytes()
    if limit < 0:
        return
    for frame in frames:
        n = memoryview(frame).nbytes
        if n > limit:
            raise MessageTooLargeError(
                f"{what} is {n} bytes, more than a message may carry ({limit} bytes, "
                f"${MAX_MESSAGE_ENV}); pass it through the object store instead (nb.put() on a "
                "node with an agent, then pass the ref), or raise the limit on every node"
            )


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
        # Fail closed if the ZAP handler is missing or does not answer for our domain.
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
        # Bound what a peer can make us buffer (also before it authenticated: libzmq decodes
        # handshake commands with the same limit), and how long it may take to authenticate.
        sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes())
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_TIMEOUT_MS)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            error = AddressInUseError if exc.errno == zmq.EADDRINUSE else ConnectionFailedError
            raise error(f"could not bind {endpoint}: {exc}") from None
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
