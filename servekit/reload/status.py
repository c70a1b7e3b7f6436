"""What the watcher tells the world: the status file (``reload list``) and its Prometheus metrics."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ..client import ModelState
from ..store import Found, version_key
from .pins import Pin

STATUS_FILE = "reload-status.json"
MAX_FAILURES = 20  # failures kept per model in the status file
# A version refused for want of memory is tried again after this long (memory may have been freed);
# a failed one only once its file changes.
REFUSED_RETRY_S = 60.0


def now_iso() -> str:
    """The current UTC time, ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def read_json(path: Path) -> dict:
    """A JSON object from a file ({} when it is missing or not an object)."""
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def write_json(path: Path, data: dict) -> None:
    """Replace a JSON file atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


RESULTS = ("success", "failure", "refused", "removed")  # the outcomes servekit_reload_total counts


class Metrics:
    """The watcher's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reloads = Counter(
            "servekit_reload_total", "Version switches attempted, by result", ["model", "result"], registry=r
        )
        self.seconds = Histogram(
            "servekit_reload_seconds",
            "Seconds from register to set-default",
            ["model"],
            registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
        )
        self.version = Gauge(
            "servekit_model_version_info",
            "1 for the version that answers each model in this pod",
            ["model", "version"],
            registry=r,
        )
        self.renewals = Counter(
            "servekit_key_renewals_total", "Renewals of TorchServe's keys, by result", ["kind", "result"], registry=r
        )
        self.key_expiry = Gauge(
            "servekit_key_expiry_timestamp_seconds", "When each current TorchServe key expires", ["kind"], registry=r
        )
        self.polls = Counter(
            "servekit_watcher_polls_total", "Polls of the store and server, by result", ["result"], registry=r
        )
        self.heartbeat = Gauge(
            "servekit_watcher_last_poll_timestamp_seconds", "When the last poll finished", registry=r
        )
        self.ready_workers = Gauge(
            "servekit_ready_workers", "READY workers of each registered version", ["model", "version"], registry=r
        )
        self.queued = Gauge(
            "servekit_queue_pending_requests",
            "Requests waiting in each registered version's queue",
            ["model", "version"],
            registry=r,
        )
        self._versions: dict[str, str] = {}

    def set_versions(self, defaults: dict[str, str]) -> None:
        """Make the info gauge show exactly these default versions."""
        for model, version in list(self._versions.items()):
            if defaults.get(model) != version:
                self.version.remove(model, version)
                del self._versions[model]
        for model, version in defaults.items():
            self.version.labels(model, version).set(1)
            self._versions[model] = version

    def set_states(self, states: dict[str, list[ModelState]]) -> None:
        """Ready workers and queued requests of every registered version, as the last poll saw them."""
        for gauge in (self.ready_workers, self.queued):
            gauge.clear()
        for model in states:
            # Every model's switch counters exist from the start at 0: Prometheus' increase() cannot
            # see the first failure of a series that appears already at 1.
            for result in RESULTS:
                self.reloads.labels(model, result)
        for versions in states.values():
            for s in versions:
                self.ready_workers.labels(s.name, s.version).set(s.ready_workers)
                self.queued.labels(s.name, s.version).set(s.pending)

    def set_version(self, model: str, version: str) -> None:
        """One model's default changed (at set-default, before the old version is drained)."""
        self.set_versions({**self._versions, model: version})

    def renewal(self, kind: str, ok: bool, expires: float | None) -> None:
        """Count one key renewal (the KeyRenewer's callback)."""
        self.renewals.labels(kind, "success" if ok else "failure").inc()
        if ok and expires is not None:
            self.key_expiry.labels(kind).set(expires)


class Status:
    """The status file of a run directory, loaded before and saved after each step (under the lock)."""

    def __init__(self, path: Path, metrics: Metrics):
        self.path = path
        self.metrics = metrics
        self.data: dict = {}

    def load(self) -> None:
        """Re-read the status file (another process may have written it)."""
        self.data = read_json(self.path)
        self.data.setdefault("models", {})
        self.data.setdefault("failed_archives", {})

    def save(self) -> None:
        """Write the status file atomically."""
        self.data["updated"] = now_iso()
        write_json(self.path, self.data)

    def model(self, model: str) -> dict:
        """The entry of one model."""
        return self.data.setdefault("models", {}).setdefault(model, {"failures": []})

    def event(self, model: str, kind: str, version: str | None, message: str, **extra: Any) -> None:
        """Record the last thing that happened to a model."""
        self.model(model)["last_event"] = {
            "time": now_iso(),
            "event": kind,
            "version": version,
            "message": message,
            **extra,
        }

    def record_failure(self, found: Found, reason: str, result: str = "failure") -> None:
        """Remember a failed archive (by size and mtime) so it is retried only once it changes."""
        entry = {"time": now_iso(), "file": found.file, "version": found.version, "reason": reason, "result": result}
        failures = self.model(found.name).setdefault("failures", [])
        failures.append(entry)
        del failures[:-MAX_FAILURES]
        self.data.setdefault("failed_archives", {})[found.file] = {
            **entry,
            "model": found.name,
            "size": found.stamp.size,
            "mtime_ns": found.stamp.mtime_ns,
            "epoch": time.time(),
        }
        self.event(found.name, "failed" if result == "failure" else result, found.version, reason, file=found.file)
        self.metrics.reloads.labels(found.name, result).inc()

    def is_failed(self, found: Found) -> bool:
        """Whether this exact file (same size and mtime) already failed (or was refused a short while ago)."""
        entry = self.data.get("failed_archives", {}).get(found.file)
        if not entry or (entry.get("size"), entry.get("mtime_ns")) != (found.stamp.size, found.stamp.mtime_ns):
            return False
        return entry.get("result") != "refused" or time.time() - entry.get("epoch", 0) < REFUSED_RETRY_S

    def forget_missing(self, store: Path) -> None:
        """Drop failure records of files no longer in the store."""
        failed = self.data.get("failed_archives", {})
        for name in [n for n in failed if not (store / n).exists()]:
            del failed[name]

    def summarize(self, states: dict[str, list[ModelState]], pins: dict[str, Pin]) -> None:
        """Put the server's view of every model into the status and the version gauge."""
        defaults = {}
        for model, versions in states.items():
            entry = self.model(model)
            default = next((s.version for s in versions if s.default), None)
            entry["default"] = default
            entry["versions"] = {
                s.version: {"ready_workers": s.ready_workers, "workers": s.workers, "url": s.url}
                for s in sorted(versions, key=lambda s: version_key(s.version))
            }
            if default:
                defaults[model] = default
        for model, entry in self.data.get("models", {}).items():
            if model not in states:
                entry.update(default=None, versions={})
            entry["pinned"] = asdict(pins[model]) if model in pins else None
        self.metrics.set_versions(defaults)
        self.metrics.set_states(states)
