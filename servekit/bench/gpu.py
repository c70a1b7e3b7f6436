"""GPU utilisation and memory per worker during a measured window, through NVML (nvidia-ml-py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

try:
    import pynvml
except ImportError:  # no nvidia-ml-py: GPU columns stay empty
    pynvml = None


def nvml_available() -> bool:
    """Whether NVML can be initialised and sees at least one GPU."""
    if pynvml is None:
        return False
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError:
        return False


class GpuSampler:
    """Sample every GPU's utilisation and each process's memory in a background thread."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.enabled = nvml_available()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.util: list[float] = []
        self.used_mib: list[float] = []
        self.per_pid_mib: dict[int, float] = {}  # peak
        self.timeline: list[tuple[float, dict[int, float]]] = []  # (monotonic s, MiB by pid), every sample
        self.pid_gpu: dict[int, int] = {}

    def _sample(self) -> None:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        while not self._stop.is_set():
            utils, used = [], 0.0
            now: dict[int, float] = {}
            for index, h in enumerate(handles):
                utils.append(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                used += pynvml.nvmlDeviceGetMemoryInfo(h).used / 2**20
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    mib = (p.usedGpuMemory or 0) / 2**20
                    self.per_pid_mib[p.pid] = max(self.per_pid_mib.get(p.pid, 0.0), mib)
                    now[p.pid] = mib
                    self.pid_gpu[p.pid] = index
            self.timeline.append((time.monotonic(), now))
            self.util.append(sum(utils) / len(utils))
            self.used_mib.append(used)
            self._stop.wait(self.interval)

    def __enter__(self) -> GpuSampler:
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self, worker_pids: Iterable[int], workers: int) -> dict[str, Any] | None:
        """Mean/max utilisation (%), peak memory in use, peak memory per worker and its growth (MiB), GPUs used."""
        if not self.enabled or not self.util:
            return None
        pids = set(worker_pids)
        mine = [mib for pid, mib in self.per_pid_mib.items() if pid in pids]
        # Inside a container NVML may report host pids: then split the device's memory evenly.
        per_worker = sum(mine) / len(mine) if mine else max(self.used_mib) / max(1, workers)
        # Memory a worker gained between the first and the last sample: a leak, or a cache still growing.
        seen: dict[int, list[float]] = {}  # pid -> [first sample, last sample]
        for _, by_pid in self.timeline:
            for pid, mib in by_pid.items():
                if pid in pids:
                    seen.setdefault(pid, [mib, mib])[1] = mib
        growth = [last - first for first, last in seen.values()]
        return {
            "util_mean_pct": round(sum(self.util) / len(self.util), 1),
            "util_max_pct": round(max(self.util), 1),
            "mem_used_mib_max": round(max(self.used_mib)),
            "mem_per_worker_mib": round(per_worker),
            "mem_per_worker_source": "per-process" if mine else "device total / workers",
            "mem_per_worker_growth_mib": round(max(growth)) if growth else None,
            "mem_per_worker_timeline": self._timeline(pids),
            # Inside a container (host pids) this cannot be told: None.
            "gpus_used": len({self.pid_gpu[pid] for pid in pids if pid in self.pid_gpu}) or None,
        }

    def _timeline(self, pids: set[int], step: float = 5.0) -> list[list[float]]:
        """[seconds from the first sample, the largest worker's MiB], one point per ``step`` seconds."""
        points: list[list[float]] = []
        start = self.timeline[0][0] if self.timeline else 0.0
        for t, by_pid in self.timeline:
            mine = [mib for pid, mib in by_pid.items() if pid in pids]
            if mine and (not points or t - start >= points[-1][0] + step):
                points.append([round(t - start, 1), round(max(mine))])
        return points


def gpu_names() -> list[str]:
    """Names of the GPUs NVML sees (empty without NVML)."""
    if not nvml_available():
        return []
    names = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
        names.append(name.decode() if isinstance(name, bytes) else str(name))
    return names
