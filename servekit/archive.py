"""Build a model's artifact from its folder and package it as a versioned ``.mar`` in the model store."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from .config import ModelConfig
from .errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"
HANDLERS_DIR = ROOT / "handlers"
BUILD_DIR = ROOT / "build"
FINGERPRINT = "servekit-inputs.sha256"


def mar_name(name: str, version: str) -> str:
    """The file name a version of a model has in the store."""
    return f"{name}-v{version}.mar"


def read_manifest(mar: str | os.PathLike) -> dict:
    """The MANIFEST.json of an archive; raises ConfigError for anything that is not a valid .mar."""
    try:
        with zipfile.ZipFile(mar) as zf:
            return json.loads(zf.read("MAR-INF/MANIFEST.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
        raise ConfigError(f"{mar} is not a valid model archive: {exc}") from None


def _fingerprint_of(mar: Path) -> str | None:
    try:
        with zipfile.ZipFile(mar) as zf:
            return zf.read(FINGERPRINT).decode().strip()
    except (zipfile.BadZipFile, KeyError, OSError):
        return None


def _sha(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def load_build_module(model_dir: Path) -> ModuleType:
    """Import ``<model_dir>/build.py`` (as part of the ``models`` package when it lives there)."""
    build = model_dir / "build.py"
    if not build.is_file():
        raise ConfigError(f"{model_dir} has no build.py; pass --artifact with an exported model instead")
    if model_dir.parent == MODELS_DIR:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        return importlib.import_module(f"models.{model_dir.name}.build")
    spec = importlib.util.spec_from_file_location(f"servekit_build_{model_dir.name}", build)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def calibration_of(module, quantize: str):
    """The build hook's own int8 calibration batches (``calibration_inputs()``), if it has any."""
    if quantize == "off" or not hasattr(module, "calibration_inputs"):
        return None
    return list(module.calibration_inputs())


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


def build_artifact(req: ArchiveRequest, cfg: ModelConfig, log=print) -> Path:
    """Export the model from its build hook into build/<name>/, reusing an up-to-date one."""
    from .export import FORMATS, SUFFIX, export  # torch is imported only when something is built

    module = load_build_module(req.model_dir)
    fmt = req.fmt or getattr(module, "EXPORT_METHOD", "trace")
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    out_dir = BUILD_DIR / req.name / (f"{fmt}-{req.device}" if req.quantize == "off" else f"{fmt}-{req.quantize}-{req.device}")
    out = out_dir / f"model{SUFFIX[fmt]}"
    weights = Path(req.weights) if req.weights else None
    if weights is not None and not weights.is_file():
        raise ConfigError(f"weights file not found: {weights}")
    # A .pt2 is compiled for one input layout: channels_last where the GPU handler feeds it so.
    channels_last = cfg.handler.channels_last and fmt == "pt2" and req.device.startswith("cuda")
    stamp = _sha([req.model_dir / "build.py", *(p for p in req.model_dir.glob("*.py") if p.name != "build.py")],
                 f"{fmt}|{cfg.handler.amp}|{req.freeze}|{req.quantize}|{channels_last}|{weights and weights.stat().st_mtime_ns}|{weights}")
    stamp_file = out_dir / "stamp"
    if out.is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp and not req.force:
        log(f"{req.name}: artifact up to date ({out.relative_to(ROOT) if out.is_relative_to(ROOT) else out})")
        return out
    log(f"{req.name}: building the model")
    model = module.build_model(str(weights) if weights else None, log=log)
    log(f"{req.name}: exporting ({fmt}) and checking it against eager")
    export(model, module.example_inputs(), out, fmt, req.device, cfg.handler.amp, req.freeze, log_fn=log,
           channels_last=channels_last, quantize=req.quantize, calibration=calibration_of(module, req.quantize))
    stamp_file.write_text(stamp)
    labels = getattr(module, "LABELS", None)
    if labels:
        (out_dir / "labels.json").write_text(json.dumps(labels))
    return out


def archive(req: ArchiveRequest, log=print) -> Path:
    """Build (if needed) and package one model; returns the path of the .mar in the store."""
    config_path = req.model_dir / "model-config.yaml"
    log(f"[1/3] {req.name}: reading {config_path}")
    cfg = ModelConfig.load(config_path)
    version = str(req.version or cfg.handler.version)
    cfg = cfg.with_version(version)
    log(f"[2/3] {req.name}: artifact")
    artifact = Path(req.artifact) if req.artifact else build_artifact(req, cfg, log)
    if not artifact.is_file():
        raise ConfigError(f"artifact not found: {artifact}")
    handler = Path(req.handler) if req.handler else HANDLERS_DIR / "image_classifier.py"
    if not handler.is_file():
        raise ConfigError(f"handler not found: {handler}")
    extras = [HANDLERS_DIR / "base_handler.py"]
    labels_name = cfg.handler.labels
    if labels_name:
        label_file = next((p for p in (req.model_dir / labels_name, artifact.parent / labels_name) if p.is_file()), None)
        if label_file is None:
            raise ConfigError(f"labels file {labels_name!r} not found in {req.model_dir} or {artifact.parent}")
        extras.append(label_file)
    sidecar = Path(str(artifact) + ".dtype")
    if sidecar.is_file():
        extras.append(sidecar)

    req.store.mkdir(parents=True, exist_ok=True)
    target = req.store / mar_name(req.name, version)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg_file = tmp / "model-config.yaml"
        cfg_file.write_text(cfg.dump())
        fingerprint = _sha([artifact, handler, cfg_file, *extras])
        if target.exists() and not req.force:
            if _fingerprint_of(target) == fingerprint:
                log(f"[3/3] {req.name}: {target.name} is up to date")
                return target
            raise ConfigError(
                f"{target} already exists with different contents; a published version is "
                "immutable: pass a new --version (or --force to overwrite)"
            )
        (tmp / FINGERPRINT).write_text(fingerprint)
        staged = []
        for extra in extras:
            shutil.copy2(extra, tmp / extra.name)
            staged.append(str(tmp / extra.name))
        staged.append(str(tmp / FINGERPRINT))
        log(f"[3/3] {req.name}: packaging {target.name}")
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", req.name, "--version", version,
            "--serialized-file", str(artifact), "--handler", str(handler),
            "--extra-files", ",".join(staged), "--config-file", str(cfg_file),
            "--export-path", str(tmp), "--archive-format", "default", "--force",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ConfigError(f"torch-model-archiver failed: {proc.stderr.strip() or proc.stdout.strip()}")
        # Publish atomically: the store never holds a half-written archive.
        part = req.store / f".{target.name}.part"
        shutil.copy2(tmp / f"{req.name}.mar", part)
        os.replace(part, target)
    log(f"{req.name}: wrote {target} ({target.stat().st_size / 1e6:.1f} MB)")
    return target


def default_models() -> list[str]:
    """Every model folder under models/ that has a model-config.yaml."""
    return sorted(p.parent.name for p in MODELS_DIR.glob("*/model-config.yaml"))
