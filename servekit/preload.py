"""Preloaded workers: a preloader imports torch, torchvision, TorchServe's worker and servekit once,
then forks each worker TorchServe asks for, so a new worker skips seconds of imports.

A worker's start is mostly imports (about 3 s per worker on 2 cores; 9-10 s of a 4-worker switch
on a busy GPU host), and a hot reload starts a whole new set of workers. With
``SERVEKIT_PRELOAD_WORKERS=1`` the server is started through :func:`launch`: the preloader runs in
the server's process group, and TorchServe's "python" is a small script that runs
``preload_client.py`` (see there). The preloader never touches CUDA: a CUDA context does not
survive a fork, so each worker makes its own, as a plain worker does.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import NoReturn

from .preload_client import HEADER

ENV = "SERVEKIT_PRELOAD_WORKERS"
DIR = "preload"  # in the run dir: the socket and TorchServe's "python"
SOCKET = "preload.sock"
# What every worker imports before it can load a model; a handler's own imports come on top.
MODULES = ("torch", "torchvision", "ts.model_service_worker", "servekit.handlers.image_classifier")
MAX_REQUEST = 4 << 20
MAX_SOCKET_PATH = 100  # a Unix socket's path must fit in 108 bytes
# Imports must leave the preloader with one thread: a fork copies only the calling thread, so a
# BLAS or OpenMP pool started at import would be missing (and its locks possibly held) in every worker.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def enabled(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the server should start its workers through the preloader (off unless the variable says on).

    Off by default: a SIGKILLed preloaded worker can leave requests it held unanswered (docs/reload.md).
    """
    return env.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")


def launch(ts_args: list[str], wait_s: float = 120.0) -> int:
    """Start the preloader, then TorchServe's launcher in this process with workers run through it.

    Runs in the server's run dir (``server.start`` sets it); the preloader stops with TorchServe.
    """
    here = Path.cwd() / DIR
    here.mkdir(mode=0o700, exist_ok=True)
    here.chmod(0o700)  # whoever can connect can have the preloader fork a worker: this user only
    sock = here / SOCKET
    if len(str(sock)) > MAX_SOCKET_PATH:
        sock = Path(tempfile.mkdtemp(prefix="servekit-preload-")) / SOCKET  # mkdtemp makes it 0700 too
    sock.unlink(missing_ok=True)
    python = here / "python"
    client = Path(__file__).with_name("preload_client.py")
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" -s "{client}" "{sock}" "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    preloader = subprocess.Popen([sys.executable, "-m", "servekit.preload", str(sock)])
    try:
        deadline = time.monotonic() + wait_s
        while not sock.exists() and preloader.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not sock.exists():
            print(f"servekit preload: the preloader is not up ({preloader.poll()=}); workers start plainly", flush=True)
        sys.executable = str(python)  # TorchServe's launcher passes this to the frontend as the workers' python
        sys.argv = ["ts.model_server", *ts_args]
        runpy.run_module("ts.model_server", run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as exc:
        return _exit_code(exc)
    finally:
        preloader.terminate()
        try:
            preloader.wait(10)
        except subprocess.TimeoutExpired:
            preloader.kill()
        if sock.parent != here:
            shutil.rmtree(sock.parent, ignore_errors=True)


def serve(sock_path: Path, modules: tuple[str, ...] = MODULES) -> NoReturn:
    """Import ``modules``, then fork a worker for every request on ``sock_path`` until terminated."""
    t0 = time.perf_counter()
    os.environ.update(SINGLE_THREADED)  # this process only: each worker gets its stand-in's environment
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # a worker imports what it needs anyway
            print(f"servekit preload: cannot preload {name}: {exc}", file=sys.stderr, flush=True)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        print(f"servekit preload: {threads} threads after the imports; not forking, workers start plainly", flush=True)
        sys.exit(1)
    base_path = sys.path[1:]  # without this process's own first entry (the working directory)
    aside = sock_path.with_name(f".{sock_path.name}.{os.getpid()}")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(aside))
    listener.listen(64)
    os.replace(aside, sock_path)  # appears only once it accepts
    print(f"servekit preload: ready in {time.perf_counter() - t0:.1f} s ({', '.join(modules)})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # A worker's exit wakes the loop at once: its stand-in must end together with it, as a plain
    # worker's process would, or TorchServe sees the connection close well before the process exit.
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    workers: dict[int, socket.socket] = {}  # worker pid -> its stand-in's connection
    try:
        while True:
            for key, _ in sel.select(timeout=1.0):
                if key.fileobj is listener:
                    _accept(listener, sel, workers, base_path, [wake_r, wake_w])
                elif key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                else:
                    _stand_in_readable(key.fileobj, key.data, sel)  # type: ignore[arg-type]
            _reap(sel, workers)
    finally:
        # The workers killed below signal their exit while this process shuts down and closes the
        # wake-up socket: writing to it then would only print an error.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock_path.unlink(missing_ok=True)
        for pid in workers:
            _kill(pid)


def _accept(
    listener: socket.socket,
    sel: selectors.BaseSelector,
    workers: dict[int, socket.socket],
    path: list[str],
    own: list[socket.socket],
) -> None:
    conn, _ = listener.accept()
    conn.settimeout(5)  # a stand-in sends at once; anything else must not hold up the next fork for long
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError) as exc:
        print(f"servekit preload: bad request: {exc}", file=sys.stderr, flush=True)
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        sel.close()
        signal.set_wakeup_fd(-1)
        _become_worker(request, fds, [listener, conn, *own, *workers.values()], path)
    for fd in fds:
        os.close(fd)
    conn.settimeout(None)
    conn.sendall(f"pid:{pid}\n".encode())
    workers[pid] = conn
    sel.register(conn, selectors.EVENT_READ, data=pid)


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST, 3)
    if len(fds) != 3 or len(data) < HEADER:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected stdin/stdout/stderr and a request, got {len(fds)} fds")
    size = int.from_bytes(data[:HEADER], "big")
    body = data[HEADER:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ValueError("the request was cut short")
        body += chunk
    return json.loads(body), list(fds)


def _stand_in_readable(conn: socket.socket, pid: int, sel: selectors.BaseSelector) -> None:
    """The stand-in only ever closes its end: TorchServe killed it, so its worker goes too."""
    try:
        if conn.recv(1):
            return
    except OSError:
        pass
    sel.unregister(conn)  # at EOF it stays readable: watching it until the reap would spin the loop
    _kill(pid)


def _reap(sel: selectors.BaseSelector, workers: dict[int, socket.socket]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = workers.pop(pid, None)
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        try:
            conn.sendall(f"exit:{128 - code if code < 0 else code}\n".encode())
        except OSError:
            pass
        with contextlib.suppress(KeyError):  # already unregistered when its stand-in went first
            sel.unregister(conn)
        conn.close()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _become_worker(request: dict, fds: list[int], inherited: list[socket.socket], base_path: list[str]) -> NoReturn:
    """In the forked child: take the stand-in's stdio, environment and directory, then run the worker script."""
    code = 1
    try:
        for s in inherited:
            s.close()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
            os.close(fd)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # TorchServe reads lines
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        argv = [str(a) for a in request["argv"]]
        extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *extra, *(p for p in base_path if p not in extra)]
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _exit_code(exc: SystemExit) -> int:
    """The process exit code a SystemExit stands for (None is 0, a message is 1)."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


if __name__ == "__main__":
    if sys.argv[1:2] == ["launch"]:
        sys.exit(launch(sys.argv[2:]))
    serve(Path(sys.argv[1]))
