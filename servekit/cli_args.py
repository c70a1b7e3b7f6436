"""Arguments of the ``servekit`` command: one parser per subcommand (servekit/cli.py runs them)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from . import __version__, server
from .formats import NAMES
from .gpu import REQUIRE_GPU_ENV

Command = Callable[[argparse.Namespace], int]


def _quantize_arg(p: argparse.ArgumentParser) -> None:
    """``--quantize``, shared by archive and export."""
    p.add_argument(
        "--quantize",
        choices=["off", "int8"],
        default="off",
        help="int8: a CPU-only int8 graph, calibrated and checked against fp32 (trace, --device cpu)",
    )


def build_parser(
    description: str, commands: Mapping[str, Command], delegated: Iterable[str]
) -> argparse.ArgumentParser:
    """The ``servekit`` parser; a subcommand runs ``commands[name]``, a ``delegated`` one parses its own arguments."""
    parser = argparse.ArgumentParser(prog="servekit", description=description)
    parser.add_argument("--version", action="version", version=f"servekit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _, default_store, default_run = server.default_paths()

    def add(name: str, text: str, **kwargs) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=text, description=text, **kwargs)
        if name in commands:
            p.set_defaults(func=commands[name])
        return p

    p = add("archive", "build and package models into versioned .mar files")
    p.add_argument("models", nargs="*", help="model folders under models/ (default: all)")
    p.add_argument("--model-store", type=Path, default=default_store, help="where the .mar files go")
    p.add_argument("--model-dir", help="a model folder outside models/ (one model)")
    p.add_argument("--version", help="archive version (default: handler.version in model-config.yaml)")
    p.add_argument("--format", choices=NAMES, help="export format (default: the build hook's EXPORT_METHOD)")
    p.add_argument("--weights", help="state dict to load (default: the variable the build hook's WEIGHTS_ENV names)")
    p.add_argument("--artifact", type=Path, help="package this exported file instead of building one")
    p.add_argument("--handler", type=Path, help="handler file (default: the build hook's HANDLER)")
    p.add_argument("--device", default="cpu", help="device to export for (.pt2 is device specific)")
    p.add_argument("--freeze", action="store_true", help="freeze TorchScript")
    _quantize_arg(p)
    p.add_argument("--force", action="store_true", help="rebuild and overwrite an existing version")

    p = add("export", "export one model to a file, checked against eager")
    p.add_argument("model", help="model folder under models/")
    p.add_argument("output", type=Path, help="file to write (its suffix must fit the format)")
    p.add_argument("--format", choices=NAMES, default="trace", help="export format")
    p.add_argument("--device", default="cpu", help="device to export for")
    p.add_argument("--amp", choices=["off", "fp16", "bf16"], help="precision checked besides fp32")
    p.add_argument("--weights", help="state dict to load")
    p.add_argument("--freeze", action="store_true", help="freeze TorchScript")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--channels-last", action="store_true", help="compile a .pt2 for channels_last input")
    _quantize_arg(p)

    p = add("publish", "copy an archive into the model store atomically")
    p.add_argument("archive", type=Path, help="the .mar file")
    p.add_argument("--model-store", type=Path, default=default_store, help="the store to publish into")
    p.add_argument("--force", action="store_true", help="replace a published file with different contents")

    p = add(
        "serve",
        "start TorchServe (and the reload watcher); wait until ready",
        epilog=f"{REQUIRE_GPU_ENV}=1 (set in the GPU image): refuse to start without a usable GPU.",
    )
    server.add_server_args(p)
    p.add_argument("--models", help="comma-separated model names (default: every model in the store)")
    p.add_argument(
        "--versions",
        type=Path,
        help="desired versions file (default: $SERVEKIT_VERSIONS or model-versions.yaml in the run dir)",
    )
    p.add_argument(
        "--foreground", action="store_true", help="stay attached, log to stdout (containers); SIGTERM stops everything"
    )
    p.add_argument("--no-watch", action="store_true", help="no hot reload (the keys are still renewed)")
    p.add_argument(
        "--watcher-port",
        type=int,
        default=os.environ.get("SERVEKIT_WATCHER_PORT") or None,  # a string default goes through type=int
        help="the watcher's /ready and /metrics on 127.0.0.1:PORT (default: $SERVEKIT_WATCHER_PORT)",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for readiness")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to wait for a clean stop")

    p = add("stop", "stop the server and watcher started from a run dir")
    p.add_argument("--run-dir", type=Path, default=default_run, help="the run dir the server was started from")

    p = add("health", "exit 0 when every model's default version has a ready worker")
    server.add_server_args(p)
    p.add_argument("--live", action="store_true", help="only check that the server answers /ping")

    p = add("key", "print the server's current inference (or management) key")
    server.add_server_args(p)
    p.add_argument("--kind", choices=["inference", "management"], default="inference", help="which key")

    p = add("predict", "classify an image file")
    server.add_server_args(p)
    p.add_argument("image", type=Path, help="a JPEG, PNG or WebP file")
    p.add_argument("--model", default="digits", help="model name")
    p.add_argument("--version", help="a version other than the default")
    p.add_argument(
        "--url",
        default=os.environ.get("SERVEKIT_URL"),
        help="a server's inference URL (default $SERVEKIT_URL, else the one started from --run-dir)",
    )
    p.add_argument(
        "--key-file",
        type=Path,
        default=os.environ.get("SERVEKIT_KEY_FILE"),
        help="the server's key_file.json, with --url (default $SERVEKIT_KEY_FILE; $SERVEKIT_KEY gives a key itself)",
    )

    for name in delegated:
        add(name, f"see `servekit {name} --help`", add_help=False)
    return parser
