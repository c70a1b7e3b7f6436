"""Load failures as the worker records them itself, beside TorchServe's logs.

TorchServe 0.12 stops reading a worker's output as soon as it gives the worker up, so a dying
worker's traceback is often missing from ``model_log.log`` (seen on slow machines). A servekit
handler writes its load failure here before it raises; the watcher reads it from here first.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import first_line

log = logging.getLogger(__name__)

FILE = "load_errors.jsonl"
DIR_ENV = "LOG_LOCATION"  # TorchServe's log directory, which servekit sets for the frontend and its workers
MAX_BYTES = 256 * 1024  # past this the file is cut to its newest records, half this size


@dataclass(frozen=True)
class LoadError:
    """One worker's failed load of one model version."""

    time: float
    model: str
    version: str
    pid: int
    error: str


def describe_exception(exc: BaseException) -> str:
    """``module.Type: first line``: the qualified type says what went wrong (builtins stay bare)."""
    kind = type(exc)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    return f"{name}: {first_line(exc)}"


def default_dir() -> Path | None:
    """Where this process records load failures: TorchServe's log directory, if it was given one."""
    value = os.environ.get(DIR_ENV, "")
    return Path(value) if value else None


def record(model: str, version: str, exc: BaseException, directory: Path | None = None) -> None:
    """Append this worker's load failure (best effort: a full or read-only disk must not hide ``exc``)."""
    directory = directory if directory is not None else default_dir()
    if directory is None:
        return
    entry = {"time": time.time(), "model": model, "version": version, "pid": os.getpid()}
    line = json.dumps({**entry, "error": describe_exception(exc)}) + "\n"
    path = directory / FILE
    try:
        with path.open("a", encoding="utf-8") as f:  # one short O_APPEND write: workers may fail at once
            f.write(line)
        if path.stat().st_size > MAX_BYTES:
            _trim(path)
    except OSError as err:
        log.warning("could not record the load failure in %s: %s", path, err)


def read(directory: Path) -> list[LoadError]:
    """Every recorded load failure, oldest first (unreadable lines skipped)."""
    try:
        lines = (directory / FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            item = json.loads(line)
            out.append(LoadError(float(item["time"]), item["model"], item["version"], int(item["pid"]), item["error"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def latest(directory: Path, model: str, version: str, since: float = 0.0) -> str | None:
    """The newest load error of this model version recorded at or after ``since`` (epoch seconds)."""
    errors = [e.error for e in read(directory) if (e.model, e.version) == (model, version) and e.time >= since]
    return errors[-1] if errors else None


def _trim(path: Path) -> None:
    kept: list[str] = []
    size = 0
    for line in reversed(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        size += len(line) + 1
        if size > MAX_BYTES // 2:
            break
        kept.append(line)
    aside = path.with_name(f".{path.name}.{os.getpid()}")  # written aside, then renamed: readers never see half
    aside.write_text("".join(f"{line}\n" for line in reversed(kept)), encoding="utf-8")
    os.replace(aside, path)
