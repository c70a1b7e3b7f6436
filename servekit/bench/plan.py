"""What a benchmark run is: the points, the plan, the artifacts, and the machine it ran on."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .gpu import gpu_names


@dataclass(frozen=True)
class Point:
    """TorchServe's batching settings for one run."""

    workers: int  # per GPU on a GPU
    batch: int
    delay: int
    gpus: int = 1  # GPUs TorchServe spreads the workers over (number_of_gpu)

    @property
    def total_workers(self) -> int:
        """Workers across all the point's GPUs."""
        return self.workers * self.gpus

    @property
    def tag(self) -> str:
        """E.g. ``w4 b32 d5``, with `` g2`` when it spans two GPUs."""
        return f"w{self.workers} b{self.batch} d{self.delay}" + (f" g{self.gpus}" if self.gpus > 1 else "")

    def label(self, config: str) -> str:
        """A run's name, e.g. ``ours w4 b32 d5``: what a tuned stock run that repeats another refers to."""
        return f"{config} {self.tag}"

    def tuned_threads(self) -> int:
        """Threads per worker when the machine's cores are split across the point's workers."""
        return max(1, (os.cpu_count() or 1) // self.total_workers)


@dataclass
class Plan:
    """Everything one benchmark invocation does."""

    model: str
    device: str
    configs: Sequence[str]
    points: Sequence[Point]
    stock_points: Sequence[Point]
    concurrency: Sequence[int]
    duration: float
    warmup: float
    out: Path
    loadgen_procs: int | None = None
    handler_overrides: dict[str, Any] = field(default_factory=dict)
    server_overrides: dict[str, str] = field(default_factory=dict)  # config.properties entries, every server
    amp: str | None = None  # our handler's amp: None keeps model-config's; "auto" picks from the ceiling
    freeze: bool | str = False  # True, False or "auto" (picked from the ceiling)
    channels_last_weights: bool = True
    weights: str | None = None
    micro: bool = True
    micro_seconds: float = 2.0
    ceiling_batches: Sequence[int] = (1, 8)
    ceiling_threads: int = 1  # CPU only: torch threads for the model-only ceiling
    decode_batches: Sequence[int] = (32, 64)
    image_bytes: int = 170_000
    images: Sequence[str] = ()  # what the load sends: () the synthetic JPEG, ("mixed",), or files and folders
    keep: bool = False
    litserve_api_servers: int = 0  # the peer's API server processes; 0: one per inference worker (its default)
    py_spy: bool = False  # sample a worker with py-spy during each run's peak window
    command: str = ""


@dataclass
class Artifacts:
    """The exported model and the copies derived from it, reused by every archive."""

    traced: Path
    served: Path  # what both handlers serve (the traced file, or its channels_last-weights copy)
    frozen: Path | None  # ``served``, frozen: ours only, with --freeze
    plain_frozen: Path | None  # ``traced``, frozen: for the model-only ceiling
    labels: list[str]
    base_config: dict[str, Any]
    alternates: dict[str, Path] = field(default_factory=dict)  # ours-int8 / ours-pt2: their own exports

    def for_ours(self, config: str, frozen: bool) -> Path:
        """The artifact our handler serves in ``config``."""
        if config in self.alternates:
            return self.alternates[config]
        return self.frozen if frozen and self.frozen else self.served


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The bf16/AMX-related CPU flags present (they decide whether bf16 autocast can pay off)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile"))


def machine_meta(plan: Plan) -> dict[str, Any]:
    """Where and how the numbers were taken."""
    from importlib.metadata import PackageNotFoundError, version

    import torch
    import torchvision

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # absent, or importable from a path without its metadata
            return "unknown"

    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": plan.command,
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpus": gpu_names(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torchserve": installed("torchserve"),
        "litserve": installed("litserve"),
        "model": plan.model,
        "device": plan.device,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
