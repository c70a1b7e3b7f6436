"""How long a new worker takes to become READY, plain and preloaded, on this machine.

    python scripts/worker_start.py [--model resnet50] [--repeats 4] [--out worker-start.json]

For each mode: a server with one worker of ``--model``, then ``--repeats`` times a synchronous
scale to two workers (timed until both are READY) and back to one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servekit import health, preload, server  # noqa: E402
from servekit.archive import ArchiveRequest, archive  # noqa: E402
from servekit.client import wait_until  # noqa: E402
from servekit.config import available_cpus  # noqa: E402
from servekit.hooks import MODELS_DIR  # noqa: E402


def measure(model: str, mar: Path, preloaded: bool, repeats: int) -> dict:
    """Start a server in this mode, time ``repeats`` scale-ups to two READY workers."""
    tmp = Path(tempfile.mkdtemp(prefix="worker-start-"))
    store = tmp / "store"
    store.mkdir()
    shutil.copy2(mar, store)
    os.environ[preload.ENV] = "1" if preloaded else "0"
    cfg = server.ServerConfig(
        tmp / "run", store, overrides={**server.private_ports(), "default_workers_per_model": "1"}
    )
    t0 = time.monotonic()
    proc = server.start(cfg, {model: mar.name}, log=lambda *_: None)
    try:
        health.wait_ready(cfg, [model], timeout=600, proc=proc)
        started = time.monotonic() - t0
        mgmt = cfg.management()
        times = []
        for _ in range(repeats):
            t = time.monotonic()
            assert mgmt.scale(model, 2).status_code == 200
            wait_until(lambda: sum(w["status"] == "READY" for w in mgmt.describe(model)[0]["workers"]) == 2, 600, 0.05)
            times.append(round(time.monotonic() - t, 2))
            assert mgmt.scale(model, 1).status_code == 200
            time.sleep(1)
    finally:
        server.stop(cfg.run_dir, log=lambda *_: None)
        shutil.rmtree(tmp, ignore_errors=True)
    return {"server_start_to_ready_s": round(started, 2), "worker_ready_s": times, "median_s": statistics.median(times)}


def main() -> int:
    """Measure both modes and write the report."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("worker-start.json"))
    args = parser.parse_args()
    staging = Path(tempfile.mkdtemp(prefix="worker-start-mar-"))
    mar = archive(ArchiveRequest(args.model, MODELS_DIR / args.model, staging, version="1.0"), log=lambda *_: None)
    report = {"model": args.model, "cpus": available_cpus(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for name, preloaded in (("plain", False), ("preloaded", True)):
        report[name] = measure(args.model, mar, preloaded, args.repeats)
    shutil.rmtree(staging, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
