"""What the load sends: the synthetic JPEG, a built-in mix of sizes and formats, or the user's own images."""

from __future__ import annotations

import io
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..client import CONTENT_TYPES, sniffed_content_type
from ..errors import ConfigError, InvalidInput
from ..imageheader import image_frame, sniff_format
from .images import HEIGHT, WIDTH, scene, synthetic_jpeg

MIXED = "mixed"  # --images mixed: the built-in mix below

# The built-in mix, as photos reach a web service: (count, width, height, format, PIL save options).
# Every image is RGB, so that every configuration (stock's image_classifier too) can answer each one.
_MIX: tuple[tuple[int, int, int, str, dict[str, Any]], ...] = (
    (6, 320, 240, "JPEG", {"quality": 80}),  # thumbnails
    (6, 640, 480, "JPEG", {"quality": 85}),  # web photos
    (4, WIDTH, HEIGHT, "JPEG", {"quality": 90, "subsampling": 0}),  # ImageNet-like, the default body's size
    (3, 1024, 768, "JPEG", {"quality": 85, "progressive": True}),
    (3, 1920, 1080, "JPEG", {"quality": 85}),  # full HD frames
    (2, 4032, 3024, "JPEG", {"quality": 85}),  # 12 MP phone photos
    (2, 800, 600, "PNG", {}),
    (2, 800, 600, "WEBP", {"quality": 80}),
)
_RENDER_SIDE = 640  # larger images are rendered at most this wide and scaled up: seconds, not minutes


@dataclass(frozen=True)
class BenchImage:
    """One request body the load sends, and what it is."""

    name: str
    body: bytes
    content_type: str
    width: int
    height: int


def _render(seed: int, width: int, height: int) -> np.ndarray:
    """A textured landscape of ``width`` x ``height`` (uint8 RGB) with a little sensor-like grain."""
    scale = max(1, -(-width // _RENDER_SIDE))
    base, texture, detail = scene(seed, width // scale, height // scale)
    small = Image.fromarray(np.clip(base + 30 * detail * texture, 0, 255).astype(np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC)).astype(np.int16)
    grain = np.random.default_rng(seed).integers(-6, 7, pixels.shape, dtype=np.int16)
    return np.clip(pixels + grain, 0, 255).astype(np.uint8)


def mixed() -> list[BenchImage]:
    """The built-in mix: 28 RGB images, 320x240 to 12 MP: JPEG (baseline and progressive), PNG, WebP."""
    images: list[BenchImage] = []
    for count, width, height, fmt, options in _MIX:
        for _ in range(count):
            seed = len(images)
            buf = io.BytesIO()
            Image.fromarray(_render(seed, width, height)).save(buf, fmt, **options)
            images.append(_image(f"mixed-{seed:02d}-{width}x{height}.{fmt.lower()}", buf.getvalue()))
    return images


def synthetic(target_bytes: int) -> list[BenchImage]:
    """The default body: one synthetic 500x375 JPEG of about ``target_bytes``."""
    return [_image(f"synthetic-{WIDTH}x{HEIGHT}.jpg", synthetic_jpeg(target_bytes=target_bytes))]


def _image(name: str, body: bytes) -> BenchImage:
    """``body`` checked to be a JPEG, PNG or WebP whose header gives its size."""
    fmt = sniff_format(body)
    if fmt is None:
        raise ConfigError(f"{name} is not a JPEG, PNG or WebP image")
    try:
        frame = image_frame(body, fmt)
    except InvalidInput as exc:
        raise ConfigError(f"{name}: {exc}") from None
    return BenchImage(name, body, sniffed_content_type(body), frame.width, frame.height)


def from_paths(paths: Sequence[Path]) -> list[BenchImage]:
    """Images from files and folders (a folder: its .jpg/.jpeg/.png/.webp files, sorted by name)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in CONTENT_TYPES)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"--images: {path} is neither a file nor a folder")
    if not files:
        raise ConfigError(f"--images: no .jpg, .jpeg, .png or .webp file in {', '.join(map(str, paths))}")
    return [_image(str(f), f.read_bytes()) for f in files]


def load(spec: Sequence[str], target_bytes: int) -> list[BenchImage]:
    """What ``--images`` names: nothing (the synthetic JPEG), ``mixed``, or files and folders."""
    if not spec:
        return synthetic(target_bytes)
    if MIXED in spec:
        if len(spec) > 1:
            raise ConfigError("--images: give either 'mixed' or paths, not both")
        return mixed()
    return from_paths([Path(s) for s in spec])


def describe(images: Sequence[BenchImage], source: str) -> dict[str, Any]:
    """The corpus in a few numbers, for results.json and the report."""
    sizes = [len(i.body) for i in images]
    megapixels = [i.width * i.height / 1e6 for i in images]
    return {
        "source": source,
        "count": len(images),
        "formats": dict(Counter(i.content_type.removeprefix("image/") for i in images)),
        "bytes_mean": round(statistics.fmean(sizes)),
        "bytes_max": max(sizes),
        "megapixels_min": round(min(megapixels), 3),
        "megapixels_median": round(statistics.median(megapixels), 3),
        "megapixels_max": round(max(megapixels), 3),
    }


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def summary_line(info: dict[str, Any]) -> str:
    """E.g. ``28 image(s) (mixed): jpeg 24, png 2, webp 2; 0.077-12.193 MP (median 0.307); 324 kB mean, ...``."""
    formats = ", ".join(f"{k} {v}" for k, v in sorted(info["formats"].items()))
    return (
        f"{info['count']} image(s) ({info['source']}): {formats}; {info['megapixels_min']}-{info['megapixels_max']} MP "
        f"(median {info['megapixels_median']}); {_size(info['bytes_mean'])} mean, {_size(info['bytes_max'])} max"
    )


def source_name(spec: Sequence[str]) -> str:
    """How the report names what ``--images`` gave (results.json's plan keeps the paths)."""
    if not spec:
        return "synthetic JPEG q90 4:4:4"
    return MIXED if MIXED in spec else "own images"
