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
        """``[{index, name, utilization, memory_used, memory_total}]`` (percent, bytes)."""
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
                }
            )
        return out

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None
