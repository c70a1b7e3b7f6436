#!/usr/bin/env python3
"""A time-compressed week of a fresh TorchServe: keys expire every minute, new versions keep coming, a worker dies.

    python scripts/soak.py [--duration 600] [--threads 3] [--out build/soak.json]

Starts its own server (free loopback ports, its own run dir and store) with the reload watcher,
``token_expiration_min`` of ``--key-minutes`` and small log caps, then for ``--duration`` seconds:

- ``--threads`` servekit clients send held-out digit PNGs and check every label, beside one raw
  HTTP client (http.client, no servekit code) that reads ``key_file.json`` itself and re-reads it
  once when a key is refused, as an outside program would;
- a new version (v2.0, v3.0, ...) is published into the store every ``--publish-every`` seconds;
- one serving worker is SIGKILLed, midway between two publishes;
- ``servekit health`` runs every 10 s; frontend, worker and watcher RSS, the log folder's size and
  the watcher's heartbeat are sampled every ``--sample-every`` seconds.

It passes (exit 0) when every request got an answer, every failure (requests and health checks)
falls inside the killed worker's window, no refused key survived its one re-read, every published
version answered, the keys were renewed, the watcher never stopped polling, the logs stayed under
their cap and memory stayed flat (compared where the server is in the same state: just before each
publish, and at the end). Everything measured goes to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soak_report import report  # noqa: E402

from models.digits.model import encode, held_out  # noqa: E402
from servekit import health, server  # noqa: E402
from servekit.archive import ArchiveRequest, archive  # noqa: E402
from servekit.bench.procs import torchserve_role  # noqa: E402
from servekit.client import model_states, wait_until  # noqa: E402
from servekit.hooks import MODELS_DIR  # noqa: E402
from servekit.loadcheck import CheckedLoad  # noqa: E402
from servekit.reload import watch_command  # noqa: E402
from servekit.reload.status import STATUS_FILE  # noqa: E402
from servekit.store import publish  # noqa: E402

MODEL = "digits"
WATCHER_LOG_CAP = 4 * 10 << 20  # RotatingFileHandler: 10 MB x (3 + 1)


@dataclass
class RawResponse:
    """Just what CheckedLoad reads from an answer."""

    status_code: int
    text: str
    headers: dict

    def json(self):
        return json.loads(self.text)


class RawKeyClient:
    """An outside client: http.client, the key read from key_file.json, re-read once when refused."""

    def __init__(self, url: str, key_file: Path, timeout: float = 60.0):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port
        self.key_file = key_file
        self.timeout = timeout
        self.key = self._read()
        self.refusals = 0  # keys refused (then re-read once)

    def _read(self) -> str:
        for _ in range(100):  # TorchServe rewrites the file in place: a read can catch it half written
            try:
                return json.loads(self.key_file.read_text())["inference"]["key"]
            except (ValueError, KeyError, OSError):
                time.sleep(0.01)
        raise RuntimeError(f"cannot read {self.key_file}")

    def _reread(self, refused: str) -> None:
        """The file is rewritten just after the key changes: wait (at most 2 s) for the new key."""
        deadline = time.monotonic() + 2.0
        self.key = self._read()
        while self.key == refused and time.monotonic() < deadline:
            time.sleep(0.02)
            self.key = self._read()

    def _post(self, model: str, body: bytes, content_type: str) -> RawResponse:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(
                "POST",
                f"/predictions/{model}",
                body=body,
                headers={"Content-Type": content_type, "Authorization": f"Bearer {self.key}"},
            )
            resp = conn.getresponse()
            return RawResponse(resp.status, resp.read().decode(errors="replace"), dict(resp.getheaders()))
        finally:
            conn.close()

    def predict(self, model: str, body: bytes, content_type: str = "image/png") -> RawResponse:
        resp = self._post(model, body, content_type)
        if resp.status_code == 401 or (resp.status_code == 400 and "InvalidKeyException" in resp.text):
            self.refusals += 1
            self._reread(self.key)
            resp = self._post(model, body, content_type)
        return resp


@dataclass
class Sample:
    """Resident memory (MB) of the frontend, the workers and the watcher, and the logs' size, at one moment."""

    t: float
    frontend_mb: float
    workers_mb: float
    workers: int
    watcher_mb: float
    logs_mb: float
    preloader_mb: float = 0.0  # the process preloaded workers are forked from (0: plain workers)


class Soak:
    """One soak run: server, watcher, two kinds of client, sampler, health checks and the scheduled events."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        overrides = {**server.private_ports(), "token_expiration_min": str(args.key_minutes)}
        self.cfg = server.ServerConfig(work / "run", work / "store", overrides=overrides)
        self.watcher_port = server.free_port()
        self.samples = [(encode(img, "PNG"), str(label)) for img, label in held_out(16)]
        self.rss: list[Sample] = []
        self.health: list[tuple[float, bool, str]] = []
        self.heartbeats: list[float] = []
        self.events: dict[str, float] = {}
        self.published: list[tuple[str, float]] = []
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.watcher: subprocess.Popen | None = None
        self.watcher_alive_at_end = False

    def now(self) -> float:
        """Seconds since the start of the load."""
        return time.monotonic() - self.t0

    # -- setup ------------------------------------------------------------------------------------
    def publish_times(self) -> list[float]:
        """When each new version is published (the first soon, so even a short run sees one)."""
        first, every = min(30.0, self.args.publish_every / 2), self.args.publish_every
        return [first + i * every for i in range(100) if first + i * every < self.args.duration - 30]

    def kill_time(self) -> float:
        """Midway between the first two publishes (or after the only one), clear of both."""
        times = self.publish_times() + [self.args.duration]
        return (times[0] + times[1]) / 2 + 10 if len(times) > 1 else self.args.duration / 2

    def prepare(self) -> list[Path]:
        """Archives v1.0 (into the store) and one more version per publish (staged)."""
        staging = self.work / "staging"
        versions = [f"{i}.0" for i in range(1, len(self.publish_times()) + 2)]
        mars = [
            archive(ArchiveRequest(MODEL, MODELS_DIR / MODEL, staging, version=v), log=lambda *_: None)
            for v in versions
        ]
        publish(mars[0], self.cfg.model_store)
        return mars[1:]

    def start(self) -> None:
        """Server with v1.0 and small log caps, then the watcher (which renews the keys)."""
        os.environ["SERVEKIT_LOG_FILE_SIZE"] = self.args.log_file_size
        os.environ["SERVEKIT_LOG_FILES"] = str(self.args.log_files)
        proc = server.start(self.cfg, {MODEL: f"{MODEL}-v1.0.mar"}, log=lambda *_: None)
        health.wait_ready(self.cfg, [MODEL], timeout=300, proc=proc)
        logs = self.cfg.run_dir / "logs"
        self.watcher = subprocess.Popen(
            watch_command(
                self.cfg,
                "--interval",
                "0.5",
                "--log-file",
                str(logs / "watcher.log"),
                "--http-port",
                str(self.watcher_port),
            ),
            stdout=open(logs / "watcher.out", "wb"),
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        metrics_url = f"http://127.0.0.1:{self.watcher_port}/metrics"
        wait_until(lambda: self.watcher_running() and requests.get(metrics_url, timeout=5).ok, 120, what="the watcher")

    def watcher_running(self) -> bool:
        """True while the watcher runs; a watcher that exited stops the soak at once, with its output."""
        if self.watcher is None or self.watcher.poll() is None:
            return True
        out = (self.cfg.run_dir / "logs" / "watcher.out").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the watcher exited with {self.watcher.returncode}:\n{out}")

    def log_cap_mb(self) -> float:
        """What the run dir's logs may hold: five log4j logs at size x (files + 1), the watcher's, and slack."""
        size = float(self.args.log_file_size.split()[0]) * (1 << 20)
        return (5 * size * (self.args.log_files + 1) + WATCHER_LOG_CAP + (1 << 20)) / 1e6

    # -- sampling ---------------------------------------------------------------------------------
    def sample_loop(self) -> None:
        pgid = server.read_pid(self.cfg.run_dir)
        logs = self.cfg.run_dir / "logs"
        while not self.stop.is_set():
            frontend = workers = preloader = 0.0
            count = 0
            for pid in server.group_members(pgid):
                try:
                    p = psutil.Process(pid)
                    rss = p.memory_info().rss / 1e6
                    # The workers that run the model: forks of the preloader, or TorchServe's own.
                    role = torchserve_role(p)
                    if role == "frontend":
                        frontend += rss
                    elif role == "workers":
                        workers += rss
                        count += 1
                    elif role == "preloader":
                        preloader += rss
                except psutil.Error:
                    continue
            try:
                watcher = psutil.Process(self.watcher.pid).memory_info().rss / 1e6 if self.watcher else 0.0
            except psutil.Error:
                watcher = 0.0
            size = sum(f.stat().st_size for f in logs.iterdir() if f.is_file()) / 1e6
            self.rss.append(
                Sample(
                    round(self.now(), 1),
                    round(frontend, 1),
                    round(workers, 1),
                    count,
                    round(watcher, 1),
                    round(size, 2),
                    round(preloader, 1),
                )
            )
            try:
                beat = json.loads((self.cfg.run_dir / STATUS_FILE).read_text())["watcher"]["heartbeat"]
                if not self.heartbeats or self.heartbeats[-1] != beat:
                    self.heartbeats.append(beat)
            except (OSError, ValueError, KeyError):
                pass
            self.stop.wait(self.args.sample_every)

    def health_loop(self) -> None:
        """`servekit health` (the readiness check users and the image run) every 10 s."""
        cmd = [sys.executable, "-m", "servekit.cli", "health", *self.cfg.cli_args()]
        while not self.stop.wait(10.0):
            t = round(self.now(), 1)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
            self.health.append((t, proc.returncode == 0, (proc.stdout + proc.stderr).strip()[-300:]))

    # -- the events -------------------------------------------------------------------------------
    def publish_next(self, mar: Path) -> None:
        """Publish one version atomically, then wait until it is the only one serving."""
        version = mar.stem.split("-v", 1)[1]
        self.published.append((version, self.now()))
        publish(mar, self.cfg.model_store)
        mgmt = self.cfg.management()

        def rolled_out() -> bool:
            self.watcher_running()
            states = [s for s in model_states(mgmt) if s.name == MODEL]
            return [(s.version, s.default) for s in states] == [(version, True)] and states[0].ready_workers > 0

        wait_until(rolled_out, 300, what=f"v{version} to be the only version")
        self.events[f"v{version}_done"] = self.now()

    def kill_worker(self, loads: list[CheckedLoad]) -> None:
        """SIGKILL the serving worker and time its replacement."""
        mgmt = self.cfg.management()
        [old] = [int(w["pid"]) for w in mgmt.describe(MODEL, "")[0]["workers"]]
        self.events["kill"] = self.now()
        os.kill(old, signal.SIGKILL)

        def replaced() -> bool:
            workers = mgmt.describe(MODEL, "")[0]["workers"]
            return any(w["status"] == "READY" and int(w["pid"]) != old for w in workers)

        wait_until(replaced, self.args.recovery_s, interval=0.2, what="a new worker")
        self.events["worker_ready"] = self.now()
        wait_until(
            lambda: all(x.ok_streak() >= 10 for x in loads), self.args.recovery_s, interval=0.2, what="success again"
        )
        self.events["recovered"] = self.now()

    # -- run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        staged = self.prepare()
        self.start()
        inference = self.cfg.address("inference_address")
        ours = CheckedLoad(
            self.cfg.inference,
            MODEL,
            self.samples,
            threads=self.args.threads,
            timeout=self.args.request_timeout,
            clock=self.now,
        )
        raw_clients: list[RawKeyClient] = []

        def raw_client() -> RawKeyClient:
            raw_clients.append(RawKeyClient(inference, self.cfg.key_file, self.args.request_timeout))
            return raw_clients[-1]

        raw = CheckedLoad(raw_client, MODEL, self.samples, threads=1, timeout=self.args.request_timeout, clock=self.now)
        threads = [threading.Thread(target=f, daemon=True) for f in (self.sample_loop, self.health_loop)]
        plan = sorted([(t, "publish") for t in self.publish_times()] + [(self.kill_time(), "kill")])
        self.t0 = time.monotonic()
        for t in threads:
            t.start()
        ours.start()
        raw.start()
        try:
            for at, what in plan:
                time.sleep(max(0.0, at - self.now()))
                self.kill_worker([ours, raw]) if what == "kill" else self.publish_next(staged.pop(0))
            time.sleep(max(0.0, self.args.duration - self.now()))
        finally:
            self.stop.set()
            ours.stop()
            raw.stop()
            for t in threads:
                t.join(15)
            metrics = self._watcher_metrics()
            self.watcher_alive_at_end = self.watcher is not None and self.watcher.poll() is None
            if self.watcher is not None:
                self.watcher.terminate()
                self.watcher.wait(30)
            server.stop(self.cfg.run_dir, log=lambda *_: None)
        return report(self, ours, raw, sum(c.refusals for c in raw_clients), metrics)

    def _watcher_metrics(self) -> dict[str, float]:
        try:
            text = requests.get(f"http://127.0.0.1:{self.watcher_port}/metrics", timeout=10).text
        except requests.RequestException:
            return {}
        return {
            line.split(" ")[0]: float(line.split(" ")[1])
            for line in text.splitlines()
            if line.startswith(("servekit_key_renewals_total", "servekit_watcher_polls_total"))
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--threads", type=int, default=3, help="servekit clients, beside the one raw client (default 3)")
    p.add_argument("--key-minutes", type=float, default=1.0, help="token_expiration_min (default 1)")
    p.add_argument("--publish-every", type=float, default=120.0, help="seconds between new versions (default 120)")
    p.add_argument("--log-file-size", default="1 MB", help="log4j rollover size (default '1 MB')")
    p.add_argument("--log-files", type=int, default=2, help="rolled files kept per log (default 2)")
    p.add_argument("--sample-every", type=float, default=3.0, help="seconds between RSS samples")
    p.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request")
    p.add_argument("--recovery-s", type=float, default=30.0, help="the longest allowed kill-to-recovery time")
    p.add_argument("--out", type=Path, default=ROOT / "build" / "soak.json")
    p.add_argument("--work-dir", type=Path, help="keep the run dir, store and logs here (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work_dir:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        result = Soak(args, args.work_dir.resolve()).run()
    else:
        with tempfile.TemporaryDirectory(prefix="servekit-soak-") as tmp:
            result = Soak(args, Path(tmp)).run()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("failures", "rss_samples")}
    print(json.dumps(summary, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
