"""CPU per request of reading TorchServe batch messages off a Unix socket, by buffer size and body allocation.

    python scripts/worker_reads.py [--batches 300] [--body-kb 168] [--repeats 4]

A writer process sends real inference messages (batches of 32 requests, eight headers each, a
JPEG-sized body, framed as TorchServe's frontend frames them) down a Unix socket, as the frontend
does to a worker; this process parses them with servekit's batch parser over a buffered reader of
each size, allocating each body either zero-filled (``bytearray(n)``, what the parser does) or
uninitialised (CPython's ``PyByteArray_FromStringAndSize(NULL, n)``). The two processes are pinned
to different CPUs. Prints the best of ``--repeats`` CPU microseconds per request for each variant.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import ts_worker_overhead as messages  # noqa: E402

from servekit.handlers import frontend_reader  # noqa: E402

_uninitialised = ctypes.pythonapi.PyByteArray_FromStringAndSize
_uninitialised.restype = ctypes.py_object
_uninitialised.argtypes = [ctypes.c_char_p, ctypes.c_ssize_t]


def _writer(sock: socket.socket, data: bytes, batches: int, cpu: int) -> None:
    os.sched_setaffinity(0, {cpu})
    for _ in range(batches):
        sock.sendall(data)
    sock.close()


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(data: bytes, batches: int, buffer_bytes: int, uninitialised: bool, writer_cpu: int) -> float:
    """CPU microseconds per request of parsing ``batches`` messages with this variant."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    writer = mp.get_context("fork").Process(target=_writer, args=(theirs, data, batches, writer_cpu))
    writer.start()
    theirs.close()
    reader = ours.makefile("rb", buffering=buffer_bytes)
    if uninitialised:
        frontend_reader.bytearray = lambda n: _uninitialised(None, n)  # type: ignore[attr-defined]
    requests, c0 = 0, _cpu_seconds()
    try:
        for _ in range(batches):
            if reader.read(1) != b"I":
                raise RuntimeError("out of step with the writer")
            requests += len(frontend_reader._parse_batch(reader))
    finally:
        if uninitialised:
            del frontend_reader.bytearray  # type: ignore[attr-defined]
    spent = _cpu_seconds() - c0
    writer.join()
    ours.close()
    return round(spent / requests * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=300)
    p.add_argument("--body-kb", type=int, default=168)
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})
    data = messages.message(os.urandom(args.body_kb * 1000))
    rows: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for kib in (1024, 256, 64, 16):
            for uninit in (False, True):
                name = f"{kib} KiB buffer, {'uninitialised' if uninit else 'zero-filled'} bodies"
                rows.setdefault(name, []).append(run(data, args.batches, kib << 10, uninit, cpus[-1]))
    best = {name: min(v) for name, v in rows.items()}
    print(json.dumps({"cpus": os.cpu_count(), "best_cpu_us_per_request": best, "all": rows}, indent=1))
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


if __name__ == "__main__":
    main()
