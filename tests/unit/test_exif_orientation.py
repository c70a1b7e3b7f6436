"""A JPEG's EXIF orientation turns it upright, on every decode path, as PIL's exif_transpose does."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from servekit.config import ImageOptions
from servekit.imageheader import jpeg_frame
from servekit.vision import Preprocessor, check_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _picture() -> Image.Image:
    """30x50, different in every direction, so that each of the 8 orientations gives other pixels."""
    ramp = (np.add.outer(np.arange(30) * 5, np.arange(50) * 2) % 256).astype(np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, ramp.shape, dtype=np.uint8)
    return Image.fromarray(np.stack([ramp, ramp[::-1], noise], -1))


def _jpeg(orientation: int | None, **kw) -> bytes:
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    _picture().save(buf, "JPEG", exif=exif.tobytes(), quality=95, **kw)
    return buf.getvalue()


def _with_app1(payload: bytes) -> bytes:
    """A plain JPEG with one APP1 segment of ``payload`` right after its start marker."""
    plain = _jpeg(None)
    return plain[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + plain[2:]


def _exif(order: str, orientation: int, kind: int = 3) -> bytes:
    """An EXIF payload with an IFD0 of one orientation entry, in byte order "<" (II) or ">" (MM)."""
    mark = b"II" if order == "<" else b"MM"
    entry = struct.pack(order + "HHI", 0x0112, kind, 1) + struct.pack(order + "HH", orientation, 0)
    return b"Exif\0\0" + mark + struct.pack(order + "HI", 42, 8) + struct.pack(order + "H", 1) + entry + bytes(4)


def _upright_by_pil(raw: bytes) -> torch.Tensor:
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(raw))).convert("RGB")
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_turns_the_image_as_pil_does(orientation):
    raw = _jpeg(orientation)
    header = check_image(raw, ImageOptions())
    assert header.orientation == orientation
    img = Preprocessor(ImageOptions(), torch.device("cpu")).decode_many([raw], [header])[0]
    assert torch.equal(img, _upright_by_pil(raw))
    assert img.shape[1:] == ((50, 30) if orientation >= 5 else (30, 50))


def test_the_orientation_is_read_in_either_byte_order_and_odd_values_are_ignored():
    assert jpeg_frame(_with_app1(_exif(">", 6))).orientation == 6
    assert jpeg_frame(_with_app1(_exif("<", 8))).orientation == 8
    for payload in (
        _exif("<", 9),  # no such orientation
        _exif("<", 6, kind=4),  # a LONG, not the SHORT the tag is
        _exif("<", 6)[:20],  # cut short
        b"Exif\0\0XX" + bytes(20),  # no byte order
        b"http://ns.adobe.com/xap/1.0/\0<x:xmpmeta/>",  # XMP, not EXIF
    ):
        assert jpeg_frame(_with_app1(payload)).orientation == 1, payload
    assert jpeg_frame(_jpeg(None)).orientation == 1


def test_with_exif_orientation_off_the_pixels_stay_as_stored():
    raw = _jpeg(6)
    opts = ImageOptions(exif_orientation=False)
    header = check_image(raw, opts)
    assert header.orientation == 1
    img = Preprocessor(opts, torch.device("cpu")).decode_many([raw], [header])[0]
    assert img.shape[1:] == (30, 50)


@needs_cuda
def test_on_a_gpu_every_orientation_turns_as_on_the_cpu():
    opts = ImageOptions()
    cpu, gpu = Preprocessor(opts, torch.device("cpu")), Preprocessor(opts, torch.device("cuda", 0))
    # 4:4:4: nvjpeg upsamples subsampled chroma its own way, and this picture's noise would show it.
    kinds = ({"subsampling": 0}, {"subsampling": 0, "progressive": True})
    raws = [bytearray(_jpeg(o, **kw)) for o in range(1, 9) for kw in kinds]
    headers = [check_image(r, opts) for r in raws]
    for raw, header, img in zip(raws, headers, gpu.decode_many(raws, headers)):
        want = cpu.decode_many([raw], [header])[0]
        assert img.shape == want.shape, header.orientation
        assert float((img.cpu().int() - want.int()).abs().float().mean()) < 1.0, header.orientation
