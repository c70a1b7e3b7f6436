#!/usr/bin/env python3
"""Bounded soak test of a fresh TorchServe: steady load, one hot reload, one worker SIGKILL.

    python scripts/soak.py [--duration 300] [--threads 4] [--out build/soak.json]

Starts its own server (free loopback ports, its own run dir and store) serving digits v1.0 with the
reload watcher, sends predictions from ``--threads`` clients for ``--duration`` seconds, publishes
digits v2.0 into the store at 1/4 of the run and SIGKILLs the serving worker at 5/8 of it (or 2 s
after the reload has finished, if that is later). Every
request's outcome is recorded; frontend and worker RSS are sampled every ``--sample-every`` seconds.

It passes (exit 0) when every request got an HTTP answer, every failure falls inside the killed
worker's window (kill -> replacement ready, at most --recovery-s), the reload caused no failure,
v2.0 answered after the reload, and RSS stayed flat: frontend and worker memory step up at events
(reload, new worker), so "flat" is judged from 30 s after the recovery to the end (at most 5 % + 20 MB
of growth); a run too short for that window is judged over the whole run (15 % + 50 MB). Results,
including every failure and every RSS sample, go to --out as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.digits.model import encode, held_out  # noqa: E402
from servekit import server  # noqa: E402
from servekit.archive import ArchiveRequest, archive  # noqa: E402
from servekit.hooks import MODELS_DIR  # noqa: E402
from servekit.client import model_states, wait_until  # noqa: E402
from servekit.loadcheck import CheckedLoad  # noqa: E402

MODEL = "digits"


@dataclass
class Sample:
    """Resident memory (MB) of the frontend and of all Python workers at one moment."""

    t: float
    frontend_mb: float
    workers_mb: float
    workers: int


class Soak:
    """One soak run: server, watcher, load, sampler, and the two injected events."""

    def __init__(self, args: argparse.Namespace, work: Path):
        self.args = args
        self.work = work
        self.overrides = server.private_ports()
        self.cfg = server.ServerConfig(work / "run", work / "store", overrides=self.overrides)
        self.samples = [(encode(img, "PNG"), str(label)) for img, label in held_out(16)]
        self.load = CheckedLoad(self.cfg.inference, MODEL, self.samples, threads=args.threads,
                                timeout=args.request_timeout, clock=self.now)
        self.rss: list[Sample] = []
        self.events: dict[str, float] = {}
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def now(self) -> float:
        """Seconds since the start of the load."""
        return time.monotonic() - self.t0

    # -- setup ------------------------------------------------------------------------------------
    def prepare(self) -> Path:
        """Archives v1.0 (into the store) and v2.0 (staged for the reload)."""
        staging = self.work / "staging"
        for version in ("1.0", "2.0"):
            archive(ArchiveRequest(MODEL, MODELS_DIR / MODEL, staging, version=version), log=lambda *_: None)
        self.cfg.model_store.mkdir(parents=True)
        shutil.copy2(staging / f"{MODEL}-v1.0.mar", self.cfg.model_store)
        return staging / f"{MODEL}-v2.0.mar"

    def start(self) -> subprocess.Popen | None:
        """Server with v1.0, then the reload watcher (if this install has one)."""
        proc = server.start(self.cfg, {MODEL: f"{MODEL}-v1.0.mar"}, log=lambda *_: None)
        server.wait_ready(self.cfg, [MODEL], timeout=300, proc=proc)
        if importlib.util.find_spec("servekit.reload") is None:
            return None
        from servekit.reload import watch_command

        log = open(self.work / "watcher.log", "wb")
        return subprocess.Popen(watch_command(self.cfg, "--interval", "0.5"), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    # -- sampling ---------------------------------------------------------------------------------
    def sample_loop(self) -> None:
        pgid = server.read_pid(self.cfg.run_dir)
        while not self.stop.is_set():
            frontend = workers = 0.0
            count = 0
            for pid in server.group_members(pgid):
                try:
                    p = psutil.Process(pid)
                    rss = p.memory_info().rss / 1e6
                    if "java" in p.name():
                        frontend += rss
                    elif "model_service_worker" in " ".join(p.cmdline()):
                        workers += rss
                        count += 1
                except psutil.Error:
                    continue
            self.rss.append(Sample(round(self.now(), 1), round(frontend, 1), round(workers, 1), count))
            self.stop.wait(self.args.sample_every)

    # -- the two events ---------------------------------------------------------------------------
    def reload(self, v2: Path, watched: bool) -> None:
        """Publish v2.0 into the store (atomically); without a watcher, roll out through the API."""
        self.events["publish"] = self.now()
        part = self.cfg.model_store / f".{v2.name}.part"
        shutil.copy2(v2, part)
        os.replace(part, self.cfg.model_store / v2.name)
        mgmt = self.cfg.management()
        if not watched:
            mgmt.register(v2.name, initial_workers=1)
            mgmt.set_default(MODEL, "2.0")
            mgmt.unregister(MODEL, "1.0")

        def rolled_out() -> bool:
            states = [s for s in model_states(mgmt) if s.name == MODEL]
            return [(s.version, s.default) for s in states] == [("2.0", True)] and states[0].ready_workers > 0

        wait_until(rolled_out, 300, what="v2.0 to be the only version")
        self.events["reload_done"] = self.now()

    def kill_worker(self) -> None:
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
        wait_until(lambda: self.load.ok_streak() >= 20, self.args.recovery_s, interval=0.2, what="success again")
        self.events["recovered"] = self.now()

    # -- run --------------------------------------------------------------------------------------
    def run(self) -> dict:
        v2 = self.prepare()
        watcher = self.start()
        sampler = threading.Thread(target=self.sample_loop, daemon=True)
        self.t0 = time.monotonic()
        sampler.start()
        self.load.start()
        duration = self.args.duration
        try:
            time.sleep(duration * 0.25)
            self.reload(v2, watched=watcher is not None)
            # The kill comes after the reload has settled, so each failure has one cause.
            time.sleep(max(2.0, duration * 0.625 - self.now()))
            self.kill_worker()
            time.sleep(max(0.0, duration - self.now()))
        finally:
            self.stop.set()
            self.load.stop()
            sampler.join(10)
            if watcher is not None:
                watcher.terminate()
                watcher.wait(30)
            server.stop(self.cfg.run_dir, log=lambda *_: None)
        return self.report(watched=watcher is not None)

    def report(self, watched: bool) -> dict:
        outs = sorted(self.load.snapshot(), key=lambda o: o.start)
        failures = [o for o in outs if not o.ok]
        ev = self.events
        window = (ev["kill"] - 0.5, ev["worker_ready"] + 1.0)
        in_window = [window[0] <= o.end and o.start <= window[1] for o in failures]
        outside = [o for o, inside in zip(failures, in_window) if not inside]
        during_reload = [o for o, inside in zip(failures, in_window)
                         if not inside and ev["publish"] <= o.end and o.start <= ev["reload_done"]]
        latencies = sorted((o.end - o.start) * 1000 for o in outs if o.ok)
        warm = [s for s in self.rss if s.t >= min(10.0, self.args.duration / 10)] or self.rss
        first_v2 = next((o.end for o in outs if o.version == "2.0"), None)
        # Memory steps up at each event (new worker, reload); a leak shows as growth while nothing
        # happens. The quiet window starts 30 s after recovery; a run too short to have one reports
        # memory but cannot judge flatness (the check is then None, not a pass or a failure).
        quiet = [s for s in self.rss if s.t >= ev["recovered"] + 30]
        judged = len(quiet) >= 4
        basis, slack, allowance = (quiet, 0.05, 20.0) if judged else (warm, 0.0, 0.0)

        def mem(key: str) -> dict:
            values = [getattr(s, key) for s in warm]
            steady = [getattr(s, key) for s in basis]
            return {"start": values[0], "end": values[-1], "max": max(values), "min": min(values),
                    "steady_from_s": basis[0].t, "steady_start": steady[0], "steady_end": steady[-1]}

        frontend, workers = mem("frontend_mb"), mem("workers_mb")

        def flat(m: dict) -> bool | None:
            return m["steady_end"] <= m["steady_start"] * (1 + slack) + allowance if judged else None

        checks = {
            "every_request_answered": all(o.status is not None for o in outs),
            "failures_only_in_kill_window": not outside,
            "no_failure_during_reload": not during_reload,
            "v2_answers_after_reload": bool(outs) and outs[-1].version == "2.0",
            "recovered_within_limit": ev["recovered"] - ev["kill"] <= self.args.recovery_s,
            "frontend_rss_flat": flat(frontend),
            "worker_rss_flat": flat(workers),
        }
        return {
            "duration_s": self.args.duration,
            "threads": self.args.threads,
            "reload_by": "watcher" if watched else "management API",
            "requests": len(outs),
            "ok": sum(o.ok for o in outs),
            "failed": len(failures),
            "throughput_rps": round(len(outs) / max(1e-9, self.args.duration), 1),
            "latency_ms": {
                "p50": round(statistics.median(latencies), 1) if latencies else None,
                "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
                "max": round(latencies[-1], 1) if latencies else None,
            },
            "events_s": {k: round(v, 2) for k, v in ev.items()},
            "first_v2_answer_s": round(first_v2, 2) if first_v2 is not None else None,
            "kill_window_s": [round(window[0], 2), round(window[1], 2)],
            "recovery_s": round(ev["recovered"] - ev["kill"], 2),
            "rss_mb": {"frontend": frontend, "workers": workers},
            "checks": checks,
            "passed": all(v is not False for v in checks.values()),
            "failures": [asdict(o) for o in failures],
            "rss_samples": [asdict(s) for s in self.rss],
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=300.0, help="seconds of load (default 300)")
    p.add_argument("--threads", type=int, default=4, help="concurrent clients (default 4)")
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
    summary = {k: result[k] for k in ("duration_s", "requests", "failed", "throughput_rps", "latency_ms",
                                      "events_s", "recovery_s", "rss_mb", "checks", "passed")}
    print(json.dumps(summary, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
