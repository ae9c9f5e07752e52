"""One metrics record per sample, taken on a thread of its own (never on an event loop)."""

from __future__ import annotations

import threading
import time
from typing import Any

from nbcluster.metrics.gpu import GpuSampler
from nbcluster.metrics.host import HostSampler


class MetricsSampler:
    """Host and GPU samplers together."""

    def __init__(self) -> None:
        self.host = HostSampler()
        self.gpu = GpuSampler()

    def sample(self) -> dict[str, Any]:
        """``{time, cpu_percent, memory_used, memory_total, gpus: [...]}``."""
        return {"time": time.time(), **self.host.sample(), "gpus": self.gpu.sample()}

    def close(self) -> None:
        self.gpu.close()


class MetricsThread:
    """Samples every ``interval`` seconds in a daemon thread; :attr:`latest` is the last record.

    NVML calls can block for a while on a busy driver: keeping them on this thread keeps the
    agent's event loop responsive.
    """

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.latest: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nbcluster-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        sampler = MetricsSampler()
        try:
            while not self._stop.wait(self.interval):
                # A plain attribute store: readers on other threads see a whole record.
                self.latest = sampler.sample()
        finally:
            sampler.close()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
