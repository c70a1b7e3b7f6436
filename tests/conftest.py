"""Shared fixtures: archives built once, a real TorchServe on free loopback ports per session."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from servekit import health, server  # noqa: E402
from servekit.archive import ArchiveRequest, archive  # noqa: E402
from servekit.hooks import MODELS_DIR  # noqa: E402


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture can tell whether its test failed."""
    outcome = yield
    setattr(item, f"rep_{call.when}", outcome.get_result())


def port_overrides() -> dict[str, str]:
    """Fresh loopback ports for a test server (see servekit.server.private_ports)."""
    return server.private_ports()


@pytest.fixture(scope="session")
def archives(tmp_path_factory) -> Path:
    """A folder with digits-v1.0.mar and digits-v2.0.mar (same model, two versions)."""
    out = tmp_path_factory.mktemp("archives")
    for version in ("1.0", "2.0"):
        archive(ArchiveRequest("digits", MODELS_DIR / "digits", out, version=version), log=lambda *_: None)
    return out


@pytest.fixture(scope="session")
def digits_weights(archives, tmp_path_factory) -> Path:
    """The state dict of the served digits v1.0 (from its archive), for building other formats of it."""
    import io
    import zipfile

    import torch

    with zipfile.ZipFile(archives / "digits-v1.0.mar") as zf:
        traced = torch.jit.load(io.BytesIO(zf.read("model.pt")))
    weights = tmp_path_factory.mktemp("weights") / "digits.pt"
    torch.save(traced.state_dict(), weights)
    return weights


@dataclass
class RunningServer:
    """A TorchServe started for tests, with its config and clients."""

    cfg: server.ServerConfig
    proc: object

    @property
    def inference(self):
        return self.cfg.inference()

    @property
    def management(self):
        return self.cfg.management()


def start_server(tmp: Path, archives_dir: Path, models: dict[str, str], **overrides) -> RunningServer:
    """Start a server with its own store (copied archives), run dir and ports; wait until ready."""
    store = tmp / "store"
    store.mkdir(parents=True, exist_ok=True)
    for f in models.values():
        shutil.copy2(archives_dir / f, store / f)
    cfg = server.ServerConfig(tmp / "run", store, overrides={**port_overrides(), **overrides})
    proc = server.start(cfg, models, log=lambda *_: None)
    try:
        health.wait_ready(cfg, list(models), timeout=300, proc=proc)
    except Exception:
        log = cfg.run_dir / "logs" / "torchserve.out"
        print(log.read_text()[-5000:] if log.exists() else "no log")
        server.stop(cfg.run_dir)
        raise
    return RunningServer(cfg, proc)


@pytest.fixture(scope="session")
def digits_server(tmp_path_factory, archives):
    """One TorchServe serving digits v1.0 for the whole session."""
    srv = start_server(tmp_path_factory.mktemp("digits-server"), archives, {"digits": "digits-v1.0.mar"})
    yield srv
    server.stop(srv.cfg.run_dir)


@pytest.fixture(scope="session")
def image() -> str:
    """The container image under test (container and pod tests), built when missing or older than the sources."""
    from support.podman import ensure_image, require_podman

    require_podman()
    return ensure_image()
