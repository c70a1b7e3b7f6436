"""The desired version of each model: a file the watcher reads (a ConfigMap in Kubernetes), and the rule that picks one.

The file is YAML (JSON is YAML too), one entry per model::

    digits: "2.0"          # serve 2.0 and nothing else, until the file changes
    resnet50: newest       # follow the newest version in the store (also: no entry at all)
    other:                 # what `servekit reload rollback|rollout` writes: held until a version
      version: "1.0"       # newer than `until_newer_than` is published
      until_newer_than: "2.0"
      reason: rollback
      time: "2026-11-28T10:00:00+00:00"
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import ConfigError
from ..store import version_key

log = logging.getLogger(__name__)

NEWEST = "newest"
VERSIONS_FILE = "model-versions.yaml"


def default_versions_file(run_dir: Path) -> Path:
    """``$SERVEKIT_VERSIONS``, else ``model-versions.yaml`` in the run directory (outside the store)."""
    return Path(os.environ.get("SERVEKIT_VERSIONS") or run_dir / VERSIONS_FILE)


@dataclass(frozen=True)
class Pin:
    """What one model should serve: ``version`` (or ``newest``), held until one newer than ``until_newer_than``."""

    version: str
    until_newer_than: str | None = None
    reason: str = "declared"
    time: str = ""

    @property
    def follows_newest(self) -> bool:
        """Whether this entry only says "the newest version"."""
        return self.version == NEWEST

    def describe(self) -> str:
        """One line for `reload list`."""
        if self.follows_newest:
            return "follows the newest version"
        held = f" (until a version newer than v{self.until_newer_than} arrives)" if self.until_newer_than else ""
        return f"pinned to v{self.version} by {self.reason}{held}"

    def to_yaml(self) -> str | dict:
        """The file entry: a bare version when nothing else is set."""
        if self.until_newer_than is None and self.reason == "declared" and not self.time:
            return self.version
        return {
            "version": self.version,
            "until_newer_than": self.until_newer_than,
            "reason": self.reason,
            "time": self.time,
        }


def parse_pins(data: object, where: str = "versions file") -> dict[str, Pin]:
    """Entries of a versions file; a malformed entry is an error that names it."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of model name to version, got {type(data).__name__}")
    pins = {}
    for model, entry in data.items():
        if isinstance(entry, (str, int, float)):
            pins[str(model)] = Pin(str(entry))
        elif isinstance(entry, dict) and "version" in entry:
            unknown = set(entry) - {"version", "until_newer_than", "reason", "time"}
            if unknown:
                raise ConfigError(f"{where}: {model}: unknown keys {sorted(unknown)}")
            newer = entry.get("until_newer_than")
            pins[str(model)] = Pin(
                str(entry["version"]),
                None if newer is None else str(newer),
                str(entry.get("reason") or "declared"),
                str(entry.get("time") or ""),
            )
        else:
            raise ConfigError(f"{where}: {model}: expected a version, {NEWEST!r} or a mapping with 'version'")
    return pins


class VersionsFile:
    """The versions file, re-read when it changes; a missing file means "newest" for every model.

    A file that becomes unreadable keeps the last good pins (and says so once): a half-edited
    ConfigMap must not roll every model to its newest version.
    """

    def __init__(self, path: Path):
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._pins: dict[str, Pin] = {}
        self.error: str | None = None

    def read(self) -> dict[str, Pin]:
        """The current pins."""
        try:
            st = self.path.stat()  # follows the ConfigMap's ..data symlink
        except FileNotFoundError:
            self._stamp, self._pins, self.error = None, {}, None
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self._pins
        try:
            self._pins = parse_pins(yaml.safe_load(self.path.read_text()), str(self.path))
            self.error = None
        except (ConfigError, yaml.YAMLError, OSError) as exc:
            error = getattr(exc, "message", None) or f"{self.path}: {exc}"
            if error != self.error:
                log.error("cannot read the versions file; keeping the last good one: %s", error)
            self.error = error
        self._stamp = stamp
        return self._pins

    def write(self, pins: dict[str, Pin]) -> None:
        """Replace the file atomically (local use; in a pod the file is a read-only ConfigMap)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = {m: p.to_yaml() for m, p in sorted(pins.items())}
        tmp.write_text(
            "# Desired model versions (servekit reload rollout|rollback write this file).\n"
            + yaml.safe_dump(body, sort_keys=True)
        )
        os.replace(tmp, self.path)


def choose_version(usable: Iterable[str], pin: Pin | None, current: str | None = None) -> str | None:
    """The version a model should serve.

    - no pin, or ``newest``: the newest usable version;
    - a declared pin: that version; while it is not (yet) in the store, the current default keeps
      serving (the newest only when nothing serves yet);
    - a rollback/rollout pin (``until_newer_than``): its version, until a version newer than that
      arrives, which is then the choice; the newest when its version is gone.
    """
    usable = list(usable)
    if not usable:
        return None
    newest = max(usable, key=version_key)
    if pin is None or pin.follows_newest:
        return newest
    if pin.until_newer_than is None:
        if pin.version in usable:
            return pin.version
        return current if current in usable else newest
    if pin.version not in usable:
        return newest
    newer = [v for v in usable if version_key(v) > version_key(pin.until_newer_than)]
    return max(newer, key=version_key) if newer else pin.version


def released(pin: Pin, usable: Iterable[str]) -> bool:
    """Whether a rollback/rollout pin no longer holds (a newer version arrived, or its version is gone)."""
    usable = list(usable)
    if pin.until_newer_than is None:
        return False
    return pin.version not in usable or any(version_key(v) > version_key(pin.until_newer_than) for v in usable)
