"""The switch protocol: register -> READY workers -> warm-up -> set-default -> drain -> unregister.

Every step goes through the management API; on any failure the version registered here is
unregistered again and the old default keeps serving.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import requests
from filelock import FileLock

from .. import load_errors
from ..client import ManagementClient, ModelState, model_states
from ..errors import ReloadError
from ..server import ServerConfig
from ..store import Found
from ..tslogs import describe, read_tail, relative_timeline, worker_timeline
from ..tuning import WORKERS_KEY
from .capacity import Probe, SystemProbe, check_room
from .status import STATUS_FILE, Metrics, Status
from .warmup import sample_of, warmup_problem

log = logging.getLogger("servekit.reload")

LOCK_FILE = "reload.lock"
SWITCH_STEPS = ("register", "ready", "warmup", "set_default")  # a switch's steps, in order
# A worker's load failure as TorchServe's model log shows it; the exception's qualified name
# (e.g. servekit.errors.ConfigError) is kept, since that is what says what went wrong.
_LOAD_FAILED = r"Failed to load model .*?, exception (.*)"
_EXCEPTION = r"((?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception): .*)"


def message_of(resp: requests.Response) -> str:
    """The ``message`` of a JSON error answer, else its text."""
    try:
        return str(resp.json().get("message", resp.text)).strip()
    except (ValueError, AttributeError):
        return resp.text.strip()[:300]


def describe_switch(steps: dict[str, float], torchserve_steps: dict[str, list[float]]) -> str:
    """``register 3.0 s, ready 0.0 s, ...; TorchServe: unpacked 0.0 s, ...``, each in the order it happens.

    (The status file is written with sorted keys, so the order is not taken from the dicts.)
    """
    text = ", ".join(f"{k} {steps[k + '_s']:.1f} s" for k in SWITCH_STEPS if k + "_s" in steps)
    return text + (f"; TorchServe: {describe(torchserve_steps)}" if torchserve_steps else "")


def worker_error(log_text: str, model: str, version: str) -> str | None:
    """The last load error a worker of this version logged in TorchServe's model log, if any."""
    worker = rf"W-\d+-{re.escape(f'{model}_{version}')}-std(?:out|err) MODEL_LOG - "
    failed = re.findall(worker + _LOAD_FAILED, log_text)
    if failed:
        return f"failed to load: {failed[-1].strip()[:300]}"
    errors = re.findall(worker + _EXCEPTION, log_text)
    return errors[-1].strip()[:300] if errors else None


@dataclass
class SwitchOptions:
    """How patient a switch is, and how much room it wants for the new version."""

    drain_grace: float = 2.0
    ready_timeout: float = 300.0
    warmup_timeout: float = 60.0
    memory_margin: float = 0.2
    memory_check: bool = True


class Reloader:
    """Moves models between versions through the management API; records outcomes in the status file and metrics."""

    def __init__(
        self,
        cfg: ServerConfig,
        options: SwitchOptions | None = None,
        metrics: Metrics | None = None,
        probe: Probe | None = None,
    ):
        self.cfg = cfg
        self.options = options or SwitchOptions()
        self.mgmt: ManagementClient = cfg.management()
        self.inference = cfg.inference(timeout=self.options.warmup_timeout)
        self.metrics = metrics or Metrics()
        self.status = Status(cfg.run_dir / STATUS_FILE, self.metrics)
        self.lock = FileLock(str(cfg.run_dir / LOCK_FILE))
        self.probe = probe or SystemProbe()

    # server state ---------------------------------------------------------------------------
    def states(self) -> dict[str, list[ModelState]]:
        """Registered versions per model."""
        grouped: dict[str, list[ModelState]] = {}
        for s in model_states(self.mgmt):
            grouped.setdefault(s.name, []).append(s)
        return grouped

    @property
    def default_workers(self) -> int:
        """The server's worker count for a model whose model-config sets none (servekit.tuning)."""
        try:
            return max(1, int(self.cfg.properties().get(WORKERS_KEY, "1")))
        except ValueError:
            return 1

    def min_workers(self, model: str, version: str) -> int:
        """The worker count a registered version runs with."""
        described = self.mgmt.describe(model, version)
        return max(1, int(described[0].get("minWorkers") or 1)) if described else 1

    # switching ------------------------------------------------------------------------------
    def switch(
        self,
        found: Found,
        workers: int,
        retire: Iterable[str],
        registered: Iterable[str],
        reason: str = "new archive",
        running: str | None = None,
    ) -> bool:
        """Check room, register (if needed), wait for READY workers, warm up, set default, then retire old versions.

        ``running`` is the version serving now, whose workers are measured for the room check. On
        failure a version registered here is unregistered again and the old default keeps serving.
        Connection errors are raised: they say nothing about the archive.
        """
        model, version = found.name, found.version
        newly = version not in set(registered)
        log.info("%s: switching to v%s (%s, %s, %d worker(s))", model, version, found.file, reason, workers)
        steps: dict[str, float] = {}
        room = self._room(model, running, workers) if newly else None
        if room:
            log.error("%s: v%s from %s was NOT rolled out: %s", model, version, found.file, room)
            self.status.record_failure(found, room, result="refused")
            self.status.save()
            return False

        def step(name: str, t: float) -> float:
            steps[f"{name}_s"] = round(time.monotonic() - t, 3)
            return time.monotonic()

        t = t0 = time.monotonic()
        began = time.time()  # load errors recorded from here on are this switch's
        try:
            if newly:
                self._register(found, workers, began)
                t = step("register", t)
            else:
                self._ensure_workers(model, version, workers)
            self._wait_ready(model, version, workers, began)
            t = step("ready", t)
            self._warm_up(found)
            t = step("warmup", t)
            resp = self.mgmt.set_default(model, version)
            if resp.status_code != 200:
                raise ReloadError(f"set-default answered {resp.status_code}: {message_of(resp)}")
            step("set_default", t)
        except (ReloadError, requests.Timeout) as exc:
            why = exc.message if isinstance(exc, ReloadError) else f"timed out: {exc}"
            if newly:
                self._unregister_quietly(model, version)
            log.error(
                "%s: v%s from %s was NOT rolled out: %s; the previous default keeps serving",
                model,
                version,
                found.file,
                why,
            )
            self.status.record_failure(found, why)
            self.status.save()
            return False
        except requests.ConnectionError:
            if newly:
                self._unregister_quietly(model, version)
            raise
        seconds = time.monotonic() - t0
        self.metrics.set_version(model, version)
        self.metrics.reloads.labels(model, "success").inc()
        self.metrics.seconds.labels(model).observe(seconds)
        ts_steps = self._torchserve_steps(model, version, time.time() - seconds)
        self.status.event(
            model,
            "default",
            version,
            f"v{version} serves {model} ({reason})",
            file=found.file,
            seconds=round(seconds, 3),
            steps=steps,
            torchserve_steps=ts_steps,
        )
        log.info("%s: v%s is the default after %.1f s (%s)", model, version, seconds, describe_switch(steps, ts_steps))
        self.status.save()  # visible now: retiring the old versions takes a while
        for old in retire:
            if old != version:
                self.retire(model, old)
        return True

    def _room(self, model: str, running: str | None, workers: int) -> str | None:
        """Why the new version does not fit beside ``running`` (None: it fits, or there is nothing to measure)."""
        if not self.options.memory_check or running is None:
            return None
        described = self.mgmt.describe(model, running)
        if not described:
            return None
        return check_room(self.probe, described[0].get("workers", []), workers, self.options.memory_margin)

    def _torchserve_steps(self, model: str, version: str, since: float) -> dict[str, list[float]]:
        """TorchServe's own log of bringing up the version's workers, as seconds after ``since`` (best effort)."""
        try:
            return relative_timeline(worker_timeline(self.cfg.run_dir / "logs", model, version), since)
        except (OSError, ValueError) as exc:
            log.debug("no TorchServe timeline for %s v%s: %s", model, version, exc)
            return {}

    def _register(self, found: Found, workers: int, began: float) -> None:
        resp = self.mgmt.register(
            found.file, initial_workers=workers, synchronous=True, timeout=self.options.ready_timeout + 30
        )
        if resp.status_code == 409:  # registered meanwhile (e.g. by hand): use it
            return
        if resp.status_code != 200:
            detail = self._worker_error(found.name, found.version, began)
            if detail is None:  # the frontend writes worker logs asynchronously
                time.sleep(1.0)
                detail = self._worker_error(found.name, found.version, began)
            raise ReloadError(
                f"register answered {resp.status_code}: {message_of(resp)}" + (f" (worker: {detail})" if detail else "")
            )

    def _ensure_workers(self, model: str, version: str, workers: int) -> None:
        """Scale a version registered earlier (by hand, or before a restart) up to ``workers``."""
        described = self.mgmt.describe(model, version)
        if described and len(described[0].get("workers", [])) < workers:
            resp = self.mgmt.scale(model, workers, version=version)
            if resp.status_code not in (200, 202):
                raise ReloadError(
                    f"scaling v{version} to {workers} workers answered {resp.status_code}: {message_of(resp)}"
                )

    def _wait_ready(self, model: str, version: str, workers: int, began: float) -> None:
        deadline = time.monotonic() + self.options.ready_timeout
        ready = 0
        while time.monotonic() < deadline:
            described = self.mgmt.describe(model, version)
            if not described:
                raise ReloadError(f"v{version} is no longer registered")
            ready = sum(w.get("status") == "READY" for w in described[0].get("workers", []))
            if ready >= workers:
                return
            time.sleep(0.25)
        detail = self._worker_error(model, version, began)
        raise ReloadError(
            f"{ready}/{workers} workers READY after {self.options.ready_timeout:.0f} s"
            + (f" (worker: {detail})" if detail else "")
        )

    def _warm_up(self, found: Found) -> None:
        sample = sample_of(found.path)
        resp = self.inference.predict(found.name, sample.body, sample.content_type, version=found.version)
        problem = warmup_problem(resp, found.version, sample.strict)
        if problem:
            raise ReloadError(problem)

    def _worker_error(self, model: str, version: str, since: float) -> str | None:
        """What the version's workers failed on: as a servekit handler recorded it, else from TorchServe's log."""
        logs = self.cfg.run_dir / "logs"
        recorded = load_errors.latest(logs, model, version, since)
        if recorded:
            return f"failed to load: {recorded[:300]}"
        try:
            text = read_tail(logs / "model_log.log", 2_000_000)
        except OSError:
            return None
        return worker_error(text, model, version)

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
        time.sleep(self.options.drain_grace)
        resp = self.mgmt.unregister(model, version)
        if resp.status_code == 200:
            log.info("%s: unregistered v%s", model, version)
        elif resp.status_code != 404:
            log.warning("%s: could not unregister v%s: %s %s", model, version, resp.status_code, message_of(resp))

    def _unregister_quietly(self, model: str, version: str) -> None:
        try:
            resp = self.mgmt.unregister(model, version)
            if resp.status_code not in (200, 404):
                log.warning("%s: could not unregister failed v%s: %s", model, version, message_of(resp))
        except requests.RequestException as exc:
            log.warning("%s: could not unregister failed v%s: %s", model, version, exc)

    def remove_model(self, model: str, versions: list[ModelState]) -> None:
        """Unregister every version of a model: the others first, the default last."""
        for s in sorted(versions, key=lambda s: s.default):
            self.retire(model, s.version)
        self.status.event(model, "removed", None, "every archive of the model left the store; unregistered")
        self.metrics.reloads.labels(model, "removed").inc()
