"""A synthetic, natural-looking JPEG of a chosen size: smooth scene + multi-scale texture."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 500, 375
TARGET_BYTES = 170_000
QUALITY = 90


def _octaves(rng: np.random.Generator, h: int, w: int, channels: int) -> np.ndarray:
    """Noise summed over scales of 1..32 pixels (bicubic upsampling), unit variance."""
    tex = np.zeros((h, w, channels), np.float32)
    for step in (1, 2, 4, 8, 16, 32):
        small = rng.normal(0, 1, (h // step + 2, w // step + 2, channels)).astype(np.float32)
        size = ((w // step + 2) * step, (h // step + 2) * step)
        bicubic = Image.Resampling.BICUBIC
        up = [np.asarray(Image.fromarray(small[..., c]).resize(size, bicubic))[:h, :w] for c in range(channels)]
        tex += np.stack(up, -1) * step**-0.2
    return tex / tex.std()


def scene(seed: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sky/ground landscape with blobs, its texture fields and where detail goes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (y / h)[..., None]
    sky = np.array([110, 160, 225], np.float32) * (1 - t) + np.array([200, 215, 235], np.float32) * t
    ground = np.array([70, 110, 45], np.float32) * (1 - t) + np.array([120, 95, 60], np.float32) * t
    below = y > 0.45 * h + 25 * np.sin(x / 60)
    base = np.where(below[..., None], ground, sky)
    for _ in range(10):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0.4 * h, h), rng.uniform(15, 60)
        base = base + rng.uniform(-60, 40, 3) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
    texture = _octaves(rng, h, w, 1) + 0.4 * _octaves(rng, h, w, 3)
    detail = (0.3 + 0.7 * below)[..., None]
    return base, texture, detail


def _encode(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def synthetic_jpeg(
    width: int = WIDTH, height: int = HEIGHT, target_bytes: int = TARGET_BYTES, quality: int = QUALITY, seed: int = 0
) -> bytes:
    """A ``width`` x ``height`` JPEG (4:4:4, ``quality``) whose size is within 2% of ``target_bytes``.

    The texture amplitude is found by bisection; the file size grows with it monotonically enough.
    """
    base, texture, detail = scene(seed, width, height)
    lo, hi = 0.0, 400.0
    best = _encode(base, quality)
    for _ in range(25):
        amp = (lo + hi) / 2
        data = _encode(base + amp * detail * texture, quality)
        if abs(len(data) - target_bytes) < abs(len(best) - target_bytes):
            best = data
        if abs(len(data) - target_bytes) <= 0.02 * target_bytes:
            return data
        lo, hi = (amp, hi) if len(data) < target_bytes else (lo, amp)
    return best
