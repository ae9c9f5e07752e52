"""A stand-in for ``pynvml`` on machines without an NVIDIA GPU, for tests only.

Select it with ``NBCLUSTER_NVML_MODULE=nbcluster.testing.fake_nvml``; it reports the GPUs listed
in the JSON file named by ``NBCLUSTER_FAKE_NVML``::

    [{"name": "NVIDIA H100", "utilization": 37, "memory_used": 1000, "memory_total": 80000,
      "processes": [{"pid": 4242, "memory_used": 700, "utilization": 30}]}]

(``processes``, optional: the compute processes NVML would list on that GPU.)

The file is re-read on every call, so a test can change the figures while an agent runs.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

FILE_ENV = "NBCLUSTER_FAKE_NVML"


def environment(gpus: list[dict[str, Any]], path: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``gpus`` to ``path``; returns the variables that make processes see them."""
    with open(path, "w") as f:
        json.dump(gpus, f)
    return {"NBCLUSTER_NVML_MODULE": __name__, FILE_ENV: os.fspath(path)}


class NVMLError(Exception):
    """Raised like pynvml's error when no (fake) driver is configured."""


def _gpus() -> list[dict[str, Any]]:
    path = os.environ.get(FILE_ENV)
    if not path:
        raise NVMLError("NVML Shared Library Not Found")
    with open(path) as f:
        data = json.load(f)
    return list(data)


def nvmlInit() -> None:
    _gpus()


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(i: int) -> int:
    if not 0 <= i < len(_gpus()):
        raise NVMLError(f"no GPU {i}")
    return i


def nvmlDeviceGetName(h: int) -> str:
    return str(_gpus()[h].get("name", "Fake GPU"))


def nvmlDeviceGetUtilizationRates(h: int) -> Any:
    g = _gpus()[h]
    return SimpleNamespace(gpu=g.get("utilization", 0), memory=0)


def nvmlDeviceGetMemoryInfo(h: int) -> Any:
    g = _gpus()[h]
    used, total = int(g.get("memory_used", 0)), int(g.get("memory_total", 0))
    return SimpleNamespace(used=used, total=total, free=total - used)


def nvmlDeviceGetComputeRunningProcesses(h: int) -> list[Any]:
    return [
        SimpleNamespace(pid=int(p["pid"]), usedGpuMemory=int(p.get("memory_used", 0)))
        for p in _gpus()[h].get("processes", [])
    ]


def nvmlDeviceGetProcessUtilization(h: int, last_seen: int) -> list[Any]:
    samples = [
        SimpleNamespace(pid=int(p["pid"]), smUtil=p["utilization"], memUtil=0, timeStamp=1)
        for p in _gpus()[h].get("processes", [])
        if "utilization" in p
    ]
    if not samples:
        raise NVMLError("Not Found")  # what NVML says when no sample is newer than last_seen
    return samples
