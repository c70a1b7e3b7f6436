"""Start the server of one bench run, TorchServe or the LitServe peer, and say what the load needs from it."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml
from urllib3 import encode_multipart_formdata

from .. import health, server
from ..client import model_states, wait_until
from ..errors import ConfigError
from .corpus import BenchImage
from .loadgen import Target
from .plan import Plan, Point
from .procs import Roles, torchserve_role

PEER_FIELD = "content"  # the multipart field that carries the image to the peer (servekit/bench/peer_app.py)
# Run dirs of the servers started and not stopped yet, so that a SIGTERM can stop them (stop_all).
_running: set[Path] = set()
_stopping = threading.Event()


class Terminated(BaseException):
    """The bench is stopping (SIGTERM): no more servers start. A BaseException, so no run records it as its failure."""


def stop_all() -> None:
    """Stop every server this process started, and refuse to start more (called from the SIGTERM handler)."""
    _stopping.set()
    for run_dir in list(_running):
        server.stop(run_dir)
        _running.discard(run_dir)


def stopping() -> bool:
    """Whether stop_all has been called."""
    return _stopping.is_set()


def _launched(run_dir: Path) -> None:
    if _stopping.is_set():
        server.stop(run_dir)
        raise Terminated()
    _running.add(run_dir)


@contextlib.contextmanager
def env_vars(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block (the server inherits them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class Serving:
    """A started server: where to send the load, its process group, and which of its processes do what."""

    target: Target
    pgid: int
    run_dir: Path
    roles: Roles = torchserve_role
    workers_on_gpu: int = 0

    def stop(self) -> None:
        """Stop the whole process group."""
        server.stop(self.run_dir)
        _running.discard(self.run_dir)


def start_torchserve(
    plan: Plan, mar: Path, point: Point, env: dict[str, str], run_dir: Path, images: Sequence[BenchImage], topk: int
) -> Serving:
    """Start TorchServe on free ports with ``env`` and wait for every worker to be READY."""
    overrides = {**server.private_ports(), **plan.server_overrides}
    # TorchServe hands workers GPU ids round-robin over the first number_of_gpu GPUs.
    overrides["number_of_gpu"] = str(point.gpus if plan.device == "cuda" else 0)
    workers = point.total_workers
    cfg = server.ServerConfig(run_dir, mar.parent, overrides=overrides)
    with env_vars(env):
        proc = server.start(cfg, {plan.model: mar.name}, log=lambda *_: None)
    _launched(run_dir)
    try:
        health.wait_ready(cfg, [plan.model], timeout=900, proc=proc)

        def all_ready() -> bool:
            states = [s for s in model_states(cfg.management()) if s.name == plan.model and s.default]
            return bool(states) and states[0].ready_workers >= workers

        wait_until(all_ready, 900, what=f"{workers} READY workers")
        described = cfg.management().describe(plan.model, "")[0].get("workers", [])
    except Exception:
        server.stop(run_dir)
        raise
    key = cfg.tokens.keys().inference if cfg.tokens else ""
    target = Target(
        url=f"{cfg.address('inference_address')}/predictions/{plan.model}",
        bodies=tuple((i.body, i.content_type) for i in images),
        headers={"Authorization": f"Bearer {key}"},
        topk=topk,
    )
    return Serving(target, proc.pid, run_dir, workers_on_gpu=sum(bool(w.get("gpu")) for w in described))


def start_litserve(
    plan: Plan,
    artifact: Path,
    model_config: dict[str, Any],
    point: Point,
    api_servers: int,
    run_dir: Path,
    images: Sequence[BenchImage],
    topk: int,
) -> Serving:
    """Start the LitServe peer (its own process group) and wait until every inference worker is set up."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "logs").mkdir(exist_ok=True)
    config_file = run_dir / "model-config.yaml"
    config_file.write_text(yaml.safe_dump(model_config, sort_keys=False))
    pid_dir = run_dir / "worker-pids"
    port = server.free_port()
    cmd = [
        sys.executable,
        "-m",
        "servekit.bench.peer_app",
        f"--artifact={artifact}",
        f"--model-config={config_file}",
        f"--device={plan.device}",
        f"--gpus={point.gpus}",
        f"--workers={point.workers}",
        f"--api-servers={api_servers}",
        f"--port={port}",
        f"--pid-dir={pid_dir}",
    ]
    with open(run_dir / "logs" / "peer.out", "ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=run_dir, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    (run_dir / server.PID_FILE).write_text(str(proc.pid))
    _launched(run_dir)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise ConfigError(f"the LitServe peer exited with code {proc.returncode}; see {run_dir / 'logs'}")
        workers = list(pid_dir.glob("*")) if pid_dir.is_dir() else []
        if len(workers) < point.total_workers:
            return False
        try:
            return requests.get(f"{url}/health", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_until(ready, 900, what=f"the LitServe peer's {point.total_workers} workers")
    except Exception:
        server.stop(run_dir)
        raise
    # A multipart upload each, as a browser's form sends a file.
    forms = tuple(encode_multipart_formdata({PEER_FIELD: (Path(i.name).name, i.body, i.content_type)}) for i in images)
    target = Target(url=f"{url}/predict", bodies=forms, headers={}, topk=topk)
    on_gpu = sum("cuda" in f.read_text() for f in pid_dir.glob("*"))
    return Serving(target, proc.pid, run_dir, roles=peer_roles(pid_dir), workers_on_gpu=on_gpu)


def peer_roles(pid_dir: Path) -> Roles:
    """The peer's inference workers left their PIDs in ``pid_dir``; its other processes serve HTTP."""
    workers: set[int] = set()

    def role(p: psutil.Process) -> str:
        if not workers:
            workers.update(int(f.name) for f in pid_dir.glob("*") if f.name.isdigit())
        return "workers" if p.pid in workers else "frontend"

    return role
