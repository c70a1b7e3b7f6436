"""The model store: archive file names, versions, manifests, atomic publishing and scanning."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import yaml
from packaging.version import InvalidVersion, Version

from .errors import ConfigError

# `<name>-v<version>.mar`: how `servekit archive` names a version in the store.
MAR_NAME = re.compile(r"^(?P<name>.+)-v(?P<version>[^-/]+)\.mar$")
# Files `servekit archive` adds to an archive beside the model: the inputs' fingerprint (an
# unchanged rebuild is "up to date"), and the warm-up request the watcher sends a new version.
FINGERPRINT = "servekit-inputs.sha256"
WARMUP_META = "servekit-warmup.json"


def mar_name(name: str, version: str) -> str:
    """The file name a version of a model has in the store."""
    return f"{name}-v{version}.mar"


def version_key(version: str) -> tuple:
    """Sort key for versions: PEP 440 order (1.10 > 1.9, 2.0rc1 < 2.0); other strings sort below, by parts."""
    try:
        return (1, Version(version), ())
    except InvalidVersion:
        parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_+]", version))
        return (0, Version("0"), parts)


def read_manifest(mar: str | os.PathLike) -> dict:
    """The MANIFEST.json of an archive; raises ConfigError for anything that is not a valid .mar."""
    try:
        with zipfile.ZipFile(mar) as zf:
            return json.loads(zf.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ConfigError(f"{mar} is not a valid model archive: {exc}") from None


def read_member(mar: str | os.PathLike, name: str) -> bytes | None:
    """One file of an archive (None when the archive has no such file or cannot be read)."""
    try:
        with zipfile.ZipFile(mar) as zf:
            return zf.read(name)
    except (zipfile.BadZipFile, KeyError, OSError):
        return None


def archive_min_workers(path: Path, default: int = 1) -> int:
    """minWorkers from the model-config.yaml inside an archive (``default``, the server's, when it sets none)."""
    try:
        config = read_manifest(path).get("model", {}).get("configFile")
        data = yaml.safe_load(read_member(path, config) or b"") if config else None
        return max(1, int((data or {}).get("minWorkers", default)))
    except (ConfigError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return default


def is_candidate(name: str) -> bool:
    """Whether a file name in the store can be an archive (not hidden, not a partial copy)."""
    return name.endswith(".mar") and not name.startswith(".") and not name.endswith((".part", ".tmp"))


def publish(src: Path, store: Path, name: str | None = None) -> Path:
    """Copy ``src`` into ``store`` atomically: written aside under a hidden name, synced, then renamed.

    A watcher polling the store never sees a half-written archive (a rename within one volume is
    atomic), and a crash mid-copy leaves only a hidden ``.part`` file behind.
    """
    store.mkdir(parents=True, exist_ok=True)
    target = store / (name or src.name)
    part = store / f".{target.name}.{os.getpid()}.part"
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, part)
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return target


@dataclass(frozen=True)
class Stamp:
    """What identifies one state of a file: a changed file is a new candidate."""

    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        """The stamp of a file as it is now."""
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns)


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


def inspect_archive(path: Path, stamp: Stamp | None = None) -> Found:
    """Read an archive's model name and version from its manifest (the file name when unreadable)."""
    stamp = stamp or Stamp.of(path)
    guess = MAR_NAME.match(path.name)
    name, version = (guess["name"], guess["version"]) if guess else (path.stem, "?")
    try:
        model = read_manifest(path)["model"]
        return Found(path, stamp, model["modelName"], str(model.get("modelVersion", "1.0")))
    except ConfigError as exc:
        return Found(path, stamp, name, version, exc.message)
    except (KeyError, TypeError) as exc:
        return Found(path, stamp, name, version, f"{path} has no model name in its manifest ({exc})")


def read_store(store: Path, log: Callable[[str], None] | None = None) -> list[Found]:
    """Every archive file in the store as it is now (no settling); unreadable ones are logged when ``log`` is given."""
    found = []
    for path in sorted(store.iterdir()) if store.is_dir() else []:
        if is_candidate(path.name) and path.is_file():
            try:
                item = inspect_archive(path)
            except FileNotFoundError:
                continue
            if item.error and log:
                log(f"skipping {path.name}: {item.error}")
            found.append(item)
    return found


def by_model(found: list[Found]) -> dict[str, dict[str, Found]]:
    """Readable archives grouped by model, then by version (the newest file wins a duplicate version)."""
    grouped: dict[str, dict[str, Found]] = {}
    for item in sorted(found, key=lambda f: f.stamp.mtime_ns):
        if item.error is None:
            grouped.setdefault(item.name, {})[item.version] = item
    return grouped


def left_store(store: Path, url: str) -> bool:
    """Whether the archive a version was registered from is gone (remote URLs never count as gone)."""
    if url.startswith("file://"):
        return not Path(urlparse(url).path).exists()
    return "://" not in url and not (store / url).exists()


@dataclass
class Scan:
    """One poll of the store."""

    archives: list[Found] = field(default_factory=list)
    bad: list[Found] = field(default_factory=list)
    pending: list[Path] = field(default_factory=list)

    def of(self, model: str) -> list[Found]:
        """Readable, settled archives of one model."""
        return [a for a in self.archives if a.name == model]


class StoreScanner:
    """Polls the store; a file counts once its size and mtime held still for ``settle`` seconds (two polls or
    more), or at once when a file event says it was renamed into place (an atomic publish)."""

    def __init__(self, store: Path, settle: float):
        self.store = store
        self.settle = settle
        self._seen: dict[str, tuple[Stamp, float]] = {}
        self._inspected: dict[tuple[str, Stamp], Found] = {}
        self._arrived: set[str] = set()
        self._arrived_lock = threading.Lock()

    def arrived(self, name: str) -> None:
        """``name`` was just renamed into the store (``publish``): it is whole, so the next poll takes it
        without waiting for it to settle. Called from a file-event thread."""
        with self._arrived_lock:
            self._arrived.add(name)

    def poll(self) -> Scan:
        """Look at the store once."""
        now = time.monotonic()
        with self._arrived_lock:
            arrived, self._arrived = self._arrived, set()
        current: dict[str, Stamp] = {}
        for path in self.store.iterdir():
            if is_candidate(path.name):
                try:
                    if path.is_file():
                        current[path.name] = Stamp.of(path)
                except FileNotFoundError:  # removed while we looked
                    continue
        scan = Scan()
        for name, stamp in sorted(current.items()):
            seen = self._seen.get(name)
            if name in arrived:  # renamed into place whole: settled as it is now
                seen = self._seen[name] = (stamp, now - self.settle)
            elif seen is None or seen[0] != stamp:
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
