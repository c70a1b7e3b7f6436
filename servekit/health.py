"""Is the server ready: /ping and a READY worker on every model's default version (probes, waits)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass

from .client import model_states, wait_until
from .errors import ConfigError
from .server import ServerConfig


def ready_models(cfg: ServerConfig) -> dict[str, tuple[str, int]]:
    """Every model's default version and its READY workers, as the management API reports them."""
    return {s.name: (s.version, s.ready_workers) for s in model_states(cfg.management()) if s.default}


def wait_ready(
    cfg: ServerConfig, models: list[str] | None = None, timeout: float = 600.0, proc: subprocess.Popen | None = None
) -> None:
    """Wait for /ping and for every named model to have a READY worker on its default version."""

    def check() -> bool:
        if proc is not None and proc.poll() is not None:
            raise ConfigError(f"TorchServe exited with code {proc.returncode}; see {cfg.run_dir / 'logs'}")
        if cfg.token_auth and not cfg.key_file.exists():
            return False
        if cfg.inference().ping().status_code != 200:
            return False
        if not models:
            return True
        ready = {name for name, (_, workers) in ready_models(cfg).items() if workers > 0}
        return set(models) <= ready

    wait_until(check, timeout, what=f"TorchServe and models {models or []} to be ready")


@dataclass(frozen=True)
class Health:
    """What a health check found: ``ok`` and a one-line account of it."""

    ok: bool
    detail: str


def check_health(cfg: ServerConfig, live: bool = False) -> Health:
    """Ready: /ping answers 200 and every model's default version has a READY worker; live: the frontend answers.

    Any failure to reach the server is "not healthy" (never an exception): probes and the
    watcher's ready endpoint call this.
    """
    try:
        ping = cfg.inference(timeout=10).ping()
        if live:  # any answer means the frontend is alive; /ping is 500 while one model's workers are down
            return Health(True, f"alive (/ping {ping.status_code})")
        if ping.status_code != 200:
            return Health(False, f"unhealthy: /ping answered {ping.status_code}")
        models = ready_models(cfg)
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, timed out: all mean not healthy
        return Health(False, f"unhealthy: {type(exc).__name__}: {exc}")
    not_ready = sorted(f"{name} v{version}" for name, (version, workers) in models.items() if workers == 0)
    if not models or not_ready:
        return Health(False, f"not ready: {not_ready or 'no models registered'}")
    return Health(
        True,
        "ready: "
        + ", ".join(f"{name} v{version} ({workers} workers)" for name, (version, workers) in sorted(models.items())),
    )
