"""Preloaded workers: a preloader imports torch, torchvision, TorchServe's worker and servekit once,
then forks each worker TorchServe asks for, so a new worker skips seconds of imports.

A worker's start is mostly imports (about 3 s per worker on 2 cores; 9-10 s of a 4-worker switch
on a busy GPU host), and a hot reload starts a whole new set of workers. Unless
``SERVEKIT_PRELOAD_WORKERS=0``, the server is started through :func:`launch`: the preloader runs in
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
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NoReturn

from .preload_client import HEADER, PID_SUFFIX
from .preload_hold import Hold, install_in_worker

ENV = "SERVEKIT_PRELOAD_WORKERS"
DIR = "preload"  # in the run dir: the socket and TorchServe's "python"
SOCKET = "preload.sock"
# What every worker imports before it can load a model; a handler's own imports come on top.
MODULES = ("torch", "torchvision", "ts.model_service_worker", "servekit.handlers.image_classifier")
OTF = "ts.protocol.otf_message_handler"  # imported by TorchServe's worker: where the hold hooks in
MAX_REQUEST = 4 << 20
MAX_SOCKET_PATH = 100  # a Unix socket's path must fit in 108 bytes
# Imports must leave the preloader with one thread: a fork copies only the calling thread, so a
# BLAS or OpenMP pool started at import would be missing (and its locks possibly held) in every worker.
SINGLE_THREADED = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def enabled(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether the server should start its workers through the preloader (on unless the variable says off)."""
    return env.get(ENV, "").strip().lower() not in ("0", "false", "no", "off")


def launch(ts_args: list[str]) -> int:
    """Start the preloader, and TorchServe's launcher in this process with workers run through it.

    The two start side by side: the Java frontend boots while the preloader imports, and a worker
    it asks for meanwhile waits for the preloader (``preload_client``). Runs in the server's run dir
    (``server.start`` sets it); the preloader stops with TorchServe.
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
        Path(f"{sock}{PID_SUFFIX}").write_text(str(preloader.pid))
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
    loop = _Loop(listener, base_path, [wake_r, wake_w])
    try:
        while True:
            for key, _ in loop.sel.select(timeout=1.0):
                if key.fileobj is wake_r:
                    with contextlib.suppress(BlockingIOError):
                        wake_r.recv(4096)
                else:
                    key.data()
            loop.reap()
    finally:
        # The workers killed below signal their exit while this process shuts down and closes the
        # wake-up socket: writing to it then would only print an error.
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sock_path.unlink(missing_ok=True)
        loop.stop()


@dataclass
class _Worker:
    stand_in: socket.socket  # the stand-in's connection: it closes when TorchServe kills the stand-in
    hold: Hold


class _Loop:
    """The preloader's state: its listener, the live workers and the connections held for dead ones."""

    def __init__(self, listener: socket.socket, path: list[str], own: list[socket.socket]) -> None:
        self.listener, self.path, self.own = listener, path, own
        self.sel = selectors.DefaultSelector()
        self.sel.register(listener, selectors.EVENT_READ, data=self.accept)
        self.sel.register(own[0], selectors.EVENT_READ)
        self.workers: dict[int, _Worker] = {}
        self.held: set[Hold] = set()

    def accept(self) -> None:
        """Fork a worker for the stand-in that connected."""
        conn, _ = self.listener.accept()
        conn.settimeout(5)  # a stand-in sends at once; anything else must not hold up the next fork for long
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError) as exc:
            print(f"servekit preload: bad request: {exc}", file=sys.stderr, flush=True)
            conn.close()
            return
        hold = Hold()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.sel.close()
            signal.set_wakeup_fd(-1)
            inherited = [self.listener, conn, hold.ours, *self.own, *self._sockets()]
            _become_worker(request, fds, inherited, self.path, hold)
        for fd in fds:
            os.close(fd)
        hold.forked()
        conn.settimeout(None)
        conn.sendall(f"pid:{pid}\n".encode())
        self.workers[pid] = _Worker(conn, hold)
        self.sel.register(conn, selectors.EVENT_READ, data=partial(self._stand_in_gone, pid, conn))
        self.sel.register(hold.ours, selectors.EVENT_READ, data=partial(self._handed, hold))

    def _sockets(self) -> list[socket.socket]:
        held = [s for h in self.held for s in h.sockets()]
        return [*held, *(s for w in self.workers.values() for s in (w.stand_in, *w.hold.sockets()))]

    def _stand_in_gone(self, pid: int, conn: socket.socket) -> None:
        """The stand-in only ever closes its end: TorchServe killed it, so its worker goes too."""
        try:
            if conn.recv(1):
                return
        except OSError:
            pass
        self.sel.unregister(conn)  # at EOF it stays readable: watching it until the reap would spin the loop
        _kill(pid)

    def _handed(self, hold: Hold) -> None:
        if not hold.receive():
            self.sel.unregister(hold.ours)  # the worker closed its end: nothing more will come

    def _release(self, hold: Hold, held: socket.socket) -> None:
        """The frontend sent a batch to the dead worker (or closed): closing now gets the batch answered."""
        self.sel.unregister(held)
        hold.close()
        self.held.discard(hold)

    def reap(self) -> None:
        """Collect exited workers: tell their stand-ins the exit code, and close or hold their connections."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(OSError):
                worker.stand_in.sendall(f"exit:{128 - code if code < 0 else code}\n".encode())
            for s in (worker.stand_in, worker.hold.ours):
                with contextlib.suppress(KeyError, ValueError):  # already unregistered, or closed
                    self.sel.unregister(s)
            worker.stand_in.close()
            held = worker.hold.release_now()
            if held is not None:
                self.held.add(worker.hold)
                self.sel.register(held, selectors.EVENT_READ, data=partial(self._release, worker.hold, held))

    def stop(self) -> None:
        """Kill every worker and drop every held connection."""
        for pid in self.workers:
            _kill(pid)
        for hold in [*self.held, *(w.hold for w in self.workers.values())]:
            hold.close()


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


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _become_worker(
    request: dict, fds: list[int], inherited: list[socket.socket], base_path: list[str], hold: Hold
) -> NoReturn:
    """In the forked child: take the stand-in's stdio, environment and directory, then run the worker script."""
    code = 1
    try:
        for s in inherited:
            s.close()
        otf = sys.modules.get(OTF)
        if otf is not None:  # preloaded with TorchServe's worker: hand its frontend connection over
            install_in_worker(hold.theirs, hold.flag, otf)
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
