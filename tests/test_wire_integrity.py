"""Frames changed or replayed on the wire are rejected by CurveZMQ before the head sees them.

A man-in-the-middle TCP proxy between a real client (with the right secret) and a real head
parses ZMTP 3 frames and, after the CURVE handshake, either flips one byte of the first
encrypted MESSAGE or sends it twice. The head must not act on either.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq

import nbcluster as nb
from nbcluster.protocol.messages import PROTOCOL_VERSION, Kind
from nbcluster.protocol.security import derive_keys, read_token_file

GREETING = 64


class Proxy(threading.Thread):
    """Forwards one TCP connection; applies ``mode`` to the client's first CURVE MESSAGE."""

    def __init__(self, target: tuple[str, int], mode: str) -> None:
        super().__init__(daemon=True)
        self.target, self.mode = target, mode
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.touched = threading.Event()

    def run(self) -> None:
        client, _ = self.listener.accept()
        server = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(server, client), daemon=True).start()
        self._client_to_server(client, server)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            dst.close()

    def _client_to_server(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            seen = 0
            while seen < GREETING:  # forwarded as it comes: peers exchange it in steps
                chunk = src.recv(GREETING - seen)
                if not chunk:
                    return
                dst.sendall(chunk)
                seen += len(chunk)
            while True:
                frame = self._read_frame(src)
                if frame is None:
                    break
                _flags, body, raw = frame
                is_message = body[:8] == b"\x07MESSAGE"  # CURVE-encrypted ZMTP frame
                if is_message and not self.touched.is_set():
                    self.touched.set()
                    if self.mode == "tamper":
                        raw = raw[:-1] + bytes([raw[-1] ^ 0x01])
                    elif self.mode == "replay":
                        dst.sendall(raw)
                dst.sendall(raw)
        except OSError:
            pass
        finally:
            dst.close()

    @staticmethod
    def _read_exact(s: socket.socket, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = s.recv(n - len(out))
            if not chunk:
                raise OSError("closed")
            out += chunk
        return out

    def _read_frame(self, s: socket.socket) -> tuple[int, bytes, bytes] | None:
        try:
            head = self._read_exact(s, 1)
        except OSError:
            return None
        flags = head[0]
        size_raw = self._read_exact(s, 8 if flags & 0x02 else 1)
        size = int.from_bytes(size_raw, "big")
        body = self._read_exact(s, size)
        return flags, body, head + size_raw + body


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[str, int, str]]:
    nb.shutdown()
    info = nb.init(num_cpus=1)
    host, port = info.address.rsplit(":", 1)
    yield host, int(port), read_token_file(Path(info.session_dir or "") / "token")
    nb.shutdown()


def _hello_through(proxy: Proxy, token: str) -> list[dict[str, object]]:
    keys = derive_keys(token)
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_secretkey = keys.client_secret
    s.curve_publickey = keys.client_public
    s.curve_serverkey = keys.server_public
    s.connect(f"tcp://127.0.0.1:{proxy.port}")
    try:
        s.send_multipart([msgpack.packb({"k": Kind.HELLO, "v": PROTOCOL_VERSION, "pid": 1})])
        replies = []
        while s.poll(2000):
            replies.append(msgpack.unpackb(s.recv_multipart()[0]))
        return replies
    finally:
        s.close()


@pytest.mark.parametrize("mode", ["pass", "tamper", "replay"])
def test_changed_or_replayed_frames_are_refused(head: tuple[str, int, str], mode: str) -> None:
    host, port, token = head
    proxy = Proxy((host, port), mode)
    proxy.start()
    replies = _hello_through(proxy, token)
    assert proxy.touched.wait(5), "the proxy never saw an encrypted message"
    welcomes = [r for r in replies if r.get("k") == Kind.WELCOME]
    if mode == "pass":
        assert len(welcomes) == 1  # the proxy itself is harmless: the check below means something
    elif mode == "tamper":
        assert welcomes == []  # the changed frame failed authentication: never reached the head
    else:
        assert len(welcomes) <= 1  # the copy was refused (nonce reuse), never handled twice
    # The head is unharmed.
    assert nb.nodes()[0]["alive"]
