"""One process at a time per GPU for work that keeps a CPU core busy for as long as it waits.

nvjpeg's batched decode on the GPU's hardware decoder holds a core for most of its wall time. When
several workers on one GPU decode at once, each call lasts longer and burns more CPU (H200: 58 us
of CPU per image alone, 72-118 us with four processes at once; docs/performance.md). Waiting on
this lock costs no CPU: the kernel parks the process until the holder lets go.

The lock is a file in the temp dir, which a servekit server makes private to its run dir
(``<run dir>/tmp``), so it is shared by that server's workers and nothing else. It is opened
without following links and only if this user can own it; otherwise work goes on without it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)


class GpuLock:
    """An exclusive lock for GPU ``index`` (a no-op when its file cannot be used)."""

    def __init__(self, index: int, what: str, directory: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(directory or tempfile.gettempdir()) / f"servekit-gpu{index}-{what}.lock"
        self.fd: int | None = None
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.warning("cannot use %s (%s): %s runs without the per-GPU lock", self.path, exc, what)
            return
        if os.fstat(fd).st_uid != os.getuid():  # another user's file could be held forever
            os.close(fd)
            log.warning("%s belongs to another user: %s runs without the per-GPU lock", self.path, what)
            return
        self.fd = fd

    @property
    def enabled(self) -> bool:
        """Whether the lock file is open (else entering does nothing)."""
        return self.fd is not None

    def __enter__(self) -> GpuLock:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock file (a held lock is released with it)."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None
