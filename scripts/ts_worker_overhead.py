"""What TorchServe 0.12's worker code costs per request around a handler, with and without servekit's parser.

    python scripts/ts_worker_overhead.py [--batches 300] [--body-kb 168]

Feeds real TorchServe messages (batches of 32 requests, eight headers each, a JPEG-sized body)
through TorchServe's ``retrieve_msg`` over servekit's buffered reader, once with TorchServe's own
parser, once with servekit's batch parser and once with that parser receiving bodies into a body
arena (as a worker does by default), then through ``ts.service.Service.predict`` with a
handler that only sets its three response headers and dumps a 5-entry answer, as ours does. Prints
CPU microseconds per request for each part.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl  # noqa: E402
from ts.protocol import otf_message_handler as otf  # noqa: E402
from ts.service import Service  # noqa: E402

from servekit.handlers.frontend_reader import BatchParser, BodyArena, BufferedFrontend  # noqa: E402

BATCH = 32
END = struct.pack("!i", -1)
HEADERS = [
    ("host", "127.0.0.1:8080"),
    ("user-agent", "servekit-loadgen/1"),
    ("accept", "*/*"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("content-type", "image/jpeg"),
    ("authorization", "Bearer abcdefghijklmnop"),
    ("content-length", "170000"),
]
ANSWER = {"predictions": [{"label": f"class {i}", "index": i, "probability": 0.123456} for i in range(5)]}


def _field(data: bytes) -> bytes:
    return struct.pack("!i", len(data)) + data


def message(body: bytes) -> bytes:
    """One inference message of BATCH requests, framed as TorchServe's frontend frames it."""
    requests = []
    for i in range(BATCH):
        head = _field(f"req-{i:08d}-abcdef-123456".encode())
        head += b"".join(_field(k.encode()) + _field(v.encode()) for k, v in HEADERS) + END
        requests.append(head + _field(b"body") + _field(b"image/jpeg") + _field(body) + END)
    return b"I" + b"".join(requests) + END


def handler(data: list[Any], context: Any) -> list[str]:
    """What our handler does around its pipeline: three headers and a JSON answer per request."""
    out = []
    for i in range(len(data)):
        context.get_request_header(i, "Content-Type")
        context.set_response_header(i, "X-Model-Version", "1.0")
        context.set_response_header(i, "X-Model-Name", "resnet50")
        context.set_response_header(i, "Content-Type", "application/json")
        out.append(json.dumps(ANSWER, separators=(",", ":")))
    return out


class _Conn:
    """Stands for the worker's socket: the reader below is bound to it."""


def run(data: bytes, batches: int, service: Service, ours: bool, arena: BodyArena | None = None) -> dict[str, float]:
    """CPU us per request: parsing the message, and Service.predict (handler and response)."""
    original_buffer, original_parser = otf._retrieve_buffer, otf._retrieve_inference_msg
    frontend = BufferedFrontend(original_buffer)
    conn = _Conn()
    frontend.conn, frontend.reader = conn, io.BufferedReader(io.BytesIO(data), buffer_size=1 << 20)  # type: ignore[assignment]
    otf._retrieve_buffer = frontend
    if ours:
        otf._retrieve_inference_msg = BatchParser(frontend, original_parser, arena)
    parse = predict = 0.0
    try:
        for _ in range(batches):
            t0 = time.process_time()
            _, batch = otf.retrieve_msg(conn)
            t1 = time.process_time()
            service.predict(batch)
            parse, predict = parse + t1 - t0, predict + time.process_time() - t1
    finally:
        otf._retrieve_buffer, otf._retrieve_inference_msg = original_buffer, original_parser
    n = batches * BATCH
    return {"parse_us": round(parse / n * 1e6, 1), "predict_us": round(predict / n * 1e6, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--body-kb", type=int, default=168)
    args = p.parse_args()
    logging.disable(logging.INFO)  # TorchServe logs every batch
    metrics = MetricsCacheYamlImpl(config_file_path=str(ROOT / "servekit" / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "resnet50"
    service = Service(
        "resnet50", "/tmp", {"model": {"modelName": "resnet50"}}, handler, None, BATCH, metrics_cache=metrics
    )
    service.set_cl_socket(None)
    data = message(os.urandom(args.body_kb * 1000)) * args.batches
    arena = BodyArena(16 << 20)  # what a CPU worker receives bodies into (page-locked on a GPU)
    rows = {
        f"{name} #{k}": run(data, args.batches, service, ours, body_arena)
        for k in (1, 2)
        for name, ours, body_arena in (
            ("torchserve", False, None),
            ("servekit", True, None),
            ("servekit with its body arena", True, arena),
        )
    }
    json_us = min(_timed(lambda: json.dumps(ANSWER, separators=(",", ":"))) for _ in range(3))
    print(json.dumps({"cpu": os.cpu_count(), "per_request_cpu_us": rows, "json_answer_us": json_us}, indent=1))


def _timed(fn: Any, n: int = 20000) -> float:
    t = time.process_time()
    for _ in range(n):
        fn()
    return round((time.process_time() - t) / n * 1e6, 2)


if __name__ == "__main__":
    main()
