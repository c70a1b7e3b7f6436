"""``servekit`` command line: archive, export, publish, serve, stop, health, key, predict, reload, proxy, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import requests

from . import cli_args, gpu, health, server
from .client import Client, PredictionError
from .errors import EXIT_FAILED, EXIT_OK, EXIT_UNREACHABLE, ConfigError, ServeKitError
from .reload import watch_command
from .reload.pins import VersionsFile, choose_version, default_versions_file
from .store import Found, by_model, inspect_archive, publish, read_store
from .tslogs import tail_lines

WATCHER_PID = "watcher.pid"
DELEGATED = {"reload": "servekit.reload.__main__", "bench": "servekit.bench", "proxy": "servekit.proxy"}


# -- archive / export -------------------------------------------------------------------------
def cmd_archive(args: argparse.Namespace) -> int:
    from .archive import ArchiveRequest, archive
    from .hooks import MODELS_DIR, default_models

    names = args.models or default_models()
    if args.artifact and len(names) != 1:
        raise ConfigError("--artifact needs exactly one model name")
    for name in names:
        model_dir = Path(args.model_dir) if args.model_dir else MODELS_DIR / name
        if not (model_dir / "model-config.yaml").is_file():
            raise ConfigError(f"no model folder {model_dir} (expected {model_dir}/model-config.yaml)")
        archive(
            ArchiveRequest(
                name=name,
                model_dir=model_dir,
                store=args.model_store,
                version=args.version,
                fmt=args.format,
                weights=args.weights,
                artifact=args.artifact,
                handler=args.handler,
                device=args.device,
                freeze=args.freeze,
                quantize=args.quantize,
                force=args.force,
            )
        )
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .export import export
    from .hooks import MODELS_DIR, BuildHook

    model_dir = MODELS_DIR / args.model
    hook = BuildHook(model_dir)
    cfg_file = model_dir / "model-config.yaml"
    amp = args.amp or (ModelConfig.load(cfg_file).handler.amp if cfg_file.is_file() else "off")
    model = hook.build_model(hook.weights(args.weights))
    calibration = hook.calibration_inputs() if args.quantize != "off" else None
    report = export(
        model,
        hook.example_inputs(),
        args.output,
        args.format,
        args.device,
        amp,
        args.freeze,
        args.opset,
        log_fn=print,
        channels_last=args.channels_last,
        quantize=args.quantize,
        calibration=calibration,
    )
    print(
        json.dumps(
            {"output": str(args.output), "relative_error": report.errors, "top1_agreement": report.top1_agreement}
        )
    )
    return EXIT_OK


def cmd_publish(args: argparse.Namespace) -> int:
    """Copy an archive into the store atomically (the publish Job's command)."""
    found = inspect_archive(args.archive)
    if found.error:
        raise ConfigError(found.error)
    existing = args.model_store / args.archive.name
    if existing.exists() and not args.force:
        if existing.read_bytes() == args.archive.read_bytes():
            print(f"{existing} is already published")
            return EXIT_OK
        raise ConfigError(
            f"{existing} exists with different contents; a published version is immutable "
            "(publish a new version, or --force)"
        )
    target = publish(args.archive, args.model_store)
    print(f"published {found.name} v{found.version} as {target}")
    return EXIT_OK


# -- serve / stop / health ----------------------------------------------------------------------
def _print_banner(cfg: server.ServerConfig, models: list[str]) -> None:
    inf = cfg.address("inference_address")
    sample = "tests/data/digit-7.png" if Path("tests/data/digit-7.png").exists() else "<image.png>"
    model = models[0] if models else "digits"
    print(f"\nTorchServe is serving {', '.join(models) or 'no models'}")
    print(f"  inference:  {inf}/predictions/<model>")
    print(f"  management: {cfg.address('management_address')}  (loopback only)")
    print(f"  metrics:    {cfg.address('metrics_address')}/metrics")
    if cfg.token_auth:
        print(f"  keys:       {cfg.key_file} (renewed before they expire; `servekit key` prints the current one)")
    print("\nTry it:")
    exe = Path(sys.executable).parent / "servekit"
    exe_text = os.path.relpath(exe) if exe.is_relative_to(Path.cwd()) else str(exe)
    run_dir = "" if cfg.run_dir == server.default_paths()[2].resolve() else f" --run-dir {cfg.run_dir}"
    auth = f'-H "Authorization: Bearer $({exe_text} key{run_dir})" ' if cfg.token_auth else ""
    print(f"  curl {auth}-H 'Content-Type: image/png' --data-binary @{sample} {inf}/predictions/{model}")
    print(f"  make predict IMG={sample} MODEL={model}\n")


def _spawn_watcher(cfg: server.ServerConfig, args: argparse.Namespace) -> subprocess.Popen:
    extra = ["--versions", str(_versions_path(args))]
    if args.watcher_port:
        extra += ["--http-port", str(args.watcher_port)]
    if args.no_watch:
        extra.append("--no-reload")
    out = None
    if not args.foreground:  # its log rotates by itself; anything printed before logging starts lands here
        extra += ["--log-file", str(cfg.run_dir / "logs" / "watcher.log")]
        out = open(cfg.run_dir / "logs" / "watcher.out", "ab")
    proc = subprocess.Popen(
        watch_command(cfg, *extra),
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
        start_new_session=not args.foreground,
    )
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


def _versions_path(args: argparse.Namespace) -> Path:
    return (args.versions or default_versions_file(args.run_dir.resolve())).resolve()


def startup_archives(store: Path, versions: VersionsFile) -> dict[str, Found]:
    """The archive each model starts with: what the versions file asks for, else the newest."""
    pins = versions.read()
    return {
        name: found[choose_version(found, pins.get(name))]  # type: ignore[index]
        for name, found in by_model(read_store(store, log=print)).items()
    }


def cmd_serve(args: argparse.Namespace) -> int:
    if gpu.gpu_required():  # the GPU image: refuse to serve on the CPU by accident
        gpu.require_gpu(log_fn=print)
    cfg = server.config_from_args(args)
    archives = startup_archives(cfg.model_store, VersionsFile(_versions_path(args)))
    wanted = args.models.split(",") if args.models else sorted(archives)
    missing = [m for m in wanted if m not in archives]
    if missing:
        raise ConfigError(f"no archive for {missing} in {cfg.model_store}: run `make archive` first")
    stopping = False

    def on_signal(signum, _frame):
        nonlocal stopping
        stopping = True

    if args.foreground:
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        proc = server.start(cfg, {m: archives[m].file for m in wanted}, console=args.foreground)
        health.wait_ready(cfg, wanted, timeout=args.timeout, proc=proc)
    except (TimeoutError, ConfigError) as exc:
        print(f"error: {exc}\n--- last lines of {cfg.run_dir}/logs/ts_log.log ---", file=sys.stderr)
        print(tail_lines(cfg.run_dir / "logs" / "ts_log.log", 40), file=sys.stderr)
        server.stop(cfg.run_dir)
        return EXIT_FAILED
    watcher = _spawn_watcher(cfg, args)
    _print_banner(cfg, wanted)
    if not args.foreground:
        return EXIT_OK
    sys.stdout.flush()
    while not stopping and proc.poll() is None:
        time.sleep(0.5)
        if watcher.poll() is not None and not stopping:
            print(f"reload watcher exited with code {watcher.returncode}; restarting it", flush=True)
            time.sleep(2)
            watcher = _spawn_watcher(cfg, args)
    print("stopping: watcher, then TorchServe", flush=True)
    _stop_watcher(cfg.run_dir, watcher)
    server.stop(cfg.run_dir, timeout=args.grace)
    return EXIT_OK if stopping else (proc.returncode or EXIT_FAILED)


def cmd_stop(args: argparse.Namespace) -> int:
    _stop_watcher(args.run_dir.resolve())
    stopped = server.stop(args.run_dir.resolve())
    print("stopped TorchServe" if stopped else "no TorchServe running from " + str(args.run_dir))
    return EXIT_OK


def cmd_health(args: argparse.Namespace) -> int:
    found = health.check_health(server.config_from_args(args), live=args.live)
    print(found.detail)
    return EXIT_OK if found.ok else EXIT_FAILED


def cmd_key(args: argparse.Namespace) -> int:
    """Print the current key (for scripts: ``curl -H "Authorization: Bearer $(servekit key)"``)."""
    cfg = server.config_from_args(args)
    if cfg.tokens is None:
        raise ConfigError("token authorization is off for this server (disable_token_authorization=true)")
    print(getattr(cfg.tokens.keys(force=True), args.kind))
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    if args.url:  # any server: the key from --key-file or $SERVEKIT_KEY
        client = Client(args.url, key_file=args.key_file)
    else:
        cfg = server.config_from_args(args)
        client = Client(cfg.address("inference_address"), key_file=cfg.key_file if cfg.token_auth else None)
    try:
        pred = client.predict(args.model, args.image, args.version)
    except PredictionError as exc:
        print(f"error {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{pred.model} v{pred.version}: {args.image}")
    for label in pred.labels:
        print(f"  {label.probability:7.2%}  {label.label}")
    if not pred.labels:
        print(json.dumps(pred.answer)[:2000])
    return EXIT_OK


COMMANDS = {
    "archive": cmd_archive,
    "export": cmd_export,
    "publish": cmd_publish,
    "serve": cmd_serve,
    "stop": cmd_stop,
    "health": cmd_health,
    "key": cmd_key,
    "predict": cmd_predict,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand (the arguments are in servekit/cli_args.py)."""
    return cli_args.build_parser(__doc__ or "servekit", COMMANDS, DELEGATED)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``servekit`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in DELEGATED:  # these parse their own arguments
        return importlib.import_module(DELEGATED[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ServeKitError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except requests.ConnectionError as exc:
        url = str(exc.request.url) if exc.request is not None else "the server"
        print(f"error: cannot reach {url}: is TorchServe running? (make serve)", file=sys.stderr)
        return EXIT_UNREACHABLE
    except OSError as exc:  # a file the user named cannot be read or written: say which, no traceback
        if isinstance(exc, FileNotFoundError) and exc.filename is None:  # tokens.py: no key file, no server
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(
            f"error: {exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"error: {exc}",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
