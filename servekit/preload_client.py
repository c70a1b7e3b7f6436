"""What TorchServe starts as a worker's "python" when workers are preloaded (stdlib only: it must start fast).

``preload_client.py SOCKET PYTHON WORKER_SCRIPT ARGS...`` hands its argv, environment, working
directory and stdin/stdout/stderr to the preloader at SOCKET, which forks a worker that has torch
imported already. This process stays as the worker's stand-in for TorchServe: it exits with the
worker's exit code, and when TorchServe kills it, the preloader kills the worker. Without a
preloader it becomes the plain worker (``PYTHON WORKER_SCRIPT ARGS...``), and says so.

The frontend boots while the preloader imports, so the first workers may start before SOCKET
exists: while the process named in ``SOCKET.pid`` lives, they wait for it (a plain start would
import everything again, on the same cores).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time

HEADER = 8  # bytes of the request's length, big-endian
WORKER_SCRIPT = "model_service_worker.py"  # TorchServe's worker: the only script the preloader runs
PID_SUFFIX = ".pid"  # beside the socket: the preloader's PID, written when it is started
WAIT_S = 110.0  # for a preloader still importing; TorchServe gives a starting worker 2 minutes


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not: the launcher reaps the preloader only at the end)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for_preloader(sock_path: str) -> None:
    """Until the socket appears, the preloader named beside it ends, or ``WAIT_S`` pass."""
    try:
        with open(sock_path + PID_SUFFIX) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(sock_path) and _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: list[str]) -> int:
    """Run one worker through the preloader at ``argv[1]``, or plainly with ``argv[2]``."""
    sock_path, python, worker = argv[1], argv[2], argv[3:]
    if not worker or not worker[0].endswith(WORKER_SCRIPT):  # TorchServe runs python for other jobs too (pip)
        os.execv(python, [python, *worker])
    _wait_for_preloader(sock_path)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(sock_path)
    except OSError as exc:
        print(f"servekit preload: no preloader at {sock_path} ({exc}); starting the worker plainly", file=sys.stderr)
        sys.stderr.flush()
        os.execv(python, [python, *worker])
    request = json.dumps({"argv": worker, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(conn, [len(request).to_bytes(HEADER, "big") + request], [0, 1, 2])
    reader = conn.makefile("r", encoding="utf-8")
    pid = 0

    def forward(signum: int, _frame: object) -> None:
        if pid:
            os.kill(pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for line in reader:
        kind, _, value = line.strip().partition(":")
        if kind == "pid":
            pid = int(value)
        elif kind == "exit":
            return int(value)
    # The preloader is gone without the worker's exit: the worker has lost its keeper, so end it.
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
