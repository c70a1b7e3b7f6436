"""The preloader's hold on a dead worker's frontend connection: a forked worker, a socketpair as the frontend."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
import types

import pytest

from servekit.preload_hold import BUSY, IDLE, Hold, install_in_worker


def _fake_otf() -> types.SimpleNamespace:
    """TorchServe's message module as the hook sees it: ``retrieve_msg`` blocks until the frontend sends a byte."""
    return types.SimpleNamespace(retrieve_msg=lambda conn: conn.recv(1))


def _worker(hold: Hold, frontend: socket.socket, conn: socket.socket, messages: int, otf=None) -> int:
    """Fork a worker that reads ``messages`` messages through the hook, then waits to be killed."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            hold.ours.close()
            frontend.close()
            otf = otf or _fake_otf()
            install_in_worker(hold.theirs, hold.flag, otf)
            for _ in range(messages):
                otf.retrieve_msg(conn)
            if messages == 0:
                otf.retrieve_msg(conn)  # hands the connection over, marks idle, and blocks
            time.sleep(60)
        finally:
            os._exit(0)
    hold.forked()
    conn.close()
    deadline = time.monotonic() + 10
    while hold.conn is None and time.monotonic() < deadline:
        select.select([hold.ours], [], [], 0.1)
        hold.receive()
    assert hold.conn is not None, "the worker did not hand its connection over"
    return pid


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _closed(frontend: socket.socket, within: float) -> bool:
    ready, _, _ = select.select([frontend], [], [], within)
    if not ready:
        return False
    try:
        return frontend.recv(1) == b""
    except ConnectionResetError:
        return True


@pytest.fixture
def pair():
    frontend, conn = socket.socketpair()
    yield frontend, conn
    frontend.close()


def test_a_worker_that_dies_idle_keeps_the_connection_until_the_frontend_sends(pair):
    frontend, conn = pair
    hold = Hold()
    pid = _worker(hold, frontend, conn, messages=0)
    time.sleep(0.2)
    assert hold.flag[0] == IDLE
    _kill(pid)
    held = hold.release_now()
    assert held is not None and held is hold.conn, "closed while TorchServe may still be gathering a batch"
    assert not _closed(frontend, 0.3), "the connection closed with the worker"
    frontend.sendall(b"next batch")
    assert select.select([hold.conn], [], [], 5)[0], "the preloader would not see the frontend's batch"
    hold.close()
    assert _closed(frontend, 5)


def test_a_worker_that_dies_with_a_request_closes_the_connection_at_once(pair):
    frontend, conn = pair
    hold = Hold()
    frontend.sendall(b"m")  # the request the worker takes and dies with
    pid = _worker(hold, frontend, conn, messages=1)
    deadline = time.monotonic() + 5
    while hold.flag[0] != BUSY and time.monotonic() < deadline:
        time.sleep(0.01)
    assert hold.flag[0] == BUSY
    _kill(pid)
    assert hold.release_now() is None
    assert _closed(frontend, 5), "the frontend waits for a reply from a dead worker"


def test_a_worker_that_dies_parsing_a_message_counts_as_holding_it(pair):
    frontend, conn = pair
    hold = Hold()
    # The whole message is read off the socket, and the worker dies before the parse returns.
    parsing = types.SimpleNamespace(retrieve_msg=lambda conn: (conn.recv(1), time.sleep(60)))
    frontend.sendall(b"m")
    pid = _worker(hold, frontend, conn, messages=1, otf=parsing)
    deadline = time.monotonic() + 5
    while hold.flag[0] != BUSY and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    _kill(pid)
    assert hold.release_now() is None, "held while the frontend waits for the reply to a message already read"
    assert _closed(frontend, 5)


def test_a_worker_that_never_connected_leaves_nothing_held():
    hold = Hold()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os._exit(0)
    hold.forked()
    os.waitpid(pid, 0)
    assert hold.release_now() is None and hold.sockets() == []


def test_without_the_preloader_the_worker_still_reads(pair):
    frontend, conn = pair
    keeper, gone = socket.socketpair()
    gone.close()  # the preloader's end is gone: handing over fails quietly
    hold = Hold()
    otf = _fake_otf()
    install_in_worker(keeper, hold.flag, otf)
    frontend.sendall(b"m")
    assert otf.retrieve_msg(conn) == b"m" and hold.flag[0] == BUSY
    conn.close()
    hold.close()
