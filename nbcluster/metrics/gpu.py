"""Per-GPU metrics through NVML (``pynvml``, from the ``nvidia-ml-py`` package)."""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

#: Names the module that provides the NVML API (default ``pynvml``). Tests on machines without
#: a GPU point it at :mod:`nbcluster.testing.fake_nvml`; nothing else should set it.
NVML_MODULE_ENV = "NBCLUSTER_NVML_MODULE"


def load_nvml() -> ModuleType | None:
    """The NVML module, initialised; ``None`` when it or the NVIDIA driver is missing."""
    name = os.environ.get(NVML_MODULE_ENV) or "pynvml"
    try:
        nvml = importlib.import_module(name)
    except ImportError:
        return None
    try:
        nvml.nvmlInit()
    except Exception:  # no driver: no GPUs, and no error
        return None
    return nvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuSampler:
    """Samples every GPU NVML sees; an empty list on hosts without an NVIDIA driver."""

    def __init__(self) -> None:
        self._nvml = load_nvml()
        self._handles: list[tuple[int, Any, str]] = []
        self._last_seen: dict[int, int] = {}  # per handle: the newest process sample's time
        if self._nvml is None:
            return
        try:
            for i in range(self._nvml.nvmlDeviceGetCount()):
                h = self._nvml.nvmlDeviceGetHandleByIndex(i)
                self._handles.append((i, h, _text(self._nvml.nvmlDeviceGetName(h))))
        except Exception as exc:
            log.warning("NVML could not list the GPUs: %s", exc)
            self._handles = []

    def sample(self) -> list[dict[str, Any]]:
        """``[{index, name, utilization, memory_used, memory_total, processes}]`` (percent, bytes).

        ``processes`` lists the compute processes NVML sees on the GPU: ``{pid, memory_used}``
        and, where the driver keeps per-process samples, ``utilization`` (SM percent).
        """
        nvml = self._nvml
        if nvml is None:
            return []
        out = []
        for i, h, name in self._handles:
            try:
                util = nvml.nvmlDeviceGetUtilizationRates(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
            except Exception:  # a GPU that fell off the bus reports nothing, the rest still do
                continue
            out.append(
                {
                    "index": i,
                    "name": name,
                    "utilization": float(util.gpu),
                    "memory_used": int(mem.used),
                    "memory_total": int(mem.total),
                    "processes": self._processes(h),
                }
            )
        return out

    def _processes(self, h: Any) -> list[dict[str, Any]]:
        """The GPU's compute processes; empty where the driver does not say (e.g. vGPU)."""
        nvml = self._nvml
        assert nvml is not None
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(h)
        except Exception:  # NVML_ERROR_NOT_SUPPORTED and friends: no per-process figures
            return []
        util: dict[int, float] = {}
        try:
            # Samples since the previous call (NVML keeps a short ring per process).
            for s in nvml.nvmlDeviceGetProcessUtilization(h, self._last_seen.get(id(h), 0)):
                util[int(s.pid)] = float(s.smUtil)
                self._last_seen[id(h)] = max(self._last_seen.get(id(h), 0), int(s.timeStamp))
        except Exception:  # not supported, or no sample since the last call
            pass
        out = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            rec: dict[str, Any] = {"pid": int(p.pid), "memory_used": int(used or 0)}
            if int(p.pid) in util:
                rec["utilization"] = util[int(p.pid)]
            out.append(rec)
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
