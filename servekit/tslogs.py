"""Read TorchServe's own logs: when each step of bringing up a model version's workers happened."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

# Steps in the order TorchServe goes through them; each pattern is matched on lines of the version.
STEPS = (
    ("unpacked", "Adding new version {version} for model {model}"),
    ("process_spawned", "Worker cmdline"),
    ("worker_started", "Torch worker started."),
    ("load_sent", "Flushing req.cmd LOAD"),
    ("handler_loading", "model_name: {model}, batchSize"),
    ("handler_ready", " ready on "),
    ("model_loaded", "State change WORKER_STARTED -> WORKER_MODEL_LOADED"),
)
_STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}),(\d{3}) ")


def _stamp(line: str) -> float | None:
    m = _STAMP.match(line)
    if not m:
        return None
    # log4j writes the JVM's local time without a zone; read it as this machine's local time.
    return dt.datetime.fromisoformat(f"{m.group(1)}.{m.group(2)}").timestamp()


def read_tail(path: str | Path, max_bytes: int) -> str:
    """The last ``max_bytes`` of a (growing) log file as text."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        return f.read().decode("utf-8", "replace")


def tail_lines(path: str | Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log, for an error message ("(no log)" when it cannot be read)."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def worker_timeline(
    log_dir: str | Path, model: str, version: str, max_bytes: int = 8 << 20
) -> dict[str, tuple[float, float]]:
    """For each step, the (first, last) epoch time it was logged for ``model`` ``version``'s workers.

    Only the last ``max_bytes`` of each log are read (a long-running server's logs grow).
    """
    tag = f"-{model}_{version}"
    found: dict[str, list[float]] = {}
    for name in ("ts_log.log", "model_log.log"):
        path = Path(log_dir) / name
        if not path.is_file():
            continue
        for line in read_tail(path, max_bytes).splitlines():
            t = _stamp(line)
            if t is None:
                continue
            for step, pattern in STEPS:
                text = pattern.format(model=model, version=version)
                if text in line and (step == "unpacked" or tag in line):
                    found.setdefault(step, []).append(t)
    return {step: (min(ts), max(ts)) for step, ts in found.items()}


def relative_timeline(timeline: dict[str, tuple[float, float]], zero: float) -> dict[str, list[float]]:
    """The timeline as seconds after ``zero`` (e.g. the publish time), steps in TorchServe's order."""
    return {
        step: [round(timeline[step][0] - zero, 2), round(timeline[step][1] - zero, 2)]
        for step, _ in STEPS
        if step in timeline
    }


def describe(timeline: dict[str, list[float]]) -> str:
    """``unpacked 0.9 s, worker started 2.2 s, ...``: when the last worker reached each step, in order."""
    return ", ".join(f"{step.replace('_', ' ')} {timeline[step][1]:.1f} s" for step, _ in STEPS if step in timeline)
