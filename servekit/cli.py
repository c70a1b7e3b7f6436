"""``servekit`` command line: archive, export, serve, stop, health, predict, reload, bench."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from . import server
from .errors import ServeKitError
from .tslogs import tail_lines

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = Path(os.environ.get("SERVEKIT_MODEL_STORE", ROOT / "model_store"))
DEFAULT_RUN = Path(os.environ.get("SERVEKIT_RUN_DIR", ROOT / ".run"))
WATCHER_PID = "watcher.pid"


def _server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path(os.environ.get("SERVEKIT_CONFIG", server.DEFAULT_CONFIG)),
                   help="config.properties template (default: $SERVEKIT_CONFIG or the repository's)")
    p.add_argument("--model-store", type=Path, default=DEFAULT_STORE)
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN, help="key_file.json, logs, pid files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config.properties entry (repeatable)")


def server_config(args: argparse.Namespace) -> server.ServerConfig:
    """A ServerConfig from the common arguments."""
    overrides = {}
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    return server.ServerConfig(args.run_dir.resolve(), args.model_store.resolve(), args.config.resolve(), overrides)


# -- archive / export -------------------------------------------------------------------------
def cmd_archive(args: argparse.Namespace) -> int:
    from .archive import MODELS_DIR, ArchiveRequest, archive, default_models

    names = args.models or default_models()
    if args.artifact and len(names) != 1:
        raise SystemExit("--artifact needs exactly one model name")
    for name in names:
        model_dir = Path(args.model_dir) if args.model_dir else MODELS_DIR / name
        if not (model_dir / "model-config.yaml").is_file():
            raise SystemExit(f"no model folder {model_dir} (expected {model_dir}/model-config.yaml)")
        weights = args.weights or (os.environ.get("WEIGHTS") if name == "resnet50" else None)
        archive(ArchiveRequest(
            name=name, model_dir=model_dir, store=args.model_store, version=args.version, fmt=args.format,
            weights=weights or None, artifact=args.artifact, handler=args.handler, device=args.device,
            freeze=args.freeze, quantize=args.quantize, force=args.force,
        ))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .archive import MODELS_DIR, calibration_of, load_build_module
    from .config import ModelConfig
    from .export import export

    model_dir = MODELS_DIR / args.model
    module = load_build_module(model_dir)
    cfg_file = model_dir / "model-config.yaml"
    amp = args.amp or (ModelConfig.load(cfg_file).handler.amp if cfg_file.is_file() else "off")
    model = module.build_model(args.weights)
    report = export(model, module.example_inputs(), args.output, args.format, args.device, amp,
                    args.freeze, args.opset, log_fn=print, channels_last=args.channels_last,
                    quantize=args.quantize, calibration=calibration_of(module, args.quantize))
    print(json.dumps({"output": str(args.output), "relative_error": report.errors,
                      "top1_agreement": report.top1_agreement}))
    return 0


# -- serve / stop / health ----------------------------------------------------------------------
def _print_banner(cfg: server.ServerConfig, models: list[str]) -> None:
    inf = cfg.address("inference_address")
    sample = "tests/data/digit-7.png" if (ROOT / "tests/data/digit-7.png").exists() else "<image.png>"
    print(f"\nTorchServe is serving {', '.join(models) or 'no models'}")
    print(f"  inference:  {inf}/predictions/<model>")
    print(f"  management: {cfg.address('management_address')}  (loopback only)")
    print(f"  metrics:    {cfg.address('metrics_address')}/metrics")
    print(f"  tokens:     {cfg.run_dir / 'key_file.json'}")
    print("\nTry it:")
    print(f"  curl -H \"Authorization: Bearer $(python3 -c 'import json;print(json.load(open(\"{cfg.run_dir}/key_file.json\"))[\"inference\"][\"key\"])')\" \\")
    print(f"       -H 'Content-Type: image/png' --data-binary @{sample} {inf}/predictions/{models[0] if models else 'digits'}")
    print(f"  make predict IMG={sample} MODEL={models[0] if models else 'digits'}\n")


def _spawn_watcher(cfg: server.ServerConfig, foreground: bool) -> subprocess.Popen:
    from .reload import watch_command

    cmd = watch_command(cfg)
    log = open(cfg.run_dir / "logs" / "watcher.log", "ab")
    proc = subprocess.Popen(cmd, stdout=None if foreground else log, stderr=subprocess.STDOUT if not foreground else None,
                            stdin=subprocess.DEVNULL, start_new_session=not foreground)
    (cfg.run_dir / WATCHER_PID).write_text(str(proc.pid))
    return proc


def _stop_watcher(run_dir: Path, proc: subprocess.Popen | None = None) -> None:
    """SIGTERM the watcher, wait up to 10 s, then SIGKILL it."""
    try:
        pid = int((run_dir / WATCHER_PID).read_text())
    except (FileNotFoundError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
        if proc is not None:  # our own child: reap it, or it lingers as a zombie
            proc.wait(timeout=10)
        else:
            psutil.Process(pid).wait(timeout=10)
    except (ProcessLookupError, psutil.NoSuchProcess):
        pass
    except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
        os.kill(pid, signal.SIGKILL)
    (run_dir / WATCHER_PID).unlink(missing_ok=True)


def startup_archives(store: Path) -> dict[str, server.Archive]:
    """The archive each model starts with: the newest, unless a rollback pinned an older one."""
    from .reload import choose_version, read_pins

    by_model: dict[str, dict[str, server.Archive]] = {}
    for found in server.scan_store(store, log=print):
        by_model.setdefault(found.name, {})[found.version] = found
    pins = read_pins(store)
    return {name: versions[choose_version(versions, pins.get(name))] for name, versions in by_model.items()}


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = server_config(args)
    archives = startup_archives(cfg.model_store)
    wanted = args.models.split(",") if args.models else sorted(archives)
    missing = [m for m in wanted if m not in archives]
    if missing:
        raise SystemExit(f"no archive for {missing} in {cfg.model_store}: run `make archive` first")
    models = {m: archives[m].path.name for m in wanted}
    proc = server.start(cfg, models)
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    if args.foreground:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        server.wait_ready(cfg, wanted, timeout=args.timeout, proc=proc)
    except (TimeoutError, RuntimeError) as exc:
        print(f"error: {exc}\n--- last lines of {cfg.run_dir}/logs/torchserve.out ---", file=sys.stderr)
        print(tail_lines(cfg.run_dir / "logs" / "torchserve.out", 40), file=sys.stderr)
        server.stop(cfg.run_dir)
        return 1
    watcher = None if args.no_watch else _spawn_watcher(cfg, args.foreground)
    _print_banner(cfg, wanted)
    if not args.foreground:
        return 0
    while not stopping and proc.poll() is None:
        time.sleep(0.5)
        if watcher is not None and watcher.poll() is not None and not stopping:
            print(f"reload watcher exited with code {watcher.returncode}; restarting it", flush=True)
            time.sleep(2)
            watcher = _spawn_watcher(cfg, args.foreground)
    print("stopping: watcher, then TorchServe", flush=True)
    if watcher is not None:
        _stop_watcher(cfg.run_dir, watcher)
    server.stop(cfg.run_dir, timeout=args.grace)
    return 0 if stopping else (proc.returncode or 1)


def cmd_stop(args: argparse.Namespace) -> int:
    _stop_watcher(args.run_dir.resolve())
    stopped = server.stop(args.run_dir.resolve())
    print("stopped TorchServe" if stopped else "no TorchServe running from " + str(args.run_dir))
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    from .client import model_states

    cfg = server_config(args)
    try:
        ping = cfg.inference().ping()
        if args.live:  # any answer means the frontend is alive; /ping is 500 while one model's workers are down
            print(f"alive (/ping {ping.status_code})")
            return 0
        if ping.status_code != 200:
            print(f"unhealthy: /ping answered {ping.status_code}")
            return 1
        states = model_states(cfg.management())
    except Exception as exc:  # any failure to reach the server is "not healthy"
        print(f"unhealthy: {exc}")
        return 1
    defaults = [s for s in states if s.default]
    not_ready = [f"{s.name} v{s.version}" for s in defaults if s.ready_workers == 0]
    if not defaults or not_ready:
        print(f"not ready: {not_ready or 'no models registered'}")
        return 1
    print("ready: " + ", ".join(f"{s.name} v{s.version} ({s.ready_workers} workers)" for s in defaults))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    cfg = server_config(args)
    resp = cfg.inference().predict_file(args.model, args.image, args.version)
    if resp.status_code != 200:
        print(f"error {resp.status_code}: {resp.text}", file=sys.stderr)
        return 1
    version = resp.headers.get("X-Model-Version", "?")
    print(f"{args.model} v{version}: {args.image}")
    for p in resp.json()["predictions"]:
        print(f"  {p['probability']:7.2%}  {p['label']}")
    return 0


def _quantize_arg(p: argparse.ArgumentParser) -> None:
    """``--quantize``, shared by archive and export."""
    p.add_argument("--quantize", choices=["off", "int8"], default="off",
                   help="int8: a CPU-only int8 graph, calibrated and checked against fp32 (trace, --device cpu)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="servekit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("archive", help="build and package models into versioned .mar files")
    p.add_argument("models", nargs="*", help="model folders under models/ (default: all)")
    p.add_argument("--model-store", type=Path, default=DEFAULT_STORE)
    p.add_argument("--model-dir", help="a model folder outside models/ (one model)")
    p.add_argument("--version", help="archive version (default: handler.version in model-config.yaml)")
    p.add_argument("--format", choices=["trace", "script", "pt2", "onnx"], help="export format")
    p.add_argument("--weights", help="state dict to load (default: $WEIGHTS for resnet50)")
    p.add_argument("--artifact", type=Path, help="package this exported file instead of building one")
    p.add_argument("--handler", type=Path, help="handler file (default: handlers/image_classifier.py)")
    p.add_argument("--device", default="cpu", help="device to export for (.pt2 is device specific)")
    p.add_argument("--freeze", action="store_true", help="freeze TorchScript")
    _quantize_arg(p)
    p.add_argument("--force", action="store_true", help="rebuild and overwrite an existing version")
    p.set_defaults(func=cmd_archive)

    p = sub.add_parser("export", help="export one model to a file, checked against eager")
    p.add_argument("model")
    p.add_argument("output", type=Path)
    p.add_argument("--format", choices=["trace", "script", "pt2", "onnx"], default="trace")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["off", "fp16", "bf16"])
    p.add_argument("--weights")
    p.add_argument("--freeze", action="store_true")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--channels-last", action="store_true", help="compile a .pt2 for channels_last input")
    _quantize_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="start TorchServe (and the reload watcher); wait until ready")
    _server_args(p)
    p.add_argument("--models", help="comma-separated model names (default: every model in the store)")
    p.add_argument("--foreground", action="store_true", help="stay attached; SIGTERM stops everything")
    p.add_argument("--no-watch", action="store_true", help="do not start the reload watcher")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to wait for a clean stop")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stop", help="stop the server and watcher started from a run dir")
    p.add_argument("--run-dir", type=Path, default=DEFAULT_RUN)
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("health", help="exit 0 when every model's default version has a ready worker")
    _server_args(p)
    p.add_argument("--live", action="store_true", help="only check that the server answers /ping")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("predict", help="classify an image file")
    _server_args(p)
    p.add_argument("image", type=Path)
    p.add_argument("--model", default="digits")
    p.add_argument("--version")
    p.set_defaults(func=cmd_predict)

    for name, module in (("reload", "servekit.reload"), ("bench", "servekit.bench")):
        p = sub.add_parser(name, help=f"see `servekit {name} --help`", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda a, m=module: _delegate(m, a.rest))
    return parser


def _delegate(module: str, argv: list[str]) -> int:
    import importlib

    return importlib.import_module(module).main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``servekit`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["reload"], ["bench"]):  # these parse their own arguments
        return _delegate(f"servekit.{argv[0]}", argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ServeKitError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except requests.ConnectionError as exc:
        url = exc.request.url if exc.request is not None else "the server"
        print(f"error: cannot reach {url}: is TorchServe running? (make serve)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
