"""Shared pieces of the reload tests: publishing into a store, and the reload watcher as a process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from servekit import reload, server
from servekit.client import wait_until
from servekit.reload.status import STATUS_FILE

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 0.5  # the watcher's poll interval in these tests, seconds


def publish(src: Path, store: Path) -> float:
    """Publish like `servekit archive` does: copy to a hidden .part file, then rename; returns the rename time."""
    target = store / src.name
    part = store / f".{target.name}.part"
    shutil.copyfile(src, part)
    os.replace(part, target)
    return time.monotonic()


class WatcherProcess:
    """`python -m servekit.reload watch` as its own process, as `servekit serve` runs it."""

    def __init__(self, cfg: server.ServerConfig, log: Path, *extra: str):
        self.cfg, self.log, self.extra = cfg, log, extra
        self.proc: subprocess.Popen | None = None

    def start(self) -> WatcherProcess:
        cmd = reload.watch_command(self.cfg, "--interval", str(INTERVAL), *self.extra)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        return self

    def stop(self) -> int | None:
        """SIGTERM and wait; the exit code (None if it was not running)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def status(self) -> dict:
        path = self.cfg.run_dir / STATUS_FILE
        return json.loads(path.read_text()) if path.exists() else {}

    def wait_polls(self, count: int = 2, timeout: float = 60) -> dict:
        """Wait for ``count`` further completed polls of this watcher process; the status after them."""
        seen: list[str] = []

        def polled():
            w = self.status().get("watcher", {})
            assert self.proc.poll() is None, f"watcher exited with {self.proc.returncode}:\n{self.tail()}"
            if w.get("pid") == self.proc.pid and w.get("state") == "running" and w.get("heartbeat") not in seen:
                seen.append(w["heartbeat"])
            return len(seen) > count

        wait_until(polled, timeout, interval=INTERVAL / 2, what=f"{count} polls of the watcher")
        return self.status()

    def tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"
