"""nvjpeg's hardware JPEG decoder, called for a batch with the headers servekit has already read.

torchvision's batched GPU decode hands every image's whole bitstream to nvjpeg's header parser, only
to ask whether the hardware decoder takes it, and that parse copies the bitstream: about a quarter
of a worker's decode CPU on an H200 host (docs/performance.md). servekit reads each header anyway
(:mod:`servekit.imageheader`) and knows where the headers end, so it asks nvjpeg the same question
with the headers alone, then calls nvjpeg's batched decode itself for the JPEGs the engine takes;
everything else still goes through torchvision. The pixels are the hardware decoder's either way,
so they are the same as torchvision's.

The decode is queued on the current CUDA stream and not waited for (torchvision waits): whatever
reads the images next on that stream runs after it, and a worker's batch ends in a sync before its
bodies' memory is reused. The next decode waits for the last one, whose scratch memory it reuses.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torchvision.io.image  # noqa: F401  (loads torchvision's image library, and with it the nvjpeg it bundles)

log = logging.getLogger(__name__)

# nvjpeg.h enums.
_BACKEND_HARDWARE = 3
_OUTPUTS = {1: 2, 3: 3}  # channels: NVJPEG_OUTPUT_Y, NVJPEG_OUTPUT_RGB (planar)
_ALIGN = 256  # bytes between the starts of two outputs in one block
_STATUS = {
    1: "not initialized",
    2: "invalid parameter",
    3: "bad JPEG",
    4: "JPEG not supported",
    5: "allocator failure",
    6: "execution failed",
    7: "architecture mismatch",
    8: "internal error",
    9: "implementation not supported",
    10: "incomplete bitstream",
}


class NvjpegError(RuntimeError):
    """An nvjpeg call failed."""


class _Image(ctypes.Structure):
    """nvjpegImage_t: a pointer and a pitch per output plane."""

    _fields_ = [("channel", ctypes.c_void_p * 4), ("pitch", ctypes.c_size_t * 4)]


def _library() -> ctypes.CDLL:
    """The nvjpeg torchvision loaded (its wheel bundles one), else the system's."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "/libnvjpeg" in line}
    for path in sorted(paths):
        if Path(path).is_file():
            return ctypes.CDLL(path)
    return ctypes.CDLL("libnvjpeg.so")


class HardwareJpegDecoder:
    """Batched decode on the GPU's JPEG engine into uint8 CHW tensors (RGB, or Y for one channel)."""

    def __init__(self, device: torch.device, channels: int, lib: ctypes.CDLL | None = None):
        if device.type != "cuda":
            raise NvjpegError("the hardware JPEG decoder needs a CUDA device")
        if channels not in _OUTPUTS:
            raise NvjpegError(f"no nvjpeg output has {channels} channels")
        self.device = device
        self.channels = channels
        self.lib = lib or _library()
        self.handle, self.state = ctypes.c_void_p(), ctypes.c_void_p()
        with torch.cuda.device(device):
            self._call("nvjpegCreateEx", _BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle))
            self._call("nvjpegJpegStateCreate", self.handle, ctypes.byref(self.state))
            self.jpeg_stream = ctypes.c_void_p()  # an nvjpegJpegStream_t: one parsed header at a time
            self._call("nvjpegJpegStreamCreate", self.handle, ctypes.byref(self.jpeg_stream))
            # Marks the end of the last decode: its scratch buffers in ``state`` are reused by the next.
            # Until its first record it is not created, and waiting on it returns at once.
            self.done = torch.cuda.Event()

    @classmethod
    def create(cls, device: torch.device, channels: int) -> HardwareJpegDecoder | None:
        """A decoder, or None (said once in the log) where the library or the GPU has no hardware decode."""
        try:
            decoder = cls(device, channels)
        except (OSError, AttributeError, NvjpegError) as exc:
            log.info("nvjpeg hardware decoder unavailable (%s); torchvision decodes every JPEG", exc)
            return None
        log.info("%s: JPEGs the JPEG engine takes go to nvjpeg's hardware decoder directly", device)
        return decoder

    def _call(self, name: str, *args: object) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise NvjpegError(f"{name}: {_STATUS.get(status, f'status {status}')}")

    def takes(self, data: torch.Tensor, header_bytes: int) -> bool:
        """nvjpeg's own verdict on whether the engine decodes this JPEG, from its headers alone.

        torchvision asks the same question with the whole bitstream, which nvjpeg copies; the
        headers are all the answer needs.
        """
        status = self.lib.nvjpegJpegStreamParseHeader(
            self.handle, ctypes.c_void_p(data.data_ptr()), ctypes.c_size_t(header_bytes), self.jpeg_stream
        )
        if status != 0:
            return False
        supported = ctypes.c_int(-1)
        status = self.lib.nvjpegDecodeBatchedSupported(self.handle, self.jpeg_stream, ctypes.byref(supported))
        return status == 0 and supported.value == 0

    def decode(self, datas: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
        """Decode ``datas`` (uint8 CPU tensors, page-locked for a direct copy) of ``(width, height)`` each.

        Every one must be one :meth:`takes` accepts. Same-sized images are written into one block of
        memory, each at an aligned start. NvjpegError if nvjpeg refuses the batch (then nothing may be read
        from the outputs).
        """
        n = len(datas)
        outs: list[torch.Tensor] = [None] * n  # type: ignore[list-item]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(sizes):
            groups.setdefault(size, []).append(i)
        for (w, h), idx in groups.items():
            # Each image starts where a tensor of its own would (cudaMalloc aligns to 256 bytes).
            nbytes = self.channels * h * w
            block = torch.empty((len(idx), -(-nbytes // _ALIGN) * _ALIGN), dtype=torch.uint8, device=self.device)
            for i, row in zip(idx, block.unbind(0)):
                outs[i] = row[:nbytes].view(self.channels, h, w)
        images = (_Image * n)()
        for image, out in zip(images, outs):
            plane = out.shape[1] * out.shape[2]
            base = out.data_ptr()
            for c in range(self.channels):
                image.channel[c] = base + c * plane
                image.pitch[c] = out.shape[2]
        pointers = (ctypes.c_void_p * n)(*(d.data_ptr() for d in datas))
        lengths = (ctypes.c_size_t * n)(*(d.numel() for d in datas))
        current = torch.cuda.current_stream(self.device)
        self.done.synchronize()  # in a worker the batch's own sync has long passed: no wait
        self._call("nvjpegDecodeBatchedInitialize", self.handle, self.state, n, 1, _OUTPUTS[self.channels])
        self._call(
            "nvjpegDecodeBatched",
            self.handle,
            self.state,
            pointers,
            lengths,
            images,
            ctypes.c_void_p(current.cuda_stream),
        )
        self.done.record(current)
        return outs

    def close(self) -> None:
        """Free nvjpeg's stream, state and handle."""
        if self.jpeg_stream:
            self.lib.nvjpegJpegStreamDestroy(self.jpeg_stream)
            self.jpeg_stream = ctypes.c_void_p()
        if self.state:
            self.lib.nvjpegJpegStateDestroy(self.state)
            self.state = ctypes.c_void_p()
        if self.handle:
            self.lib.nvjpegDestroy(self.handle)
            self.handle = ctypes.c_void_p()
