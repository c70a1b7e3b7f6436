"""Images in the formats cameras and tools write: each decodes to the right pixels, or is refused with a clear 415.

The files in tests/data/variants are one held-out digit, written by tests/data/variants/make.py.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import decode_image

from conftest import ROOT
from models.digits.model import held_out
from servekit.config import ImageOptions
from servekit.errors import InvalidInput, RequestError, UnsupportedMediaType
from servekit.imageheader import jpeg_frame
from servekit.vision import Preprocessor, check_image

VARIANTS = ROOT / "tests" / "data" / "variants"
# name: whether nvjpeg may see it (False: libjpeg on the CPU decodes it on every device)
DECODED = {
    "arithmetic.jpg": False,
    "arithmetic-progressive.jpg": False,
    "arithmetic-grey.jpg": False,
    "lossless.jpg": False,
    "lossless-grey.jpg": False,
    "tables16.jpg": False,  # sequential with 16-bit quantisation tables: nvjpeg decodes noise
    "tables16-grey.jpg": False,
    "tables16-progressive.jpg": True,  # progressive ones it decodes right
    "rgb48.png": False,
    "grey16.png": False,
    "lossy.webp": False,
    "lossless.webp": False,
    "alpha.webp": False,  # its alpha dropped, as PIL's convert does
}
REFUSED = {
    "bits12.jpg": "a 12-bit JPEG: only 8-bit JPEGs",
    "lossless16.jpg": "a 16-bit JPEG: only 8-bit JPEGs",
    "animated.webp": "an animated WebP: send a still image",
}
SUFFIXES = (".jpg", ".png", ".webp")
LOSSLESS = ("lossless.jpg", "lossless-grey.jpg")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _opts(channels: int) -> ImageOptions:
    return ImageOptions(channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)


def _libjpeg_reads_lossless() -> bool:
    """torchvision's libjpeg-turbo reads lossless JPEGs from version 3 (torchvision 0.29 has it, 0.26 not)."""
    try:
        decode_image(torch.frombuffer(bytearray((VARIANTS / LOSSLESS[1]).read_bytes()), dtype=torch.uint8))
    except RuntimeError:
        return False
    return True


READS_LOSSLESS = _libjpeg_reads_lossless()


def _digit(channels: int) -> torch.Tensor:
    grey = torch.from_numpy(np.array(held_out(1)[0][0])).unsqueeze(0)
    return grey.expand(channels, -1, -1)


def test_every_variant_file_is_there():
    assert sorted(p.name for p in VARIANTS.iterdir() if p.suffix in SUFFIXES) == sorted({*DECODED, *REFUSED})


@pytest.mark.parametrize("name", sorted(DECODED))
def test_the_header_routes_each_variant(name):
    raw = (VARIANTS / name).read_bytes()
    header = check_image(raw, ImageOptions())
    assert header.cpu_only is (header.format == "JPEG" and not DECODED[name])
    assert not header.hardware_header  # 28x28, and none is a baseline JPEG of 8-bit tables


def test_a_baseline_marked_frame_with_16_bit_tables_never_reaches_the_jpeg_engine():
    raw = bytearray((VARIANTS / "tables16.jpg").read_bytes())
    at = raw.index(b"\xff\xc1")
    raw[at + 1] = 0xC0  # as some encoders write it: a baseline marker over 16-bit tables
    assert jpeg_frame(raw).cpu_only and not jpeg_frame(raw).hardware_header
    plain = bytearray(Image.new("RGB", (64, 48), (90, 140, 200)).tobytes())
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 48), bytes(plain)).save(buf, "JPEG")
    extended = bytearray(buf.getvalue())
    extended[extended.index(b"\xff\xc0") + 1] = 0xC1  # an extended frame of 8-bit tables: nvjpeg's
    assert not jpeg_frame(extended).cpu_only


@pytest.mark.parametrize(("name", "why"), sorted(REFUSED.items()))
def test_jpegs_of_more_than_8_bits_and_animations_are_refused_before_decoding(name, why):
    with pytest.raises(UnsupportedMediaType, match=why) as err:
        check_image((VARIANTS / name).read_bytes(), ImageOptions())
    assert err.value.status == 415


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", sorted(DECODED))
def test_each_variant_decodes_to_the_digit_on_the_cpu(name, channels):
    raw = (VARIANTS / name).read_bytes()
    pre = Preprocessor(_opts(channels), torch.device("cpu"))
    if name in LOSSLESS and not READS_LOSSLESS:
        with pytest.raises(InvalidInput, match="Unsupported JPEG process"):
            pre.decode_cpu(raw)
        return
    img = pre.decode_cpu(raw)
    assert img.dtype == torch.uint8 and img.shape == (channels, 28, 28)
    error = (img.int() - _digit(channels).int()).abs()
    if name.startswith(("lossless", "rgb48", "grey16")):  # lossless.webp too
        assert int(error.max()) <= 1  # lossless, 16 bits scaled back to 8; the grey of RGB rounds
    else:
        assert float(error.float().mean()) < 12, float(error.float().mean())  # lossy, quality 10 at worst


@needs_cuda
@pytest.mark.parametrize("channels", [3, 1])
def test_on_a_gpu_each_variant_decodes_as_on_the_cpu(channels):
    opts = _opts(channels)
    cpu, gpu = Preprocessor(opts, torch.device("cpu")), Preprocessor(opts, torch.device("cuda", 0))
    names = sorted(DECODED)
    raws = [bytearray((VARIANTS / n).read_bytes()) for n in names]
    out = gpu.decode_many(raws, [check_image(r, opts) for r in raws])  # one batch, as a worker sees them
    for name, raw, img in zip(names, raws, out):
        if name in LOSSLESS and not READS_LOSSLESS:
            assert isinstance(img, RequestError) and img.status == 400, (name, img)
            continue
        assert isinstance(img, torch.Tensor), (name, img)
        error = (img.cpu().int() - cpu.decode_cpu(raw).int()).abs().float()
        assert float(error.mean()) < 1.0, (name, float(error.mean()))  # nvjpeg's noise was 42 to 54
