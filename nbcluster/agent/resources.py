"""What a node has: CPUs, memory and GPUs (through NVML when an NVIDIA driver is present)."""

from __future__ import annotations

import os
from typing import Any

import psutil


def detect_cpus() -> int:
    """CPUs this process may run on (respects affinity masks and cgroup-limited containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, n)


def detect_memory() -> int:
    """Total physical memory in bytes."""
    return int(psutil.virtual_memory().total)


def detect_gpus() -> list[dict[str, Any]]:
    """The NVIDIA GPUs of this host as ``[{index, name, memory_total}]``; empty without NVML."""
    try:
        import pynvml  # provided by nvidia-ml-py, an optional dependency
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver: no GPUs, and no error
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total": int(mem.total),
                }
            )
        return gpus
    except Exception:
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def node_resources(
    num_cpus: float | None,
    num_gpus: float | None,
    resources: dict[str, float] | None,
    gpus: list[dict[str, Any]],
) -> dict[str, float]:
    """The logical resources a node declares: detected defaults overridden by the caller."""
    res: dict[str, float] = {
        "CPU": float(detect_cpus() if num_cpus is None else num_cpus),
        "GPU": float(len(gpus) if num_gpus is None else num_gpus),
        "memory": float(detect_memory()),
    }
    for k, v in (resources or {}).items():
        if k in ("CPU", "GPU"):
            raise ValueError(f"declare {k} with num_cpus/num_gpus, not resources")
        res[str(k)] = float(v)
    return {k: v for k, v in res.items() if v > 0}
