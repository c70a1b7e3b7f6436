"""Build a model's artifact from its folder and package it as a versioned ``.mar`` in the model store."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .config import ClassifierOptions, HandlerOptions, ModelConfig
from .errors import ConfigError
from .extras import require
from .formats import FORMATS, NAMES, side_files
from .hooks import DEFAULT_HANDLER, HANDLERS_DIR, BuildHook
from .store import FINGERPRINT, WARMUP_META, mar_name, publish

# Exported artifacts are kept (and reused while their inputs are unchanged) here.
BUILD_DIR = Path(os.environ.get("SERVEKIT_BUILD_DIR") or "build").resolve()
WARMUP_SUFFIX = {"image/png": ".png", "image/jpeg": ".jpg", "application/json": ".json"}


def _fingerprint_of(mar: Path) -> str | None:
    try:
        with zipfile.ZipFile(mar) as zf:
            return zf.read(FINGERPRINT).decode().strip()
    except (zipfile.BadZipFile, KeyError, OSError):
        return None


def run_model_archiver(
    name: str,
    version: str,
    artifact: Path,
    handler: str,
    extra_files: list[Path],
    config_file: Path,
    export_dir: Path,
    archive_format: str,
) -> None:
    """Run torch-model-archiver; its own message becomes a ConfigError when it fails."""
    require("model_archiver", "archive", "building a .mar")
    cmd = [
        sys.executable,
        "-m",
        "model_archiver.model_packaging",
        "--model-name",
        name,
        "--version",
        version,
        "--serialized-file",
        str(artifact),
        "--handler",
        handler,
        "--extra-files",
        ",".join(str(p) for p in extra_files),
        "--config-file",
        str(config_file),
        "--export-path",
        str(export_dir),
        "--archive-format",
        archive_format,
        "--force",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ConfigError(f"torch-model-archiver failed: {proc.stderr.strip() or proc.stdout.strip()}")


def zip_stored(folder: Path, mar: Path) -> Path:
    """Zip an archive folder into ``mar`` without compression.

    Weights barely compress (8% for ResNet-50), but TorchServe inflates a deflated archive on every
    registration: 0.7 s for ResNet-50's 95 MB on this project's 2-core machine against 0.04 s stored,
    paid again at each start and each switch to a new version.
    """
    with zipfile.ZipFile(mar, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return mar


def _sha(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class ArchiveRequest:
    """What to archive and how."""

    name: str
    model_dir: Path
    store: Path
    version: str | None = None
    fmt: str | None = None
    weights: str | None = None
    artifact: Path | None = None
    handler: Path | None = None
    device: str = "cpu"
    freeze: bool = False
    quantize: str = "off"
    force: bool = False


def options_class_of(handler: Path) -> type[HandlerOptions]:
    """The options a handler file declares: its handler class's ``options_class`` (the classifier's if none)."""
    spec = importlib.util.spec_from_file_location(f"servekit_handler_{handler.stem}", handler)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import the handler {handler}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the handler's own import error, named
        raise ConfigError(f"cannot import the handler {handler}: {type(exc).__name__}: {exc}") from None
    finally:
        sys.modules.pop(spec.name, None)
    own = [
        v
        for v in vars(module).values()
        if isinstance(v, type) and v.__module__ == module.__name__ and hasattr(v, "options_class")
    ]
    return own[-1].options_class if own else ClassifierOptions


def _hook(req: ArchiveRequest) -> BuildHook | None:
    """The model folder's build hook (None when an artifact is given and the folder has none)."""
    if req.artifact and not (req.model_dir / "build.py").is_file():
        return None
    return BuildHook(req.model_dir)


def build_artifact(req: ArchiveRequest, cfg: ModelConfig, hook: BuildHook, log: Callable[[str], None] = print) -> Path:
    """Export the model from its build hook into build/<name>/, reusing an up-to-date one."""
    from .export import export  # torch is imported only when something is built

    fmt = req.fmt or hook.export_method
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {NAMES}")
    out_dir = (
        BUILD_DIR
        / req.name
        / (f"{fmt}-{req.device}" if req.quantize == "off" else f"{fmt}-{req.quantize}-{req.device}")
    )
    out = out_dir / f"model{FORMATS[fmt].suffix}"
    weights_arg = hook.weights(req.weights)
    weights = Path(weights_arg) if weights_arg else None
    if weights is not None and not weights.is_file():
        raise ConfigError(f"weights file not found: {weights}")
    # A .pt2 is compiled for one input layout: channels_last where the GPU handler feeds it so.
    channels_last = cfg.handler.channels_last and fmt == "pt2" and req.device.startswith("cuda")
    stamp = _sha(
        [req.model_dir / "build.py", *(p for p in req.model_dir.glob("*.py") if p.name != "build.py")],
        f"{fmt}|{cfg.handler.amp}|{req.freeze}|{req.quantize}|{channels_last}|"
        f"{weights and weights.stat().st_mtime_ns}|{weights}",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    # One build per artifact at a time (two archives, a bench and a test run): the second waits and
    # then finds it up to date instead of compiling it again beside the first.
    with FileLock(out_dir / ".build.lock"):
        stamp_file = out_dir / "stamp"
        if out.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp and not req.force:
            log(f"{req.name}: artifact up to date ({out})")
            return out
        log(f"{req.name}: building the model")
        model = hook.build_model(str(weights) if weights else None, log=log)
        log(f"{req.name}: exporting ({fmt}) and checking it against eager")
        calibration = hook.calibration_inputs() if req.quantize != "off" else None
        export(
            model,
            hook.example_inputs(),
            out,
            fmt,
            req.device,
            cfg.handler.amp,
            req.freeze,
            log_fn=log,
            channels_last=channels_last,
            quantize=req.quantize,
            calibration=calibration,
        )
        stamp_file.write_text(stamp)
        if hook.labels:
            (out_dir / "labels.json").write_text(json.dumps(hook.labels))
        return out


def _warmup_files(hook: BuildHook | None, tmp: Path) -> list[Path]:
    """The build hook's warm-up sample and its description, written into ``tmp`` (none without a hook sample)."""
    sample = hook.warmup_sample() if hook else None
    if sample is None:
        return []
    body = tmp / f"servekit-warmup{WARMUP_SUFFIX.get(sample.content_type, '.bin')}"
    body.write_bytes(sample.body)
    meta = tmp / WARMUP_META
    meta.write_text(json.dumps({"file": body.name, "content_type": sample.content_type, "strict": True}))
    return [body, meta]


def _extras(req: ArchiveRequest, cfg: ModelConfig, artifact: Path, handler: Path) -> list[Path]:
    """Files packed beside the model: the adapter modules a handler builds on, labels, the artifact's side files."""
    extras = sorted(p for p in HANDLERS_DIR.glob("*.py") if p.name not in (handler.name, "__init__.py"))
    labels = getattr(cfg.handler, "labels", None)  # a classifier's option
    if labels:
        label_file = next((p for p in (req.model_dir / labels, artifact.parent / labels) if p.is_file()), None)
        if label_file is None:
            raise ConfigError(f"labels file {labels!r} not found in {req.model_dir} or {artifact.parent}")
        extras.append(label_file)
    return extras + side_files(artifact)


def archive(req: ArchiveRequest, log: Callable[[str], None] = print) -> Path:
    """Build (if needed) and package one model; returns the path of the .mar in the store."""
    config_path = req.model_dir / "model-config.yaml"
    log(f"[1/3] {req.name}: reading {config_path}")
    hook = _hook(req)
    handler = Path(req.handler) if req.handler else hook.handler() if hook else HANDLERS_DIR / DEFAULT_HANDLER
    if not handler.is_file():
        raise ConfigError(f"handler not found: {handler}")
    # Checked with the options the handler declares: a typo fails here, not in a worker.
    cfg = ModelConfig.load(config_path, options_class_of(handler))
    version = str(req.version or cfg.handler.version)
    cfg = cfg.with_version(version)
    log(f"[2/3] {req.name}: artifact")
    if req.artifact:
        artifact = Path(req.artifact)
    elif hook is not None:
        artifact = build_artifact(req, cfg, hook, log)
    else:
        raise ConfigError(f"{req.model_dir} has no build.py; pass --artifact with an exported model instead")
    if not artifact.is_file():
        raise ConfigError(f"artifact not found: {artifact}")
    extras = _extras(req, cfg, artifact, handler)

    target = req.store / mar_name(req.name, version)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg_file = tmp / "model-config.yaml"
        cfg_file.write_text(cfg.dump())
        staged_dir = tmp / "extra"
        staged_dir.mkdir()
        extras += _warmup_files(hook, staged_dir)
        fingerprint = _sha([artifact, handler, cfg_file, *extras])
        if target.exists() and not req.force:
            if _fingerprint_of(target) == fingerprint:
                log(f"[3/3] {req.name}: {target.name} is up to date")
                return target
            raise ConfigError(
                f"{target} already exists with different contents; a published version is "
                "immutable: pass a new --version (or --force to overwrite)"
            )
        (staged_dir / FINGERPRINT).write_text(fingerprint)
        staged = [*extras, staged_dir / FINGERPRINT]
        log(f"[3/3] {req.name}: packaging {target.name}")
        run_model_archiver(req.name, version, artifact, str(handler), staged, cfg_file, Path(tmp), "no-archive")
        mar = zip_stored(tmp / req.name, tmp / f"{req.name}.mar")
        # Publish atomically: the store never holds a half-written archive.
        publish(mar, req.store, target.name)
    log(f"{req.name}: wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target
