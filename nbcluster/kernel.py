"""The Jupyter kernel we may run in: finding it, and routing remote output to its cells.

Every task remembers which cell submitted it (the kernel's parent header when ``.remote()`` was
called), and its prints are published under that cell, even when they arrive after the cell
finished. IPython is never imported here: only a kernel that already runs is used.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nbcluster.client.core import CoreClient

#: Cells whose parent header is kept for late output (the oldest are forgotten first).
MAX_CELLS = 512


class CellOutput:
    """Publishes remote output under the notebook cell that submitted the task.

    ``tag`` runs in the user's thread at ``.remote()`` time and remembers the cell's parent
    header; ``write`` runs on the client's I/O thread and writes the lines to the kernel's stream
    with that parent header (ipykernel then sends a ``stream`` message the frontend shows under
    that cell).
    """

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.streams: dict[str, Any] = {"stdout": sys.stdout, "stderr": sys.stderr}  # OutStreams
        self._headers: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cells: dict[str, str] = {}  # msg_id -> the cell's id, for the timeline
        self._lock = threading.Lock()

    def tag(self) -> str | None:
        """The id of the cell running now (its request's ``msg_id``)."""
        try:
            parent = self.kernel.get_parent("shell")
        except Exception:
            return None
        header = (parent or {}).get("header") or {}
        msg_id = header.get("msg_id")
        if not msg_id:
            return None
        cell = ((parent or {}).get("metadata") or {}).get("cellId")  # JupyterLab sends it
        with self._lock:
            self._headers[msg_id] = header
            self._headers.move_to_end(msg_id)
            if cell:
                self._cells[msg_id] = str(cell)
            while len(self._headers) > MAX_CELLS:
                old, _ = self._headers.popitem(last=False)
                self._cells.pop(old, None)
        return str(msg_id)

    def cell(self, tag: Any) -> str | None:
        """The notebook cell id (JupyterLab's ``cellId``) of a task's output ``tag``."""
        with self._lock:
            return self._cells.get(tag) if tag else None

    def write(self, stream: str, text: str, tag: Any) -> None:
        out = self.streams.get(stream) or self.streams["stdout"]
        with self._lock:
            header = self._headers.get(tag) if tag else None
        try:
            if header is not None and hasattr(out, "set_thread_parent"):
                token = out.set_thread_parent(header)
                try:
                    out.write(text)
                finally:
                    out.reset_thread_parent(token)
            else:  # no cell known (or an older ipykernel): the current cell gets it
                out.write(text)
        except Exception:  # the kernel is shutting down: nowhere left to show it
            pass


def kernel_shell() -> Any:
    """The IPython shell of the Jupyter kernel we run in, else ``None``."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    shell = ipython.get_ipython()
    return shell if getattr(shell, "kernel", None) is not None else None


def attach_kernel(client: CoreClient) -> None:
    """Route ``client``'s remote output to notebook cells when it runs in a Jupyter kernel."""
    shell = kernel_shell()
    if shell is None or client.on_output is not None:
        return
    router = CellOutput(shell.kernel)
    client.output_tag = router.tag
    client.on_output = router.write
    client.cell_of = router.cell
