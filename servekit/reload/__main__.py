"""``servekit reload watch|list|rollout|rollback|status`` (also ``python -m servekit.reload``); docs/reload.md."""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path

import requests
from filelock import Timeout

from ..errors import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, ConfigError, ServeKitError
from ..health import check_health
from ..server import add_server_args, config_from_args
from ..store import read_store, version_key
from ..tokens import KeyRenewer
from . import http
from .pins import Pin, VersionsFile, default_versions_file, released
from .status import STATUS_FILE, Metrics, now_iso
from .switch import Reloader, SwitchOptions, describe_switch
from .watcher import Watcher

log = logging.getLogger("servekit.reload")


def _reloader(args: argparse.Namespace, metrics: Metrics | None = None) -> Reloader:
    options = SwitchOptions(
        drain_grace=args.drain_grace,
        ready_timeout=args.ready_timeout,
        memory_margin=args.memory_margin,
        memory_check=not args.no_memory_check,
    )
    return Reloader(config_from_args(args), options, metrics)


def _versions(args: argparse.Namespace) -> VersionsFile:
    return VersionsFile(args.versions or default_versions_file(args.run_dir.resolve()))


def _log_to(path: Path | None, level: int) -> None:
    """Log to stderr, or to a size-capped rotating file (10 MB x 3) when a path is given."""
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if path is None:
        logging.basicConfig(level=level, format=fmt)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=10 << 20, backupCount=3)
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=level, handlers=[handler])


def cmd_watch(args: argparse.Namespace) -> int:
    metrics = Metrics()
    reloader = _reloader(args, metrics)
    cfg = reloader.cfg
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("signal %d: stopping after the current step", signum)
        stop.set()
        watcher.wake.set()

    watcher = Watcher(reloader, cfg.model_store, _versions(args), args.interval, args.unregister_removed)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    if cfg.token_auth and cfg.tokens is not None:
        lifetime = float(cfg.properties().get("token_expiration_min", "60")) * 60
        renewer = KeyRenewer(cfg.address("management_address"), cfg.tokens, lifetime, metrics.renewal)
        threading.Thread(target=renewer.run, args=(stop,), name="key-renewer", daemon=True).start()
    httpd = http.serve(args.http_port, metrics.registry, lambda: check_health(cfg)) if args.http_port else None
    try:
        if args.no_reload:
            log.info("hot reload is off; renewing keys only")
            stop.wait()
        else:
            watcher.run(stop)
    finally:
        stop.set()
        if httpd is not None:
            httpd.shutdown()
    return EXIT_OK


def _locked(reloader: Reloader, timeout: float):
    try:
        return reloader.lock.acquire(timeout=timeout)
    except Timeout:
        raise ServeKitError(f"another rollout still holds {reloader.lock.lock_file} after {timeout:.0f} s") from None


def _rollout(args: argparse.Namespace, version: str | None, reason: str) -> int:
    """Pin ``version`` (None: the one before the default) in the versions file, and switch to it now."""
    reloader, versions, model = _reloader(args), _versions(args), args.model
    store = reloader.cfg.model_store
    with _locked(reloader, args.lock_timeout):
        reloader.status.load()
        archives = [a for a in read_store(store) if a.name == model and a.error is None]
        registered = reloader.states().get(model, [])
        default = next((s.version for s in registered if s.default), None)
        if version is None:
            if default is None:
                raise ServeKitError(f"{model} is not registered")
            older = [
                a
                for a in archives
                if version_key(a.version) < version_key(default) and not reloader.status.is_failed(a)
            ]
            if not older:
                raise ServeKitError(f"no version of {model} older than v{default} is in {store}")
            version = max(older, key=lambda a: version_key(a.version)).version
        found = next((a for a in archives if a.version == version), None)
        if found is None:
            have = ", ".join(sorted((a.version for a in archives), key=version_key)) or "none"
            raise ServeKitError(f"no archive of {model} v{version} in {store} (versions there: {have})")
        pins = versions.read()
        previous = dict(pins)
        newest = max((a.version for a in archives), key=version_key)
        pins[model] = Pin(version, newest, reason, now_iso())
        try:
            versions.write(pins)
        except OSError as exc:
            raise ConfigError(
                f"cannot write {versions.path} ({exc.strerror}): where it is a read-only "
                "ConfigMap, change the ConfigMap instead (kubectl apply)"
            ) from None
        others = [s.version for s in registered if s.version != version]
        if default == version:
            for old in others:
                reloader.retire(model, old)
            ok = True
            reloader.status.event(model, reason, version, f"v{version} pinned (already the default)")
        else:
            workers = reloader.min_workers(model, default) if default else 1
            ok = reloader.switch(found, workers, others, [s.version for s in registered], reason, running=default)
        if not ok:
            versions.write(previous)
        reloader.status.summarize(reloader.states(), versions.read())
        reloader.status.save()
    print(
        f"{model}: v{version} is the default and pinned (a version newer than v{newest} releases the pin)"
        if ok
        else f"{model}: {reason} to v{version} failed; see `servekit reload list`"
    )
    return EXIT_OK if ok else EXIT_FAILED


def cmd_rollout(args: argparse.Namespace) -> int:
    return _rollout(args, args.version, "rollout")


def cmd_rollback(args: argparse.Namespace) -> int:
    return _rollout(args, None, "rollback")


def inventory(reloader: Reloader, versions: VersionsFile) -> dict:
    """Every model's versions: registered (with ready workers), default, in the store, pinned, failed."""
    store = reloader.cfg.model_store
    reloader.status.load()
    pins = versions.read()
    states = reloader.states()
    failed = reloader.status.data.get("failed_archives", {})
    models: dict[str, dict] = {}
    for found in read_store(store):
        entry = models.setdefault(found.name, {"versions": {}})
        v = entry["versions"].setdefault(found.version, {})
        v["archive"] = found.file
        if found.file in failed:
            v["failed"] = failed[found.file]["reason"]
        elif found.error:
            v["failed"] = found.error
    for model, registered in states.items():
        entry = models.setdefault(model, {"versions": {}})
        for s in registered:
            entry["versions"].setdefault(s.version, {}).update(
                registered=True, default=s.default, ready_workers=s.ready_workers, workers=s.workers
            )
    for model, entry in models.items():
        entry["default"] = next((v for v, d in entry["versions"].items() if d.get("default")), None)
        pin = pins.get(model)
        usable = [v for v, d in entry["versions"].items() if d.get("archive") and not d.get("failed")]
        entry["pinned"] = dict(asdict(pin), released=released(pin, usable), text=pin.describe()) if pin else None
        entry["last_event"] = reloader.status.data.get("models", {}).get(model, {}).get("last_event")
    return {"models": models, "watcher": reloader.status.data.get("watcher"), "versions_file": str(versions.path)}


def cmd_list(args: argparse.Namespace) -> int:
    data = inventory(_reloader(args), _versions(args))
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return EXIT_OK
    for model, entry in sorted(data["models"].items()):
        print(f"{model}  (serving: {entry['default'] or 'none'})")
        for version in sorted(entry["versions"], key=version_key, reverse=True):
            v = entry["versions"][version]
            mark = "*" if v.get("default") else " "
            ready = f"{v['ready_workers']}/{v['workers']} ready" if v.get("registered") else "not registered"
            note = f"  FAILED: {v['failed']}" if v.get("failed") else ""
            print(f"  {mark} v{version:<10} {ready:<16} {v.get('archive', '(archive gone)')}{note}")
        pin = entry["pinned"]
        if pin:
            print(f"    {pin['text']}" + ("; released: a newer version arrived" if pin["released"] else ""))
        e = entry["last_event"]
        if e:
            print(f"    last event: {e['time']} {e['event']} v{e.get('version')}: {e['message']}")
            if e.get("seconds") is not None:
                print(
                    f"      took {e['seconds']:.1f} s "
                    f"({describe_switch(e.get('steps') or {}, e.get('torchserve_steps') or {})})"
                )
    w = data["watcher"]
    print(f"watcher: {w['state']} (pid {w.get('pid')}, last poll {w.get('heartbeat')})" if w else "watcher: never ran")
    if w and w.get("last_error"):
        print(f"  last error: {w['last_error']}")
    if w and w.get("versions_error"):
        print(f"  versions file: {w['versions_error']}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    path = args.run_dir.resolve() / STATUS_FILE
    if not path.exists():
        print(f"no {path}: the watcher has not run from this run dir", file=sys.stderr)
        return EXIT_FAILED
    print(path.read_text().rstrip())
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``servekit reload``."""
    parser = argparse.ArgumentParser(prog="servekit reload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        add_server_args(p)
        p.add_argument(
            "--versions",
            type=Path,
            help="desired versions file (default: $SERVEKIT_VERSIONS or model-versions.yaml in the run dir)",
        )
        p.add_argument(
            "--drain-grace",
            type=float,
            default=2.0,
            help="seconds to wait after an old version's queue is empty before unregistering it",
        )
        p.add_argument(
            "--ready-timeout",
            type=float,
            default=300.0,
            help="seconds a new version may take to register and get READY workers",
        )
        p.add_argument(
            "--lock-timeout", type=float, default=900.0, help="seconds to wait for a switch in progress elsewhere"
        )
        p.add_argument(
            "--memory-margin",
            type=float,
            default=0.2,
            help="room a new version needs beyond its measured per-worker memory (0.2 = 20%%)",
        )
        p.add_argument(
            "--no-memory-check",
            action="store_true",
            help="register new versions without checking the device has room for them",
        )
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.set_defaults(func=func)
        return p

    p = command("watch", cmd_watch, "poll the model store and roll new versions in (until SIGTERM)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between polls of the store")
    p.add_argument(
        "--http-port", "--metrics-port", dest="http_port", type=int, help="serve /metrics and /ready on 127.0.0.1:PORT"
    )
    p.add_argument("--log-file", type=Path, help="log to this file, rotated at 10 MB (default: stderr)")
    p.add_argument("--no-reload", action="store_true", help="only renew TorchServe's keys (no hot reload)")
    removed = p.add_mutually_exclusive_group()
    removed.add_argument(
        "--unregister-removed",
        dest="unregister_removed",
        action="store_true",
        default=True,
        help="unregister versions (and models) whose archives left the store (default)",
    )
    removed.add_argument(
        "--keep-removed",
        dest="unregister_removed",
        action="store_false",
        help="keep serving versions whose archives left the store",
    )
    p = command("list", cmd_list, "versions per model: default, ready workers, store, pins, failures")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = command("rollout", cmd_rollout, "make MODEL VERSION the default (pinned) and retire the others")
    p.add_argument("model", help="model name")
    p.add_argument("version", help="version to serve")
    p = command("rollback", cmd_rollback, "go back to the newest version older than the default (pinned)")
    p.add_argument("model", help="model name")
    command("status", cmd_status, "print the watcher's status JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``servekit reload``."""
    args = build_parser().parse_args(argv)
    level = (
        logging.DEBUG
        if args.verbose
        else logging.INFO
        if args.command in ("watch", "rollout", "rollback")
        else logging.WARNING
    )
    _log_to(getattr(args, "log_file", None), level)
    try:
        return args.func(args)
    except ServeKitError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except (requests.ConnectionError, FileNotFoundError) as exc:
        print(f"error: cannot reach TorchServe from {args.run_dir}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


if __name__ == "__main__":
    sys.exit(main())
