"""Host metrics through psutil."""

from __future__ import annotations

from typing import Any

import psutil


class HostSampler:
    """CPU utilisation since the previous sample, and memory in use.

    The first ``cpu_percent`` reading of a fresh sampler covers the time since it was created.
    """

    def __init__(self) -> None:
        psutil.cpu_percent(interval=None)  # primes the counter the next call compares with

    def sample(self) -> dict[str, Any]:
        """``{cpu_percent, memory_used, memory_total}`` (bytes)."""
        mem = psutil.virtual_memory()
        return {
            "cpu_percent": float(psutil.cpu_percent(interval=None)),
            "memory_used": int(mem.total - mem.available),
            "memory_total": int(mem.total),
        }
