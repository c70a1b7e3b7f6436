"""Hold a dead preloaded worker's frontend connection until TorchServe can answer its requests.

TorchServe 0.12 answers the requests of a worker whose connection closes only when its worker
thread already has their batch in hand (waiting for the reply). If the close comes while the thread
is still gathering a batch (``Model.pollBatch``, up to ``maxBatchDelay``), it drops the requests it
gathered and they are never answered. A plain worker's close usually comes after that window (the
kernel frees the dead process's memory first); a forked worker frees little, so its close often
lands inside it.

So each preloaded worker hands the preloader a copy of its frontend connection and keeps one shared
byte saying whether it holds a request. When the worker dies holding one, the frontend is waiting
for the reply and the preloader closes the connection at once; when it dies idle, the preloader
closes it only once the frontend sends the next batch, which it does only with the batch in hand.
"""

from __future__ import annotations

import contextlib
import mmap
import select
import socket
from typing import Any

IDLE, BUSY = 0, 1


class Hold:
    """One worker's handed-over frontend connection and its busy byte, as the preloader sees them."""

    def __init__(self) -> None:
        self.flag = mmap.mmap(-1, 1)  # anonymous and shared: the forked worker writes, the preloader reads
        self.ours, self.theirs = socket.socketpair()
        self.conn: socket.socket | None = None

    def sockets(self) -> list[socket.socket]:
        """Every socket this hold keeps open in the preloader (a new worker must not inherit them)."""
        return [s for s in (self.ours, self.theirs, self.conn) if s is not None and s.fileno() >= 0]

    def forked(self) -> None:
        """In the preloader after the fork: the worker keeps the other end."""
        self.theirs.close()

    def receive(self) -> bool:
        """Take the connection the worker handed over, if any is waiting; False once the worker's end is closed."""
        try:
            _, fds, _, _ = socket.recv_fds(self.ours, 16, 4, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        for fd in fds:
            if self.conn is None:
                self.conn = socket.socket(fileno=fd)
            else:  # pragma: no cover - a worker hands over one connection
                socket.close(fd)
        return bool(fds)

    def release_now(self) -> socket.socket | None:
        """After the worker's exit: close the connection now if that is safe; else return it, still held."""
        self.receive()  # a connection handed over just before the exit is still in flight
        self.ours.close()
        if self.conn is None or self.flag[0] == BUSY or _readable(self.conn):
            self.close()
            return None
        return self.conn

    def close(self) -> None:
        """Close the held connection (TorchServe then answers the batch it sent) and the busy byte."""
        for s in self.sockets():
            s.close()
        self.conn = None
        with contextlib.suppress(BufferError):
            self.flag.close()


def _readable(conn: socket.socket) -> bool:
    poll = select.poll()  # not select(): it fails on descriptors past 1024
    poll.register(conn, select.POLLIN)
    return bool(poll.poll(0))


def install_in_worker(keeper: socket.socket, flag: mmap.mmap, otf: Any) -> None:
    """In the forked worker: hand the frontend connection to the preloader and keep the busy byte.

    ``otf`` is TorchServe's ``ts.protocol.otf_message_handler``; the worker script imports its
    ``retrieve_msg`` when it starts, so this runs before it.
    """
    original = otf.retrieve_msg
    waits: list[select.poll] = []

    def retrieve_msg(conn: socket.socket) -> Any:
        if not waits:
            waits.append(select.poll())
            waits[0].register(conn, select.POLLIN)
            with contextlib.suppress(OSError):  # without the preloader the worker still serves
                socket.send_fds(keeper, [b"c"], [conn.fileno()])
            keeper.close()
        flag[0] = IDLE  # the previous reply is sent
        # Busy from the message's first byte, not its last: once the worker has read all of it the
        # socket is quiet, and a death mid-parse must still count as holding a request. The frontend
        # sends nothing more until it has the reply, so no message is ever read ahead into a buffer.
        waits[0].poll()
        flag[0] = BUSY
        return original(conn)

    otf.retrieve_msg = retrieve_msg
