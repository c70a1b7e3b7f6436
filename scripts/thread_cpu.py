"""CPU per thread of a benchmarked server's workers over one window, started from the bench's log.

    python3 scripts/thread_cpu.py --log bench.log [--after "ready in"] [--delay 5] [--seconds 10]

Waits until ``--log`` contains ``--after`` (the bench's "ready in" line: the server is up and its
first window starts), sleeps ``--delay`` seconds (the bench's warm-up), then reads every worker
thread's user and system time (psutil) at the start and end of a ``--seconds`` window. Prints
JSON: per worker process, each thread's name and CPU seconds in the window, busiest first.
Workers are found as the bench finds them (``servekit.bench.procs.torchserve_role``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from servekit.bench.procs import torchserve_role  # noqa: E402


def workers() -> list[psutil.Process]:
    """Every live TorchServe worker on this machine."""
    found = []
    for p in psutil.process_iter():
        try:
            if torchserve_role(p) == "workers":
                found.append(p)
        except psutil.Error:
            continue
    return found


def thread_times(proc: psutil.Process) -> dict[int, tuple[str, float]]:
    """Each thread of ``proc``: its name and user + system CPU seconds so far."""
    out = {}
    for t in proc.threads():
        try:
            name = psutil.Process(t.id).name()  # on Linux a thread id opens as a process: its own name
        except psutil.Error:
            continue
        out[t.id] = (name, t.user_time + t.system_time)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--after", default="ready in")
    p.add_argument("--delay", type=float, default=5.0)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    while not (args.log.is_file() and args.after in args.log.read_text(errors="replace")):
        time.sleep(0.2)
    time.sleep(args.delay)
    procs = workers()
    before = {w.pid: thread_times(w) for w in procs}
    time.sleep(args.seconds)
    report = {}
    for w in procs:
        after = thread_times(w)
        rows = [
            {"tid": tid, "name": name, "cpu_s": round(cpu - before[w.pid].get(tid, (name, 0.0))[1], 3)}
            for tid, (name, cpu) in after.items()
        ]
        rows.sort(key=lambda r: -r["cpu_s"])
        report[str(w.pid)] = {"cpu_s": round(sum(r["cpu_s"] for r in rows), 3), "threads": rows[:12]}
    print(json.dumps({"seconds": args.seconds, "workers": report}, indent=1))


if __name__ == "__main__":
    main()
