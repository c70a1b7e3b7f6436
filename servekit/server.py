"""Start, wait for and stop a TorchServe process tree (frontend + Python workers) from a run directory."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from packaging.version import InvalidVersion, Version

from .archive import read_manifest
from .client import InferenceClient, ManagementClient, model_states, wait_until
from .config import read_properties, write_properties
from .errors import ConfigError
from .java import find_java
from .tokens import TokenFile

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "config.properties"
METRICS_YAML = Path(__file__).resolve().parent / "metrics.yaml"
PID_FILE = "server.pid"


def version_key(version: str) -> tuple:
    """Sort key for versions: PEP 440 order (1.10 > 1.9, 2.0rc1 < 2.0); other strings sort below, by parts."""
    try:
        return (1, Version(version), ())
    except InvalidVersion:
        parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"[.\-_+]", version))
        return (0, Version("0"), parts)


@dataclass(frozen=True)
class Archive:
    """One archive in the store, as its manifest describes it."""

    path: Path
    name: str
    version: str


def scan_store(store: str | os.PathLike, log=None) -> list[Archive]:
    """Every valid archive in the store (unreadable ones are skipped, and logged)."""
    found = []
    for mar in sorted(Path(store).glob("*.mar")):
        try:
            model = read_manifest(mar)["model"]
            found.append(Archive(mar, model["modelName"], str(model.get("modelVersion", "1.0"))))
        except (ConfigError, KeyError) as exc:
            if log:
                log(f"skipping {mar.name}: {exc}")
    return found


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
        props["allowed_urls"] = props.get("allowed_urls", "").replace("MODEL_STORE", re.escape(store).replace("\\", "\\\\"))
        if props.get("metrics_config", "METRICS_CONFIG") == "METRICS_CONFIG":
            props["metrics_config"] = str(METRICS_YAML)
        props.update(self.overrides)
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
    def tokens(self) -> TokenFile:
        """The run directory's key file."""
        return TokenFile(self.run_dir / "key_file.json")

    def inference(self) -> InferenceClient:
        """A client for the inference API."""
        return InferenceClient(self.address("inference_address"), self.tokens)

    def management(self) -> ManagementClient:
        """A client for the management API."""
        return ManagementClient(self.address("management_address"), self.tokens)


def _env(cfg: ServerConfig, java_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["JAVA_HOME"] = str(java_home)
    env["PATH"] = f"{java_home / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The launcher keeps its pid file in the temp dir: one per run dir lets servers coexist.
    tmp = cfg.run_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env["LOG_LOCATION"] = str(cfg.run_dir / "logs")
    env["METRICS_LOCATION"] = str(cfg.run_dir / "logs")
    # Workers set their own torch thread count; this keeps other OpenMP users from taking every core.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TS_DISABLE_SYSTEM_METRICS", "false")
    return env


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_ports() -> dict[str, str]:
    """config.properties overrides that give a server its own loopback ports (APIs, gRPC, workers)."""
    return {
        "inference_address": f"http://127.0.0.1:{free_port()}",
        "management_address": f"http://127.0.0.1:{free_port()}",
        "metrics_address": f"http://127.0.0.1:{free_port()}",
        "grpc_inference_port": str(free_port()),
        "grpc_management_port": str(free_port()),
        # Worker ports must not collide with another server on this machine.
        "initial_worker_port": str(20000 + free_port() % 20000),
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


def start(cfg: ServerConfig, models: dict[str, str] | None = None, log=print) -> subprocess.Popen:
    """Start TorchServe in its own process group; ``models`` maps names to archive files in the store."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if read_pid(cfg.run_dir):
        raise RuntimeError(f"a server started from {cfg.run_dir} is already running (make stop / servekit stop)")
    java = find_java()
    log(f"java: {java.java} (Java {java.major}, from {java.source})")
    props_file = cfg.run_dir / "config.properties"
    write_properties(cfg.properties(), props_file)
    (cfg.run_dir / "logs").mkdir(exist_ok=True)
    key_file = cfg.run_dir / "key_file.json"
    key_file.unlink(missing_ok=True)  # a stale key file would be mistaken for the new one
    # The launcher module runs the same code as the `torchserve` script, wherever it is installed.
    cmd = [sys.executable, "-m", "ts.model_server",
           "--start", "--foreground", "--ts-config", str(props_file),
           "--model-store", str(cfg.model_store.resolve()), "--ncs"]
    if models:
        cmd += ["--models", *(f"{n}={f}" for n, f in sorted(models.items()))]
    out = open(cfg.run_dir / "logs" / "torchserve.out", "ab")
    proc = subprocess.Popen(cmd, cwd=cfg.run_dir, env=_env(cfg, java.home), stdout=out,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    (cfg.run_dir / PID_FILE).write_text(str(proc.pid))
    return proc


def wait_ready(cfg: ServerConfig, models: list[str] | None = None, timeout: float = 600.0,
               proc: subprocess.Popen | None = None) -> None:
    """Wait for /ping and for every named model to have a READY worker on its default version."""
    def check() -> bool:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"TorchServe exited with code {proc.returncode}; see {cfg.run_dir / 'logs'}")
        if not (cfg.run_dir / "key_file.json").exists():
            return False
        if cfg.inference().ping().status_code != 200:
            return False
        if not models:
            return True
        ready = {s.name for s in model_states(cfg.management()) if s.default and s.ready_workers > 0}
        return set(models) <= ready

    wait_until(check, timeout, what=f"TorchServe and models {models or []} to be ready")


def stop(run_dir: Path, timeout: float = 60.0, log=print) -> bool:
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
