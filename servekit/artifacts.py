"""One function loads any serialized model: TorchScript ``.pt``, torch.export/AOTInductor ``.pt2``, ONNX."""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

TORCHSCRIPT, AOTI, EXPORTED, ONNX = "torchscript", "aoti", "exported_program", "onnx"


@dataclass
class LoadedModel:
    """A callable model plus what the serving path needs to know about it."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    kind: str
    device: torch.device
    # Autocast applies only where the graph is traced at run time (TorchScript, ExportedProgram);
    # an AOTInductor package or an ONNX graph has its dtype fixed at export time.
    autocast: bool
    # The dtype the artifact expects for its input (None: float32, autocast may apply).
    input_dtype: torch.dtype | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def artifact_kind(path: str | os.PathLike) -> str:
    """Which loader a file needs, from its suffix and (for ``.pt2``) its contents."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth", ".ts", ".torchscript"):
        return TORCHSCRIPT
    if suffix == ".onnx":
        return ONNX
    if suffix == ".pt2":
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            raise ConfigError(f"{path} is not a valid .pt2 package (not a zip file)") from None
        return AOTI if any("aotinductor" in n for n in names) else EXPORTED
    raise ConfigError(
        f"unknown artifact type {suffix!r} for {path}: expected .pt (TorchScript), "
        ".pt2 (torch.export / AOTInductor) or .onnx"
    )


def _load_torchscript(path: Path, device: torch.device) -> LoadedModel:
    module = torch.jit.load(str(path), map_location=device).eval()
    return LoadedModel(module, TORCHSCRIPT, device, autocast=True)


def _load_exported(path: Path, device: torch.device) -> LoadedModel:
    module = torch.export.load(str(path)).module().to(device)
    return LoadedModel(module, EXPORTED, device, autocast=True)


def _load_aoti(path: Path, device: torch.device) -> LoadedModel:
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        runner = torch._inductor.aoti_load_package(str(path), device_index=index)
    except Exception as exc:  # the AOTI runtime raises plain RuntimeErrors with long text
        raise ConfigError(
            f"cannot load AOTInductor package {path} on {device}: {str(exc).splitlines()[0][:300]}. "
            "A .pt2 package is compiled for one device type: re-export it for this device "
            "(`servekit export --format pt2 --device cuda|cpu`)."
        ) from None
    dtype = _aoti_input_dtype(path)
    return LoadedModel(runner, AOTI, device, autocast=False, input_dtype=dtype)


def _aoti_input_dtype(path: Path) -> torch.dtype | None:
    """The input dtype recorded beside the package at export (``<file>.dtype``), if any."""
    side = path.with_suffix(path.suffix + ".dtype")
    if side.is_file():
        name = side.read_text().strip()
        return getattr(torch, name) if name != "float32" else None
    return None


def _load_onnx(path: Path, device: torch.device) -> LoadedModel:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError("serving .onnx needs onnxruntime: pip install onnxruntime") from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        out = session.run(None, {name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(device)

    return LoadedModel(run, ONNX, device, autocast=False)


LOADERS: dict[str, Callable[[Path, torch.device], LoadedModel]] = {
    TORCHSCRIPT: _load_torchscript,
    EXPORTED: _load_exported,
    AOTI: _load_aoti,
    ONNX: _load_onnx,
}


def load_artifact(path: str | os.PathLike, device: torch.device) -> LoadedModel:
    """Load ``path`` onto ``device`` with the loader its type needs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model artifact not found: {path}")
    kind = artifact_kind(path)
    model = LOADERS[kind](path, device)
    log.info("loaded %s artifact %s on %s", kind, path.name, device)
    return model
