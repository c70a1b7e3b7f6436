"""Start, wait for and stop a TorchServe process tree (frontend + Python workers) from a run directory."""

from __future__ import annotations

import argparse
import fcntl
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from . import preload
from .client import InferenceClient, ManagementClient
from .config import WORKERS_ENV, available_cpus, read_properties, write_properties
from .errors import ConfigError
from .java import find_java
from .tokens import TokenFile
from .tuning import WORKERS_KEY, resolve_auto

PACKAGE = Path(__file__).resolve().parent
# The template ships in the package; the store and the run dir are the working directory's, so an
# installed servekit (not only a checkout) finds them.
DEFAULT_CONFIG = PACKAGE / "config.properties"
DEFAULT_STORE = Path("model_store")
DEFAULT_RUN = Path(".run")
METRICS_YAML = PACKAGE / "metrics.yaml"
# TorchServe's log4j2 configuration: size-capped rolling files, console output switched by env.
LOG_CONFIG = PACKAGE / "log4j2.xml"
PID_FILE = "server.pid"
# Held (flock) by the server's launcher while it runs. The pid file cannot tell that a run dir is
# shared with another container, whose processes this one cannot see; the lock can.
LOCK_FILE = "server.lock"


def default_paths() -> tuple[Path, Path, Path]:
    """(config template, model store, run dir) from ``$SERVEKIT_CONFIG``, ``_MODEL_STORE``, ``_RUN_DIR``, else ours."""
    env = os.environ
    return (
        Path(env.get("SERVEKIT_CONFIG", DEFAULT_CONFIG)),
        Path(env.get("SERVEKIT_MODEL_STORE", DEFAULT_STORE)),
        Path(env.get("SERVEKIT_RUN_DIR", DEFAULT_RUN)),
    )


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The arguments that locate a server: config template, model store, run dir, overrides."""
    config, store, run = default_paths()
    p.add_argument(
        "--config",
        type=Path,
        default=config,
        help="config.properties template (default: $SERVEKIT_CONFIG or the repository's)",
    )
    p.add_argument(
        "--model-store",
        type=Path,
        default=store,
        help="folder of .mar archives (default: $SERVEKIT_MODEL_STORE or model_store/)",
    )
    p.add_argument(
        "--run-dir",
        type=Path,
        default=run,
        help="key_file.json, logs, pid and status files (default: $SERVEKIT_RUN_DIR or .run/)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config.properties entry (repeatable)",
    )


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` items as a mapping of config.properties entries."""
    overrides = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    return overrides


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """A ServerConfig from the arguments :func:`add_server_args` declares."""
    overrides = parse_overrides(args.set)
    return ServerConfig(args.run_dir.resolve(), args.model_store.resolve(), args.config.resolve(), overrides)


@dataclass
class ServerConfig:
    """Where the server keeps its state and how it is reached."""

    run_dir: Path
    model_store: Path
    template: Path = DEFAULT_CONFIG
    overrides: dict[str, str] = field(default_factory=dict)

    def properties(self) -> dict[str, str]:
        """The effective config.properties: template + model store + overrides."""
        props = read_properties(self.template)
        store = str(self.model_store.resolve())
        props["model_store"] = store
        props["allowed_urls"] = props.get("allowed_urls", "").replace(
            "MODEL_STORE", re.escape(store).replace("\\", "\\\\")
        )
        if props.get("metrics_config", "METRICS_CONFIG") == "METRICS_CONFIG":
            props["metrics_config"] = str(METRICS_YAML)
        props.update(self.overrides)
        resolve_auto(props, available_cpus())
        # Worker sockets and unpacked archives go under the run dir, so servers can coexist.
        tmpdir = f"-Djava.io.tmpdir={self.run_dir / 'tmp'}"
        props["vmargs"] = f"{props.get('vmargs', '')} {tmpdir}".strip()
        return props

    def cli_args(self) -> list[str]:
        """The command-line arguments that rebuild this config (``servekit serve|reload ...``)."""
        args = ["--run-dir", str(self.run_dir), "--model-store", str(self.model_store), "--config", str(self.template)]
        for k, v in self.overrides.items():
            args += ["--set", f"{k}={v}"]
        return args

    def address(self, key: str) -> str:
        """A configured base URL, with 0.0.0.0 replaced by loopback for our own calls."""
        return self.properties()[key].replace("0.0.0.0", "127.0.0.1")

    @property
    def token_auth(self) -> bool:
        """Whether TorchServe checks its own keys (off only behind the pod's authenticating proxy)."""
        return self.properties().get("disable_token_authorization", "false").strip().lower() != "true"

    @property
    def key_file(self) -> Path:
        """Where TorchServe writes its keys (its working directory, the run dir)."""
        return self.run_dir / "key_file.json"

    @property
    def tokens(self) -> TokenFile | None:
        """The run directory's key file (None when token authorization is off)."""
        return TokenFile(self.key_file) if self.token_auth else None

    def inference(self, timeout: float = 60.0) -> InferenceClient:
        """A client for the inference API."""
        return InferenceClient(self.address("inference_address"), self.tokens, timeout=timeout)

    def management(self) -> ManagementClient:
        """A client for the management API."""
        return ManagementClient(self.address("management_address"), self.tokens)


def _env(cfg: ServerConfig, props: dict[str, str], java_home: Path, console: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["JAVA_HOME"] = str(java_home)
    env["PATH"] = f"{java_home / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The launcher keeps its pid file in the temp dir: one per run dir lets servers coexist.
    tmp = cfg.run_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env["LOG_LOCATION"] = str(cfg.run_dir / "logs")
    env["METRICS_LOCATION"] = str(cfg.run_dir / "logs")
    # log4j2.xml reads this: in a container (foreground) the logs also go to stdout for `kubectl logs`.
    env.setdefault("SERVEKIT_LOG_CONSOLE", "info" if console else "off")
    # Workers set their own torch thread count; this keeps other OpenMP users from taking every core.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TS_DISABLE_SYSTEM_METRICS", "false")
    # Images of many sizes leave torch's cached GPU blocks fragmented: with growable segments a worker
    # serving photos from thumbnails to 12 MP held 868 MiB instead of 1,482 (docs/performance.md).
    env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # A handler whose model-config sets no worker count splits the CPUs by the count TorchServe starts.
    env[WORKERS_ENV] = props.get(WORKERS_KEY, "1")
    return env


def free_port() -> int:
    """A loopback TCP port nothing listens on right now, below the kernel's ephemeral range.

    Port 0 would hand out an ephemeral port, which any outgoing connection (a load generator's, the
    frontend's) may take before our server binds it: the soak's watcher once died that way with
    "Address already in use". Ports below the range are only ever taken by listeners.
    """
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise ConfigError(f"no free loopback port between 10000 and {low}")


def free_ports(n: int) -> list[int]:
    """``n`` different free loopback ports: each :func:`free_port` is free on its own, and two may be equal."""
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _ephemeral_low() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    return max(low, 10100)


def private_ports() -> dict[str, str]:
    """config.properties overrides that give a server its own loopback ports (APIs, gRPC, workers)."""
    # Distinct: a metrics port drawn equal to a gRPC port once stopped TorchServe at start ("Failed to bind").
    inference, management, metrics, grpc_inference, grpc_management, workers = free_ports(6)
    return {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{management}",
        "metrics_address": f"http://127.0.0.1:{metrics}",
        "grpc_inference_port": str(grpc_inference),
        "grpc_management_port": str(grpc_management),
        # Worker ports must not collide with another server on this machine.
        "initial_worker_port": str(20000 + workers % 20000),
    }


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


def _alive(pgid: int) -> bool:
    return bool(group_members(pgid))


def read_pid(run_dir: Path) -> int | None:
    """The process group of a server started from ``run_dir``, if it is still running."""
    try:
        pgid = int((run_dir / PID_FILE).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pgid if _alive(pgid) else None


def start(
    cfg: ServerConfig, models: dict[str, str] | None = None, log: Callable[[str], None] = print, console: bool = False
) -> subprocess.Popen:
    """Start TorchServe in its own process group; ``models`` maps names to archive files in the store.

    ``console``: TorchServe's logs go to this process's stdout as well as to the capped files
    (containers); otherwise its stdout goes to ``logs/torchserve.out``.
    """
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if read_pid(cfg.run_dir):
        raise ConfigError(f"a server started from {cfg.run_dir} is already running (make stop / servekit stop)")
    lock = hold_run_dir(cfg.run_dir)
    try:
        return _launch(cfg, models, log, console, lock)
    finally:
        os.close(lock)  # the launcher holds the lock from here on, until it exits


def hold_run_dir(run_dir: Path) -> int:
    """A descriptor holding the run dir's lock; ConfigError when another server holds it."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"another server is running from {run_dir} ({LOCK_FILE} is locked) although no server of "
            "this machine's is: is the run dir a volume shared with another container or pod? Give "
            "each server a run dir of its own (in Kubernetes, an emptyDir per pod)."
        ) from None
    return fd


def _launch(
    cfg: ServerConfig, models: dict[str, str] | None, log: Callable[[str], None], console: bool, lock: int
) -> subprocess.Popen:
    java = find_java()
    log(f"java: {java.java} (Java {java.major}, from {java.source})")
    props_file = cfg.run_dir / "config.properties"
    props = cfg.properties()
    write_properties(props, props_file)
    (cfg.run_dir / "logs").mkdir(exist_ok=True)
    cfg.key_file.unlink(missing_ok=True)  # a stale key file would be mistaken for the new one
    # The launcher module runs the same code as the `torchserve` script, wherever it is installed;
    # with preloaded workers it runs inside servekit.preload's launcher.
    launcher = ["servekit.preload", "launch"] if preload.enabled() else ["ts.model_server"]
    cmd = [
        sys.executable,
        "-m",
        *launcher,
        "--start",
        "--foreground",
        "--ts-config",
        str(props_file),
        "--model-store",
        str(cfg.model_store.resolve()),
        "--ncs",
        "--log-config",
        str(LOG_CONFIG),
    ]
    if models:
        cmd += ["--models", *(f"{n}={f}" for n, f in sorted(models.items()))]
    out: IO[bytes] | None = None if console else open(cfg.run_dir / "logs" / "torchserve.out", "ab")
    proc = subprocess.Popen(
        cmd,
        cwd=cfg.run_dir,
        env=_env(cfg, props, java.home, console),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        pass_fds=(lock,),
    )
    (cfg.run_dir / PID_FILE).write_text(str(proc.pid))
    return proc


def stop(run_dir: Path, timeout: float = 60.0, log: Callable[[str], None] = print) -> bool:
    """SIGTERM the server's process group, then SIGKILL what is left; True if one was running."""
    pgid = read_pid(run_dir)
    if pgid is None:
        (run_dir / PID_FILE).unlink(missing_ok=True)
        return False
    os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pgid):
        log(f"server group {pgid} did not stop in {timeout:.0f} s; killing it")
        os.killpg(pgid, signal.SIGKILL)
        while _alive(pgid):
            time.sleep(0.1)
    (run_dir / PID_FILE).unlink(missing_ok=True)
    return True
