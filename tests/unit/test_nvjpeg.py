"""JPEGs marked for the GPU's JPEG engine decode there to libjpeg's pixels; the rest fall back cleanly."""

from __future__ import annotations

import io
import itertools
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image, decode_jpeg

from servekit import nvjpeg
from servekit.config import ImageOptions
from servekit.imageheader import jpeg_frame
from servekit.nvjpeg import HardwareJpegDecoder, NvjpegError
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
    ("mode", "kw", "hardware", "cpu_only"),
    [
        ("RGB", {"subsampling": 0}, True, False),
        ("RGB", {"subsampling": 1}, True, False),
        ("RGB", {"subsampling": 2}, True, False),
        ("L", {}, True, False),
        # Pillow gives a greyscale JPEG's one component the factors of the subsampling asked for.
        ("L", {"subsampling": 1}, False, True),
        ("L", {"subsampling": 2}, False, True),
        ("L", {"subsampling": 2, "progressive": True}, False, False),
        ("RGB", {"progressive": True}, False, False),
        # Pillow marks these (Adobe, transform 0): RGB-coded, which nvjpeg decodes as YCbCr.
        ("RGB", {"keep_rgb": True}, False, True),
        ("CMYK", {}, False, True),
    ],
)
def test_the_frame_header_says_which_jpegs_the_engine_may_take(mode, kw, hardware, cpu_only):
    jpeg = _jpeg(mode, 33, 17, **kw)
    frame = jpeg_frame(jpeg)
    assert frame[:2] == (33, 17) and frame.cpu_only is cpu_only
    if hardware:  # the headers end where the scan's entropy-coded data starts
        assert jpeg.rindex(b"\xff\xda", 0, frame.hardware_header) < frame.hardware_header < len(jpeg)
    else:
        assert frame.hardware_header == 0
    assert check_image(jpeg, ImageOptions()).cpu_only is cpu_only


def _without_app14(jpeg: bytes) -> bytes:
    """The same JPEG without its Adobe marker segment."""
    at = jpeg.index(b"\xff\xee")
    return jpeg[:at] + jpeg[at + 2 + int.from_bytes(jpeg[at + 2 : at + 4], "big") :]


def test_libjpegs_rule_says_which_three_component_jpegs_are_rgb_coded():
    rgb_coded = _jpeg("RGB", 33, 17, keep_rgb=True)
    assert jpeg_frame(rgb_coded).cpu_only  # the Adobe marker's transform 0
    bare = _without_app14(rgb_coded)
    assert jpeg_frame(bare).cpu_only  # no marker: the component IDs "R", "G", "B"
    jfif = bare[:2] + b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bare[2:]
    assert not jpeg_frame(jfif).cpu_only  # a JFIF file is YCbCr whatever its IDs
    ycbcr = _jpeg("RGB", 33, 17)
    assert not jpeg_frame(ycbcr).cpu_only and jpeg_frame(ycbcr).hardware_header  # IDs 1, 2, 3
    adobe_ycbcr = rgb_coded.replace(b"Adobe\x00d\x00\x00\x00\x00\x00", b"Adobe\x00d\x00\x00\x00\x00\x01")
    assert not jpeg_frame(adobe_ycbcr).cpu_only  # transform 1


def test_an_unusual_chroma_layout_or_damage_after_the_frame_header_is_left_to_torchvision():
    jpeg = _jpeg("RGB", 16, 16, subsampling=0)
    assert jpeg_frame(jpeg).hardware_header
    assert jpeg_frame(_with_chroma_factors(jpeg, 0x22)).hardware_header == 0  # chroma at 2x2 like the luma
    sof = jpeg.index(b"\xff\xc0")
    cut = jpeg[: sof + 19]  # the frame header and nothing after it
    assert jpeg_frame(cut) == (16, 16, 0, False, 1, False)
    garbage = jpeg[: sof + 19] + b"\x00\x01" + jpeg[sof + 21 :]
    assert jpeg_frame(garbage) == (16, 16, 0, False, 1, False)


def test_no_decoder_without_a_gpu_or_a_library(monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="servekit.nvjpeg"):
        assert HardwareJpegDecoder.create(torch.device("cpu"), 3) is None
    assert "torchvision decodes every JPEG" in caplog.text

    def missing() -> None:
        raise OSError("libnvjpeg.so: cannot open shared object file")

    monkeypatch.setattr(nvjpeg, "_library", missing)
    assert HardwareJpegDecoder.create(torch.device("cuda", 0), 3) is None
    assert Preprocessor(ImageOptions(), torch.device("cpu")).hardware is None
    with pytest.raises(NvjpegError, match="no nvjpeg output has 2 channels"):
        HardwareJpegDecoder(torch.device("cuda", 0), 2)


_CASES = [
    _jpeg(mode, w, h, **kw)
    for (w, h), mode, kw in itertools.product(
        [(1, 1), (7, 5), (33, 17), (500, 375), (375, 500)],
        ["RGB", "L"],
        [{"subsampling": 0}, {"subsampling": 1}, {"subsampling": 2, "quality": 60}],
    )
]


@needs_cuda
@pytest.mark.parametrize("channels", [3, 1])
def test_the_engine_decodes_to_libjpegs_pixels(channels):
    device = torch.device("cuda", 0)
    decoder = HardwareJpegDecoder(device, channels)
    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    frames = [jpeg_frame(j) for j in _CASES]
    datas = [as_uint8(bytearray(j)) for j in _CASES]
    taken = [
        i for i, (d, f) in enumerate(zip(datas, frames)) if f.hardware_header and decoder.takes(d, f.hardware_header)
    ]
    # Of each size's six, the three RGB layouts and the greyscale one with plain sampling factors.
    assert len(taken) == len(_CASES) * 4 // 6 and all(not frames[i].cpu_only for i in taken)
    ours = decoder.decode([datas[i] for i in taken], [frames[i][:2] for i in taken])
    theirs = decode_jpeg([datas[i] for i in taken], mode=mode, device=device)
    for i, a, b in zip(taken, ours, theirs):
        assert a.shape == b.shape == (channels, frames[i].height, frames[i].width)
        assert torch.equal(a, b), i
        # libjpeg upsamples chroma its own way; full-resolution planes (4:4:4, greyscale, a luma) come
        # out the same bit for bit. _CASES[i] is 4:4:4 or greyscale where i % 3 == 0.
        if channels == 1 or i % 3 == 0:
            assert torch.equal(a.cpu(), decode_jpeg(datas[i], mode=mode)), i
    decoder.close()


@needs_cuda
@pytest.mark.parametrize("channels", [3, 1])
def test_jpegs_nvjpeg_decodes_wrongly_are_decoded_on_the_cpu(channels):
    # nvjpeg got every such image wrong on an H200 (docs/performance.md); libjpeg is the reference.
    opts = ImageOptions(channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
    pre = Preprocessor(opts, torch.device("cuda", 0))
    odd_grey = [_jpeg("L", w, h, subsampling=s) for (w, h), s in [((500, 375), 2), ((33, 17), 1)]]
    rgb_coded, cmyk = _jpeg("RGB", 64, 48, keep_rgb=True), _jpeg("CMYK", 64, 48)
    plain_grey, rgb444 = _CASES[9], _CASES[0]  # 7x5 and 1x1: the engine decodes them exactly
    raws = [bytearray(b) for b in (odd_grey[0], plain_grey, rgb_coded, odd_grey[1], rgb444, cmyk)]
    headers = [check_image(r, opts) for r in raws]
    assert [h.cpu_only for h in headers] == [True, False, True, True, False, True]
    out = pre.decode_many(raws, headers)
    for i, (raw, img) in enumerate(zip(raws, out)):
        want = decode_image(as_uint8(raw), mode=pre.mode)
        assert isinstance(img, torch.Tensor) and torch.equal(img.cpu(), want), i


@needs_cuda
def test_a_batch_mixing_kinds_decodes_each_on_its_path(monkeypatch):
    pre = Preprocessor(ImageOptions(decode_threads=1), torch.device("cuda", 0))  # one thread: progressive to nvjpeg
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
    # With decode threads, libjpeg takes the progressive one, beside the engine's batch.
    threaded = Preprocessor(ImageOptions(decode_threads=2), pre.device)
    threaded.warmup()
    out = threaded.decode_many(raws, [check_image(r, pre.opts) for r in raws])
    assert out[1].device.type == "cpu" and out[0].device == pre.device
    assert torch.equal(out[1], decode_image(as_uint8(bytearray(progressive)), mode=ImageReadMode.RGB))
