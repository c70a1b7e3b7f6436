"""An image's format and dimensions from its first bytes, without decoding a pixel.

PIL's ``Image.open`` does this too, but it parses every table of a JPEG header in Python (about
30 us a request on a GPU host, a tenth of a worker's CPU per image); walking the marker segments
to the frame header takes a few microseconds. PIL stays the reference in the tests.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .batch import Body
from .errors import InvalidInput

JPEG, PNG = "JPEG", "PNG"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); C4 (DHT), C8 (JPG)
# and CC (DAC) share the range but are tables.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length
_SOS, _EOI = 0xDA, 0xD9
_BASELINE, _PROGRESSIVE = 0xC0, 0xC2
# What nvjpeg's hardware decoder takes besides greyscale: YCbCr with the chroma at 1x1 and the luma
# sampled (h, v) as 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1 or 4:1:0.
_HARDWARE_LUMA = frozenset({(1, 1), (2, 1), (2, 2), (1, 2), (4, 1), (4, 2)})
# A greyscale JPEG's one component may declare any sampling factors; they do not change its pixels
# (ITU T.81 A.1.1), but nvjpeg decodes a sequential one whose factors are not 1x1 wrongly, on the JPEG
# engine and off it, alone or in a batch (docs/performance.md): such an image is decoded on the CPU.
_GREY_PLAIN = 0x11


def sniff_format(raw: Body) -> str | None:
    """JPEG or PNG from the magic bytes, else None."""
    if raw[:3] == _JPEG_MAGIC:
        return JPEG
    if raw[:8] == _PNG_MAGIC:
        return PNG
    return None


class ImageFrame(NamedTuple):
    """An image's size and, for a JPEG a GPU's JPEG engine may take, how many leading bytes hold its headers."""

    width: int
    height: int
    hardware_header: int  # bytes up to the end of the scan header; 0: not a hardware candidate
    cpu_only: bool = False  # nvjpeg would decode it wrongly


def dimensions(raw: Body, fmt: str) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header or a PNG's IHDR; InvalidInput when it cannot be read."""
    frame = image_frame(raw, fmt)
    return frame.width, frame.height


def image_frame(raw: Body, fmt: str) -> ImageFrame:
    """:func:`jpeg_frame` for a JPEG; a PNG's size from its IHDR (never a hardware candidate)."""
    return jpeg_frame(raw) if fmt == JPEG else ImageFrame(*_png(raw), 0)


def _png(raw: Body) -> tuple[int, int]:
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise InvalidInput("cannot read the PNG header: no IHDR chunk first")
    width, height = struct.unpack_from(">II", raw, 16)
    return width, height


def _hardware(raw: Body, i: int, marker: int, end: int) -> bool:
    """Baseline 8-bit Huffman, greyscale or YCbCr in a layout nvjpeg's hardware decoder lists."""
    if marker != _BASELINE or i + 8 > end or raw[i + 2] != 8:
        return False
    components = raw[i + 7]
    if components == 1:
        return i + 10 <= end and raw[i + 9] == _GREY_PLAIN
    if components != 3 or i + 8 + 9 > end:
        return False
    factors = [(raw[i + 9 + 3 * c] >> 4, raw[i + 9 + 3 * c] & 0x0F) for c in range(3)]
    return factors[0] in _HARDWARE_LUMA and factors[1] == factors[2] == (1, 1)


def _cpu_only(raw: Body, i: int, marker: int, end: int) -> bool:
    """A sequential greyscale JPEG with sampling factors other than 1x1 (see ``_GREY_PLAIN``)."""
    return marker != _PROGRESSIVE and i + 10 <= end and raw[i + 7] == 1 and raw[i + 9] != _GREY_PLAIN


def jpeg_frame(raw: Body) -> ImageFrame:
    """Walk a JPEG's marker segments: its frame header's size and, for a hardware candidate, where its headers end.

    InvalidInput when no frame header can be read; anything odd after it only rules out the hardware path.
    """
    end, i = len(raw), 2
    frame: tuple[int, int] | None = None
    candidate = False
    while i < end:
        if raw[i] != 0xFF:
            if frame is None:
                raise InvalidInput(f"cannot read the JPEG header: no marker at byte {i}")
            break
        while i < end and raw[i] == 0xFF:  # a marker may be preceded by fill bytes
            i += 1
        if i >= end:
            break
        marker = raw[i]
        i += 1
        if marker in _STANDALONE:
            continue
        if marker == _EOI or i + 2 > end:
            break
        (length,) = struct.unpack_from(">H", raw, i)
        if length < 2:
            if frame is None:
                raise InvalidInput(f"cannot read the JPEG header: segment {marker:#04x} has length {length}")
            break
        if marker == _SOS:
            if frame is not None and candidate and i + length <= end:
                return ImageFrame(*frame, i + length)
            break
        if marker in _SOF:
            if i + 7 > end:
                break
            height, width = struct.unpack_from(">HH", raw, i + 3)
            frame, candidate = (width, height), _hardware(raw, i, marker, end)
            if not candidate:
                return ImageFrame(width, height, 0, _cpu_only(raw, i, marker, end))
        i += length
    if frame is None:
        raise InvalidInput("cannot read the JPEG header: no frame header before the image data")
    return ImageFrame(*frame, 0)
