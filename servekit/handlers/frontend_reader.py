"""A buffered reader for the frontend's messages to a TorchServe 0.12 worker.

TorchServe's worker reads every field of a request with its own ``recv`` (``_retrieve_buffer``):
about 40 system calls per request, 1,300 for a batch of 32, each for a few bytes. Reading through a
buffer takes a few calls per request instead. The buffer is small on purpose: the part of a body
beyond what is buffered is received straight into the body's own memory, where a buffer that holds
whole bodies copies every byte twice. Only ``_retrieve_buffer`` reads the worker's
socket in 0.12, so a buffer that reads ahead loses nothing; on another TorchServe version the
worker keeps its own reader and says so once.

An inference message is parsed in one function over that buffer (``_retrieve_inference_msg``):
TorchServe's parser makes four Python calls per field, which cost more than the reads themselves.
It returns what TorchServe's does, except that ids and headers are ``bytes`` (equal, and decoded
the same way) where TorchServe gives ``bytearray``, and that bodies are received into a
:class:`BodyArena` when there is one.

The arena is one buffer a batch's bodies are received into, reused batch after batch: no memory to
allocate and zero per body, and on a GPU it is page-locked, so nvjpeg copies a body to the device
by DMA instead of through the driver's staging buffer (about 2% of a GPU worker's CPU per request,
docs/performance.md). Its bodies are ``memoryview``s, valid until the next batch is read: a worker
handles one batch at a time and sends its answers before it reads the next, and nvjpeg's decode
ends in a stream sync, so nothing still reads them by then. A handler that keeps a body past its
batch must copy it (or set ``body_buffer_mib: 0``).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
import sys
from typing import Any, NoReturn, cast

import torch

try:
    import ts
    from ts.protocol import otf_message_handler as otf
except ImportError:  # pragma: no cover - servekit's core runs without TorchServe
    ts = otf = None

log = logging.getLogger(__name__)
TESTED_VERSION = "0.12.0"
BUFFER_BYTES = 64 << 10  # every request's headers, and no more than a fraction of its body
_INT = struct.Struct("!i")
END_OF_LIST = -1


class BodyArena:
    """Where one batch's bodies are received: a buffer reused for each batch, page-locked if asked."""

    def __init__(self, nbytes: int, pinned: bool = False) -> None:
        if pinned:
            self.memory: Any = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()
        else:
            self.memory = bytearray(nbytes)
        self.view = memoryview(self.memory)
        self.pinned = pinned
        self.used = 0

    def reset(self) -> None:
        """A new batch: every earlier body's memory may be written again."""
        self.used = 0

    def take(self, n: int) -> memoryview | bytearray:
        """Writable memory for an ``n``-byte body: the arena's next ``n`` bytes, or a bytearray when they do not fit."""
        start = self.used
        if start + n > len(self.view):
            return bytearray(n)
        self.used = start + n
        return self.view[start : start + n]


class BufferedFrontend:
    """``_retrieve_buffer`` with one buffered reader over the worker's socket."""

    def __init__(self, original: Any) -> None:
        self.original = original
        self.conn: socket.socket | None = None
        self.reader: io.BufferedReader | None = None

    def reader_for(self, conn: Any) -> io.BufferedReader | None:
        """The buffered reader over ``conn`` (made at its first use), or None when it is not a socket."""
        if conn is not self.conn:
            if not isinstance(conn, socket.socket):
                return None
            self.conn, self.reader = conn, cast(io.BufferedReader, conn.makefile("rb", buffering=BUFFER_BYTES))
        return self.reader

    def __call__(self, conn: Any, length: int) -> bytearray:
        """Exactly ``length`` bytes from the frontend, as TorchServe's own reader returns them."""
        reader = self.reader_for(conn)
        if reader is None:
            return self.original(conn, length)
        data = bytearray(length)
        if reader.readinto(data) < length:
            _disconnected()
        return data


class BatchParser:
    """``_retrieve_inference_msg`` over the buffered reader: one batch of requests, parsed in one loop."""

    def __init__(self, frontend: BufferedFrontend, original: Any, arena: BodyArena | None = None) -> None:
        self.frontend = frontend
        self.original = original
        self.arena = arena  # where bodies are received (None: each its own bytearray)

    def __call__(self, conn: Any) -> list[dict[str, Any]]:
        """The batch's requests as TorchServe's parser returns them."""
        reader = self.frontend.reader_for(conn)
        if reader is None:
            return self.original(conn)
        try:
            return _parse_batch(reader, self.arena)
        except struct.error:  # a length cut short: the frontend went away mid-message
            _disconnected()


def _parse_batch(reader: io.BufferedReader, arena: BodyArena | None = None) -> list[dict[str, Any]]:
    read, readinto, unpack = reader.read, reader.readinto, _INT.unpack
    if arena is not None:
        arena.reset()
    take = arena.take if arena is not None else bytearray
    decode = os.environ.get("TS_DECODE_INPUT_REQUEST") in (None, "true")
    batch: list[dict[str, Any]] = []
    while True:
        (n,) = unpack(read(4))
        if n == END_OF_LIST:
            return batch
        request: dict[str, Any] = {"requestId": read(n)}
        headers = []
        while True:
            (n,) = unpack(read(4))
            if n == END_OF_LIST:
                break
            header = read(n)
            (n,) = unpack(read(4))
            headers.append({"name": header, "value": read(n)})
        request["headers"] = headers
        inputs = []
        while True:
            (n,) = unpack(read(4))
            if n == END_OF_LIST:
                break
            name = read(n).decode("utf-8")
            (n,) = unpack(read(4))
            content_type = read(n).decode("utf-8")
            (n,) = unpack(read(4))
            value = take(n)
            if readinto(value) < n:
                _disconnected()
            inputs.append({"name": name, "contentType": content_type, "value": _decoded(value, content_type, decode)})
        request["parameters"] = inputs
        batch.append(request)


def _decoded(value: bytearray | memoryview, content_type: str, decode: bool) -> Any:
    """JSON and text bodies decoded as TorchServe 0.12 decodes them (kept raw when that fails)."""
    if not decode:
        return value
    try:
        if content_type == "application/json":
            return json.loads(str(value, "utf-8"))
        if content_type.startswith("text"):
            return str(value, "utf-8")
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, or JSON nested too deep: TorchServe keeps it raw
        logging.warning("Failed decoding of input data. Forwarding encoded payload", exc_info=True)
    return value


def _disconnected() -> NoReturn:
    logging.info("Frontend disconnected.")
    sys.exit(0)  # what TorchServe's reader does: the worker ends with its frontend


def install(arena: BodyArena | None = None) -> bool:
    """Replace TorchServe's per-field socket reads with buffered ones (once per process); False if not.

    ``arena``: where bodies are received from then on (None: each body its own bytearray).
    """
    if otf is None:
        return False
    current = getattr(otf, "_retrieve_buffer", None)
    if isinstance(current, BufferedFrontend):
        if isinstance(otf._retrieve_inference_msg, BatchParser):
            otf._retrieve_inference_msg.arena = arena
        return True
    version = getattr(ts, "__version__", "unknown")
    if version != TESTED_VERSION or current is None:
        log.info("TorchServe %s: the worker keeps its own reader (buffered reads need %s)", version, TESTED_VERSION)
        return False
    frontend = BufferedFrontend(current)
    otf._retrieve_buffer = frontend
    otf._retrieve_inference_msg = BatchParser(frontend, otf._retrieve_inference_msg, arena)
    where = "" if arena is None else f"; bodies into a {len(arena.view) >> 20} MiB{' page-locked' * arena.pinned} arena"
    log.info("reading the frontend's messages through a %d KiB buffer%s", BUFFER_BYTES >> 10, where)
    return True
