"""Refuse to serve without a usable GPU when one is required (``SERVEKIT_REQUIRE_GPU=1``, set by the GPU image).

Without it a GPU image on a node without a GPU (no ``--gpus``, no ``nvidia.com/gpu`` limit, a
driver too old for torch's CUDA) silently serves on the CPU, tens of times slower. The pure
functions here (parsing, comparison, messages) need no GPU; :func:`require_gpu` gathers the facts.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)

REQUIRE_GPU_ENV = "SERVEKIT_REQUIRE_GPU"
PROC_VERSION = Path("/proc/driver/nvidia/version")
# Minimum Linux driver per CUDA major version (a CUDA 13.x build runs on any driver >= the 13.x entry).
# Source: NVIDIA CUDA Toolkit release notes, table "CUDA Toolkit and Minimum Required Driver Version for
# CUDA Minor Version Compatibility" (https://docs.nvidia.com/cuda/cuda-toolkit-release-notes/).
MIN_DRIVER: dict[int, str] = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
_GPU_VARS = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")


def gpu_required(env: Mapping[str, str] = os.environ) -> bool:
    """True when ``$SERVEKIT_REQUIRE_GPU`` is 1 (or true/yes/on)."""
    return env.get(REQUIRE_GPU_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def parse_version(text: str) -> tuple[int, ...] | None:
    """``"580.65.06"`` -> ``(580, 65, 6)``; None when ``text`` holds no dotted version."""
    match = re.search(r"\d+(?:\.\d+)+", text)
    return tuple(int(p) for p in match.group().split(".")) if match else None


def driver_from_proc(text: str) -> str | None:
    """The driver version in ``/proc/driver/nvidia/version`` (its ``NVRM version:`` line)."""
    for line in text.splitlines():
        if line.startswith("NVRM"):
            match = re.search(r"\s(\d{3,}\.\d+(?:\.\d+)?)\s", line + " ")
            return match.group(1) if match else None
    return None


def min_driver(cuda: str) -> str | None:
    """The oldest Linux driver that runs a build for CUDA ``cuda`` (None: a CUDA major not in the table)."""
    version = parse_version(cuda + ".0")
    return MIN_DRIVER.get(version[0]) if version else None


def driver_too_old(cuda: str, driver: str) -> str | None:
    """The minimum driver when ``driver`` is older than CUDA ``cuda`` needs, else None."""
    needed = min_driver(cuda)
    have, want = parse_version(driver), parse_version(needed or "")
    return needed if have and want and have < want else None


def visible_devices(env: Mapping[str, str]) -> str:
    """``CUDA_VISIBLE_DEVICES=...; NVIDIA_VISIBLE_DEVICES=...`` as set (``<unset>`` otherwise)."""
    return "; ".join(f"{k}={env[k]!r}" if k in env else f"{k}=<unset>" for k in _GPU_VARS)


def cpu_build_message(torch_version: str) -> str:
    return (
        f"{REQUIRE_GPU_ENV}=1 but torch {torch_version} is a CPU-only build (torch.version.cuda is None).\n"
        "  fix: install a CUDA build of torch (the PyPI wheel for Linux x86_64 is one; a `+cpu` wheel or the "
        "download.pytorch.org/whl/cpu index is not), or unset the variable to serve on the CPU."
    )


def old_driver_message(torch_version: str, cuda: str, driver: str, source: str, needed: str) -> str:
    return (
        f"{REQUIRE_GPU_ENV}=1 but the NVIDIA driver {driver} (from {source}) is too old for torch "
        f"{torch_version}, built for CUDA {cuda}: it needs driver >= {needed}.\n"
        f"  fix: upgrade the host's driver to {needed} or newer, or run an image whose torch is built "
        "for an older CUDA (datacenter GPUs can also run it through CUDA's forward compatibility package)."
    )


def no_gpu_message(
    torch_version: str, cuda: str, env: Mapping[str, str], driver: str | None, source: str, torch_says: str = ""
) -> str:
    found = (
        f"driver {driver} (from {source})"
        if driver
        else "no NVIDIA driver (not from NVML, /proc/driver/nvidia/version or nvidia-smi)"
    )
    lines = [
        f"{REQUIRE_GPU_ENV}=1 but no usable GPU: torch {torch_version} (CUDA {cuda}) sees none "
        "(torch.cuda.is_available() is False).",
        f"  found: {found}; {visible_devices(env)}",
    ]
    if torch_says:
        lines.append(f"  torch says: {torch_says}")
    lines += [
        "  fix: run on a node with an NVIDIA GPU and give the container one:",
        "    docker: the NVIDIA Container Toolkit on the host and `docker run --gpus all`; "
        "podman: `--device nvidia.com/gpu=all` (CDI);",
        "    Kubernetes: `resources.limits: {nvidia.com/gpu: 1}` (the NVIDIA device plugin on the node);",
        "    CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES must not be empty, none or void, nor name a missing GPU.",
        f"  to serve on the CPU instead, unset {REQUIRE_GPU_ENV} (or use the CPU image).",
    ]
    return "\n".join(lines)


def passed_message(names: list[str], driver: str | None, torch_version: str, cuda: str) -> str:
    gpus = ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))
    return f"GPU check passed: {gpus}; driver {driver or 'unknown'}; torch {torch_version} (CUDA {cuda})"


# -- facts (these touch the machine) -------------------------------------------------------------
def driver_version() -> tuple[str, str] | None:
    """(driver version, where it was read): pynvml, else /proc/driver/nvidia/version, else nvidia-smi."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
        return (version.decode() if isinstance(version, bytes) else str(version)), "NVML"
    except Exception:  # not installed, or no libnvidia-ml: try the next source
        pass
    try:
        found = driver_from_proc(PROC_VERSION.read_text())
        if found:
            return found, str(PROC_VERSION)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
                check=True,
            ).stdout
            if out.strip():
                return out.strip().splitlines()[0].strip(), "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def require_gpu(log_fn: Callable[[str], object] = log.info) -> None:
    """Raise ConfigError saying what is missing and how to fix it unless torch can use a GPU here."""
    import torch

    cuda = torch.version.cuda
    if cuda is None:
        raise ConfigError(cpu_build_message(torch.__version__))
    with warnings.catch_warnings(record=True) as caught:  # torch explains a failed CUDA init in a warning
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    driver, source = driver_version() or (None, "")
    if not available:
        # An old driver is the likelier cause when there is one; checked only now, since CUDA's forward
        # compatibility package lets a datacenter GPU run a newer CUDA on an older driver.
        needed = driver_too_old(cuda, driver) if driver else None
        if driver and needed:
            raise ConfigError(old_driver_message(torch.__version__, cuda, driver, source, needed))
        said = " ".join(str(caught[0].message).split())[:300] if caught else ""
        raise ConfigError(no_gpu_message(torch.__version__, cuda, os.environ, driver, source, said))
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    log_fn(passed_message(names, driver, torch.__version__, cuda))
