"""Authentication: nothing from a peer without the cluster secret is ever unpickled."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import zmq
import zmq.utils.monitor

import nbcluster as nb
from nbcluster.exceptions import AuthenticationError, ConfigurationError
from nbcluster.protocol.messages import PROTOCOL_VERSION
from nbcluster.protocol.security import derive_keys, new_token, read_token_file, write_token_file


class _Evil:
    """Unpickling this creates a file: proof that a payload was deserialized."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def local() -> Iterator[nb.ClusterInfo]:
    nb.shutdown()
    info = nb.init(num_cpus=1)
    yield info
    nb.shutdown()


def _token(info: nb.ClusterInfo) -> str:
    return read_token_file(Path(info.session_dir or "") / "token")


def _raw_socket(endpoint: str, keys: object | None, server_key: bytes | None = None) -> zmq.Socket:  # type: ignore[type-arg]
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if keys is not None:
        s.curve_secretkey = keys.client_secret  # type: ignore[attr-defined]
        s.curve_publickey = keys.client_public  # type: ignore[attr-defined]
        s.curve_serverkey = server_key or keys.server_public  # type: ignore[attr-defined]
    s.connect(endpoint)
    return s


def _send_evil(sock: zmq.Socket, marker: Path) -> None:  # type: ignore[type-arg]
    header = msgpack.packb({"k": "hello", "v": PROTOCOL_VERSION, "pid": 1})
    try:  # a DEALER without an authenticated peer may refuse to queue at all
        sock.send_multipart([header, pickle.dumps(_Evil(str(marker)))], flags=zmq.NOBLOCK)
    except zmq.Again:
        pass


def test_wrong_secret_is_refused_before_unpickling(local: nb.ClusterInfo, tmp_path: Path) -> None:
    endpoint = f"tcp://{local.address}"
    real = derive_keys(_token(local))
    marker = tmp_path / "pwned"
    attackers = {
        "plaintext": _raw_socket(endpoint, None),
        "wrong secret": _raw_socket(endpoint, derive_keys(new_token())),
        # Knows the head's public key, but not the client key derived from the secret.
        "wrong client key": _raw_socket(endpoint, derive_keys(new_token()), real.server_public),
    }
    for sock in attackers.values():
        mon = sock.get_monitor_socket()
        _send_evil(sock, marker)
        assert sock.poll(1500) == 0  # never answered
        events = []
        for _ in range(50):  # it keeps retrying (and failing) the handshake: sample a while
            if not mon.poll(100):
                break
            events.append(zmq.utils.monitor.recv_monitor_message(mon)["event"])
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED not in events
        sock.disable_monitor()
        mon.close()
        sock.close()
    assert not marker.exists()

    # The same message from a peer with the secret is processed (it gets a welcome).
    good = _raw_socket(endpoint, real)
    good.send_multipart([msgpack.packb({"k": "hello", "v": PROTOCOL_VERSION, "pid": 1})])
    assert good.poll(5000)
    reply = msgpack.unpackb(good.recv_multipart()[0])
    assert reply["k"] == "welcome"
    good.close()


def test_driver_with_wrong_secret_gets_a_clear_error(local: nb.ClusterInfo, tmp_path: Path) -> None:
    bad = tmp_path / "token"
    write_token_file(bad, new_token())
    code = f"import nbcluster as nb\nnb.init(address={local.address!r}, token_file={str(bad)!r})\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "AuthenticationError" in proc.stderr and "secret" in proc.stderr
    assert bad.read_text() not in proc.stderr  # the secret itself is never shown


def test_worker_with_wrong_secret_exits_nonzero(local: nb.ClusterInfo, tmp_path: Path) -> None:
    bad = tmp_path / "token"
    write_token_file(bad, new_token())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nbcluster",
            "worker",
            "--address",
            local.address,
            "--token-file",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "does not match" in proc.stderr
    assert bad.read_text() not in proc.stderr + proc.stdout
    assert len(nb.nodes()) == 1  # it never joined


def test_protocol_version_mismatch_is_refused(local: nb.ClusterInfo) -> None:
    sock = _raw_socket(f"tcp://{local.address}", derive_keys(_token(local)))
    sock.send_multipart([msgpack.packb({"k": "hello", "v": PROTOCOL_VERSION + 100, "pid": 1})])
    assert sock.poll(5000)
    reply = msgpack.unpackb(sock.recv_multipart()[0])
    assert reply["k"] == "error" and reply["code"] == "version"
    assert "protocol version" in reply["msg"]
    sock.close()


def test_malformed_frames_are_answered_and_the_head_survives(local: nb.ClusterInfo) -> None:
    sock = _raw_socket(f"tcp://{local.address}", derive_keys(_token(local)))
    for junk in (b"\xc1\xff\x00garbage", msgpack.packb([1, 2, 3]), msgpack.packb({"no": "kind"})):
        sock.send_multipart([junk, b"payload"])
        assert sock.poll(5000)
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        assert reply["k"] == "error" and reply["code"] == "protocol"
    sock.close()

    @nb.remote
    def ok() -> str:
        return "still serving"

    assert nb.get(ok.remote(), timeout=30) == "still serving"


def test_token_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "sub" / "token"
    write_token_file(path, "s3cret")
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_token_file(path) == "s3cret"
    os.chmod(path, 0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        read_token_file(path)
    with pytest.raises(ConfigurationError, match="does not exist"):
        read_token_file(tmp_path / "missing")
    assert "s3cret" not in repr(derive_keys("s3cret"))


def test_authentication_error_is_typed() -> None:
    assert issubclass(AuthenticationError, nb.exceptions.NbclusterError)


def test_store_refuses_segments_it_did_not_write(tmp_path: Path) -> None:
    from nbcluster.store import ObjectStoreError, open_segment, write_segment
    from nbcluster.store.segment import dumps_oob

    path = str(tmp_path / "seg")
    write_segment(path, dumps_oob(b"x" * 1000))
    assert len(open_segment(path)) > 0
    os.chmod(path, 0o644)  # as a file another user planted would be
    with pytest.raises(ObjectStoreError, match="refusing"):
        open_segment(path)
