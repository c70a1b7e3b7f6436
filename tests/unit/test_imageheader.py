"""Dimensions read from headers agree with PIL on every kind of JPEG and PNG, and bad headers fail clearly."""

from __future__ import annotations

import io
import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from servekit.config import ImageOptions
from servekit.errors import InvalidInput, RequestError, UnsupportedMediaType
from servekit.imageheader import JPEG, PNG, WEBP, dimensions, sniff_format
from servekit.vision import check_image


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _image(mode: str, w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(w * 1000 + h)
    bands = len(Image.new(mode, (1, 1)).getbands())
    pixels = rng.integers(0, 256, (h, w, bands), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if bands == 1 else pixels, "L" if bands == 1 else None).convert(mode)


def _jpegs():
    exif = Image.Exif()
    exif[0x010F] = "camera"
    exif[0x0112] = 6  # rotated: the stored size is what counts, as with PIL's .size
    for (w, h), mode, kw in itertools.product(
        [(1, 1), (17, 9), (500, 375), (4000, 3)],
        ["RGB", "L", "CMYK"],
        [{}, {"progressive": True}, {"subsampling": 0, "quality": 95}, {"optimize": True, "exif": exif.tobytes()}],
    ):
        yield f"{mode}-{w}x{h}-{sorted(kw)}", _encode(_image(mode, w, h), "JPEG", **kw)
    icc = bytes(70_000)  # an ICC profile spread over two APP2 segments before the frame header
    yield "icc", _encode(_image("RGB", 33, 21), "JPEG", icc_profile=icc)


def _pngs():
    for (w, h), mode in itertools.product([(1, 1), (640, 3), (3, 640)], ["L", "RGB", "RGBA", "P", "1", "I;16"]):
        yield f"{mode}-{w}x{h}", _encode(_image(mode, w, h), "PNG")


def _webps():
    exif = Image.Exif()
    exif[0x0112] = 1
    kinds = {"lossy": {"quality": 80}, "lossless": {"lossless": True}, "extended": {"exif": exif.tobytes()}}
    for (w, h), mode, (kind, kw) in itertools.product(
        [(1, 1), (640, 3), (3, 640), (500, 375), (16383, 2)], ["RGB", "RGBA"], kinds.items()
    ):
        yield f"webp-{kind}-{mode}-{w}x{h}", _encode(_image(mode, w, h), "WEBP", **kw)


@pytest.mark.parametrize(
    ("name", "raw"), [*_jpegs(), *_pngs(), *_webps()], ids=lambda v: v if isinstance(v, str) else ""
)
def test_dimensions_match_pil(name, raw):
    fmt = sniff_format(raw)
    assert fmt == Image.open(io.BytesIO(raw)).format
    for body in (raw, bytearray(raw)):  # TorchServe hands handlers bytearrays
        assert dimensions(body, fmt) == Image.open(io.BytesIO(raw)).size, name


def test_fill_bytes_and_standalone_markers_before_the_frame_are_skipped():
    raw = _encode(_image("RGB", 40, 30), "JPEG")
    padded = raw[:2] + b"\xff\xff\xff" + b"\xff\x01" + raw[2:]  # fill bytes, then TEM (no length)
    assert dimensions(padded, JPEG) == (40, 30)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\xff\xd8\xff", "no frame header"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\0" * 8, "no frame header"),  # cut after the first segment
        (b"\xff\xd8\xff\xe0\x00\x01", "length 1"),
        (b"\xff\xd8\xff\xe0\x00\x04\0\0garbage", "no marker at byte 8"),
        (b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 20, "no frame header"),  # scan data before any frame
        (b"\xff\xd8\xff\xc0\x00\x11\x08\x01", "no frame header"),  # frame header cut short
    ],
)
def test_bad_jpeg_headers_are_invalid_input(raw, why):
    with pytest.raises(InvalidInput, match=why):
        dimensions(raw, JPEG)


def test_bad_png_headers_are_invalid_input():
    good = _encode(_image("RGB", 5, 4), "PNG")
    for raw in (good[:20], good[:12] + b"IDAT" + good[16:]):
        with pytest.raises(InvalidInput, match="no IHDR"):
            dimensions(raw, PNG)
    assert dimensions(good[:8] + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 7, 3), PNG) == (7, 3)


def test_bad_webp_headers_are_invalid_input_and_animations_unsupported():
    good = _encode(_image("RGB", 5, 4), "WEBP")
    for raw, why in ((good[:24], "too short"), (good[:12] + b"VP9 " + good[16:], "no image chunk first")):
        with pytest.raises(InvalidInput, match=why):
            dimensions(raw, WEBP)
    frames = [_image("RGB", 5, 4), _image("RGB", 5, 4).rotate(90)]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    with pytest.raises(UnsupportedMediaType, match="animated WebP"):
        dimensions(buf.getvalue(), WEBP)


def test_only_jpeg_png_and_webp_are_recognised():
    assert sniff_format(b"GIF89a") is None and sniff_format(b"") is None and sniff_format(b"\xff\xd8") is None
    assert sniff_format(b"\xff\xd8\xff\xe0") == JPEG and sniff_format(b"\x89PNG\r\n\x1a\n") == PNG
    assert sniff_format(b"RIFF\0\0\0\0WEBPVP8 ") == WEBP and sniff_format(b"RIFF\0\0\0\0WAVEfmt ") is None


_SEEDS = [
    _encode(_image("RGB", 40, 30), "JPEG", exif=b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0\0\0\x06\0\0\0"),
    _encode(_image("L", 40, 30), "JPEG", progressive=True),
    _encode(_image("RGB", 40, 30), "PNG"),
    _encode(_image("RGB", 40, 30), "WEBP"),
    _encode(_image("RGBA", 40, 30), "WEBP", lossless=True),
]


@settings(max_examples=200, derandomize=True, deadline=None)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6), st.data())
def test_damaged_headers_fail_as_request_errors_only(seed, flips, data):
    """Any bytes changed or cut in the first 200 give an answer or a RequestError (a 4xx), never a crash."""
    raw = bytearray(seed)
    for at, value in flips:
        if at < len(raw):
            raw[at] = value
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        header = check_image(raw, ImageOptions())
    except RequestError as err:
        assert 400 <= err.status < 500
    else:
        assert header.width >= 1 and header.height >= 1 and 1 <= header.orientation <= 8
