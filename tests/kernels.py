"""A real IPython kernel (ipykernel, launched by jupyter_client) driven as a frontend drives it.

Used by the magics and widgets tests: cells are sent on the shell channel and every IOPub message
is kept with its parent header, so a test can tell under which cell an output appeared.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


class Kernel:
    """One kernel process and a blocking client to it."""

    def __init__(self, env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=full_env, cwd=str(cwd) if cwd else None)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.iopub: list[dict[str, Any]] = []

    def _pump(self, timeout: float) -> dict[str, Any] | None:
        try:
            msg: dict[str, Any] = self.kc.get_iopub_msg(timeout=timeout)
        except queue.Empty:
            return None
        self.iopub.append(msg)
        return msg

    def submit(self, code: str) -> str:
        """Send a cell; returns its ``msg_id`` (the parent of everything it outputs)."""
        return str(self.kc.execute(code, allow_stdin=False))

    def wait_idle(self, msg_id: str, timeout: float = 120.0) -> None:
        """Read IOPub until the kernel is idle again after ``msg_id``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._pump(0.5)
            if (
                msg is not None
                and msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return
        raise AssertionError(f"cell {msg_id} did not finish within {timeout} s")

    def run(self, code: str, timeout: float = 120.0, ok: bool = True) -> list[dict[str, Any]]:
        """Run a cell to completion; returns its IOPub messages. ``ok``: fail on an error."""
        msg_id = self.submit(code)
        self.wait_idle(msg_id, timeout)
        out = self.outputs(msg_id)
        if ok:
            errors = [m for m in out if m["msg_type"] == "error"]
            assert not errors, "\n".join(
                _strip("\n".join(e["content"]["traceback"])) for e in errors
            )
        return out

    def outputs(self, msg_id: str) -> list[dict[str, Any]]:
        return [m for m in self.iopub if m["parent_header"].get("msg_id") == msg_id]

    def text(self, msg_id: str, stream: str | None = None) -> str:
        """Everything a cell printed (``stream``: only stdout or stderr)."""
        return "".join(
            m["content"]["text"]
            for m in self.outputs(msg_id)
            if m["msg_type"] == "stream" and (stream is None or m["content"]["name"] == stream)
        )

    def result(self, msg_id: str) -> str:
        """The ``text/plain`` of the cell's value (``Out[n]``)."""
        for m in self.outputs(msg_id):
            if m["msg_type"] == "execute_result":
                return str(m["content"]["data"].get("text/plain", ""))
        return ""

    def wait_for_text(self, msg_id: str, needle: str, timeout: float = 30.0) -> str:
        """Read IOPub until ``needle`` was printed under cell ``msg_id``."""
        deadline = time.monotonic() + timeout
        while needle not in self.text(msg_id):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{needle!r} not printed under {msg_id}: {self.text(msg_id)!r}"
                )
            self._pump(0.5)
        return self.text(msg_id)

    def close(self) -> None:
        self.kc.stop_channels()
        if self.km.is_alive():
            self.km.shutdown_kernel(now=False)
        self.km.cleanup_resources()


def _strip(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


strip_ansi = _strip


@contextmanager
def kernel(env: dict[str, str] | None = None, cwd: Path | None = None) -> Iterator[Kernel]:
    k = Kernel(env, cwd)
    try:
        yield k
    finally:
        k.close()
