"""Hot model reload: watch the model store and move TorchServe to new archive versions without failing requests.

Run as ``servekit reload watch|list|rollout|rollback|status`` (or ``python -m servekit.reload``);
docs/reload.md describes the rules.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import zipfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import requests
import yaml
from filelock import FileLock, Timeout
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .archive import read_manifest
from .client import InferenceClient, ManagementClient, ModelState, model_states
from .errors import ConfigError
from .server import ServerConfig, version_key
from .tslogs import describe, read_tail, relative_timeline, worker_timeline

log = logging.getLogger("servekit.reload")

STATUS_FILE = "reload-status.json"
PINS_FILE = ".servekit-pins.json"
LOCK_FILE = "reload.lock"
MAX_FAILURES = 20  # failures kept per model in the status file
SWITCH_STEPS = ("register", "ready", "warmup", "set_default")  # a switch's steps, in order
MAR_NAME = re.compile(r"^(?P<name>.+)-v(?P<version>[^-/]+)\.mar$")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# -- server access ------------------------------------------------------------------------------
def management_client(cfg: ServerConfig) -> ManagementClient:
    """The management API of a server (the client carries requests through key rotation)."""
    return cfg.management()


def inference_client(cfg: ServerConfig, timeout: float = 60.0) -> InferenceClient:
    """The inference API of a server (the client carries requests through key rotation)."""
    return InferenceClient(cfg.address("inference_address"), cfg.tokens, timeout=timeout)


def watch_command(cfg: ServerConfig, *extra: str) -> list[str]:
    """The command that runs the watcher as its own process for the server ``cfg`` describes."""
    return [sys.executable, "-m", "servekit.reload", "watch", *cfg.cli_args(), *extra]


# -- the store ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stamp:
    """What identifies one state of a file: a changed file is a new candidate."""

    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Found:
    """An archive file in the store; ``error`` is set when its manifest cannot be read."""

    path: Path
    stamp: Stamp
    name: str
    version: str
    error: str | None = None

    @property
    def file(self) -> str:
        """The file name, which is also the URL TorchServe registers it under."""
        return self.path.name


@dataclass
class Scan:
    """One poll of the store."""

    archives: list[Found] = field(default_factory=list)
    bad: list[Found] = field(default_factory=list)
    pending: list[Path] = field(default_factory=list)

    def of(self, model: str) -> list[Found]:
        """Readable, settled archives of one model."""
        return [a for a in self.archives if a.name == model]


def is_candidate(name: str) -> bool:
    """Whether a file name in the store can be an archive (not hidden, not a partial copy)."""
    return name.endswith(".mar") and not name.startswith(".") and not name.endswith((".part", ".tmp"))


def _stamp(path: Path) -> Stamp:
    st = path.stat()
    return Stamp(st.st_size, st.st_mtime_ns)


def inspect_archive(path: Path, stamp: Stamp | None = None) -> Found:
    """Read an archive's model name and version from its manifest (the file name when unreadable)."""
    stamp = stamp or _stamp(path)
    guess = MAR_NAME.match(path.name)
    name, version = (guess["name"], guess["version"]) if guess else (path.stem, "?")
    try:
        model = read_manifest(path)["model"]
        return Found(path, stamp, model["modelName"], str(model.get("modelVersion", "1.0")))
    except ConfigError as exc:
        return Found(path, stamp, name, version, exc.message)
    except (KeyError, TypeError) as exc:
        return Found(path, stamp, name, version, f"{path} has no model name in its manifest ({exc})")


def read_store(store: Path) -> list[Found]:
    """Every archive file in the store as it is now (no settling)."""
    found = []
    for path in sorted(store.iterdir()):
        if is_candidate(path.name) and path.is_file():
            try:
                found.append(inspect_archive(path))
            except FileNotFoundError:
                continue
    return found


def _left_store(store: Path, url: str) -> bool:
    """Whether the archive a version was registered from is gone (remote URLs never count as gone)."""
    if url.startswith("file://"):
        return not Path(urlparse(url).path).exists()
    return "://" not in url and not (store / url).exists()


def archive_min_workers(path: Path) -> int:
    """minWorkers from the model-config.yaml inside an archive (1 when it sets none)."""
    try:
        config = read_manifest(path).get("model", {}).get("configFile")
        if not config:
            return 1
        with zipfile.ZipFile(path) as zf:
            data = yaml.safe_load(zf.read(config)) or {}
        return max(1, int(data.get("minWorkers", 1)))
    except (ConfigError, KeyError, ValueError, TypeError, yaml.YAMLError, zipfile.BadZipFile):
        return 1


class StoreScanner:
    """Polls the store; a file counts once its size and mtime held still for ``settle`` seconds (two polls or more)."""

    def __init__(self, store: Path, settle: float):
        self.store = store
        self.settle = settle
        self._seen: dict[str, tuple[Stamp, float]] = {}
        self._inspected: dict[tuple[str, Stamp], Found] = {}

    def poll(self) -> Scan:
        """Look at the store once."""
        now = time.monotonic()
        current: dict[str, Stamp] = {}
        for path in self.store.iterdir():
            if is_candidate(path.name):
                try:
                    if path.is_file():
                        current[path.name] = _stamp(path)
                except FileNotFoundError:  # removed while we looked
                    continue
        scan = Scan()
        for name, stamp in sorted(current.items()):
            seen = self._seen.get(name)
            if seen is None or seen[0] != stamp:
                self._seen[name] = (stamp, now)
                scan.pending.append(self.store / name)
                continue
            if now - seen[1] < self.settle:
                scan.pending.append(self.store / name)
                continue
            key = (name, stamp)
            if key not in self._inspected:
                self._inspected[key] = inspect_archive(self.store / name, stamp)
            found = self._inspected[key]
            (scan.archives if found.error is None else scan.bad).append(found)
        self._seen = {n: s for n, s in self._seen.items() if n in current}
        self._inspected = {k: f for k, f in self._inspected.items() if current.get(k[0]) == k[1]}
        return scan


# -- pins ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pin:
    """A version held by rollout/rollback; ``newest`` was the newest version in the store when pinned."""

    version: str
    newest: str
    reason: str = "rollout"
    time: str = ""


def read_pins(store: Path) -> dict[str, Pin]:
    """The pins file of a store (empty when there is none)."""
    data = _read_json(store / PINS_FILE)
    pins = {}
    for model, pin in data.items():
        try:
            pins[model] = Pin(**pin)
        except TypeError:
            log.warning("ignoring unreadable pin for %s in %s", model, store / PINS_FILE)
    return pins


def write_pins(store: Path, pins: dict[str, Pin]) -> None:
    """Replace the pins file atomically."""
    _write_json(store / PINS_FILE, {m: asdict(p) for m, p in sorted(pins.items())})


def choose_version(usable: Iterable[str], pin: Pin | None) -> str | None:
    """The version a model should serve: the newest usable one, unless a pin holds it.

    A pin holds while its version is usable and nothing newer than ``pin.newest`` is; once such a
    version exists it is the choice (and the pin is dropped when it has taken over).
    """
    usable = list(usable)
    if not usable:
        return None
    newest = max(usable, key=version_key)
    if pin is None or pin.version not in usable:
        return newest
    newer = [v for v in usable if version_key(v) > version_key(pin.newest)]
    return max(newer, key=version_key) if newer else pin.version


# -- status file and metrics --------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Metrics:
    """The reloader's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.reloads = Counter("servekit_reload_total", "Version switches attempted, by result",
                               ["model", "result"], registry=self.registry)
        self.seconds = Histogram("servekit_reload_seconds", "Seconds from register to set-default",
                                 ["model"], registry=self.registry,
                                 buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
        self.default = Gauge("servekit_model_default_version_info", "1 for the version that answers each model",
                             ["model", "version"], registry=self.registry)
        self._defaults: dict[str, str] = {}

    def set_defaults(self, defaults: dict[str, str]) -> None:
        """Make the info gauge show exactly these default versions."""
        for model, version in list(self._defaults.items()):
            if defaults.get(model) != version:
                self.default.remove(model, version)
                del self._defaults[model]
        for model, version in defaults.items():
            self.default.labels(model, version).set(1)
            self._defaults[model] = version


# -- moving between versions --------------------------------------------------------------------
class ReloadError(Exception):
    """A version could not be made the default; the message says why."""


@dataclass(frozen=True)
class Sample:
    """A warm-up request; ``strict`` samples must get a 200 with predictions."""

    body: bytes
    content_type: str
    strict: bool


@functools.lru_cache(maxsize=None)
def _digits_sample() -> Sample:
    from models.digits.model import encode, held_out

    image, _ = held_out(1)[0]
    return Sample(encode(image, "PNG"), "image/png", strict=True)


@functools.lru_cache(maxsize=None)
def _generic_sample() -> Sample:
    from PIL import Image

    buf = io.BytesIO()
    Image.linear_gradient("L").resize((64, 64)).convert("RGB").save(buf, format="PNG")
    return Sample(buf.getvalue(), "image/png", strict=False)


# Models with a known-good input; any other model is warmed up with a small PNG, and a 4xx
# from our handler is accepted for it (the image may not suit the model, but the worker ran).
SAMPLES = {"digits": _digits_sample}


def sample_for(model: str) -> Sample:
    """The warm-up request for a model."""
    return SAMPLES.get(model, _generic_sample)()


def warmup_problem(resp: requests.Response, version: str, strict: bool) -> str | None:
    """Why a warm-up answer does not prove the version serves (None when it does)."""
    answered = resp.headers.get("X-Model-Version")
    if answered is not None and answered != version:
        return f"warm-up was answered by version {answered}, not {version}"
    if resp.status_code == 200:
        try:
            predictions = resp.json().get("predictions")
        except (ValueError, AttributeError):
            predictions = None
        return None if predictions else f"warm-up answered 200 without predictions: {resp.text[:200]}"
    from_handler = answered is not None and 400 <= resp.status_code < 500
    if from_handler and not strict:
        try:
            if {"code", "message"} <= set(resp.json()):
                return None
        except ValueError:
            pass
    return f"warm-up prediction answered {resp.status_code}: {resp.text.strip()[:300]}"


def _message(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("message", resp.text)).strip()
    except ValueError:
        return resp.text.strip()[:300]


class Reloader:
    """Moves models between versions through the management API; records outcomes in the status file and metrics."""

    def __init__(self, cfg: ServerConfig, drain_grace: float = 2.0, ready_timeout: float = 300.0,
                 warmup_timeout: float = 60.0, metrics: Metrics | None = None):
        self.cfg = cfg
        self.mgmt = management_client(cfg)
        self.inference = inference_client(cfg, timeout=warmup_timeout)
        self.drain_grace = drain_grace
        self.ready_timeout = ready_timeout
        self.metrics = metrics or Metrics()
        self.lock = FileLock(str(cfg.run_dir / LOCK_FILE))
        self.status_path = cfg.run_dir / STATUS_FILE
        self.status: dict = {}

    # status ---------------------------------------------------------------------------------
    def load_status(self) -> None:
        """Re-read the status file (another process may have written it)."""
        self.status = _read_json(self.status_path)
        self.status.setdefault("models", {})
        self.status.setdefault("failed_archives", {})

    def save_status(self) -> None:
        """Write the status file atomically."""
        self.status["updated"] = _now()
        _write_json(self.status_path, self.status)

    def _model_status(self, model: str) -> dict:
        return self.status.setdefault("models", {}).setdefault(model, {"failures": []})

    def event(self, model: str, kind: str, version: str | None, message: str, **extra: Any) -> None:
        """Record the last thing that happened to a model."""
        self._model_status(model)["last_event"] = {"time": _now(), "event": kind, "version": version,
                                                   "message": message, **extra}

    def record_failure(self, found: Found, reason: str) -> None:
        """Remember a failed archive (by size and mtime) so it is retried only once it changes."""
        entry = {"time": _now(), "file": found.file, "version": found.version, "reason": reason}
        failures = self._model_status(found.name).setdefault("failures", [])
        failures.append(entry)
        del failures[:-MAX_FAILURES]
        self.status.setdefault("failed_archives", {})[found.file] = {
            **entry, "model": found.name, "size": found.stamp.size, "mtime_ns": found.stamp.mtime_ns}
        self.event(found.name, "failed", found.version, reason, file=found.file)
        self.metrics.reloads.labels(found.name, "failure").inc()

    def is_failed(self, found: Found) -> bool:
        """Whether this exact file (same size and mtime) already failed."""
        entry = self.status.get("failed_archives", {}).get(found.file)
        return bool(entry) and (entry.get("size"), entry.get("mtime_ns")) == (found.stamp.size, found.stamp.mtime_ns)

    def forget_missing(self, store: Path) -> None:
        """Drop failure records of files no longer in the store."""
        failed = self.status.get("failed_archives", {})
        for name in [n for n in failed if not (store / n).exists()]:
            del failed[name]

    def summarize(self, states: dict[str, list[ModelState]], pins: dict[str, Pin]) -> None:
        """Put the server's view of every model into the status and the default-version gauge."""
        defaults = {}
        for model, versions in states.items():
            entry = self._model_status(model)
            default = next((s.version for s in versions if s.default), None)
            entry["default"] = default
            entry["versions"] = {s.version: {"ready_workers": s.ready_workers, "workers": s.workers, "url": s.url}
                                 for s in sorted(versions, key=lambda s: version_key(s.version))}
            entry["pinned"] = asdict(pins[model]) if model in pins else None
            if default:
                defaults[model] = default
        for model, entry in self.status.get("models", {}).items():
            if model not in states:
                entry.update(default=None, versions={}, pinned=asdict(pins[model]) if model in pins else None)
        self.metrics.set_defaults(defaults)

    # server state ---------------------------------------------------------------------------
    def states(self) -> dict[str, list[ModelState]]:
        """Registered versions per model."""
        grouped: dict[str, list[ModelState]] = {}
        for s in model_states(self.mgmt):
            grouped.setdefault(s.name, []).append(s)
        return grouped

    def min_workers(self, model: str, version: str) -> int:
        """The worker count a registered version runs with."""
        described = self.mgmt.describe(model, version)
        return max(1, int(described[0].get("minWorkers") or 1)) if described else 1

    # switching ------------------------------------------------------------------------------
    def switch(self, found: Found, workers: int, retire: Iterable[str], registered: Iterable[str],
               reason: str = "new archive") -> bool:
        """Register (if needed), wait for READY workers, warm up, set default, then retire old versions.

        On failure a version registered here is unregistered again and the old default keeps
        serving. Connection errors are raised: they say nothing about the archive.
        """
        model, version = found.name, found.version
        newly = version not in set(registered)
        t0 = time.monotonic()
        log.info("%s: switching to v%s (%s, %s, %d worker(s))", model, version, found.file, reason, workers)
        steps: dict[str, float] = {}

        def step(name: str, t: float) -> float:
            steps[f"{name}_s"] = round(time.monotonic() - t, 3)
            return time.monotonic()

        try:
            self._sample(model)  # built before the clock starts (the digits sample imports torch once)
            t = t0 = time.monotonic()
            if newly:
                self._register(found, workers)
                t = step("register", t)
            else:
                self._ensure_workers(model, version, workers)
            self._wait_ready(model, version, workers)
            t = step("ready", t)
            self._warm_up(model, version)
            t = step("warmup", t)
            resp = self.mgmt.set_default(model, version)
            if resp.status_code != 200:
                raise ReloadError(f"set-default answered {resp.status_code}: {_message(resp)}")
            step("set_default", t)
        except (ReloadError, requests.Timeout) as exc:
            why = str(exc) if isinstance(exc, ReloadError) else f"timed out: {exc}"
            if newly:
                self._unregister_quietly(model, version)
            log.error("%s: v%s from %s was NOT rolled out: %s; the previous default keeps serving",
                      model, version, found.file, why)
            self.record_failure(found, why)
            self.save_status()
            return False
        except requests.ConnectionError:
            if newly:
                self._unregister_quietly(model, version)
            raise
        seconds = time.monotonic() - t0
        self.metrics.reloads.labels(model, "success").inc()
        self.metrics.seconds.labels(model).observe(seconds)
        ts_steps = self._torchserve_steps(model, version, time.time() - seconds)
        self.event(model, "default", version, f"v{version} serves {model} ({reason})",
                   file=found.file, seconds=round(seconds, 3), steps=steps, torchserve_steps=ts_steps)
        log.info("%s: v%s is the default after %.1f s (%s)", model, version, seconds,
                 describe_switch(steps, ts_steps))
        self.save_status()  # visible now: retiring the old versions takes a while
        for old in retire:
            if old != version:
                self.retire(model, old)
        return True

    def _torchserve_steps(self, model: str, version: str, since: float) -> dict[str, list[float]]:
        """TorchServe's own log of bringing up the version's workers, as seconds after ``since`` (best effort)."""
        try:
            return relative_timeline(worker_timeline(self.cfg.run_dir / "logs", model, version), since)
        except (OSError, ValueError) as exc:
            log.debug("no TorchServe timeline for %s v%s: %s", model, version, exc)
            return {}

    def _register(self, found: Found, workers: int) -> None:
        resp = self.mgmt.register(found.file, initial_workers=workers, synchronous=True,
                                  timeout=self.ready_timeout + 30)
        if resp.status_code == 409:  # registered meanwhile (e.g. by hand): use it
            return
        if resp.status_code != 200:
            detail = self._worker_error(found.name, found.version)
            if detail is None:  # the frontend writes worker logs asynchronously
                time.sleep(1.0)
                detail = self._worker_error(found.name, found.version)
            raise ReloadError(f"register answered {resp.status_code}: {_message(resp)}"
                              + (f" (worker: {detail})" if detail else ""))

    def _ensure_workers(self, model: str, version: str, workers: int) -> None:
        """Scale a version registered earlier (by hand, or before a restart) up to ``workers``."""
        described = self.mgmt.describe(model, version)
        if described and len(described[0].get("workers", [])) < workers:
            resp = self.mgmt.scale(model, workers, version=version)
            if resp.status_code not in (200, 202):
                raise ReloadError(f"scaling v{version} to {workers} workers answered {resp.status_code}: "
                                  f"{_message(resp)}")

    def _wait_ready(self, model: str, version: str, workers: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        ready = 0
        while time.monotonic() < deadline:
            described = self.mgmt.describe(model, version)
            if not described:
                raise ReloadError(f"v{version} is no longer registered")
            ready = sum(w.get("status") == "READY" for w in described[0].get("workers", []))
            if ready >= workers:
                return
            time.sleep(0.25)
        detail = self._worker_error(model, version)
        raise ReloadError(f"{ready}/{workers} workers READY after {self.ready_timeout:.0f} s"
                          + (f" (worker: {detail})" if detail else ""))

    @staticmethod
    def _sample(model: str) -> Sample:
        try:
            return sample_for(model)
        except Exception as exc:  # an unbuildable sample fails the switch with its reason
            raise ReloadError(f"could not build a warm-up sample for {model}: {exc}") from exc

    def _warm_up(self, model: str, version: str) -> None:
        sample = self._sample(model)
        resp = self.inference.predict(model, sample.body, sample.content_type, version=version)
        problem = warmup_problem(resp, version, sample.strict)
        if problem:
            raise ReloadError(problem)

    def _worker_error(self, model: str, version: str) -> str | None:
        """The last load error a worker of this version logged, if any."""
        try:
            text = read_tail(self.cfg.run_dir / "logs" / "model_log.log", 2_000_000)
        except OSError:
            return None
        worker = rf"W-\d+-{re.escape(f'{model}_{version}')}-std(?:out|err) MODEL_LOG - "
        failed = re.findall(worker + r"Failed to load model .*?, exception (.*)", text)
        if failed:
            return f"failed to load: {failed[-1].strip()[:300]}"
        errors = re.findall(worker + r"(\w+(?:Error|Exception): .*)", text)
        return errors[-1].strip()[:300] if errors else None

    def retire(self, model: str, version: str, drain_timeout: float = 60.0) -> None:
        """Wait for a version's queue to empty (plus a grace for requests in flight), then unregister it."""
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            described = self.mgmt.describe(model, version)
            if not described:
                return
            if described[0].get("jobQueueStatus", {}).get("pendingRequests", 0) == 0:
                break
            time.sleep(0.2)
        time.sleep(self.drain_grace)
        resp = self.mgmt.unregister(model, version)
        if resp.status_code == 200:
            log.info("%s: unregistered v%s", model, version)
        elif resp.status_code != 404:
            log.warning("%s: could not unregister v%s: %s %s", model, version, resp.status_code, _message(resp))

    def _unregister_quietly(self, model: str, version: str) -> None:
        try:
            resp = self.mgmt.unregister(model, version)
            if resp.status_code not in (200, 404):
                log.warning("%s: could not unregister failed v%s: %s", model, version, _message(resp))
        except requests.RequestException as exc:
            log.warning("%s: could not unregister failed v%s: %s", model, version, exc)

    def remove_model(self, model: str, versions: list[ModelState]) -> None:
        """Unregister every version of a model: the others first, the default last."""
        for s in sorted(versions, key=lambda s: s.default):
            self.retire(model, s.version)
        self.event(model, "removed", None, "every archive of the model left the store; unregistered")
        self.metrics.reloads.labels(model, "removed").inc()


# -- the watcher --------------------------------------------------------------------------------
class Watcher:
    """Reconciles the server with the store on every poll; idempotent, so a restart just picks up."""

    def __init__(self, reloader: Reloader, store: Path, interval: float = 1.0, unregister_removed: bool = True):
        self.reloader = reloader
        self.store = store
        self.interval = interval
        self.unregister_removed = unregister_removed
        self.scanner = StoreScanner(store, settle=interval)
        self.wake = threading.Event()
        self.failed_polls = 0
        self.last_error: str | None = None

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set; a failed poll is logged and the next one tries again."""
        r = self.reloader
        started = _now()
        observer = self._observe()
        log.info("watching %s every %.2g s (server %s)", self.store, self.interval, r.mgmt.base)
        waiting = False
        threading.Thread(target=self._prepare_samples, daemon=True).start()
        try:
            while not stop.is_set():
                try:
                    with r.lock.acquire(timeout=max(1.0, self.interval)):
                        waiting = False
                        self._poll(started)
                except Timeout:
                    if not waiting:
                        log.info("a rollout elsewhere holds %s; waiting for it", r.lock.lock_file)
                    waiting = True
                    continue
                except Exception as exc:  # the watcher must outlive any failed poll (server restarting, ...)
                    self.failed_polls += 1
                    error = f"{type(exc).__name__}: {exc}"
                    repeated = self.last_error is not None and self.last_error.endswith(error)
                    log.log(logging.DEBUG if repeated else logging.WARNING, "poll failed, retrying: %s", error)
                    self.last_error = f"{_now()}: {error}"
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
        r = self.reloader
        r.load_status()
        r.status["watcher"] = {"state": "running", "pid": os.getpid(), "started": started, "heartbeat": _now(),
                               "interval": self.interval, "store": str(self.store),
                               "failed_polls": self.failed_polls, "last_error": self.last_error}
        self.tick()
        r.save_status()

    def _prepare_samples(self) -> None:
        """Build the warm-up samples of the store's models ahead of their first switch."""
        for found in read_store(self.store):
            if found.error is None:
                try:
                    sample_for(found.name)
                except Exception as exc:  # a sample that cannot be built fails its switch later, with the reason
                    log.debug("no warm-up sample for %s yet: %s", found.name, exc)

    def _observe(self):
        """File events wake the poll loop early; polling stays the source of truth."""
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover
            return None
        wake = self.wake

        class Nudge(FileSystemEventHandler):
            def on_any_event(self, event):
                paths = (event.src_path, getattr(event, "dest_path", "") or "")
                if any(is_candidate(os.path.basename(os.fsdecode(p))) for p in paths):
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
                r.load_status()
                r.status.setdefault("watcher", {}).update(state="stopped", stopped=_now(), pid=os.getpid())
                r.save_status()
        except (Timeout, OSError) as exc:
            log.warning("could not record the stop in %s: %s", r.status_path, exc)

    def tick(self) -> None:
        """One poll: settle the store's view, then bring every model in line with it."""
        r = self.reloader
        scan = self.scanner.poll()
        r.forget_missing(self.store)
        for bad in scan.bad:
            if not r.is_failed(bad):
                log.error("%s: %s is not a usable archive: %s", bad.name, bad.file, bad.error)
                r.record_failure(bad, bad.error or "unreadable")
        pins = read_pins(self.store)
        pins_before = dict(pins)
        states = r.states()
        changed = False
        for model in sorted({a.name for a in scan.archives} | set(states)):
            changed |= self.reconcile(model, scan, states.get(model, []), pins)
        if pins != pins_before:
            write_pins(self.store, pins)
        r.summarize(r.states() if changed else states, pins)

    def reconcile(self, model: str, scan: Scan, registered: list[ModelState], pins: dict[str, Pin]) -> bool:
        """Bring one model in line with the store; True when the server was changed."""
        r = self.reloader
        archives = scan.of(model)
        usable = [a for a in archives if not r.is_failed(a)]
        default = next((s.version for s in registered if s.default), None)
        if model in pins and pins[model].version not in {a.version for a in archives} and not scan.pending:
            log.info("%s: pinned v%s left the store; the pin is dropped", model, pins.pop(model).version)
        pin = pins.get(model)
        gone = [s for s in registered if _left_store(self.store, s.url)]
        candidates = [a.version for a in usable]
        if not self.unregister_removed and default and any(s.default for s in gone):
            candidates.append(default)  # kept although its archive is gone: only a newer one replaces it
        target = choose_version(candidates, pin)
        changed = False
        if target is not None and target != default:
            found = max((a for a in usable if a.version == target), key=lambda a: a.stamp.mtime_ns)
            workers = r.min_workers(model, default) if default else archive_min_workers(found.path)
            retire = ([default] if default else []) + ([s.version for s in gone] if self.unregister_removed else [])
            r.switch(found, workers, retire, [s.version for s in registered], self._why(target, default, pin))
            changed = True
        elif self.unregister_removed and gone:
            changed = self._unregister_gone(model, registered, gone, bool(usable) or bool(scan.pending))
        if pin:
            current = next((s.version for s in r.states().get(model, []) if s.default), None) if changed else default
            if current and version_key(current) > version_key(pin.newest):
                log.info("%s: v%s is newer than the pin on v%s; the pin is dropped", model, current, pin.version)
                pins.pop(model, None)
        return changed

    @staticmethod
    def _why(target: str, default: str | None, pin: Pin | None) -> str:
        if default is None:
            return "new model"
        if pin and target == pin.version:
            return f"pinned by {pin.reason}"
        return "new archive" if version_key(target) > version_key(default) else "store changed"

    def _unregister_gone(self, model: str, registered: list[ModelState], gone: list[ModelState],
                         anything_left: bool) -> bool:
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
                r.event(model, "unregistered", s.version, f"{s.url} left the store")
                changed = True
        return changed


# -- commands -----------------------------------------------------------------------------------
def _reloader(args: argparse.Namespace) -> Reloader:
    from .cli import server_config

    return Reloader(server_config(args), drain_grace=args.drain_grace, ready_timeout=args.ready_timeout)


def cmd_watch(args: argparse.Namespace) -> int:
    reloader = _reloader(args)
    watcher = Watcher(reloader, reloader.cfg.model_store, args.interval, args.unregister_removed)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping after the current step", signum)
        stop.set()
        watcher.wake.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    http = None
    if args.metrics_port:
        http, _ = start_http_server(args.metrics_port, addr="127.0.0.1", registry=reloader.metrics.registry)
        log.info("reload metrics on http://127.0.0.1:%d/metrics", args.metrics_port)
    try:
        watcher.run(stop)
    finally:
        if http is not None:
            http.shutdown()
    return 0


def _locked(reloader: Reloader, timeout: float):
    try:
        return reloader.lock.acquire(timeout=timeout)
    except Timeout:
        raise SystemExit(f"another rollout still holds {reloader.lock.lock_file} after {timeout:.0f} s") from None


def _rollout(reloader: Reloader, model: str, version: str | None, reason: str, lock_timeout: float) -> int:
    """Pin ``version`` (None: the one before the default), make it the default, retire every other version."""
    store = reloader.cfg.model_store
    with _locked(reloader, lock_timeout):
        reloader.load_status()
        archives = [a for a in read_store(store) if a.name == model and a.error is None]
        registered = reloader.states().get(model, [])
        default = next((s.version for s in registered if s.default), None)
        if version is None:
            if default is None:
                print(f"error: {model} is not registered", file=sys.stderr)
                return 1
            older = [a for a in archives if version_key(a.version) < version_key(default) and not reloader.is_failed(a)]
            if not older:
                print(f"error: no version of {model} older than v{default} is in {store}", file=sys.stderr)
                return 1
            version = max(older, key=lambda a: version_key(a.version)).version
        found = next((a for a in archives if a.version == version), None)
        if found is None:
            have = ", ".join(sorted((a.version for a in archives), key=version_key)) or "none"
            print(f"error: no archive of {model} v{version} in {store} (versions there: {have})", file=sys.stderr)
            return 1
        pins = read_pins(store)
        previous = pins.get(model)
        newest = max((a.version for a in archives), key=version_key)
        pins[model] = Pin(version, newest, reason, _now())
        write_pins(store, pins)
        others = [s.version for s in registered if s.version != version]
        if default == version:
            for old in others:
                reloader.retire(model, old)
            ok = True
            reloader.event(model, reason, version, f"v{version} pinned (already the default)")
        else:
            workers = reloader.min_workers(model, default) if default else archive_min_workers(found.path)
            ok = reloader.switch(found, workers, others, [s.version for s in registered], reason)
        if not ok:
            if previous:
                pins[model] = previous
            else:
                pins.pop(model, None)
            write_pins(store, pins)
        reloader.summarize(reloader.states(), read_pins(store))
        reloader.save_status()
    print(f"{model}: v{version} is the default and pinned (a version newer than v{newest} releases the pin)"
          if ok else f"{model}: {reason} to v{version} failed; see `servekit reload list`")
    return 0 if ok else 1


def cmd_rollout(args: argparse.Namespace) -> int:
    return _rollout(_reloader(args), args.model, args.version, "rollout", args.lock_timeout)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _rollout(_reloader(args), args.model, None, "rollback", args.lock_timeout)


def inventory(reloader: Reloader) -> dict:
    """Every model's versions: registered (with ready workers), default, in the store, pinned, failed."""
    store = reloader.cfg.model_store
    reloader.load_status()
    pins = read_pins(store)
    states = reloader.states()
    failed = reloader.status.get("failed_archives", {})
    models: dict[str, dict] = {}
    for found in read_store(store):
        entry = models.setdefault(found.name, {"versions": {}})
        v = entry["versions"].setdefault(found.version, {})
        v["archive"] = found.file
        if found.file in failed:
            v["failed"] = failed[found.file]["reason"]
        elif found.error:
            v["failed"] = found.error
    for model, versions in states.items():
        entry = models.setdefault(model, {"versions": {}})
        for s in versions:
            entry["versions"].setdefault(s.version, {}).update(
                registered=True, default=s.default, ready_workers=s.ready_workers, workers=s.workers)
    for model, entry in models.items():
        entry["default"] = next((v for v, d in entry["versions"].items() if d.get("default")), None)
        entry["pinned"] = asdict(pins[model]) if model in pins else None
        entry["last_event"] = reloader.status.get("models", {}).get(model, {}).get("last_event")
    return {"models": models, "watcher": reloader.status.get("watcher")}


def describe_switch(steps: dict[str, float], torchserve_steps: dict[str, list[float]]) -> str:
    """``register 3.0 s, ready 0.0 s, ...; TorchServe: unpacked 0.0 s, ...``, each in the order it happens.

    (The status file is written with sorted keys, so the order is not taken from the dicts.)
    """
    text = ", ".join(f"{k} {steps[k + '_s']:.1f} s" for k in SWITCH_STEPS if k + "_s" in steps)
    return text + (f"; TorchServe: {describe(torchserve_steps)}" if torchserve_steps else "")


def cmd_list(args: argparse.Namespace) -> int:
    data = inventory(_reloader(args))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    for model, entry in sorted(data["models"].items()):
        print(f"{model}  (default: {entry['default'] or 'none'})")
        for version in sorted(entry["versions"], key=version_key, reverse=True):
            v = entry["versions"][version]
            mark = "*" if v.get("default") else " "
            ready = f"{v['ready_workers']}/{v['workers']} ready" if v.get("registered") else "not registered"
            note = f"  FAILED: {v['failed']}" if v.get("failed") else ""
            print(f"  {mark} v{version:<10} {ready:<16} {v.get('archive', '(archive gone)')}{note}")
        if entry["pinned"]:
            p = entry["pinned"]
            print(f"    pinned to v{p['version']} by {p['reason']} (until a version newer than v{p['newest']} arrives)")
        if entry["last_event"]:
            e = entry["last_event"]
            print(f"    last event: {e['time']} {e['event']} v{e.get('version')}: {e['message']}")
            if e.get("seconds") is not None:
                print(f"      took {e['seconds']:.1f} s ({describe_switch(e.get('steps') or {}, e.get('torchserve_steps') or {})})")
    w = data["watcher"]
    print(f"watcher: {w['state']} (pid {w.get('pid')}, last poll {w.get('heartbeat')})" if w else "watcher: never ran")
    if w and w.get("last_error"):
        print(f"  last error: {w['last_error']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    path = args.run_dir.resolve() / STATUS_FILE
    if not path.exists():
        print(f"no {path}: the watcher has not run from this run dir", file=sys.stderr)
        return 1
    print(path.read_text().rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``servekit reload``."""
    from .cli import _server_args

    parser = argparse.ArgumentParser(prog="servekit reload", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        _server_args(p)
        p.add_argument("--drain-grace", type=float, default=2.0,
                       help="seconds to wait after an old version's queue is empty before unregistering it")
        p.add_argument("--ready-timeout", type=float, default=300.0,
                       help="seconds a new version may take to register and get READY workers")
        p.add_argument("--lock-timeout", type=float, default=900.0,
                       help="seconds to wait for a switch in progress elsewhere")
        p.add_argument("-v", "--verbose", action="store_true")
        p.set_defaults(func=func)
        return p

    p = command("watch", cmd_watch, "poll the model store and roll new versions in (until SIGTERM)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the store")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT")
    removed = p.add_mutually_exclusive_group()
    removed.add_argument("--unregister-removed", dest="unregister_removed", action="store_true", default=True,
                         help="unregister versions (and models) whose archives left the store (default)")
    removed.add_argument("--keep-removed", dest="unregister_removed", action="store_false",
                         help="keep serving versions whose archives left the store")
    p = command("list", cmd_list, "versions per model: default, ready workers, store, pins, failures")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("rollout", cmd_rollout, "make MODEL VERSION the default (pinned) and retire the others")
    p.add_argument("model")
    p.add_argument("version")
    p = command("rollback", cmd_rollback, "go back to the newest version older than the default (pinned)")
    p.add_argument("model")
    command("status", cmd_status, "print the watcher's status JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``servekit reload``."""
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO if args.command in ("watch", "rollout", "rollback") \
        else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (requests.ConnectionError, FileNotFoundError) as exc:
        print(f"error: cannot reach TorchServe from {args.run_dir}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
