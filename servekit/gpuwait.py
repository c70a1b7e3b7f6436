"""How a worker waits for its GPU: sleep until the GPU signals, instead of spinning a CPU core.

CUDA's default for a process with one GPU context on a many-core machine is to spin while it waits
(a sync, a copy to the host, nvjpeg's end-of-decode sync). A worker waits on the GPU for most of a
batch, so spinning makes each worker look like a busy core and takes cores from the frontend and
the other workers. Blocking sync costs tens of microseconds of wake-up per wait instead.

The flag belongs to the device's primary context and must be set before torch creates it, through
the driver API (torch has no setting for it).
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from .config import GPU_WAIT_CHOICES

log = logging.getLogger(__name__)

# CUctx_flags scheduling bits (cuda.h).
WAIT_FLAGS = {"spin": 0x01, "yield": 0x02, "blocking": 0x04}
_SCHED_MASK = 0x07


def set_gpu_wait(mode: str, index: int, lib: Any = None) -> str:
    """Set how this process waits on GPU ``index``; returns the mode in effect ("auto": the driver's choice)."""
    if mode not in GPU_WAIT_CHOICES:
        raise ValueError(f"gpu_wait must be one of {GPU_WAIT_CHOICES}, got {mode!r}")
    if mode == "auto":
        return "auto"
    try:
        cuda = lib or ctypes.CDLL("libcuda.so.1")
        dev = ctypes.c_int()
        flags, active = ctypes.c_uint(), ctypes.c_int()
        for name, call in (
            ("cuInit", lambda: cuda.cuInit(0)),
            ("cuDeviceGet", lambda: cuda.cuDeviceGet(ctypes.byref(dev), index)),
            ("cuDevicePrimaryCtxSetFlags", lambda: cuda.cuDevicePrimaryCtxSetFlags(dev, WAIT_FLAGS[mode])),
            (
                "cuDevicePrimaryCtxGetState",
                lambda: cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)),
            ),
        ):
            status = call()
            if status != 0:
                raise OSError(f"{name} returned CUDA error {status}")
    except (OSError, AttributeError) as exc:
        log.warning("cannot set gpu_wait=%s (%s); the driver decides how CUDA waits", mode, exc)
        return "auto"
    if flags.value & _SCHED_MASK != WAIT_FLAGS[mode]:
        log.warning(
            "gpu_wait=%s did not take (context flags %#x); the driver decides how CUDA waits", mode, flags.value
        )
        return "auto"
    log.info("GPU %d: CUDA waits %s (gpu_wait)", index, mode)
    return mode
