"""Serving defaults from the machine: how many workers a model gets when its model-config sets none.

The rule (docs/performance.md, "LitServe side by side, and workers from the machine"):
- GPU: one worker per 4 CPUs of each GPU's share, at least 1 and at most 4 per GPU. One H200 with
  16 cores served 6,067-6,343 req/s (p99 52-57 ms) with 4 workers and CUDA graphs; a 2xH200 host
  with 32 cores 11,107 req/s with 4 per GPU (1.96x one GPU). Each worker holds about 1.4 GiB of
  GPU memory.
- CPU: one worker per 4 CPUs (at least 1), the cores split between the workers. On 2 cores one
  worker with both threads answered a lone request in 43 ms against 72 ms for two one-thread
  workers, and gave up 11% of the peak at 32 connections.
Batch size and delay stay the model's own (resnet50: 32 and 1 ms, the best on every GPU host
measured). Netty threads: ``frontend_threads``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Mapping

# config.properties entries that ``auto`` fills from the machine (ServerConfig.properties).
WORKERS_KEY = "default_workers_per_model"  # workers of a model whose model-config sets none
FRONTEND_THREAD_KEYS = ("number_of_netty_threads", "netty_client_threads")
CPUS_PER_WORKER = 4
MAX_WORKERS_PER_GPU = 4


def resolve_auto(props: dict[str, str], cpus: int) -> None:
    """Replace every ``auto`` entry of ``props`` with its value for ``cpus`` CPUs and the GPUs TorchServe will use."""
    for key in FRONTEND_THREAD_KEYS:
        if props.get(key, "").strip() == "auto":
            props[key] = str(frontend_threads(cpus))
    if props.get(WORKERS_KEY, "").strip() == "auto":
        props[WORKERS_KEY] = str(default_workers(cpus, gpu_count(props)))


def frontend_threads(cpus: int) -> int:
    """Netty threads for ``cpus`` CPUs: 4, and one more per 4 CPUs beyond 16.

    Four carry one GPU's ~6,000 req/s; with two GPUs on a 32-core host four capped the frontend at
    9,710 req/s (1.59x one GPU) and eight gave 11,107 (1.96x), docs/performance.md.
    """
    return max(4, cpus // 4)


def default_workers(cpus: int, gpus: int) -> int:
    """Workers for one model on a machine with ``cpus`` CPUs and ``gpus`` GPUs (spread round-robin)."""
    if gpus <= 0:
        return max(1, cpus // CPUS_PER_WORKER)
    per_gpu = min(MAX_WORKERS_PER_GPU, max(1, cpus // gpus // CPUS_PER_WORKER))
    return per_gpu * gpus


def gpu_count(props: Mapping[str, str], env: Mapping[str, str] = os.environ) -> int:
    """GPUs TorchServe 0.12 will use: ``number_of_gpu`` when set, else the ids in CUDA_VISIBLE_DEVICES,
    else what nvidia-smi lists (ConfigManager.getAvailableGpu's own order)."""
    configured = props.get("number_of_gpu", "").strip()
    if configured.isdigit():
        return int(configured)
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if visible.strip():
        return len([v for v in visible.split(",") if v.strip()])
    return _nvidia_smi_gpus()


@functools.lru_cache(maxsize=1)
def _nvidia_smi_gpus() -> int:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.strip().isdigit() for line in out.stdout.splitlines()) if out.returncode == 0 else 0
