"""Decode and preprocess a batch of images as tensors (nvjpeg on a GPU, libjpeg-turbo on CPU)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import ImageOps
from torchvision.io import ImageReadMode, decode_image, decode_jpeg, encode_jpeg
from torchvision.transforms.v2.functional import rgb_to_grayscale, to_dtype

from .batch import Batch, Body
from .config import ImageOptions
from .errors import InvalidInput, PayloadTooLarge, RequestError, UnsupportedMediaType
from .gpulock import GpuLock
from .imageheader import JPEG, image_frame, sniff_format
from .nvjpeg import HardwareJpegDecoder, NvjpegError

log = logging.getLogger(__name__)

# Where to write a preprocessed batch of n images (None: a new tensor).
Into = Callable[[int], torch.Tensor | None]


@dataclass(frozen=True)
class ImageHeader:
    """What the header says, read without decoding the pixels."""

    format: str
    width: int
    height: int
    hardware_header: int = 0  # a JPEG a GPU's JPEG engine may take: the bytes its headers fill
    cpu_only: bool = False  # a JPEG nvjpeg decodes wrongly or not at all (servekit.imageheader)
    orientation: int = 1  # EXIF orientation: how to turn the stored pixels upright (1: as they are)
    progressive: bool = False  # a progressive JPEG


def check_image(raw: Body, opts: ImageOptions) -> ImageHeader:
    """Validate size, format and declared dimensions before any pixel is decoded."""
    if len(raw) > opts.max_image_bytes:
        raise PayloadTooLarge(f"image is {len(raw)} bytes; the limit is {opts.max_image_bytes} (max_image_bytes)")
    fmt = sniff_format(raw)
    if fmt is None:
        raise UnsupportedMediaType("not a JPEG, PNG or WebP image")
    width, height, hardware_header, cpu_only, orientation, progressive = image_frame(raw, fmt)
    if width < 1 or height < 1:
        raise InvalidInput(f"image has no pixels ({width}x{height})")
    if width * height > opts.max_image_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is "
            f"{opts.max_image_pixels} (max_image_pixels)"
        )
    ratio = max(width, height) / min(width, height)
    if ratio > opts.max_aspect_ratio:
        raise PayloadTooLarge(
            f"image is {width}x{height}, a side ratio of {ratio:.1f}; the limit is {opts.max_aspect_ratio:g} "
            f"(max_aspect_ratio): resized to {opts.resize} px on its short side, it would be too large"
        )
    turn = orientation if opts.exif_orientation else 1
    return ImageHeader(fmt, width, height, hardware_header, cpu_only, turn, progressive)


def as_uint8(raw: Body) -> torch.Tensor:
    """A uint8 view of ``raw`` without a copy (nvjpeg only reads it).

    torch warns that a view of immutable bytes must not be written to; nothing writes to it, and
    a bytearray copy of every request body would cost more than the decode's own CPU share.
    A worker's bodies are writable (bytearrays, or views of its body arena): no warning filter.
    """
    if isinstance(raw, bytearray) or (isinstance(raw, memoryview) and not raw.readonly):
        return torch.frombuffer(raw, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=torch.uint8)


class Preprocessor:
    """Decode + resize + centre-crop + normalise, built once per model at load."""

    def __init__(self, opts: ImageOptions, device: torch.device, dtype: torch.dtype = torch.float32):
        self.opts = opts
        self.device = device
        self.dtype = dtype
        self.mode = ImageReadMode.GRAY if opts.channels == 1 else ImageReadMode.RGB
        mean = torch.tensor(opts.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        inv_std = 1.0 / (torch.tensor(opts.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.inv_std = inv_std.to(device)
        self.shift = (-mean * inv_std).to(device)  # (x - mean) * inv_std == x * inv_std + shift
        self.memory_format = (
            torch.channels_last if opts.channels_last and device.type == "cuda" else torch.contiguous_format
        )
        self.gpu_decode = device.type == "cuda" and opts.decode_device in ("auto", "cuda")
        # The lock's wait parks the worker; nvjpeg's own wait keeps a core busy (servekit.gpulock).
        self.decode_lock: contextlib.AbstractContextManager[object] = (
            GpuLock(device.index or 0, "nvjpeg")
            if self.gpu_decode and opts.serial_gpu_decode
            else contextlib.nullcontext()
        )
        self._gpu_decode_failed = False
        self.hardware = (
            HardwareJpegDecoder.create(device, opts.channels) if self.gpu_decode and opts.hardware_jpeg else None
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def warmup(self) -> None:
        """Decode one small JPEG on the GPU, so the first request does not pay nvjpeg's start-up (~0.7 s)."""
        if not self.gpu_decode:
            return
        sample = encode_jpeg(torch.full((3, 64, 64), 128, dtype=torch.uint8)).numpy().tobytes()
        if self.hardware is not None:
            data, header = as_uint8(sample), check_image(sample, self.opts)
            try:
                if not self.hardware.takes(data, header.hardware_header):
                    raise NvjpegError("it does not take a baseline 4:2:0 JPEG")
                self.hardware.decode([data], [(header.width, header.height)])
                torch.cuda.synchronize(self.device)
            except NvjpegError as exc:
                log.warning("nvjpeg's hardware decoder failed at warm-up (%s); torchvision decodes every JPEG", exc)
                self.hardware = None
        # torchvision's decoder too: it takes the JPEGs the hardware path leaves (progressive, CMYK).
        self.decode_many([sample], [ImageHeader(JPEG, 64, 64)])

    # -- decoding -------------------------------------------------------------------------
    def decode_cpu(self, raw: Body) -> torch.Tensor:
        """One image to a uint8 CHW tensor on the CPU."""
        data = as_uint8(raw)
        try:
            img = decode_image(data, mode=self.mode)
        except RuntimeError as exc:
            if "color conversion" not in str(exc):
                raise InvalidInput(f"cannot decode image: {_short(exc)}") from None
            # libjpeg converts no colours in a lossless JPEG: take its own channels, converted below.
            img = self._decode_unchanged(data)
        if img.shape[0] != self.opts.channels:  # that, and libwebp, which gives RGB(A) whatever the mode asks
            img = self._to_channels(img)
        # A 16-bit PNG decodes to uint16: keep its top 8 bits, as torchvision scales between dtypes.
        return img if img.dtype == torch.uint8 else to_dtype(img, torch.uint8, scale=True)

    @staticmethod
    def _decode_unchanged(data: torch.Tensor) -> torch.Tensor:
        try:
            return decode_image(data, mode=ImageReadMode.UNCHANGED)
        except RuntimeError as exc:
            raise InvalidInput(f"cannot decode image: {_short(exc)}") from None

    def _to_channels(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[0] in (2, 4):  # alpha dropped, as PIL's convert does
            img = img[:-1]
        have, want = int(img.shape[0]), self.opts.channels
        if have == want:
            return img
        if have == 1 and want == 3:
            return img.expand(3, -1, -1).contiguous()
        if have == 3 and want == 1:
            return rgb_to_grayscale(img)
        raise InvalidInput(f"cannot decode image: {have} colour channels, the model takes {want}")

    def decode_many(self, raws: Sequence[Body], headers: Sequence[ImageHeader]) -> list[torch.Tensor | RequestError]:
        """Decode a batch: JPEGs to nvjpeg in one call on a GPU; PNGs, WebPs, progressive and ``cpu_only`` JPEGs
        to the CPU, side by side in the decode threads while the GPU decodes.

        Errors stay per item.
        """
        out: list[torch.Tensor | RequestError] = [None] * len(raws)  # type: ignore[list-item]
        threads = self._decode_threads()
        on_cpu = [i for i, h in enumerate(headers) if self._on_cpu(h, threads)]
        # One image alone is decoded here: a thread would only add its hand-over.
        pool = self._decode_pool(threads) if on_cpu and (len(on_cpu) > 1 or len(on_cpu) < len(raws)) else None
        pending: list[tuple[int, Future]] = (
            [(i, pool.submit(self._decode_cpu_item, raws[i])) for i in on_cpu] if pool else []
        )
        if self.hardware is not None:
            self._decode_hardware(raws, headers, out)
        cpu = set(on_cpu)
        jpeg_idx = [i for i, h in enumerate(headers) if i not in cpu and h.format == JPEG and out[i] is None]
        if self.gpu_decode and not self._gpu_decode_failed and jpeg_idx:
            datas = [as_uint8(raws[i]) for i in jpeg_idx]
            try:
                with self.decode_lock:
                    decoded = decode_jpeg(datas, mode=self.mode, device=self.device)
                for i, img in zip(jpeg_idx, decoded):
                    out[i] = img
            except RuntimeError as exc:
                # One corrupt JPEG fails nvjpeg's whole batch call: retry one by one to isolate it.
                log.debug("batched GPU decode failed (%s); decoding items one by one", _short(exc))
                for i, data in zip(jpeg_idx, datas):
                    out[i] = self._decode_gpu_one(data)
        for i, future in pending:
            out[i] = future.result()
        for i, raw in enumerate(raws):
            if out[i] is None:
                out[i] = self._decode_cpu_item(raw)
        for i, h in enumerate(headers):
            img = out[i]
            if h.orientation != 1 and isinstance(img, torch.Tensor):
                out[i] = upright(img, h.orientation)
        return out

    def _on_cpu(self, header: ImageHeader, threads: int) -> bool:
        """Whether libjpeg, libpng or libwebp decodes this image.

        A progressive JPEG too, on a GPU with decode threads: nvjpeg's hybrid path spends its CPU on one after
        another (7.9 ms of a core for a 1024x768 one on an H200 host); libjpeg spends 14 ms, but in parallel.
        """
        if not self.gpu_decode or self._gpu_decode_failed:
            return True
        return header.format != JPEG or header.cpu_only or (header.progressive and threads > 1)

    def _decode_cpu_item(self, raw: Body) -> torch.Tensor | RequestError:
        try:
            return self.decode_cpu(raw)
        except RequestError as err:
            return err

    def _decode_threads(self) -> int:
        return torch.get_num_threads() if self.opts.decode_threads == "auto" else int(self.opts.decode_threads)

    def _decode_pool(self, threads: int) -> ThreadPoolExecutor | None:
        """``threads`` threads that decode a batch's CPU images side by side (torchvision's decoders release
        the GIL).

        Made in the process that uses it: a worker forked from a preloader has none of its threads.
        """
        if threads < 2:
            return None
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="servekit-decode")
            self._pool_pid = os.getpid()
        return self._pool

    def _decode_hardware(
        self, raws: Sequence[Body], headers: Sequence[ImageHeader], out: list[torch.Tensor | RequestError]
    ) -> None:
        """Decode the batch's hardware-decodable JPEGs on the GPU's JPEG engine, into ``out``.

        If nvjpeg refuses the batch, they are left for torchvision, which isolates a bad one.
        """
        assert self.hardware is not None
        idx, datas = [], []
        for i, h in enumerate(headers):
            if h.hardware_header:
                data = as_uint8(raws[i])
                if self.hardware.takes(data, h.hardware_header):
                    idx.append(i)
                    datas.append(data)
        if not idx:
            return
        try:
            with self.decode_lock:
                images = self.hardware.decode(datas, [(headers[i].width, headers[i].height) for i in idx])
        except NvjpegError as exc:
            log.debug("hardware JPEG decode failed (%s); torchvision decodes the batch", exc)
            return
        for i, img in zip(idx, images):
            out[i] = img

    def _decode_gpu_one(self, data: torch.Tensor) -> torch.Tensor | RequestError:
        try:
            return decode_jpeg(data, mode=self.mode, device=self.device)
        except RuntimeError as exc:
            if "nvjpeg" in str(exc).lower() and "not" in str(exc).lower() and "support" in str(exc).lower():
                log.warning("GPU JPEG decoding unavailable (%s); decoding on the CPU", _short(exc))
                self._gpu_decode_failed = True
            try:
                return self.decode_cpu(bytes(data.numpy()))
            except RequestError as err:
                return err

    def prepare(self, bodies: Batch[Body], into: Into | None = None) -> tuple[Batch[torch.Tensor], torch.Tensor | None]:
        """Check each header, decode the batch, and stack the good images into one normalised NCHW tensor.

        Returns the batch (bad items failed, each with its own error) and the tensor of its live
        items in order (None when none is left). ``into``: see :meth:`to_batch`.
        """
        checked = bodies.map(lambda raw: (raw, check_image(raw, self.opts)))
        images = checked.map_all(lambda items: self.decode_many([r for r, _ in items], [h for _, h in items]))
        live = images.live()
        return images, (self.to_batch(live, into) if live else None)

    # -- geometry and normalisation ----------------------------------------------------
    def resize_crop(self, imgs: torch.Tensor) -> torch.Tensor:
        """Resize the short side of same-sized NCHW images to ``resize`` (antialiased) and centre-crop."""
        h, w = imgs.shape[-2:]
        size = self.opts.resize
        if h <= w:
            nh, nw = size, max(1, int(size * w / h))
        else:
            nh, nw = max(1, int(size * h / w)), size
        # On a CPU, torch resizes uint8 images in fixed point, rounded to 8 bits as PIL does: 9.8 ms
        # for a 12 MP photo against 130 ms in float32 (2 cores). CUDA resizes floats only.
        x = imgs if imgs.device.type == "cpu" and imgs.dtype == torch.uint8 else imgs.float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        c = self.opts.crop
        top = int(round((nh - c) / 2.0))
        left = int(round((nw - c) / 2.0))
        return x[:, :, top : top + c, left : left + c].float()

    @torch.inference_mode()  # a graph's input is an inference tensor: it may only be written in this mode
    def to_batch(self, images: Sequence[torch.Tensor], into: Into | None = None) -> torch.Tensor:
        """One normalised NCHW batch on the model's device; same-sized images are resized together.

        ``into(n)`` may name the tensor to write a batch of ``n`` to (e.g. a CUDA graph's input).
        Few kernels on purpose: at batch 1 their launches, not their work, are the cost.
        """
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((int(img.shape[-2]), int(img.shape[-1])), []).append(i)
        parts = [part for idx in groups.values() for part in _chunks(idx, images[idx[0]].numel())]
        if len(parts) == 1:  # the usual case: the crop is written once, by the clamp
            x = self.resize_crop(self._stack(images)).clamp(0, 255)
        else:
            c = self.opts.crop
            x = torch.empty((len(images), self.opts.channels, c, c), device=self.device)
            for part in parts:
                x[torch.tensor(part, device=self.device)] = self.resize_crop(self._stack([images[i] for i in part]))
            x.clamp_(0, 255)
        out = into(len(images)) if into is not None else None
        if out is None or out.shape != x.shape or out.dtype != self.dtype:
            out = torch.empty(x.shape, dtype=self.dtype, device=self.device, memory_format=self.memory_format)
        # (round(x) - mean) / std in one kernel, written straight in the model's dtype and layout.
        return torch.addcmul(self.shift, x.round_(), self.inv_std, out=out)

    def _stack(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(images) == 1:
            return images[0].to(self.device, non_blocking=True).unsqueeze(0)
        return torch.stack([img.to(self.device, non_blocking=True) for img in images])


def upright(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """A CHW image turned as its EXIF orientation (2-8) says, as PIL's ``ImageOps.exif_transpose`` does.

    A transpose is a view; a flip copies the image (cheap beside its decode).
    """
    if orientation in (5, 6, 7, 8):  # stored on its side: rows become columns
        img = img.transpose(-2, -1)
    flips = {2: (-1,), 3: (-2, -1), 4: (-2,), 6: (-1,), 7: (-2, -1), 8: (-2,)}.get(orientation, ())
    return img.flip(flips) if flips else img


# Values of one image stack resized at once (128 MB as float32 on a GPU). Same-sized images are resized
# together, but 32 phone photos of 12 MP made one 4.6 GB float tensor (7.8 GB at peak in a worker);
# past this, they go a few at a time, or one by one. A batch of 32 500x375 photos is 18M values.
_CHUNK_VALUES = 1 << 25


def _chunks(idx: list[int], values_each: int) -> list[list[int]]:
    """``idx`` (images of one size, ``values_each`` values each) cut into runs within ``_CHUNK_VALUES``."""
    per = max(1, _CHUNK_VALUES // max(1, values_each))
    return [idx[i : i + per] for i in range(0, len(idx), per)]


def reference_transform(opts: ImageOptions):
    """torchvision's PIL-based transform with the same settings, for parity tests."""
    from torchvision import transforms as T

    steps = [T.Resize(opts.resize), T.CenterCrop(opts.crop), T.ToTensor(), T.Normalize(opts.mean, opts.std)]
    if opts.channels == 1:
        steps.insert(0, T.Grayscale(1))
    else:
        steps.insert(0, T.Lambda(lambda im: im.convert("RGB")))
    if opts.exif_orientation:
        steps.insert(0, T.Lambda(ImageOps.exif_transpose))
    return T.Compose(steps)


# torchvision prefixes its decode errors with "function, /build/path/file.cpp:LINE, ".
_SOURCE_PREFIX = re.compile(r"^[^,]*, \S+\.(?:cpp|cc|cu|h):\d+, ")


def _short(exc: BaseException) -> str:
    text = _SOURCE_PREFIX.sub("", str(exc).strip())
    return text.splitlines()[0][:200] if text else type(exc).__name__
