"""The buffered frontend reader parses TorchServe 0.12's own messages exactly as TorchServe's reader does."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch
from ts.protocol import otf_message_handler as otf

from servekit.handlers import frontend_reader
from servekit.handlers.frontend_reader import BatchParser, BodyArena, BufferedFrontend

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


def _parse(reader, messages: list[bytes], monkeypatch, parser=None) -> list:
    """Send ``messages`` back to back over a real socket pair and parse them with ``reader`` (and ``parser``)."""
    monkeypatch.setattr(otf, "_retrieve_buffer", reader)
    if parser is not None:
        monkeypatch.setattr(otf, "_retrieve_inference_msg", parser)
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


def _ours(messages: list[bytes], monkeypatch) -> list:
    frontend = BufferedFrontend(otf._retrieve_buffer)
    return _parse(frontend, messages, monkeypatch, BatchParser(frontend, otf._retrieve_inference_msg))


@pytest.mark.parametrize("decode", [None, "true", "false"])
def test_the_batch_parser_returns_what_torchserves_parser_returns(monkeypatch, decode):
    if decode is None:
        monkeypatch.delenv("TS_DECODE_INPUT_REQUEST", raising=False)
    else:
        monkeypatch.setenv("TS_DECODE_INPUT_REQUEST", decode)
    items = [
        (bytes(range(256)) * 700, "image/jpeg"),
        (b'{"instances": [[1, 2], {"a": "\\u00e9"}]}', "application/json"),
        (b"{not json", "application/json"),
        ("caf\u00e9".encode(), "text/plain; charset=utf-8"),
        (b"\xff\xfe not utf-8", "text/csv"),
        (b"[" * 100_000 + b"]" * 100_000, "application/json"),  # too deep for json: kept raw
        (b"", "application/octet-stream"),
    ]
    requests = [_request(i, body, ctype) for i, (body, ctype) in enumerate(items)]
    messages = [b"I" + b"".join(requests) + END, b"I" + requests[0] + END, b"I" + END]
    original = otf._retrieve_inference_msg
    ours = _ours(messages, monkeypatch)
    monkeypatch.setattr(otf, "_retrieve_inference_msg", original)
    theirs = _parse(otf._retrieve_buffer, messages, monkeypatch)
    assert ours == theirs
    (_, batch), (_, one), (_, empty) = ours
    assert len(batch) == len(items) and len(one) == 1 and empty == []
    values = [r["parameters"][0]["value"] for r in batch]
    assert isinstance(values[0], bytearray) and values[0] == items[0][0]  # bodies: bytearray, as from TorchServe
    if decode != "false":
        assert values[1] == {"instances": [[1, 2], {"a": "\u00e9"}]} and values[3] == "caf\u00e9"
        assert values[2] == b"{not json" and values[4] == items[4][0] and values[5] == items[5][0]
    assert [h["name"] for h in batch[2]["headers"]] == [b"Host", b"Content-Type", b"X-Id"]


def test_bodies_are_received_into_the_arena_whose_memory_the_next_batch_reuses(monkeypatch):
    first = [bytes([1]) * 100_000, bytes([2]) * 150_000, bytes([3]) * 120_000, b'{"x": 1}']
    second = [bytes([4]) * 100_000]
    frontend = BufferedFrontend(otf._retrieve_buffer)
    parser = BatchParser(frontend, otf._retrieve_inference_msg, BodyArena(300_000))
    ours = _parse(frontend, [_batch(first)], monkeypatch, parser)
    monkeypatch.undo()
    theirs = _parse(otf._retrieve_buffer, [_batch(first)], monkeypatch)
    assert ours == theirs  # the same requests, values equal to TorchServe's bytearrays
    values = [r["parameters"][0]["value"] for r in ours[0][1]]
    assert [type(v) for v in values] == [memoryview, memoryview, bytearray, memoryview]  # the third does not fit
    assert values[0].obj is values[1].obj is parser.arena.memory
    _parse(frontend, [_batch(second)], monkeypatch, parser)
    assert values[0] == second[0]  # the next batch was received into the same memory
    assert parser.arena.used == 100_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_page_locked_arena_hands_out_page_locked_bodies():
    arena = BodyArena(1 << 20, pinned=True)
    body = arena.take(1000)
    assert arena.pinned and torch.frombuffer(body, dtype=torch.uint8).is_pinned()


def test_a_frontend_gone_mid_batch_ends_the_worker(monkeypatch):
    whole = b"I" + _request(0, b"x" * 5000) + END
    for cut in (3, 30, len(whole) - 100, len(whole) - 2):
        a, b = socket.socketpair()
        a.sendall(whole[:cut])
        a.close()
        frontend = BufferedFrontend(otf._retrieve_buffer)
        monkeypatch.setattr(otf, "_retrieve_buffer", frontend)
        monkeypatch.setattr(otf, "_retrieve_inference_msg", BatchParser(frontend, lambda conn: []))
        with pytest.raises(SystemExit) as exit_info:
            otf.retrieve_msg(b)
        assert exit_info.value.code == 0, cut
        b.close()


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
    monkeypatch.setattr(otf, "_retrieve_inference_msg", otf._retrieve_inference_msg)
    assert frontend_reader.install() and isinstance(otf._retrieve_buffer, BufferedFrontend)
    installed, parser = otf._retrieve_buffer, otf._retrieve_inference_msg
    assert isinstance(parser, BatchParser) and parser.frontend is installed
    assert frontend_reader.install() and otf._retrieve_buffer is installed  # once per process
    assert otf._retrieve_inference_msg is parser
