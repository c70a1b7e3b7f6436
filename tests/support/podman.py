"""podman for the container and pod tests: the command, the image (built when stale), timings."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("SERVEKIT_IMAGE", "localhost/servekit:cpu")
BASE_IMAGE = os.environ.get("SERVEKIT_BASE_IMAGE", "localhost/debian-base:bookworm")
VARIANT = os.environ.get("SERVEKIT_VARIANT", "cpu")
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
RUN_DIR = "/run/servekit"
UID = 10001
MODEL = "digits"
TIMINGS = ROOT / "build" / "container-test-timings.json"
# Sources whose change makes an existing image stale.
SOURCES = ("pyproject.toml", "README.md", "servekit", "models", "docker")

_timings: dict[str, float] = {}


def record(name: str, seconds: float) -> None:
    _timings[name] = round(seconds, 1)
    print(f"[container] {name}: {seconds:.1f} s")
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    TIMINGS.write_text(json.dumps(_timings, indent=2) + "\n")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run podman, capturing text output; raise with its output when ``check`` and it fails."""
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def _run_script(script: str, log: Path, env: dict[str, str], timeout: float) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.run(
            ["bash", str(ROOT / "docker" / script)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=timeout,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        pytest.fail(f"docker/{script} exited {proc.returncode}; last lines of {log}:\n{tail}")


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        paths = [path] if path.is_file() else path.rglob("*") if path.is_dir() else []
        for p in paths:
            if p.is_file() and "__pycache__" not in p.parts:
                newest = max(newest, p.stat().st_mtime)
    return newest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def connects(host: str, port: int, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def servekit_cli() -> list[str]:
    exe = Path(sys.executable).parent / "servekit"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "servekit.cli"]


# -- fixtures -------------------------------------------------------------------------------------
def require_podman() -> None:
    """podman is installed (skip without it, unless CI=true: then it is a failure)."""
    if shutil.which("podman") is None:
        msg = "podman is not installed: run `bash docker/podman-setup.sh` (as root)"
        if IN_CI:
            pytest.fail(f"CI=true and {msg}")
        pytest.skip(msg)


def ensure_image() -> str:
    """The image under test, built (base image too) when missing or older than the sources.

    One test process at a time: the container and pod tests may run in two at once (pytest-xdist).
    """
    TIMINGS.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(TIMINGS.with_name("container-image.lock")):
        return _ensure_image()


def _ensure_image() -> str:
    # PyPI's torch, as in CI (`make container-image`): PyTorch's own indexes are not reachable there.
    torch_index = os.environ.get("TORCH_INDEX_URL", "pypi")
    env = {**os.environ, "BASE_IMAGE": BASE_IMAGE, "VARIANT": VARIANT, "IMAGE": IMAGE, "TORCH_INDEX_URL": torch_index}
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        if not BASE_IMAGE.startswith("localhost/debian-base:"):
            pytest.fail(f"base image {BASE_IMAGE} is missing and no registry is reachable")
        t0 = time.monotonic()
        _run_script("podman-setup.sh", ROOT / "build" / "podman-setup.log", env, timeout=1800)
        record("base image (podman-setup.sh)", time.monotonic() - t0)
    reason = None
    if os.environ.get("SERVEKIT_REBUILD"):
        reason = "SERVEKIT_REBUILD is set"
    elif podman("image", "exists", IMAGE, check=False).returncode != 0:
        reason = "image missing"
    else:
        created = float(podman("image", "inspect", "--format", "{{.Created.Unix}}", IMAGE).stdout)
        if _newest_source_mtime() > created:
            reason = "sources newer than the image"
    if reason:
        print(f"[container] building {IMAGE}: {reason}")
        t0 = time.monotonic()
        _run_script("build.sh", ROOT / "build" / "container-build.log", env, timeout=3000)
        record(f"image build ({reason})", time.monotonic() - t0)
    return IMAGE
