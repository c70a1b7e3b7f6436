"""Room for a new version: during a switch both versions are loaded, so check the device before registering.

Per-worker memory is measured on the version that serves now (its workers' GPU memory, or their
resident memory on a CPU); the free memory is the device's (cgroup-aware on the host). A new
version whose workers, with a margin, do not fit is refused and the running version keeps serving.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

log = logging.getLogger(__name__)

MIB = 1 << 20
_GPU_ID = re.compile(r"gpuId::(\d+)")


@dataclass(frozen=True)
class DeviceFigures:
    """One device as measured now: free bytes, and bytes per worker of the running version on it."""

    name: str
    free: int
    per_worker: int
    workers: int  # of the running version on this device


def room_problem(fig: DeviceFigures, new_workers: int, margin: float) -> str | None:
    """Why ``new_workers`` more workers do not fit on the device (None when they do)."""
    need = int(fig.per_worker * new_workers * (1 + margin))
    if need <= fig.free:
        return None
    return (
        f"not enough memory on {fig.name} for {new_workers} more worker(s): need {need // MIB} MiB "
        f"({fig.per_worker // MIB} MiB measured per worker of the running version, +{margin:.0%}), "
        f"{fig.free // MIB} MiB free. The running version keeps serving; free memory (fewer workers, "
        "another model) or move the new version to a larger device"
    )


class Probe(Protocol):
    """Measures the devices a version's workers run on (the management API's worker entries)."""

    def figures(self, workers: list[dict]) -> list[DeviceFigures]:
        """One entry per device the workers use."""
        ...


def host_available() -> int:
    """Bytes this container may still allocate: the host's available memory, capped by a cgroup v2 limit."""
    available = psutil.virtual_memory().available
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - current)
    except (OSError, ValueError):
        pass
    return max(0, available)


class SystemProbe:
    """Real figures: NVML for GPU workers (per process where the PIDs match, else the device's use split
    over the workers on it), resident memory and the host's free memory for CPU workers."""

    def __init__(self) -> None:
        self._nvml_failed = False

    def figures(self, workers: list[dict]) -> list[DeviceFigures]:
        """One entry per device the workers use."""
        gpu = [w for w in workers if w.get("gpu")]
        if gpu:
            return self._gpu_figures(gpu)
        rss = [int(w.get("memoryUsage") or 0) for w in workers]
        return [DeviceFigures("host", host_available(), max(rss, default=0), len(rss))] if rss else []

    def _gpu_figures(self, workers: list[dict]) -> list[DeviceFigures]:
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as exc:  # no NVML here: say so once, and do not block switches
            if not self._nvml_failed:
                log.warning("cannot read GPU memory (NVML: %s); new versions are not checked for room", exc)
            self._nvml_failed = True
            return []
        by_gpu: dict[int, list[int]] = {}
        for w in workers:
            m = _GPU_ID.search(str(w.get("gpuUsage", "")))
            by_gpu.setdefault(int(m.group(1)) if m else 0, []).append(int(w.get("pid") or 0))
        out = []
        for index, pids in sorted(by_gpu.items()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            used = {p.pid: p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
            mine = [used[p] for p in pids if p in used]
            # In a container NVML reports host PIDs: then split the device's use over our workers.
            per_worker = max(mine) if mine else int(mem.used) // max(1, len(pids))
            out.append(DeviceFigures(f"cuda:{index}", int(mem.free), per_worker, len(pids)))
        return out


def check_room(probe: Probe, running_workers: list[dict], new_workers: int, margin: float) -> str | None:
    """Why the new version's workers do not fit beside the running ones (None when they do, or nothing runs)."""
    figures = probe.figures(running_workers)
    if not figures:
        return None
    share = -(-new_workers // len(figures))  # workers spread over the devices the running version uses
    for fig in figures:
        problem = room_problem(fig, share, margin)
        if problem:
            return problem
    return None
