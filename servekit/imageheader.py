"""An image's format, dimensions and EXIF orientation from its first bytes, without decoding a pixel.

PIL's ``Image.open`` does this too, but it parses every table of a JPEG header in Python (about
30 us a request on a GPU host, a tenth of a worker's CPU per image); walking the marker segments
to the scan header takes a few microseconds. PIL stays the reference in the tests. The same walk
says which JPEGs nvjpeg's hardware decoder may take, and which nvjpeg must not decode at all.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .batch import Body
from .errors import InvalidInput, UnsupportedMediaType

JPEG, PNG, WEBP = "JPEG", "PNG", "WEBP"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_VP8_START = b"\x9d\x01\x2a"  # a lossy WebP key frame's start code
_VP8L_SIGNATURE, _VP8X_ANIMATED = 0x2F, 0x02
_JPEG_MAGIC = b"\xff\xd8\xff"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic); C4 (DHT), C8 (JPG)
# and CC (DAC) share the range but are tables.
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}  # RSTn and TEM carry no length
_SOS, _EOI = 0xDA, 0xD9
_BASELINE, _PROGRESSIVE = 0xC0, 0xC2
# Huffman-coded DCT frames (baseline, extended, progressive): the kinds nvjpeg decodes.
_NVJPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2})
_PRECISION = 8  # libjpeg as torchvision builds it decodes 8-bit samples only, and so does the model
_DQT = 0xDB
# What nvjpeg's hardware decoder takes besides greyscale: YCbCr with the chroma at 1x1 and the luma
# sampled (h, v) as 4:4:4, 4:2:2, 4:2:0, 4:4:0, 4:1:1 or 4:1:0.
_HARDWARE_LUMA = frozenset({(1, 1), (2, 1), (2, 2), (1, 2), (4, 1), (4, 2)})
# JPEGs nvjpeg decodes wrongly on the GPU, on the JPEG engine and off it, alone or in a batch
# (docs/performance.md), go to libjpeg on the CPU ("cpu_only"):
# - a sequential greyscale one whose one component declares sampling factors other than 1x1 (they
#   do not change its pixels, ITU T.81 A.1.1);
# - an RGB-coded one (no colour transform): nvjpeg decodes it as YCbCr. libjpeg's rule decides which
#   are: without a JFIF marker, an Adobe marker's transform 0, or else component IDs "R", "G", "B";
# - four components (CMYK, YCCK): torchvision's GPU decode fails on them, and the whole batch with it;
# - a lossless, hierarchical or arithmetic-coded frame (not in ``_NVJPEG_FRAMES``): nvjpeg fails on
#   it, and the whole batch with it, which then goes through the one-by-one retry;
# - a sequential one with 16-bit quantisation tables (a quality of about 10 or less): nvjpeg ignores
#   the tables' width, on the JPEG engine and off it, and decodes noise (progressive ones decode right).
_GREY_PLAIN = 0x11
_APP0, _APP1, _APP14 = 0xE0, 0xE1, 0xEE
_EXIF, _ORIENTATION_TAG, _SHORT = b"Exif\0\0", 0x0112, 3
_RGB_IDS = b"RGB"


def sniff_format(raw: Body) -> str | None:
    """JPEG, PNG or WEBP from the magic bytes, else None."""
    if raw[:3] == _JPEG_MAGIC:
        return JPEG
    if raw[:8] == _PNG_MAGIC:
        return PNG
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return WEBP
    return None


class ImageFrame(NamedTuple):
    """An image's size and, for a JPEG a GPU's JPEG engine may take, how many leading bytes hold its headers."""

    width: int
    height: int
    hardware_header: int  # bytes up to the end of the scan header; 0: not a hardware candidate
    cpu_only: bool = False  # nvjpeg would decode it wrongly or not at all
    orientation: int = 1  # EXIF orientation, 1-8 (1: as stored), of a JPEG that has one
    progressive: bool = False  # a progressive JPEG (its entropy decoding is the CPU's work on every path)


def dimensions(raw: Body, fmt: str) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header or a PNG's IHDR; InvalidInput when it cannot be read."""
    frame = image_frame(raw, fmt)
    return frame.width, frame.height


def image_frame(raw: Body, fmt: str) -> ImageFrame:
    """:func:`jpeg_frame` for a JPEG; a PNG's or WebP's size from its first chunk (never a hardware candidate)."""
    if fmt == JPEG:
        return jpeg_frame(raw)
    return ImageFrame(*(_png(raw) if fmt == PNG else _webp(raw)), 0)


def _webp(raw: Body) -> tuple[int, int]:
    """A WebP's size from its first chunk: lossy (VP8), lossless (VP8L) or extended (VP8X, the canvas)."""
    chunk = bytes(raw[12:16])
    if len(raw) < 30:
        raise InvalidInput("cannot read the WebP header: the file is too short")
    if chunk == b"VP8 " and raw[23:26] == _VP8_START:
        width, height = struct.unpack_from("<HH", raw, 26)
        return width & 0x3FFF, height & 0x3FFF  # the top 2 bits are a scaling hint
    if chunk == b"VP8L" and raw[20] == _VP8L_SIGNATURE:
        bits = int.from_bytes(raw[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        if raw[20] & _VP8X_ANIMATED:
            raise UnsupportedMediaType("an animated WebP: send a still image (JPEG, PNG or WebP)")
        return int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1
    raise InvalidInput(f"cannot read the WebP header: no image chunk first ({chunk!r})")


def _exif_orientation(raw: Body, start: int, stop: int) -> int:
    """The orientation tag of an APP1 segment's payload ``raw[start:stop]`` (1 when it has none or it is odd).

    TIFF layout: a byte order mark, 42, the offset of IFD0, then 12-byte entries (tag, type, count, value).
    """
    if raw[start : start + 6] != _EXIF or stop - start < 14:
        return 1
    tiff = start + 6
    order = {b"II": "<", b"MM": ">"}.get(bytes(raw[tiff : tiff + 2]))
    if order is None:
        return 1
    (ifd,) = struct.unpack_from(order + "I", raw, tiff + 4)
    at = tiff + ifd
    if at + 2 > stop:
        return 1
    (count,) = struct.unpack_from(order + "H", raw, at)
    for entry in range(at + 2, min(at + 2 + 12 * count, stop - 11), 12):
        tag, kind = struct.unpack_from(order + "HH", raw, entry)
        if tag == _ORIENTATION_TAG:
            (value,) = struct.unpack_from(order + "H", raw, entry + 8)
            return value if kind == _SHORT and 1 <= value <= 8 else 1
    return 1


def _png(raw: Body) -> tuple[int, int]:
    if len(raw) < 24 or raw[12:16] != b"IHDR":
        raise InvalidInput("cannot read the PNG header: no IHDR chunk first")
    width, height = struct.unpack_from(">II", raw, 16)
    return width, height


def _hardware(raw: Body, i: int, marker: int, end: int) -> bool:
    """Baseline 8-bit Huffman, greyscale or YCbCr in a layout nvjpeg's hardware decoder lists.

    Asked only of a frame that is not ``_cpu_only``, which has ruled out the rest.
    """
    if marker != _BASELINE or i + 8 > end or raw[i + 2] != 8:
        return False
    components = raw[i + 7]
    if components == 1:
        return True
    if components != 3 or i + 8 + 9 > end:
        return False
    factors = [(raw[i + 9 + 3 * c] >> 4, raw[i + 9 + 3 * c] & 0x0F) for c in range(3)]
    return factors[0] in _HARDWARE_LUMA and factors[1] == factors[2] == (1, 1)


def _wide_tables(raw: Body, start: int, stop: int) -> bool:
    """Whether a DQT segment's payload ``raw[start:stop]`` holds a table of 16-bit values."""
    while start < stop:
        if raw[start] >> 4:
            return True
        start += 65
    return False


def _cpu_only(raw: Body, i: int, marker: int, end: int, jfif: bool, adobe: int | None, wide_q: bool) -> bool:
    """Whether nvjpeg would decode this frame wrongly (see ``_GREY_PLAIN``).

    ``adobe``: the Adobe marker's transform; ``wide_q``: a quantisation table has 16-bit values.
    """
    if marker not in _NVJPEG_FRAMES or (wide_q and marker != _PROGRESSIVE):
        return True
    components = raw[i + 7] if i + 8 <= end else 0
    if components == 1:
        return marker != _PROGRESSIVE and i + 10 <= end and raw[i + 9] != _GREY_PLAIN
    if components == 3 and not jfif:
        ids = bytes(raw[i + 8 + 3 * c] for c in range(3)) if i + 8 + 9 <= end else b""
        return adobe == 0 if adobe is not None else ids == _RGB_IDS
    return components == 4


def jpeg_frame(raw: Body) -> ImageFrame:
    """Walk a JPEG's marker segments: its frame header's size and, for a hardware candidate, where its headers end.

    InvalidInput when no frame header can be read, UnsupportedMediaType for samples of other than 8 bits;
    anything odd after the frame header only rules out the hardware path.
    """
    end, i = len(raw), 2
    sof, sof_marker, header_end = 0, 0, 0  # where the frame header's segment starts; the scan's data
    jfif, adobe, wide_q, orientation = False, None, False, 1
    while i < end:
        if raw[i] != 0xFF:
            if not sof:
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
            if not sof:
                raise InvalidInput(f"cannot read the JPEG header: segment {marker:#04x} has length {length}")
            break
        if marker == _SOS:
            header_end = i + length if sof and i + length <= end else 0
            break
        if marker in _SOF and i + 7 <= end:
            sof, sof_marker = i, marker
        elif marker == _APP0 and raw[i + 2 : i + 7] == b"JFIF\0":
            jfif = True
        elif marker == _APP14 and length >= 12 and i + 14 <= end and raw[i + 2 : i + 7] == b"Adobe":
            adobe = raw[i + 13]
        elif marker == _APP1 and orientation == 1:
            orientation = _exif_orientation(raw, i + 2, min(i + length, end))
        elif marker == _DQT:
            wide_q = wide_q or _wide_tables(raw, i + 2, min(i + length, end))
        i += length
    if not sof:
        raise InvalidInput("cannot read the JPEG header: no frame header before the image data")
    if raw[sof + 2] != _PRECISION:
        raise UnsupportedMediaType(
            f"a {raw[sof + 2]}-bit JPEG: only 8-bit JPEGs can be decoded; send an 8-bit JPEG or a PNG"
        )
    height, width = struct.unpack_from(">HH", raw, sof + 3)
    cpu_only = _cpu_only(raw, sof, sof_marker, end, jfif, adobe, wide_q)
    hardware = header_end if not cpu_only and _hardware(raw, sof, sof_marker, end) else 0
    return ImageFrame(width, height, hardware, cpu_only, orientation, sof_marker == _PROGRESSIVE)
