"""Post-training int8 quantization for CPU serving (FX graph mode, x86 backend: VNNI/AMX int8 kernels)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .errors import ConfigError, first_line

QUANTIZE = ("off", "int8")
# Relative error of the int8 artifact against the fp32 eager model on check batches it was not
# calibrated on, and the top-1 agreement it must keep there.
INT8_TOLERANCE = 0.15
INT8_MIN_AGREEMENT = 0.9


def check_quantize(quantize: str, fmt: str, device: torch.device) -> None:
    """Refuse combinations int8 cannot serve, with what to do instead."""
    if quantize not in QUANTIZE:
        raise ConfigError(f"unknown quantize {quantize!r}; choose one of {QUANTIZE}")
    if quantize == "off":
        return
    if device.type != "cpu":
        raise ConfigError(
            f"int8 quantization makes a CPU artifact (x86 int8 kernels); it cannot run on {device.type}. "
            "On a GPU serve the fp32 export with amp: fp16/bf16 instead"
        )
    if fmt != "trace":
        raise ConfigError(f"int8 quantization is exported as a traced TorchScript graph: use --format trace, not {fmt}")
    if "x86" not in torch.backends.quantized.supported_engines:
        raise ConfigError("this torch build has no x86 quantized engine; int8 export is not available")


def split_calibration(batches: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Calibrate on about three quarters of the batches and check on the rest (never on the same data)."""
    batches = list(batches)
    if len(batches) < 2:
        raise ConfigError("int8 calibration needs at least two input batches (one to calibrate, one to check)")
    cut = max(1, (len(batches) * 3) // 4)
    return batches[:cut], batches[cut:]


def quantize_int8(model: torch.nn.Module, calibration: Sequence[torch.Tensor]) -> torch.nn.Module:
    """Static int8 quantization: observe activation ranges on ``calibration``, then convert."""
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx

    torch.backends.quantized.engine = "x86"
    model = copy.deepcopy(model).eval().cpu()
    example = (calibration[0].cpu(),)
    try:
        prepared = quantize_fx.prepare_fx(model, get_default_qconfig_mapping("x86"), example)
    except Exception as exc:  # symbolic tracing fails on data-dependent control flow, among others
        raise ConfigError(
            f"int8 quantization cannot trace the model ({first_line(exc)}); export it without --quantize"
        ) from None
    with torch.no_grad():
        for batch in calibration:
            prepared(batch.cpu())
    return quantize_fx.convert_fx(prepared)
