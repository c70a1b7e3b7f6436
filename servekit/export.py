"""Export a model (TorchScript trace/script, torch.export + AOTInductor .pt2, ONNX), checked against eager."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .artifacts import load_artifact
from .errors import ConfigError, ExportMismatch

log = logging.getLogger(__name__)

FORMATS = ("trace", "script", "pt2", "onnx")
SUFFIX = {"trace": ".pt", "script": ".pt", "pt2": ".pt2", "onnx": ".onnx"}
# Stated tolerances on the relative error ||artifact - eager|| / ||eager||.
TOLERANCE = {None: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
AMP = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ParityReport:
    """How close an artifact came to eager, per precision checked."""

    errors: dict[str, float]
    top1_agreement: dict[str, float]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if torch.isnan(out).any():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_parity(eager: Callable, artifact: Callable, inputs: torch.Tensor,
                 amp: torch.dtype | None = None, artifact_autocast: bool = True,
                 artifact_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Relative error and top-1 agreement of ``artifact`` vs ``eager``; raises past the tolerance."""
    device = inputs.device
    with torch.inference_mode():
        with _autocast(device, amp):
            ref = eager(inputs)
        x = inputs if artifact_dtype is None else inputs.to(artifact_dtype)
        with _autocast(device, amp if artifact_autocast else None):
            out = artifact(x)
    err = relative_error(out, ref)
    agree = float((out.float().argmax(-1) == ref.float().argmax(-1)).float().mean())
    tol = TOLERANCE[amp]
    name = "fp32" if amp is None else str(amp).replace("torch.", "")
    if not err <= tol:
        raise ExportMismatch(
            f"exported artifact disagrees with the eager model under {name}: relative error "
            f"{err:.3g} > tolerance {tol:g} (top-1 agreement {agree:.1%}); nothing was written. "
            "If the model has data-dependent control flow, export with --method script."
        )
    return err, agree


def _trace(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    with torch.inference_mode(False), torch.no_grad():
        return torch.jit.trace(model, example, check_trace=False)


def _script(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    return torch.jit.script(model)


def export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike,
                       method: str = "trace", freeze: bool = False) -> Path:
    """Trace or script ``model`` and save it (optionally frozen) to ``path``."""
    module = {"trace": _trace, "script": _script}[method](model.eval(), example)
    if freeze:
        module = torch.jit.freeze(module.eval())
    path = Path(path)
    module.save(str(path))
    return path


def export_pt2(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike,
               device: torch.device, dtype: torch.dtype | None = None, max_batch: int = 256) -> Path:
    """torch.export with a dynamic batch dimension, compiled by AOTInductor for ``device``."""
    model = model.eval().to(device)
    example = example.to(device)
    if dtype is not None:
        model = model.to(dtype)
        example = example.to(dtype)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    # The runtime needs to know the input dtype the graph was compiled for.
    Path(str(path) + ".dtype").write_text(str(dtype or torch.float32).replace("torch.", ""))
    return Path(path)


def export_onnx(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike,
                opset: int = 18) -> Path:
    """ONNX with a dynamic batch axis at an explicit opset."""
    try:
        torch.onnx.export(
            model.eval(), (example,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
            dynamo=False,
        )
    except Exception as exc:
        text = str(exc)
        op = ""
        if "Unsupported" in text or "not supported" in text:
            op = text.split("'")[1] if "'" in text else text.splitlines()[0]
            raise ConfigError(
                f"ONNX export failed: operator {op} is not supported at opset {opset}. Try a newer "
                "--opset, replace the operator in the model, or serve the TorchScript/.pt2 artifact."
            ) from None
        raise
    return Path(path)


def export(model: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike, fmt: str = "trace",
           device: str | torch.device = "cpu", amp: str = "off", freeze: bool = False,
           opset: int = 18, log_fn=log.info) -> ParityReport:
    """Export in ``fmt``, check against eager (fp32 and the configured AMP dtype), then write ``path``.

    The artifact is first written to a temporary file; ``path`` only appears if every check passes.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; choose one of {FORMATS}")
    device = torch.device(device)
    amp_dtype = AMP[amp]
    if device.type == "cpu" and amp_dtype is torch.float16:
        amp_dtype = torch.bfloat16  # CPU autocast runs bf16
    model = model.eval().to(device)
    example = example.to(device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        if fmt in ("trace", "script"):
            export_torchscript(model, example, tmp_path, fmt, freeze)
        elif fmt == "pt2":
            # AOTInductor bakes the dtype in: a half-precision graph for GPU AMP, fp32 otherwise.
            pt2_dtype = amp_dtype if (amp_dtype is not None and device.type == "cuda") else None
            export_pt2(model, example, tmp_path, device, pt2_dtype)
        else:
            export_onnx(model.cpu(), example.cpu(), tmp_path, opset)
        loaded = load_artifact(tmp_path, device)
        if loaded.input_dtype is not None:  # a half-precision AOTInductor graph
            precisions = [loaded.input_dtype]
        elif loaded.autocast and amp_dtype is not None:
            precisions = [None, amp_dtype]
        else:
            precisions = [None]
        errors, agree = {}, {}
        for dt in precisions:
            err, ag = check_parity(model, loaded, example, amp=dt, artifact_autocast=loaded.autocast,
                                   artifact_dtype=loaded.input_dtype)
            name = "fp32" if dt is None else str(dt).replace("torch.", "")
            errors[name], agree[name] = err, ag
            log_fn(f"export {fmt}: parity {name}: relative error {err:.2e}, top-1 agreement {ag:.0%}")
        for side in Path(tmp).iterdir():
            os.replace(side, path.parent / side.name.replace(tmp_path.name, path.name, 1))
    return ParityReport(errors, agree)
