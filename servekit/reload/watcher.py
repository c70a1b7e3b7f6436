"""The watch loop: on every poll, bring each model in line with the store and the versions file."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from filelock import Timeout

from ..client import ModelState
from ..store import Scan, StoreScanner, archive_min_workers, is_candidate, left_store, version_key
from .pins import Pin, VersionsFile, choose_version
from .status import now_iso
from .switch import Reloader

log = logging.getLogger("servekit.reload")


class Watcher:
    """Reconciles the server with the store on every poll; idempotent, so a restart just picks up."""

    def __init__(
        self,
        reloader: Reloader,
        store: Path,
        versions: VersionsFile,
        interval: float = 1.0,
        unregister_removed: bool = True,
    ):
        self.reloader = reloader
        self.store = store
        self.versions = versions
        self.interval = interval
        self.unregister_removed = unregister_removed
        self.scanner = StoreScanner(store, settle=interval)
        self.wake = threading.Event()
        self.failed_polls = 0
        self.last_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a failed poll is logged and the next one tries again."""
        r = self.reloader
        started = now_iso()
        observer = self._observe()
        log.info(
            "watching %s every %.2g s (server %s, versions from %s)",
            self.store,
            self.interval,
            r.mgmt.base,
            self.versions.path,
        )
        waiting = False
        try:
            while not stop.is_set():
                try:
                    with r.lock.acquire(timeout=max(1.0, self.interval)):
                        waiting = False
                        self._poll(started)
                    r.metrics.polls.labels("success").inc()
                    r.metrics.heartbeat.set(time.time())
                except Timeout:
                    if not waiting:
                        log.info("a rollout elsewhere holds %s; waiting for it", r.lock.lock_file)
                    waiting = True
                    continue
                except Exception as exc:  # the watcher must outlive any failed poll (server restarting, ...)
                    self.failed_polls += 1
                    r.metrics.polls.labels("failure").inc()
                    error = f"{type(exc).__name__}: {exc}"
                    repeated = self.last_error is not None and self.last_error.endswith(error)
                    log.log(logging.DEBUG if repeated else logging.WARNING, "poll failed, retrying: %s", error)
                    self.last_error = f"{now_iso()}: {error}"
                self.wake.wait(self.interval)
                self.wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self._mark_stopped()
            log.info("watcher stopped")

    def _poll(self, started: str) -> None:
        """One tick with the status file loaded before and saved after (the lock is held)."""
        status = self.reloader.status
        status.load()
        status.data["watcher"] = {
            "state": "running",
            "pid": os.getpid(),
            "started": started,
            "heartbeat": now_iso(),
            "interval": self.interval,
            "store": str(self.store),
            "versions_file": str(self.versions.path),
            "versions_error": self.versions.error,
            "failed_polls": self.failed_polls,
            "last_error": self.last_error,
        }
        self.tick()
        status.save()

    def _observe(self):
        """File events wake the poll loop early; polling stays the source of truth."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover
            return None
        wake, scanner = self.wake, self.scanner

        class Nudge(FileSystemEventHandler):
            def on_any_event(self, event):
                names = [os.path.basename(os.fsdecode(p)) for p in (event.src_path, getattr(event, "dest_path", ""))]
                if event.event_type == "moved" and is_candidate(names[1]):
                    scanner.arrived(names[1])  # renamed into place: whole, no need to wait for it to settle
                if any(is_candidate(n) for n in names if n):
                    wake.set()

        observer = Observer()
        observer.schedule(Nudge(), str(self.store), recursive=False)
        observer.daemon = True
        observer.start()
        return observer

    def _mark_stopped(self) -> None:
        r = self.reloader
        try:
            with r.lock.acquire(timeout=10):
                r.status.load()
                r.status.data.setdefault("watcher", {}).update(state="stopped", stopped=now_iso(), pid=os.getpid())
                r.status.save()
        except (Timeout, OSError) as exc:
            log.warning("could not record the stop in %s: %s", r.status.path, exc)

    def tick(self) -> None:
        """One poll: settle the store's view, then bring every model in line with it."""
        r = self.reloader
        scan = self.scanner.poll()
        r.status.forget_missing(self.store)
        for bad in scan.bad:
            if not r.status.is_failed(bad):
                log.error("%s: %s is not a usable archive: %s", bad.name, bad.file, bad.error)
                r.status.record_failure(bad, bad.error or "unreadable")
        pins = self.versions.read()
        states = r.states()
        changed = False
        for model in sorted({a.name for a in scan.archives} | set(states)):
            changed |= self.reconcile(model, scan, states.get(model, []), pins.get(model))
        r.status.summarize(r.states() if changed else states, pins)

    def reconcile(self, model: str, scan: Scan, registered: list[ModelState], pin: Pin | None) -> bool:
        """Bring one model in line with the store and its pin; True when the server was changed."""
        r = self.reloader
        usable = [a for a in scan.of(model) if not r.status.is_failed(a)]
        default = next((s.version for s in registered if s.default), None)
        gone = [s for s in registered if left_store(self.store, s.url)]
        candidates = [a.version for a in usable]
        if not self.unregister_removed and default and any(s.default for s in gone):
            candidates.append(default)  # kept although its archive is gone: only a newer one replaces it
        target = choose_version(candidates, pin, default)
        if target is not None and target != default:
            found = max((a for a in usable if a.version == target), key=lambda a: a.stamp.mtime_ns)
            workers = r.min_workers(model, default) if default else archive_min_workers(found.path, r.default_workers)
            retire = ([default] if default else []) + ([s.version for s in gone] if self.unregister_removed else [])
            r.switch(
                found,
                workers,
                retire,
                [s.version for s in registered],
                self._why(target, default, pin),
                running=default,
            )
            return True
        if self.unregister_removed and gone:
            return self._unregister_gone(model, registered, gone, bool(usable) or bool(scan.pending))
        return False

    @staticmethod
    def _why(target: str, default: str | None, pin: Pin | None) -> str:
        if default is None:
            return "new model"
        if pin and target == pin.version:
            return f"pinned by {pin.reason}"
        return "new archive" if version_key(target) > version_key(default) else "store changed"

    def _unregister_gone(
        self, model: str, registered: list[ModelState], gone: list[ModelState], anything_left: bool
    ) -> bool:
        """Unregister versions whose archives left the store (the model, when none is left)."""
        r = self.reloader
        if len(gone) == len(registered) and not anything_left:
            log.info("%s: no archive of it is left in %s; unregistering the model", model, self.store)
            r.remove_model(model, registered)
            return True
        changed = False
        for s in gone:
            if not s.default:
                log.info("%s: %s left the store; unregistering v%s", model, s.url, s.version)
                r.retire(model, s.version)
                r.status.event(model, "unregistered", s.version, f"{s.url} left the store")
                changed = True
        return changed
