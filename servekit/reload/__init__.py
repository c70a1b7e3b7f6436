"""Hot model reload: watch the model store and move TorchServe to new archive versions without failing requests.

One module per job: ``pins`` (the desired versions file), ``status`` (status file, metrics),
``warmup`` (the sample a new version must answer), ``capacity`` (room for it), ``switch`` (the
register -> ready -> warm-up -> set-default -> drain protocol), ``watcher`` (the loop), ``http``
(its /ready and /metrics endpoint) and ``__main__`` (``servekit reload ...``).
"""

from __future__ import annotations

import sys

from ..server import ServerConfig


def watch_command(cfg: ServerConfig, *extra: str) -> list[str]:
    """The command that runs the watcher as its own process for the server ``cfg`` describes."""
    return [sys.executable, "-m", "servekit.reload", "watch", *cfg.cli_args(), *extra]
