"""Closed-loop HTTP load: several processes, each with threads that keep one connection open apiece."""

from __future__ import annotations

import http.client
import json
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# (start wall time, end wall time, HTTP status or 0 for a transport error / -1 for a bad answer, error text)
Record = tuple[float, float, int, str | None]


@dataclass(frozen=True)
class Target:
    """What the requests send, and what a good answer looks like."""

    url: str
    # (body, its Content-Type): each connection sends them in turn, starting from its own index, so
    # that concurrent requests carry different images and a batch mixes them as real traffic does.
    bodies: tuple[tuple[bytes, str], ...]
    headers: dict[str, str]  # sent with every body
    topk: int | None = None  # entries a good answer has (None: only the status is checked)
    timeout: float = 300.0


@dataclass
class LoadResult:
    """One measured window at a fixed concurrency."""

    concurrency: int
    processes: int
    duration_s: float
    completed: int
    latencies_ms: list[float]
    errors: int
    error_samples: list[str] = field(default_factory=list)
    loadgen_cpu_s: float = 0.0
    probes: dict[str, float] = field(default_factory=dict)  # per second, over the window

    @property
    def rps(self) -> float:
        """Successful responses per second inside the window."""
        return self.completed / self.duration_s if self.duration_s else 0.0

    @property
    def loadgen_cores(self) -> float:
        """CPU cores the load generator itself used during the window."""
        return self.loadgen_cpu_s / self.duration_s if self.duration_s else 0.0


def valid_answer(body: bytes, topk: int) -> bool:
    """Our handler's ``{"predictions": [k items]}`` or the stock handler's ``{label: prob}`` with k entries."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    if "predictions" in data:
        return isinstance(data["predictions"], list) and len(data["predictions"]) == topk
    return len(data) == topk and all(isinstance(v, (int, float)) for v in data.values())


def _post(
    conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict[str, str], target: Target
) -> tuple[int, str | None, bool]:
    """One request on a kept-alive connection: (status, error text, whether the connection is still usable)."""
    conn.request("POST", path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        return resp.status, f"HTTP {resp.status}: {data[:200].decode(errors='replace')}", not resp.will_close
    if target.topk is not None and not valid_answer(data, target.topk):
        return -1, f"malformed answer: {data[:200].decode(errors='replace')}", not resp.will_close
    return 200, None, not resp.will_close


def _client_loop(target: Target, first: int, start_at: float, stop_at: float, out: list[Record]) -> None:
    """Send requests back to back from ``start_at`` until ``stop_at``, the bodies in turn from index ``first``."""
    parts = urlsplit(target.url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    sends = [(body, {**target.headers, "Content-Type": ctype}) for body, ctype in target.bodies]
    conn: http.client.HTTPConnection | None = None
    time.sleep(max(0.0, start_at - time.time()))
    sent = first
    while (t0 := time.time()) < stop_at:
        if conn is None:
            conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=target.timeout)
        body, headers = sends[sent % len(sends)]
        sent += 1
        try:
            status, err, keep = _post(conn, path, body, headers, target)
        except (OSError, http.client.HTTPException) as exc:
            status, err, keep = 0, f"{type(exc).__name__}: {exc}", False
        out.append((t0, time.time(), status, err))
        if not keep:
            conn.close()
            conn = None
    if conn is not None:
        conn.close()


def _cpu_probe(measure_from: float, stop_at: float, cpu: list[float]) -> None:
    """Read this process's CPU time at the window's start and end."""
    time.sleep(max(0.0, measure_from - time.time()))
    cpu.append(time.process_time())
    time.sleep(max(0.0, stop_at - time.time()))
    cpu.append(time.process_time())


def _process_main(
    target: Target,
    threads: int,
    first: int,
    warmup: float,
    duration: float,
    start_value,
    ready: mp.Queue,
    results: mp.Queue,
) -> None:
    """One load process: report ready, wait for the shared start instant, run ``threads`` clients.

    Its clients are connections ``first`` .. ``first + threads - 1`` of the whole load.
    """
    ready.put(os.getpid())
    while start_value.value == 0.0:
        time.sleep(0.005)
    start_at = start_value.value
    measure_from, stop_at = start_at + warmup, start_at + warmup + duration
    records: list[list[Record]] = [[] for _ in range(threads)]
    cpu: list[float] = []
    workers = [
        threading.Thread(target=_client_loop, args=(target, first + i, start_at, stop_at, records[i]), daemon=True)
        for i in range(threads)
    ]
    workers.append(threading.Thread(target=_cpu_probe, args=(measure_from, stop_at, cpu), daemon=True))
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    cpu_s = cpu[1] - cpu[0] if len(cpu) == 2 else 0.0
    results.put((os.getpid(), [r for rs in records for r in rs], cpu_s))


def split(concurrency: int, processes: int) -> list[int]:
    """Connections per process: as even as possible, none empty."""
    processes = max(1, min(processes, concurrency))
    return [concurrency // processes + (i < concurrency % processes) for i in range(processes)]


def default_processes(concurrency: int, cpus: int | None = None) -> int:
    """A quarter of the machine's cores (at most 8), never more processes than connections."""
    cpus = cpus or os.cpu_count() or 1
    return max(1, min(concurrency, cpus // 4, 8))


def summarize(
    records: list[Record], measure_from: float, stop_at: float, concurrency: int, processes: int, cpu_s: float
) -> LoadResult:
    """Throughput counts answers that ended inside the window; latencies, requests that started in it."""
    duration = stop_at - measure_from
    ok_done = sum(1 for s, e, st, _ in records if st == 200 and measure_from <= e <= stop_at)
    started = [r for r in records if measure_from <= r[0] < stop_at]
    latencies = [(e - s) * 1000.0 for s, e, st, _ in started if st == 200]
    failed = [err or f"status {st}" for _, _, st, err in started if st != 200]
    samples = list(dict.fromkeys(failed))[:5]
    return LoadResult(concurrency, processes, duration, ok_done, latencies, len(failed), samples, cpu_s)


def _probe_window(
    probes: dict[str, Callable[[], float]], measure_from: float, stop_at: float, out: dict[str, float]
) -> None:
    """Rate of change of each probe (e.g. CPU seconds of the server) between the window's edges."""
    time.sleep(max(0.0, measure_from - time.time()))
    first = {k: f() for k, f in probes.items()}
    time.sleep(max(0.0, stop_at - time.time()))
    out.update({k: (f() - first[k]) / max(1e-9, stop_at - measure_from) for k, f in probes.items()})


def run_load(
    target: Target,
    concurrency: int,
    duration: float,
    warmup: float = 2.0,
    processes: int | None = None,
    probes: dict[str, Callable[[], float]] | None = None,
) -> LoadResult:
    """Keep ``concurrency`` requests in flight for ``warmup`` + ``duration`` seconds; measure the last part.

    ``probes`` are read in this process at the window's start and end; their rates come back in ``probes``.
    """
    ctx = mp.get_context("spawn")  # the parent may hold torch threads: never fork it
    shares = split(concurrency, processes or default_processes(concurrency))
    start_value = ctx.Value("d", 0.0)
    ready, results = ctx.Queue(), ctx.Queue()
    firsts = [sum(shares[:i]) for i in range(len(shares))]
    procs = [
        ctx.Process(
            target=_process_main,
            args=(target, n, first, warmup, duration, start_value, ready, results),
            daemon=True,
        )
        for n, first in zip(shares, firsts, strict=True)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            ready.get(timeout=120)
        start_at = time.time() + 0.2
        start_value.value = start_at
        rates: dict[str, float] = {}
        prober = threading.Thread(
            target=_probe_window,
            daemon=True,
            args=(probes or {}, start_at + warmup, start_at + warmup + duration, rates),
        )
        prober.start()
        deadline = start_at + warmup + duration + target.timeout + 30
        collected = []
        for _ in procs:
            collected.append(results.get(timeout=max(1.0, deadline - time.time())))
    except queue.Empty:
        raise RuntimeError("a load generator process did not report back in time") from None
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    records = [r for _, recs, _ in collected for r in recs]
    cpu_s = sum(c for _, _, c in collected)
    prober.join()
    measure_from = start_at + warmup
    result = summarize(records, measure_from, measure_from + duration, concurrency, len(procs), cpu_s)
    result.probes = rates
    return result
