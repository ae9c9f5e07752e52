"""What a node has: CPUs, memory and GPUs (through NVML when an NVIDIA driver is present)."""

from __future__ import annotations

import logging
import os
from typing import Any

import psutil

# NVML_MODULE_ENV is re-exported: tests point it at a fake NVML through this module.
from nbcluster.metrics.gpu import NVML_MODULE_ENV as NVML_MODULE_ENV
from nbcluster.metrics.gpu import load_nvml

log = logging.getLogger(__name__)


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
    """The NVIDIA GPUs of this host as ``[{index, name, memory_total}]`` (bytes).

    Empty, and no error, where NVML or the NVIDIA driver is missing. GPUs hidden by this
    process's ``CUDA_VISIBLE_DEVICES`` (a list of indices) are left out, so that an agent started
    inside a GPU allocation only offers the GPUs it was given.
    """
    nvml = load_nvml()  # nvidia-ml-py is an optional dependency
    if nvml is None:
        return []
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            name = nvml.nvmlDeviceGetName(h)
            mem = nvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append(
                {
                    "index": i,
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_total": int(mem.total),
                }
            )
    except Exception as exc:
        log.warning("NVML could not list the GPUs (none will be offered): %s", exc)
        return []
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
    visible = _visible_indices()
    return gpus if visible is None else [g for g in gpus if g["index"] in visible]


def _visible_indices() -> set[int] | None:
    """Indices allowed by ``CUDA_VISIBLE_DEVICES`` (``None``: unset or not plain indices)."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not all(x.isdigit() for x in items):
        return None  # UUIDs or MIG names: offer what NVML lists
    return {int(x) for x in items}


def node_resources(
    num_cpus: float | None,
    num_gpus: float | None,
    resources: dict[str, float] | None,
    gpus: list[dict[str, Any]],
) -> dict[str, float]:
    """The logical resources a node declares: detected defaults overridden by the caller.

    Raises
    ------
    ValueError
        For negative amounts, a fractional GPU count, or CPU/GPU given in ``resources``.
    """
    for label, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be non-negative, got {value!r}")
    if num_gpus is not None and num_gpus != int(num_gpus):
        raise ValueError(f"a node has whole GPUs: num_gpus must be a whole number, got {num_gpus}")
    res: dict[str, float] = {
        "CPU": float(detect_cpus() if num_cpus is None else num_cpus),
        "GPU": float(len(gpus) if num_gpus is None else num_gpus),
        "memory": float(detect_memory()),
    }
    if resources is not None and not isinstance(resources, dict):
        raise ValueError(f'resources must be a mapping, e.g. {{"TPU": 4}}, got {resources!r}')
    for k, v in (resources or {}).items():
        if k in ("CPU", "GPU"):
            raise ValueError(f"declare {k} with num_cpus/num_gpus, not resources")
        if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
            raise ValueError(f"resources[{k!r}] must be a non-negative number, got {v!r}")
        res[str(k)] = float(v)
    return {k: v for k, v in res.items() if v > 0}
