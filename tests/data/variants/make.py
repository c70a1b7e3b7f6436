"""Write the image variants the decode tests read: one held-out digit in formats cameras and tools write.

Run from the project root: ``python tests/data/variants/make.py``. Needs what the project does not:
``cjpeg`` (Debian's libjpeg-turbo-progs, 2.1) and ``imagecodecs`` (libjpeg-turbo 3,
for lossless and 12-bit JPEGs, and 16-bit PNGs). The files are committed; the tests only read them.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import imagecodecs
import numpy as np

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from models.digits.model import held_out  # noqa: E402

OUT = Path(__file__).resolve().parent
# Written by cjpeg from the digit, as greyscale or as RGB.
CJPEG = {
    "arithmetic.jpg": ("rgb", ["-arithmetic"]),
    "arithmetic-progressive.jpg": ("rgb", ["-arithmetic", "-progressive"]),
    "arithmetic-grey.jpg": ("grey", ["-arithmetic"]),
    # Quality 10 without -baseline: quantisation tables of 16-bit values, in an extended (SOF1) frame.
    "tables16.jpg": ("rgb", ["-quality", "10"]),
    "tables16-grey.jpg": ("grey", ["-quality", "10"]),
    "tables16-progressive.jpg": ("rgb", ["-quality", "10", "-progressive"]),
}


def main() -> None:
    """Write every variant of held-out digit 0 next to this script."""
    img, _ = held_out(1)[0]
    grey = np.asarray(img)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    with tempfile.TemporaryDirectory() as tmp:
        src = {"grey": Path(tmp, "d.pgm"), "rgb": Path(tmp, "d.ppm")}
        img.save(src["grey"])
        img.convert("RGB").save(src["rgb"])
        for name, (kind, args) in CJPEG.items():
            subprocess.run(["cjpeg", *args, "-outfile", str(OUT / name), str(src[kind])], check=True)
    wide = rgb.astype(np.uint16) * 257
    encoded = {
        "lossless.jpg": imagecodecs.jpeg8_encode(rgb, lossless=True),
        "lossless-grey.jpg": imagecodecs.jpeg8_encode(grey, lossless=True),
        "bits12.jpg": imagecodecs.jpeg8_encode(wide >> 4, bitspersample=12),
        "lossless16.jpg": imagecodecs.jpeg8_encode(wide, lossless=True, bitspersample=16),
        "rgb48.png": imagecodecs.png_encode(wide),
        "grey16.png": imagecodecs.png_encode(wide[..., 0].copy()),
    }
    for name, data in encoded.items():
        (OUT / name).write_bytes(data)
    # WebP, by Pillow's libwebp: lossy, lossless, with an alpha channel (extended format), animated.
    with_alpha = img.convert("RGBA")
    with_alpha.putalpha(254)  # not opaque, so libwebp keeps the alpha channel (and an extended header)
    webps = {
        "lossy.webp": (img.convert("RGB"), {"quality": 90}),
        "lossless.webp": (img, {"lossless": True}),
        "alpha.webp": (with_alpha, {"quality": 90}),
        "animated.webp": (img, {"save_all": True, "append_images": [img.rotate(90)], "duration": 100}),
    }
    for name, (picture, kw) in webps.items():
        picture.save(OUT / name, "WEBP", **kw)


if __name__ == "__main__":
    main()
