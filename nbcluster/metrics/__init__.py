"""Node metrics: host CPU and memory (psutil) and per-GPU utilisation and memory (NVML)."""

from nbcluster.metrics.gpu import GpuSampler
from nbcluster.metrics.host import HostSampler
from nbcluster.metrics.sampler import MetricsSampler, MetricsThread

__all__ = ["GpuSampler", "HostSampler", "MetricsSampler", "MetricsThread"]
