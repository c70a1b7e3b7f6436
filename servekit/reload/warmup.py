"""The warm-up request that proves a new version serves before it becomes the default.

The sample travels in the archive (``servekit archive`` packs the build hook's ``warmup_sample()``),
so the watcher needs neither torch nor the model's own code: it stays a small process.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import requests

from ..store import WARMUP_META, read_member


@dataclass(frozen=True)
class Sample:
    """A warm-up request; ``strict`` samples must get a 200 with predictions."""

    body: bytes
    content_type: str
    strict: bool


@lru_cache(maxsize=1)
def generic_png(size: int = 64) -> bytes:
    """A small grey gradient PNG, written without an imaging library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes((x * 255 // (size - 1)) for x in range(size)) for _ in range(size))
    header = struct.pack(">IIBBBBB", size, size, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def sample_of(mar: Path) -> Sample:
    """The sample packed in an archive; a generic PNG (answers other than 200 tolerated) when it has none."""
    meta_raw = read_member(mar, WARMUP_META)
    if meta_raw:
        try:
            meta = json.loads(meta_raw)
            body = read_member(mar, meta["file"])
            if body:
                return Sample(body, str(meta["content_type"]), bool(meta.get("strict", True)))
        except (ValueError, KeyError, TypeError):
            pass
    return Sample(generic_png(), "image/png", strict=False)


def warmup_problem(resp: requests.Response, version: str, strict: bool) -> str | None:
    """Why a warm-up answer does not prove the version serves (None when it does)."""
    answered = resp.headers.get("X-Model-Version")
    if answered is not None and answered != version:
        return f"warm-up was answered by version {answered}, not {version}"
    if resp.status_code == 200:
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        return None if answer else f"warm-up answered 200 without a JSON answer: {resp.text[:200]}"
    from_handler = answered is not None and 400 <= resp.status_code < 500
    if from_handler and not strict:
        try:
            if {"code", "message"} <= set(resp.json()):
                return None
        except ValueError:
            pass
    return f"warm-up prediction answered {resp.status_code}: {resp.text.strip()[:300]}"
