"""``servekit proxy``: run nginx in front of TorchServe with the clients' keys from a Kubernetes Secret.

nginx does the proxying; this module writes its configuration, starts it, and reloads it (no
restart, no dropped connection) when the Secret's files change, so a key is rotated by putting
the new key beside the old one in the Secret and removing the old one later.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import start_http_server

from .errors import EXIT_OK, ConfigError
from .proxy_stats import RequestStats

log = logging.getLogger("servekit.proxy")

TEMPLATE = Path(__file__).resolve().parent / "nginx.conf.template"
# RFC 6750 token68 characters: anything else could not be sent in a header or would break the map.
KEY_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class ProxySettings:
    """Where nginx listens and what it passes to."""

    listen: int = 8080
    metrics_listen: int = 8082
    inference: str = "127.0.0.1:8180"
    ts_metrics: str = "127.0.0.1:8182"
    watcher: str = "127.0.0.1:9101"
    max_body: str = "10m"
    read_timeout: str = "130s"
    access_log: bool = True
    workers: int = 2
    run_dir: Path = Path("/tmp/servekit-proxy")
    stats_port: int = 9103  # UDP, loopback: nginx's one line per prediction (servekit.proxy_stats)
    metrics_port: int = 9102  # loopback: the request metrics made of those lines


def read_keys(keys_dir: Path | None, env_keys: str = "") -> dict[str, str]:
    """Client keys by name: one per file in ``keys_dir`` (a mounted Secret), plus ``env_keys`` (comma-separated).

    Hidden entries (Kubernetes' ``..data`` links) are skipped. A key with characters a bearer token
    cannot carry is an error that names its file, never a silent skip.
    """
    keys: dict[str, str] = {}
    if keys_dir is not None and keys_dir.is_dir():
        for path in sorted(keys_dir.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            keys[path.name] = path.read_text().strip()
    for i, key in enumerate(k.strip() for k in env_keys.replace("\n", ",").split(",")):
        if key:
            keys[f"env-{i + 1}"] = key
    for name, key in keys.items():
        if not KEY_RE.match(key):
            raise ConfigError(
                f"client key {name!r} has characters a bearer token cannot carry (allowed: A-Z a-z 0-9 . _ ~ + / = -)"
            )
    short = sorted(n for n, k in keys.items() if len(k) < MIN_KEY_LENGTH)
    if short:
        log.warning(
            "client keys %s are shorter than %d characters: use long random keys "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')",
            short,
            MIN_KEY_LENGTH,
        )
    return keys


def keys_map(keys: dict[str, str]) -> str:
    """The nginx map entries: key -> the key's name (which the access log shows)."""
    return "".join(f'"{key}" "{re.sub(r"[^A-Za-z0-9._-]", "_", name)}";\n' for name, key in sorted(keys.items()))


def _size_text(size: str) -> str:
    """nginx's ``10m`` as ``10 MiB`` for a message."""
    units = {"k": "KiB", "m": "MiB", "g": "GiB"}
    return f"{size[:-1]} {units[size[-1].lower()]}" if size[-1:].lower() in units else f"{size} bytes"


def render(settings: ProxySettings) -> str:
    """nginx.conf for these settings."""
    values = {
        "workers": str(settings.workers),
        "run_dir": str(settings.run_dir),
        "listen": str(settings.listen),
        "metrics_listen": str(settings.metrics_listen),
        "inference": settings.inference,
        "ts_metrics": settings.ts_metrics,
        "watcher": settings.watcher,
        "max_body": settings.max_body,
        "read_timeout": settings.read_timeout,
        "max_body_text": _size_text(settings.max_body),
        "access_log": "/dev/stdout servekit" if settings.access_log else "off",
        "location_access_log": "access_log /dev/stdout servekit;" if settings.access_log else "",
        "stats_port": str(settings.stats_port),
        "proxy_metrics": str(settings.metrics_port),
    }
    text = TEMPLATE.read_text()
    for name, value in values.items():
        text = text.replace("{{" + name + "}}", value)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise ConfigError(f"{TEMPLATE} has placeholders nobody fills: {sorted(set(left))}")
    return text


class Proxy:
    """nginx as a child process, reloaded whenever the keys change."""

    def __init__(self, settings: ProxySettings, keys_dir: Path | None, env_keys: str = "", nginx: str = "nginx"):
        self.settings = settings
        self.keys_dir = keys_dir
        self.env_keys = env_keys
        self.nginx = shutil.which(nginx) or nginx
        self.conf = settings.run_dir / "nginx.conf"
        self.keys: dict[str, str] = {}
        self.proc: subprocess.Popen | None = None

    def write(self) -> None:
        """Write nginx.conf and the keys map (refusing to start with no key at all)."""
        keys = read_keys(self.keys_dir, self.env_keys)
        if not keys:
            raise ConfigError(
                f"no client keys: mount the Secret's keys at {self.keys_dir} "
                "(one key per file) or set SERVEKIT_API_KEYS"
            )
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.settings.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(render(self.settings))
        tmp = self.settings.run_dir / ".keys.map.tmp"
        tmp.write_text(keys_map(keys))
        tmp.chmod(0o600)
        os.replace(tmp, self.settings.run_dir / "keys.map")
        self.keys = keys

    def start(self) -> None:
        """Check the configuration with ``nginx -t``, then start nginx in the foreground."""
        self.write()
        # -e stderr: nginx would otherwise open its compiled-in error log first (unwritable here).
        check = subprocess.run(
            [self.nginx, "-t", "-q", "-e", "stderr", "-c", str(self.conf)], capture_output=True, text=True
        )
        if check.returncode != 0:
            raise ConfigError(f"nginx refused the configuration: {check.stderr.strip()}")
        self.proc = subprocess.Popen([self.nginx, "-e", "stderr", "-c", str(self.conf), "-g", "daemon off;"])
        log.info(
            "nginx on :%d (inference) and :%d (metrics) with %d client key(s): %s",
            self.settings.listen,
            self.settings.metrics_listen,
            len(self.keys),
            ", ".join(sorted(self.keys)),
        )

    def refresh(self) -> bool:
        """Re-read the keys; on a change rewrite the map and reload nginx (graceful). True when reloaded."""
        try:
            keys = read_keys(self.keys_dir, self.env_keys)
        except (ConfigError, OSError) as exc:  # a Secret being updated: keep serving with the current keys
            log.warning("keeping the current keys: %s", getattr(exc, "message", exc))
            return False
        if keys == self.keys or not keys or self.proc is None:
            return False
        added, removed = sorted(set(keys) - set(self.keys)), sorted(set(self.keys) - set(keys))
        self.write()
        self.proc.send_signal(signal.SIGHUP)
        log.info(
            "client keys changed (added %s, removed %s, changed %s); nginx reloaded",
            added or "none",
            removed or "none",
            sorted(n for n in keys if n in self.keys and keys[n] != self.keys[n]) or "none",
        )
        return True

    def run(self, stop: threading.Event, interval: float = 2.0) -> int:
        """Serve until ``stop`` is set (then nginx finishes its requests and quits) or nginx exits."""
        self.start()
        assert self.proc is not None
        while not stop.wait(interval):
            if self.proc.poll() is not None:
                log.error("nginx exited with code %s", self.proc.returncode)
                return self.proc.returncode or 1
            self.refresh()
        self.proc.send_signal(signal.SIGQUIT)  # graceful: finish the requests in flight
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        return EXIT_OK


def build_parser(env: Mapping[str, str] = os.environ) -> argparse.ArgumentParser:
    """Arguments of ``servekit proxy`` (defaults from ``$SERVEKIT_PROXY_*`` and friends)."""
    p = argparse.ArgumentParser(prog="servekit proxy", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--listen", type=int, default=env.get("SERVEKIT_PROXY_PORT", "8080"), help="inference port")
    p.add_argument(
        "--metrics-listen",
        type=int,
        default=env.get("SERVEKIT_PROXY_METRICS_PORT", "8082"),
        help="port for /metrics (TorchServe's), /metrics/servekit (the watcher's) and /metrics/proxy (requests)",
    )
    p.add_argument(
        "--inference",
        default=env.get("SERVEKIT_UPSTREAM", "127.0.0.1:8180"),
        help="TorchServe's inference address on the pod's loopback",
    )
    p.add_argument(
        "--ts-metrics",
        default=env.get("SERVEKIT_UPSTREAM_METRICS", "127.0.0.1:8182"),
        help="TorchServe's metrics address",
    )
    p.add_argument(
        "--watcher",
        default=env.get("SERVEKIT_WATCHER", "127.0.0.1:9101"),
        help="the watcher's /ready and /metrics address",
    )
    p.add_argument(
        "--keys-dir",
        type=Path,
        default=Path(env.get("SERVEKIT_KEYS_DIR", "/etc/servekit/api-keys")),
        help="the mounted Secret: one client key per file",
    )
    p.add_argument("--max-body", default=env.get("SERVEKIT_MAX_BODY", "10m"), help="largest request body")
    p.add_argument(
        "--read-timeout", default=env.get("SERVEKIT_READ_TIMEOUT", "130s"), help="longest wait for TorchServe's answer"
    )
    p.add_argument(
        "--no-access-log",
        action="store_true",
        default=env.get("SERVEKIT_ACCESS_LOG") == "off",
        help="no access log (default: one line per request on stdout)",
    )
    p.add_argument("--workers", type=int, default=env.get("SERVEKIT_PROXY_WORKERS", "2"), help="nginx workers")
    p.add_argument("--stats-port", type=int, default=9103, help="loopback UDP port of nginx's per-request lines")
    p.add_argument("--metrics-port", type=int, default=9102, help="loopback port of the request metrics")
    p.add_argument(
        "--run-dir",
        type=Path,
        default=Path(env.get("SERVEKIT_PROXY_RUN_DIR", "/tmp/servekit-proxy")),
        help="where nginx.conf, the keys map and nginx's temp files go",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``servekit proxy``."""
    env = os.environ
    args = build_parser(env).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = ProxySettings(
        args.listen,
        args.metrics_listen,
        args.inference,
        args.ts_metrics,
        args.watcher,
        args.max_body,
        args.read_timeout,
        not args.no_access_log,
        args.workers,
        args.run_dir,
        args.stats_port,
        args.metrics_port,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stats = RequestStats()
    stats.listen(settings.stats_port, stop)
    httpd, _ = start_http_server(settings.metrics_port, addr="127.0.0.1", registry=stats.registry)
    try:
        return Proxy(settings, args.keys_dir, env.get("SERVEKIT_API_KEYS", "")).run(stop)
    except ConfigError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    finally:
        httpd.shutdown()


if __name__ == "__main__":
    sys.exit(main())
