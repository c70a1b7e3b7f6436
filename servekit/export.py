"""Export a model (TorchScript trace/script, torch.export + AOTInductor .pt2, ONNX), checked against eager."""

from __future__ import annotations

import copy
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import META_DTYPE, META_MEMORY_FORMAT, dtype_sidecar, load_artifact
from .errors import ConfigError, first_line
from .formats import FORMATS, NAMES, Format
from .inference import amp_dtype as serving_amp
from .parity import (
    ParityReport,
    calibration_batches,
    check_int8,
    check_parity,
    parity_inputs,
    precision_name,
    precisions,
)
from .quantize import check_quantize, quantize_int8, split_calibration

log = logging.getLogger(__name__)

# The opsets torch's TorchScript-based ONNX exporter (dynamo=False) can write.
ONNX_OPSETS = range(7, 21)


# -- TorchScript ---------------------------------------------------------------------------------
def _trace(model: torch.nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule, list[str]]:
    """Trace, collecting the tracer's warnings (they name the lines a trace cannot follow)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        with torch.inference_mode(False), torch.no_grad():
            module = torch.jit.trace(model, example, check_trace=False)
    notes = []
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            note = f"{Path(w.filename).name}:{w.lineno}: {str(w.message).split('. ')[0]}"
            if note not in notes:
                notes.append(note)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return module, notes


def _script(model: torch.nn.Module) -> torch.jit.ScriptModule:
    try:
        return torch.jit.script(model)
    except Exception as exc:  # the frontend raises several types, each with the offending source
        raise ConfigError(
            f"torch.jit.script cannot compile the model:\n{str(exc).strip()[:2000]}\n"
            "Use --format trace (no data-dependent control flow) or --format pt2."
        ) from None


def export_torchscript(
    model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, method: str = "trace", freeze: bool = False
) -> list[str]:
    """Trace or script ``model`` and save it (optionally frozen) to ``path``; returns the tracer's warnings."""
    model = model.eval()
    module, notes = _trace(model, example) if method == "trace" else (_script(model), [])
    if freeze:
        module = torch.jit.freeze(module.eval())
    module.save(str(path))
    return notes


# -- torch.export + AOTInductor -----------------------------------------------------------------
def _export_failure(exc: Exception) -> ConfigError:
    text = str(exc)
    where = ""
    marker = "The following call raised this error:"
    if marker in text:
        lines = text.split(marker, 1)[1].strip().splitlines()[:2]
        where = " at " + " ".join(line.strip() for line in lines)
    data_dependent = "data-dependent" in text or "GuardOnDataDependent" in type(exc).__name__
    hint = (
        "Python control flow on a tensor's values cannot be captured: rewrite the branch with "
        "torch.cond, or export with --format script."
        if data_dependent
        else "Fix the model for torch.export, or use --format script / trace."
    )
    return ConfigError(f"torch.export cannot capture the model: {text.strip().splitlines()[0][:300]}{where}. {hint}")


def _check_compiler(device: torch.device) -> None:
    """AOTInductor compiles C++ (and, on a GPU, loads Triton kernels): say so up front when it cannot."""
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception as exc:  # inductor raises its own error types for a missing compiler
        raise ConfigError(
            f"AOTInductor needs a C++ compiler to build a .pt2 package ({exc.__class__.__name__}: "
            f"{first_line(exc, 200) if str(exc).strip() else 'not found'}): install g++ "
            "(apt-get install g++) or set CXX"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("exporting a .pt2 for cuda needs a CUDA GPU on the exporting machine")


def capture(
    model: torch.nn.Module,
    example: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    max_batch: int = 1024,
) -> torch.export.ExportedProgram:
    """torch.export of the model on ``device`` (in ``dtype``, ``channels_last`` input), its batch dimension dynamic."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    # A copy: converting dtype or layout must not touch the caller's (eager reference) model.
    model = copy.deepcopy(model).eval().to(device=device, dtype=dtype or torch.float32)
    model = model.to(memory_format=memory_format)
    example = example.to(device=device, dtype=dtype or torch.float32).contiguous(memory_format=memory_format)
    if example.shape[0] == 1:
        example = torch.cat([example, example])  # a batch of 1 would be specialised as a constant
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    try:
        with torch.no_grad():
            return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as exc:  # export raises many error types; all mean "cannot capture"
        raise _export_failure(exc) from None


def export_program(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """A torch.export program, saved as is (fp32, not compiled): it runs on any device, and autocast applies."""
    torch.export.save(capture(model, example, torch.device("cpu")), str(path))
    return Path(path)


def export_pt2(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype | None = None,
    max_batch: int = 1024,
    channels_last: bool = False,
) -> Path:
    """torch.export with a dynamic batch dimension, compiled by AOTInductor for ``device``.

    ``dtype`` (a half type, GPU only) and ``channels_last`` are baked into the package, recorded in its
    metadata and in the ``<file>.dtype`` sidecar; the loader converts inputs to match.
    """
    device = torch.device(device)
    _check_compiler(device)
    program = capture(model, example, device, dtype, channels_last, max_batch)
    name = precision_name(dtype).replace("fp32", "float32")
    metadata = {META_DTYPE: name, META_MEMORY_FORMAT: "channels_last" if channels_last else "contiguous"}
    try:
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(path), inductor_configs={"aot_inductor.metadata": metadata}
        )
    except Exception as exc:
        raise ConfigError(f"AOTInductor could not compile the model for {device}: {str(exc).strip()[:500]}") from None
    # Packed into the archive beside the model; the loader checks it against the package's metadata.
    dtype_sidecar(path).write_text(name + "\n")
    return Path(path)


# -- ONNX ------------------------------------------------------------------------------------------
def _unsupported_operator(exc: Exception, opset: int) -> ConfigError:
    text = str(exc)
    op = re.search(r"operator '([^']+)'", text)
    since = re.search(r"added in version (\d+)", text)
    name = op.group(1) if op else text.splitlines()[0]
    if since:
        what = f"It has an ONNX export from opset {since.group(1)}: pass --opset {since.group(1)}."
    else:
        what = (
            f"No opset up to {ONNX_OPSETS[-1]} has it: replace the operator in the model, register a "
            "symbolic for it (torch.onnx.register_custom_op_symbolic), or serve the TorchScript or "
            ".pt2 artifact instead."
        )
    return ConfigError(f"ONNX export failed: operator {name} is not supported at opset {opset}. {what}")


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, opset: int = 18) -> Path:
    """ONNX (fp32, dynamic batch axis) at an explicit opset, with torch's TorchScript-based exporter.

    The dynamo exporter (torch's default) needs the onnxscript package; the TorchScript-based one
    (``dynamo=False``) needs nothing beyond torch and is what runs here.
    """
    if opset not in ONNX_OPSETS:
        raise ConfigError(f"ONNX opset {opset} is not supported; choose {ONNX_OPSETS[0]}..{ONNX_OPSETS[-1]}")
    model = copy.deepcopy(model).float().cpu().eval()
    example = example.detach().float().cpu()
    if example.shape[0] == 1:
        example = torch.cat([example, example])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter, knowingly
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the parity check catches what they warn of
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example,),
                    str(path),
                    input_names=["input"],
                    output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=opset,
                    dynamo=False,
                )
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        raise _unsupported_operator(exc, opset) from None
    except (torch.onnx.errors.OnnxExporterError, RuntimeError) as exc:
        raise ConfigError(f"ONNX export failed at opset {opset}: {first_line(exc)}") from None
    try:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
    except ImportError:
        log.warning("onnx is not installed; skipping the ONNX checker (onnxruntime still checks parity)")
    except Exception as exc:  # onnx.checker.ValidationError and shape-inference errors
        raise ConfigError(f"the exported ONNX graph is invalid: {first_line(exc)}") from None
    return Path(path)


# -- the exporters, by the name a format's record gives (servekit.formats) ---------------------------
@dataclass(frozen=True)
class ExportJob:
    """What an exporter is asked to write."""

    fmt: Format
    device: torch.device
    amp_dtype: torch.dtype | None
    freeze: bool
    opset: int
    channels_last: bool


def _torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, job: ExportJob) -> list[str]:
    return export_torchscript(model, example, path, job.fmt.name, job.freeze)


def _pt2(model: torch.nn.Module, example: torch.Tensor, path: Path, job: ExportJob) -> list[str]:
    # AOTInductor bakes the dtype in: a half-precision graph for GPU AMP, fp32 otherwise.
    dtype = job.amp_dtype if job.device.type == "cuda" else None
    export_pt2(model, example, path, job.device, dtype, channels_last=job.channels_last)
    return []


def _program(model: torch.nn.Module, example: torch.Tensor, path: Path, job: ExportJob) -> list[str]:
    export_program(model, example, path)
    return []


def _onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, job: ExportJob) -> list[str]:
    export_onnx(model, example, path, job.opset)
    return []


EXPORTERS: dict[str, Callable[[torch.nn.Module, torch.Tensor, Path, ExportJob], list[str]]] = {
    "torchscript": _torchscript,
    "pt2": _pt2,
    "program": _program,
    "onnx": _onnx,
}


# -- the one entry point ---------------------------------------------------------------------------


def _publish(tmp: Path, path: Path) -> None:
    """Move the artifact's side files first, the artifact last: it never appears without them."""
    main = tmp / path.name
    for side in sorted(tmp.iterdir()):
        if side != main:
            os.replace(side, path.parent / side.name)
    os.replace(main, path)


def export(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    fmt: str = "trace",
    device: str | torch.device = "cpu",
    amp: str = "off",
    freeze: bool = False,
    opset: int = 18,
    log_fn=log.info,
    *,
    channels_last: bool = False,
    check_inputs: Sequence[torch.Tensor] | None = None,
    quantize: str = "off",
    calibration: Sequence[torch.Tensor] | None = None,
) -> ParityReport:
    """Export in ``fmt``, check against eager (fp32 and the AMP dtype) on several batches, then write ``path``.

    The artifact is written to a temporary folder beside ``path``; ``path`` (and its ``.dtype``
    sidecar for .pt2) only appear once every check passes. ``quantize="int8"`` (CPU, trace) exports a
    frozen int8 graph calibrated on part of ``calibration`` and checked on the rest.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {NAMES}")
    record = FORMATS[fmt]
    path = Path(path)
    if path.suffix.lower() not in record.suffixes:
        raise ConfigError(f"a {fmt} artifact is loaded by its suffix: name it *{record.suffix}, not {path.name}")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA GPU here")
    check_quantize(quantize, fmt, device)
    amp_dtype = serving_amp(amp, device)
    model = model.eval().to(device)
    example = example.to(device)
    if quantize == "int8":
        calib, held = split_calibration(calibration or calibration_batches(example))
        written, freeze, amp_dtype = quantize_int8(model, calib), True, None
        batches = [(f"held-out batch {i + 1}", b) for i, b in enumerate(held)]
        batches.append(("single held-out item", held[0][:1]))
    else:
        written = model
        batches = (
            [(f"check batch {i + 1}", b.to(device)) for i, b in enumerate(check_inputs)]
            if check_inputs
            else parity_inputs(example)
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as tmp:
        tmp_path = Path(tmp) / path.name
        t0 = time.perf_counter()
        job = ExportJob(record, device, amp_dtype, freeze, opset, channels_last)
        notes = EXPORTERS[record.exporter](written, example, tmp_path, job)
        seconds["export"] = time.perf_counter() - t0
        for note in notes:
            log_fn(f"export {fmt}: tracer warning: {note}")
        hint = (
            " Tracing records one path through the model; tracer warnings: " + "; ".join(notes[:3]) + "."
            if notes
            else ""
        )
        if record.traced:
            hint += " If the model has data-dependent control flow, export with --format script."
        t0 = time.perf_counter()
        loaded = load_artifact(tmp_path, device)
        seconds["load"] = time.perf_counter() - t0
        errors, agree = {}, {}
        t0 = time.perf_counter()
        if quantize == "int8":
            errors["int8"], agree["int8"] = check_int8(model, loaded, batches, held, hint)
            log_fn(
                f"export {fmt}: parity int8 vs fp32 on {len(batches)} held-out batches: "
                f"worst relative error {errors['int8']:.2e}, top-1 agreement {agree['int8']:.0%}"
            )
        else:
            for dt in precisions(loaded, amp_dtype):
                err, ag = check_parity(
                    model,
                    loaded,
                    batches,
                    amp=dt,
                    artifact_autocast=loaded.autocast,
                    artifact_dtype=loaded.input_dtype,
                    hint=hint,
                )
                errors[precision_name(dt)], agree[precision_name(dt)] = err, ag
                log_fn(
                    f"export {fmt}: parity {precision_name(dt)} on {len(batches)} batches: "
                    f"worst relative error {err:.2e}, top-1 agreement {ag:.0%}"
                )
        seconds["check"] = time.perf_counter() - t0
        _publish(Path(tmp), path)
    log_fn(f"export {fmt}: wrote {path} (export {seconds['export']:.1f} s, load {seconds['load']:.2f} s)")
    return ParityReport(errors, agree, seconds)
