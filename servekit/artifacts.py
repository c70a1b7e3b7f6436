"""One function loads any serialized model: TorchScript ``.pt``, torch.export/AOTInductor ``.pt2``, ONNX."""

from __future__ import annotations

import json
import logging
import os
import platform
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, first_line
from .formats import AOTI, EXPORTED, FORMATS, ONNX, TORCHSCRIPT, loaders_for

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Keys this project writes into an AOTInductor package's metadata at export.
META_DTYPE, META_MEMORY_FORMAT = "servekit_input_dtype", "servekit_memory_format"
# The CPU features each instruction-set name in AOTI_CPU_ISA needs (torch's own detection).
_ISA_CHECKS = {
    "avx2": "_is_avx2_supported",
    "avx512": "_is_avx512_supported",
    "avx512_vnni": "_is_vnni_supported",
    "amx_tile": "_is_amx_tile_supported",
}


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
    # Whether torch can capture its forward as a CUDA graph: torch runs its kernels (TorchScript,
    # ExportedProgram); onnxruntime and an AOTInductor package launch their own.
    graphable: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def dtype_sidecar(path: str | os.PathLike) -> Path:
    """``<file>.dtype``: the input dtype an AOTInductor package was compiled for, beside it."""
    path = Path(path)
    return path.with_name(path.name + ".dtype")


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        raise ConfigError(f"{path} is not a valid .pt2 package (not a zip file)") from None


def artifact_kind(path: str | os.PathLike) -> str:
    """Which loader a file needs: its format's (servekit.formats, by suffix), told apart by contents for ``.pt2``."""
    path = Path(path)
    kinds = loaders_for(path)
    if len(kinds) == 1:
        return kinds[0]
    if {AOTI, EXPORTED} == set(kinds):
        names = _zip_names(path)
        if any("/data/aotinductor/" in n for n in names):
            return AOTI
        if any(n.endswith(("/models/model.json", "serialized_exported_program.json")) for n in names):
            return EXPORTED
        raise ConfigError(f"{path} is a zip file but neither an AOTInductor package nor a torch.export program")
    known = ", ".join(f"{f.suffix} ({f.name})" for f in FORMATS.values())
    raise ConfigError(f"unknown artifact type {path.suffix!r} for {path}: expected one of {known}")


def is_quantized_torchscript(path: str | os.PathLike) -> bool:
    """True for a TorchScript archive whose code calls quantized (int8) operators."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(
                "ops.quantized." in zf.read(n).decode("utf-8", "replace")
                for n in zf.namelist()
                if "/code/" in n and n.endswith(".py")
            )
    except (zipfile.BadZipFile, OSError):
        return False


def _load_torchscript(path: Path, device: torch.device) -> LoadedModel:
    quantized = is_quantized_torchscript(path)
    if quantized and device.type != "cpu":
        raise ConfigError(
            f"{path.name} is an int8 (quantized) TorchScript model, which runs on the CPU only; on {device} "
            "serve the fp32 export (amp: fp16/bf16 gives the GPU's fast path)"
        )
    try:
        module = torch.jit.load(str(path), map_location=device).eval()
    except RuntimeError as exc:
        if quantized:
            raise ConfigError(
                f"cannot load the int8 model {path.name}: {first_line(exc)}. It was exported for the x86 "
                f"quantized engine; this torch offers {torch.backends.quantized.supported_engines}. "
                "Serve the fp32 export on this machine."
            ) from None
        raise ConfigError(
            f"cannot load {path.name} as TorchScript: {first_line(exc)}. A state_dict or pickled "
            "model saved with torch.save is not TorchScript: export it (`servekit export`) first."
        ) from None
    if quantized:
        # int8 kernels take fp32 input and quantize it themselves: autocast has nothing to do there.
        log.info("%s is an int8 model: amp (autocast) does not apply to it", path.name)
    return LoadedModel(module, TORCHSCRIPT, device, autocast=not quantized, graphable=not quantized)


def _load_exported(path: Path, device: torch.device) -> LoadedModel:
    try:
        module = torch.export.load(str(path)).module().to(device)
    except Exception as exc:  # deserialisation errors come from many layers
        raise ConfigError(f"cannot load torch.export program {path.name} on {device}: {first_line(exc)}") from None
    return LoadedModel(module, EXPORTED, device, autocast=True, graphable=True)


def aoti_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata AOTInductor stores in a package (device, platform, CPU ISA, ours), read without loading it."""
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if "/data/aotinductor/" in name and name.endswith("_metadata.json"):
                return {str(k): str(v) for k, v in json.loads(zf.read(name)).items()}
    return {}


def check_aoti_compatible(meta: dict[str, str], device: torch.device, name: str) -> None:
    """Refuse, with the reason, a package that cannot run here (rather than crash the worker)."""
    built_for = meta.get("AOTI_DEVICE_KEY")
    redo = f"re-export it on a machine of the serving kind (`servekit export --format pt2 --device {device.type}`)"
    if built_for and built_for != device.type:
        extra = (
            " and this machine has no usable CUDA GPU" if built_for == "cuda" and not torch.cuda.is_available() else ""
        )
        raise ConfigError(
            f"{name} is an AOTInductor package compiled for {built_for}, but it is being loaded on "
            f"{device}{extra}. A .pt2 package runs only on the device type it was compiled for: {redo}, "
            "or serve the TorchScript/ONNX artifact, which is device independent."
        )
    machine = meta.get("AOTI_MACHINE")
    if machine and machine != platform.machine():
        raise ConfigError(f"{name} was compiled for {machine}, this machine is {platform.machine()}: {redo}")
    if built_for == "cpu":
        isa = meta.get("AOTI_CPU_ISA", "").lower().split()
        missing = [f for f in isa if f in _ISA_CHECKS and not getattr(torch.cpu, _ISA_CHECKS[f], lambda: True)()]
        if missing:
            raise ConfigError(
                f"{name} was compiled for CPUs with {' '.join(isa)}; this CPU lacks {', '.join(missing)} "
                f"(running it would crash with an illegal instruction): {redo}, or export with "
                "ATEN_CPU_CAPABILITY=avx2 set for a package that runs on older CPUs."
            )


def aoti_input_dtype(path: Path, meta: dict[str, str]) -> torch.dtype:
    """The input dtype of a package: its ``.dtype`` sidecar, checked against what the package records."""
    recorded = meta.get(META_DTYPE)
    side = dtype_sidecar(path)
    name = side.read_text().strip() if side.is_file() else recorded or "float32"
    if name not in DTYPES:
        raise ConfigError(f"{side}: unknown dtype {name!r}; expected one of {sorted(DTYPES)}")
    if recorded and name != recorded:
        raise ConfigError(
            f"{side} says {name} but {path.name} was compiled for {recorded} input: the sidecar belongs "
            "to another export; re-export, or delete the sidecar"
        )
    return DTYPES[name]


def match_layout(x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` with exactly the strides an AOTInductor package was compiled for (a copy only if they differ).

    Compiled kernels index with the export example's strides: other strides give wrong numbers
    silently, even a channels_last batch of one-channel images, which ``is_contiguous()`` accepts.
    """
    if x.dim() != 4:
        memory_format = torch.contiguous_format
    expected = torch.empty(x.shape, device="meta", memory_format=memory_format).stride()
    return x if x.stride() == expected else x.clone(memory_format=memory_format)


def _aoti_runner(path: Path, index: int) -> Callable:
    """The package's runner, built directly where this torch allows, else by ``aoti_load_package``.

    torch's loader imports the export machinery (seconds) and compiles CPU feature probes (10-20 s
    per fresh process with a cold inductor cache, and a compiler at serving time) only to log a
    mismatch that check_aoti_compatible has already ruled out; the direct runner loads in milliseconds.
    """
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, index)
    except (AttributeError, TypeError, RuntimeError):  # another torch, or an older package layout
        return torch._inductor.aoti_load_package(str(path), device_index=index)

    def run(x: torch.Tensor):
        outputs = loader.boxed_run([x])
        return outputs[0] if len(outputs) == 1 else tuple(outputs)

    return run


def _load_aoti(path: Path, device: torch.device) -> LoadedModel:
    try:
        meta = aoti_metadata(path)
    except (zipfile.BadZipFile, OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable AOTInductor package: {first_line(exc)}") from None
    check_aoti_compatible(meta, device, path.name)
    dtype = aoti_input_dtype(path, meta)
    memory_format = torch.channels_last if meta.get(META_MEMORY_FORMAT) == "channels_last" else torch.contiguous_format
    index = device.index if device.type == "cuda" and device.index is not None else -1
    try:
        runner = _aoti_runner(path, index)
    except Exception as exc:  # the AOTI runtime raises plain RuntimeErrors with long text
        raise ConfigError(
            f"cannot load AOTInductor package {path} on {device}: {first_line(exc)}. "
            "A .pt2 package is compiled for one device type and software stack: re-export it here "
            f"(`servekit export --format pt2 --device {device.type}`)."
        ) from None

    def run(x: torch.Tensor) -> torch.Tensor:
        return runner(match_layout(x.to(device=device, dtype=dtype), memory_format))

    return LoadedModel(run, AOTI, device, autocast=False, input_dtype=None if dtype is torch.float32 else dtype)


_once: set[str] = set()
CUDA_EP = "CUDAExecutionProvider"


def _warn_once(key: str, msg: str, *args: object) -> None:
    if key not in _once:
        _once.add(key)
        log.warning(msg, *args)


def _preload_cuda_dlls(ort) -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels torch uses (onnxruntime >= 1.21), once per process."""
    if "preload" in _once or not hasattr(ort, "preload_dlls"):
        return
    _once.add("preload")
    try:
        ort.preload_dlls()
    except Exception as exc:  # it only prints on a missing library; anything raised here is unexpected
        log.warning("onnxruntime.preload_dlls() failed (%s); the CUDA provider may not load", first_line(exc))


def _load_onnx(path: Path, device: torch.device) -> LoadedModel:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(
            "serving .onnx needs onnxruntime, not installed here: pip install 'servekit[cpu]' ('servekit[gpu]' "
            "for onnxruntime-gpu)"
        ) from None
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if CUDA_EP in ort.get_available_providers():
            _preload_cuda_dlls(ort)
            providers.insert(0, CUDA_EP)
        else:
            _warn_once(
                "no-cuda-ep",
                "onnxruntime %s has no CUDA provider: %s runs on the CPU. For the GPU, pip install onnxruntime-gpu "
                "in place of onnxruntime (uninstall onnxruntime first: both provide the same module)",
                ort.__version__,
                path.name,
            )
    options = ort.SessionOptions()
    # Share the cores the way torch does (TorchServe splits them across workers).
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime's own exception types
        raise ConfigError(f"onnxruntime cannot load {path.name}: {first_line(exc)}") from None
    if providers[0] == CUDA_EP and CUDA_EP not in session.get_providers():  # onnxruntime fell back silently
        _warn_once(
            "cuda-ep-fallback",
            "onnxruntime could not start its CUDA provider: %s runs on the CPU (active: %s). Check that "
            "onnxruntime-gpu (not onnxruntime) is installed, built for CUDA %s like torch, and that its CUDA and "
            "cuDNN libraries load (onnxruntime's own message just before this one names the one that failed)",
            path.name,
            session.get_providers(),
            (torch.version.cuda or "?").split(".")[0],
        )
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise ConfigError(f"{path.name} takes {len(inputs)} inputs; an image classifier takes one")
    name = inputs[0].name

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
    device = torch.device(device)
    if not path.is_file():
        raise ConfigError(f"model artifact not found: {path}")
    kind = artifact_kind(path)
    model = LOADERS[kind](path, device)
    log.info("loaded %s artifact %s on %s", kind, path.name, device)
    return model
