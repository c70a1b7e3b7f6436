"""A buffered reader for the frontend's messages to a TorchServe 0.12 worker.

TorchServe's worker reads every field of a request with its own ``recv`` (``_retrieve_buffer``):
about 40 system calls per request, 1,300 for a batch of 32, each for a few bytes. Reading through a
buffer takes one call per few hundred KB instead. Only ``_retrieve_buffer`` reads the worker's
socket in 0.12, so a buffer that reads ahead loses nothing; on another TorchServe version the
worker keeps its own reader and says so once.
"""

from __future__ import annotations

import io
import logging
import socket
import sys
from typing import Any, cast

try:
    import ts
    from ts.protocol import otf_message_handler as otf
except ImportError:  # pragma: no cover - servekit's core runs without TorchServe
    ts = otf = None

log = logging.getLogger(__name__)
TESTED_VERSION = "0.12.0"
BUFFER_BYTES = 1 << 20  # a whole batch of typical images in few reads


class BufferedFrontend:
    """``_retrieve_buffer`` with one buffered reader over the worker's socket."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.conn: socket.socket | None = None
        self.reader: io.BufferedReader | None = None

    def __call__(self, conn: Any, length: int) -> bytearray:
        """Exactly ``length`` bytes from the frontend, as TorchServe's own reader returns them."""
        if conn is not self.conn:
            if not isinstance(conn, socket.socket):
                return self.original(conn, length)
            self.conn, self.reader = conn, cast(io.BufferedReader, conn.makefile("rb", buffering=BUFFER_BYTES))
        data = bytearray(length)
        assert self.reader is not None
        if self.reader.readinto(data) < length:
            logging.info("Frontend disconnected.")
            sys.exit(0)  # what TorchServe's reader does: the worker ends with its frontend
        return data


def install() -> bool:
    """Replace TorchServe's per-field socket reads with buffered ones (once per process); False if not."""
    if otf is None:
        return False
    current = getattr(otf, "_retrieve_buffer", None)
    if isinstance(current, BufferedFrontend):
        return True
    version = getattr(ts, "__version__", "unknown")
    if version != TESTED_VERSION or current is None:
        log.info("TorchServe %s: the worker keeps its own reader (buffered reads need %s)", version, TESTED_VERSION)
        return False
    otf._retrieve_buffer = BufferedFrontend(current)
    log.info("reading the frontend's messages through a %d KiB buffer", BUFFER_BYTES >> 10)
    return True
