"""JPEGs marked for the GPU's JPEG engine decode there to torchvision's pixels; the rest fall back cleanly."""

from __future__ import annotations

import io
import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from servekit import nvjpeg
from servekit.config import ImageOptions
from servekit.imageheader import jpeg_frame
from servekit.nvjpeg import HardwareJpegDecoder
from servekit.vision import Preprocessor, as_uint8, check_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _jpeg(mode: str, w: int, h: int, **kw) -> bytes:
    rng = np.random.default_rng(w * 7 + h)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", **kw)
    return buf.getvalue()


def _with_chroma_factors(jpeg: bytes, factors: int) -> bytes:
    """The same JPEG with its second component's sampling byte rewritten (a layout the engine lacks)."""
    at = jpeg.index(b"\xff\xc0") + 2 + 8 + 3 + 1  # marker, length to components, first component, id
    return jpeg[:at] + bytes([factors]) + jpeg[at + 1 :]


@pytest.mark.parametrize(
    ("mode", "kw", "hardware"),
    [
        ("RGB", {"subsampling": 0}, True),
        ("RGB", {"subsampling": 1}, True),
        ("RGB", {"subsampling": 2}, True),
        ("L", {}, True),
        ("RGB", {"progressive": True}, False),
        ("CMYK", {}, False),
    ],
)
def test_the_frame_header_says_which_jpegs_the_engine_may_take(mode, kw, hardware):
    jpeg = _jpeg(mode, 33, 17, **kw)
    frame = jpeg_frame(jpeg)
    assert frame[:2] == (33, 17)
    if hardware:  # the headers end where the scan's entropy-coded data starts
        assert jpeg.rindex(b"\xff\xda", 0, frame.hardware_header) < frame.hardware_header < len(jpeg)
    else:
        assert frame.hardware_header == 0


def test_an_unusual_chroma_layout_or_damage_after_the_frame_header_is_left_to_torchvision():
    jpeg = _jpeg("RGB", 16, 16, subsampling=0)
    assert jpeg_frame(jpeg).hardware_header
    assert jpeg_frame(_with_chroma_factors(jpeg, 0x22)).hardware_header == 0  # chroma at 2x2 like the luma
    sof = jpeg.index(b"\xff\xc0")
    cut = jpeg[: sof + 19]  # the frame header and nothing after it
    assert jpeg_frame(cut) == (16, 16, 0)
    garbage = jpeg[: sof + 19] + b"\x00\x01" + jpeg[sof + 21 :]
    assert jpeg_frame(garbage) == (16, 16, 0)


def test_no_decoder_without_a_gpu_or_a_library(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="servekit.nvjpeg"):
        assert HardwareJpegDecoder.create(torch.device("cpu"), 3) is None
    assert "torchvision decodes every JPEG" in caplog.text

    def missing() -> None:
        raise OSError("libnvjpeg.so: cannot open shared object file")

    monkeypatch.setattr(nvjpeg, "_library", missing)
    assert HardwareJpegDecoder.create(torch.device("cuda", 0), 3) is None
    assert HardwareJpegDecoder.create(torch.device("cuda", 0), 1) is None  # one channel: torchvision
    assert Preprocessor(ImageOptions(), torch.device("cpu")).hardware is None


_CASES = [
    _jpeg(mode, w, h, **kw)
    for (w, h), mode, kw in itertools.product(
        [(1, 1), (7, 5), (33, 17), (500, 375), (375, 500)],
        ["RGB", "L"],
        [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "quality": 60}],
    )
]


@needs_cuda
def test_the_engine_decodes_to_torchvisions_pixels():
    device = torch.device("cuda", 0)
    decoder = HardwareJpegDecoder(device, 3)
    frames = [jpeg_frame(j) for j in _CASES]
    datas = [as_uint8(bytearray(j)) for j in _CASES]
    taken = [i for i, (d, f) in enumerate(zip(datas, frames)) if decoder.takes(d, f.hardware_header, f.width, f.height)]
    assert taken == [i for i, f in enumerate(frames) if min(f.width, f.height) >= nvjpeg.MIN_SIDE]
    assert len(taken) == len(_CASES) * 3 // 5  # of five sizes, 33x17, 500x375 and 375x500
    ours = decoder.decode([datas[i] for i in taken], [frames[i][:2] for i in taken])
    theirs = decode_jpeg([datas[i] for i in taken], mode=ImageReadMode.RGB, device=device)
    for i, a, b in zip(taken, ours, theirs):
        assert a.shape == b.shape == (3, frames[i].height, frames[i].width)
        assert torch.equal(a, b), i
    decoder.close()


@needs_cuda
def test_a_batch_mixing_kinds_decodes_each_on_its_path(monkeypatch):
    pre = Preprocessor(ImageOptions(), torch.device("cuda", 0))
    assert pre.hardware is not None
    pre.warmup()
    calls: list[int] = []
    decode = pre.hardware.decode
    monkeypatch.setattr(pre.hardware, "decode", lambda datas, sizes: calls.append(len(datas)) or decode(datas, sizes))
    good = _jpeg("RGB", 64, 48, subsampling=2)
    progressive = _jpeg("RGB", 64, 48, progressive=True)
    truncated = good[: len(good) // 2]  # a header the reader accepts, then too few bytes
    raws = [bytearray(b) for b in (good, progressive, truncated, good)]
    out = pre.decode_many(raws, [check_image(r, pre.opts) for r in raws])
    assert calls == [3]  # the two good ones and the truncated one went to the engine in one batch
    want = decode_jpeg(as_uint8(bytearray(good)), mode=ImageReadMode.RGB, device=pre.device)
    assert torch.equal(out[0], want) and torch.equal(out[3], want)
    assert torch.equal(out[1], decode_jpeg(as_uint8(bytearray(progressive)), device=pre.device))
    # A cut-short scan is decoded as far as it goes, as torchvision's own hardware path does; the
    # pixels past the cut are undefined in both (they differed between the two on an H200).
    cut = decode_jpeg(as_uint8(bytearray(truncated)), device=pre.device)
    assert out[2].shape == cut.shape == (3, 48, 64)
