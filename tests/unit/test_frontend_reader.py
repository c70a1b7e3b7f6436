"""The buffered frontend reader parses TorchServe 0.12's own messages exactly as TorchServe's reader does."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from ts.protocol import otf_message_handler as otf

from servekit.handlers import frontend_reader
from servekit.handlers.frontend_reader import BufferedFrontend

END = struct.pack("!i", -1)


def _field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def _request(i: int, body: bytes, content_type: str = "image/jpeg") -> bytes:
    """One request as the frontend frames it: id, headers, then the inputs."""
    headers = [("Host", "127.0.0.1"), ("Content-Type", content_type), ("X-Id", str(i))]
    out = _field(f"req-{i}".encode()) + b"".join(_field(k.encode()) + _field(v.encode()) for k, v in headers) + END
    return out + _field(b"body") + _field(content_type.encode()) + _field(body) + END


def _batch(bodies: list[bytes]) -> bytes:
    return b"I" + b"".join(_request(i, b) for i, b in enumerate(bodies)) + END


def _parse(reader, messages: list[bytes], monkeypatch) -> list:
    """Send ``messages`` back to back over a real socket pair and parse them with ``reader``."""
    monkeypatch.setattr(otf, "_retrieve_buffer", reader)
    a, b = socket.socketpair()
    sender = threading.Thread(target=lambda: [a.sendall(m) for m in messages])
    sender.start()
    try:
        return [otf.retrieve_msg(b) for _ in messages]
    finally:
        sender.join()
        a.close()
        b.close()


def test_batches_parse_exactly_as_with_torchserves_reader(monkeypatch):
    original = otf._retrieve_buffer
    bodies = [bytes([i]) * (1000 + 70_000 * i) for i in range(5)] + [b'{"x": 1}']
    messages = [_batch(bodies), _batch(bodies[::-1]), _batch([b"tiny"])]
    ours = _parse(BufferedFrontend(original), messages, monkeypatch)
    theirs = _parse(original, messages, monkeypatch)
    assert ours == theirs
    (_, first), (_, second), (_, third) = ours
    assert [len(r["parameters"][0]["value"]) for r in first[:5]] == [len(b) for b in bodies[:5]]
    assert isinstance(first[0]["parameters"][0]["value"], bytearray)  # the type handlers get from TorchServe
    assert len(second) == 6 and third[0]["parameters"][0]["value"] == b"tiny"


def test_a_frontend_gone_mid_message_ends_the_worker_as_torchserve_does():
    a, b = socket.socketpair()
    a.sendall(_field(b"only part of a message")[:10])
    a.close()
    reader = BufferedFrontend(otf._retrieve_buffer)
    assert reader(b, 4) == bytearray(_field(b"only part of a message")[:4])
    with pytest.raises(SystemExit) as exit_info:
        reader(b, 100)
    assert exit_info.value.code == 0
    b.close()


def test_install_only_on_the_tested_torchserve(monkeypatch):
    original = otf._retrieve_buffer
    monkeypatch.setattr(otf, "_retrieve_buffer", original)
    monkeypatch.setattr(frontend_reader.ts, "__version__", "0.13.0")
    assert not frontend_reader.install() and otf._retrieve_buffer is original
    monkeypatch.setattr(frontend_reader.ts, "__version__", frontend_reader.TESTED_VERSION)
    assert frontend_reader.install() and isinstance(otf._retrieve_buffer, BufferedFrontend)
    installed = otf._retrieve_buffer
    assert frontend_reader.install() and otf._retrieve_buffer is installed  # once per process
