"""Progress of many refs: an ipywidgets bar in a notebook, a line on stderr elsewhere."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from nbcluster.client import current
from nbcluster.client.objects import FAILED, PENDING, Entry
from nbcluster.kernel import kernel_shell
from nbcluster.refs import ObjectRef

TICK_S = 0.2  # how often the bar is redrawn while refs complete


class Progress:
    """Counts ``refs`` as they complete and shows done/failed/total and the rate.

    Made by :func:`progress`. Completions are counted by callbacks on the client's I/O thread;
    a drawing thread owned by this object redraws until every ref is done or :meth:`close`.
    """

    def __init__(self, refs: Sequence[ObjectRef], label: str = "tasks") -> None:
        self.total = len(refs)
        self.label = label
        self.done = 0
        self.failed = 0
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._closed = threading.Event()
        self._start = time.monotonic()
        self._end: float | None = None
        self._widget: Any = None
        self._bar: Any = None
        self._text: Any = None
        self._shown_text = False
        self._displayed = False
        client = current.require()
        client.prefetch(refs)  # start fetches of borrowed refs, as get() does
        for ref in refs:
            if not client.objects.on_ready(ref.oid, self._one_done):
                self._one_done(client.objects.get(ref.oid))
        if self.total == 0:
            self._finished.set()
        self._thread = threading.Thread(target=self._run, name="nbcluster-progress", daemon=True)

    def _one_done(self, entry: Entry | None) -> None:
        # Runs on the client's I/O thread (or here, for refs already done): count, never draw.
        with self._lock:
            if entry is not None and entry.state == FAILED:
                self.failed += 1
            elif entry is None or entry.state != PENDING:
                self.done += 1
            if self.done + self.failed >= self.total:
                self._end = time.monotonic()
                self._finished.set()

    # ------------------------------------------------------------------------ drawing
    def summary(self) -> str:
        """``"7/10 done, 1 failed, 3.5/s"``."""
        with self._lock:
            done, failed = self.done, self.failed
            elapsed = (self._end or time.monotonic()) - self._start
        rate = (done + failed) / elapsed if elapsed > 0 else 0.0
        failed_text = f", {failed} failed" if failed else ""
        return f"{done}/{self.total} done{failed_text}, {rate:.1f}/s"

    def show(self) -> Progress:
        """Display the bar (a widget in a notebook, else stderr) and start redrawing it."""
        if self._displayed:
            return self
        self._displayed = True
        widget = _make_widget(self.total)
        if widget is not None:
            self._widget, self._bar, self._text = widget
            from IPython.display import display

            display(self._widget)  # type: ignore[no-untyped-call]
        self._draw()
        self._thread.start()
        return self

    def _draw(self) -> None:
        with self._lock:
            count, failed = self.done + self.failed, self.failed
        text = f"{self.label}: {self.summary()}"
        if self._bar is not None:
            self._bar.value = count
            if count >= self.total:
                self._bar.bar_style = "danger" if failed else "success"
            self._text.value = text
            return
        width = 30
        filled = int(width * count / self.total) if self.total else width
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}")
        sys.stderr.flush()
        self._shown_text = True

    def _run(self) -> None:
        while not self._closed.is_set():
            finished = self._finished.wait(TICK_S)
            self._draw()
            if finished:
                break
        if self._shown_text:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every ref is done (``False`` at ``timeout``)."""
        return self._finished.wait(timeout)

    def close(self) -> None:
        """Stop redrawing (after one last draw)."""
        self._closed.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def __repr__(self) -> str:
        return f"<progress {self.label}: {self.summary()}>"

    def _ipython_display_(self) -> None:
        self.show()  # already shown when made by progress(): nothing more to display


def _make_widget(total: int) -> tuple[Any, Any, Any] | None:
    """An ipywidgets bar when running in a Jupyter kernel with ipywidgets, else ``None``."""
    if kernel_shell() is None:
        return None
    try:
        import ipywidgets
    except ImportError:
        return None
    bar = ipywidgets.IntProgress(value=0, min=0, max=max(total, 1), bar_style="info")
    text = ipywidgets.HTML()
    return ipywidgets.HBox([bar, text]), bar, text


def progress(refs: Sequence[ObjectRef], *, label: str = "tasks") -> Progress:
    """Show a progress bar for ``refs``: done/failed/total and the completion rate.

    In a notebook it is a widget under the cell; elsewhere a line on stderr. It updates as the
    tasks finish, whether or not anything waits on them. ``get(refs, progress=True)`` shows one
    while it waits.

    Returns
    -------
    Progress
        ``.wait()`` blocks until all are done; ``.close()`` stops updating.
    """
    if isinstance(refs, ObjectRef) or not isinstance(refs, list | tuple):
        raise TypeError("progress() expects a list of ObjectRefs")
    for r in refs:
        if not isinstance(r, ObjectRef):
            raise TypeError(f"progress() expects ObjectRefs, got {type(r).__name__}")
    return Progress(refs, label).show()


class StreamProgress:
    """Items taken from a streaming generator, shown under the notebook cell that consumes it.

    Made by :func:`stream_progress`; redrawn at most every ``TICK_S`` while items arrive.
    """

    def __init__(self, label: str, text: Any) -> None:
        self.label = label
        self._text = text
        self._start = time.monotonic()
        self._drawn = 0.0

    def update(self, count: int) -> None:
        """``count`` items were taken so far."""
        now = time.monotonic()
        if now - self._drawn >= TICK_S:
            self._drawn = now
            self._draw(count, "")

    def close(self, count: int) -> None:
        """The stream ended after ``count`` items."""
        self._draw(count, " (done)")

    def _draw(self, count: int, suffix: str) -> None:
        elapsed = time.monotonic() - self._start
        rate = count / elapsed if elapsed > 0 else 0.0
        self._text.value = f"{self.label}: {count} items{suffix}, {rate:.1f}/s"


def stream_progress(tid: str) -> StreamProgress | None:
    """A live count of the items of stream ``tid`` in a notebook; ``None`` elsewhere."""
    if kernel_shell() is None:
        return None
    try:
        import ipywidgets
        from IPython.display import display
    except ImportError:
        return None
    text = ipywidgets.HTML()
    display(text)  # type: ignore[no-untyped-call]
    return StreamProgress(f"stream {tid}", text)
