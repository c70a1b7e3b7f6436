"""The processes of a benchmarked server: which is the frontend, which are workers, their CPU time."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import psutil

from .. import server

# A server process's role: "frontend" (takes the HTTP requests), "workers" (run the model), "preloader"
# (what preloaded workers are forked from) or "other".
Roles = Callable[[psutil.Process], str]
PRELOADER = "servekit.preload"  # the module the preloader runs as
STAND_IN = "preload_client.py"  # what TorchServe starts for each preloaded worker


def torchserve_role(p: psutil.Process) -> str:
    """A TorchServe process's role, from its command line (a preloaded worker: from its parent's)."""
    cmdline = p.cmdline()
    if any(part.endswith(STAND_IN) for part in cmdline):  # names the worker script, but only waits for it
        return "other"
    if PRELOADER in cmdline:
        # A fork keeps the preloader's command line: the preloader's children are the workers.
        parent = p.parent()
        if parent is not None and parent.cmdline() == cmdline:
            return "workers"
        # `python -m servekit.preload launch ...` starts TorchServe; `... <socket>` is the preloader.
        return "other" if cmdline[cmdline.index(PRELOADER) + 1 :][:1] == ["launch"] else "preloader"
    return process_role(cmdline)


def worker_processes(pgid: int, roles: Roles = torchserve_role) -> list[psutil.Process]:
    """The model workers in a server's process group."""
    procs = []
    for pid in server.group_members(pgid):
        try:
            p = psutil.Process(pid)
            if roles(p) == "workers":
                procs.append(p)
        except psutil.Error:
            continue
    return procs


def group_cpu_seconds(pgid: int, role: str | None = None, roles: Roles = torchserve_role) -> float:
    """User + system CPU seconds of every live process in a group, or of one ``role`` in it.

    The split between ``frontend`` and ``workers`` shows whether a request's CPU goes to the
    serving framework itself or to the handler.
    """
    total = 0.0
    for pid in server.group_members(pgid):
        try:
            p = psutil.Process(pid)
            if role is not None and roles(p) != role:
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def process_role(cmdline: Sequence[str]) -> str:
    """``frontend``, ``workers`` or ``other`` (the launcher) for a server process's command line."""
    if any("model_service_worker" in part for part in cmdline):
        return "workers"
    if cmdline and Path(cmdline[0]).name.startswith("java"):
        return "frontend"
    return "other"


def busy_seconds() -> float:
    """Machine-wide busy CPU seconds (everything but idle and iowait)."""
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


def worker_env_threads(pgid: int) -> list[str | None]:
    """OMP_NUM_THREADS as each TorchServe worker process sees it (a preloaded worker: as the preloader saw it,
    from the same server environment)."""
    out = []
    for p in worker_processes(pgid):
        try:
            out.append(p.environ().get("OMP_NUM_THREADS"))
        except psutil.Error:
            out.append(None)
    return out
