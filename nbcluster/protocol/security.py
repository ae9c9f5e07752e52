"""Cluster secret handling and CurveZMQ key derivation.

Every process of a cluster knows one shared secret (a token). From it we derive two CurveZMQ key
pairs: one that every *server* socket uses and one that every *client* socket uses. A server only
accepts clients presenting the derived client public key (checked by a ZAP handler before the
application sees a byte), and a client only completes the handshake with a server holding the
derived server secret key. So a peer without the secret can neither connect nor impersonate a
server, and CurveZMQ encrypts and authenticates every frame (replays and tampering are rejected by
its nonces and MACs).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from nbcluster._private_fs import open_private_file
from nbcluster.exceptions import ConfigurationError

TOKEN_ENV = "NBCLUSTER_TOKEN"
TOKEN_FILE_ENV = "NBCLUSTER_TOKEN_FILE"


def new_token() -> str:
    """Return a fresh random cluster secret (256 bits, hex)."""
    return secrets.token_hex(32)


def write_token_file(path: Path, token: str) -> None:
    """Write ``token`` to ``path`` readable by the owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode())
    finally:
        os.close(fd)


def read_token_file(path: Path) -> str:
    """Read a token file, refusing one that another user could have written or can read.

    The file is opened without following a symbolic link, and must be a regular file owned by
    the current user with no group or other permission bits (mode 0600).

    Raises
    ------
    ConfigurationError
        If the file is missing, empty or not private (:class:`~nbcluster._private_fs.
        UnsafePathError`, whose message says how to fix it, e.g. ``chmod 600``).
    """
    try:
        fd = open_private_file(path, "token file")
    except FileNotFoundError:
        raise ConfigurationError(f"token file {path} does not exist") from None
    with os.fdopen(fd, "rb") as f:
        token = f.read().decode(errors="replace").strip()
    if not token:
        raise ConfigurationError(f"token file {path} is empty")
    return token


def token_from_environment() -> str | None:
    """Return the token named by the environment (file first), or ``None``."""
    file = os.environ.get(TOKEN_FILE_ENV)
    if file:
        return read_token_file(Path(file).expanduser())
    return os.environ.get(TOKEN_ENV) or None


@dataclass(frozen=True)
class CurveKeys:
    """The CurveZMQ key material derived from one cluster secret (z85-encoded bytes)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    def __repr__(self) -> str:  # never show secrets in logs or tracebacks
        return "CurveKeys(<derived from the cluster secret>)"


def _derive_secret_key(token: str, label: bytes) -> bytes:
    raw = hashlib.blake2b(token.encode(), digest_size=32, person=label).digest()
    return z85.encode(raw)


def derive_keys(token: str) -> CurveKeys:
    """Derive the server and client CurveZMQ key pairs from the cluster secret."""
    if not zmq.has("curve"):
        raise ConfigurationError("this libzmq was built without CURVE support")
    server_secret = _derive_secret_key(token, b"nbc-server-key")
    client_secret = _derive_secret_key(token, b"nbc-client-key")
    return CurveKeys(
        server_public=zmq.curve_public(server_secret),
        server_secret=server_secret,
        client_public=zmq.curve_public(client_secret),
        client_secret=client_secret,
    )
