"""Parity of an exported artifact with the eager model: relative error and top-1 agreement per check batch."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ExportMismatch
from .quantize import INT8_MIN_AGREEMENT, INT8_TOLERANCE

# Stated tolerances on the relative error ||artifact - eager|| / ||eager||, per precision.
TOLERANCE = {None: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@dataclass
class ParityReport:
    """How close an artifact came to eager, per precision checked (worst batch), and where time went."""

    errors: dict[str, float]
    top1_agreement: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


def precision_name(dtype: torch.dtype | None) -> str:
    """fp32 for None, else the dtype's short name (float16, bfloat16)."""
    return "fp32" if dtype is None else str(dtype).replace("torch.", "")


def _random_like(example: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch of ``batch`` items shaped like ``example``'s, with its mean and spread."""
    x = torch.randn((batch, *example.shape[1:]), generator=gen)
    return (x * example.float().std().cpu() + example.float().mean().cpu()).to(example)


def calibration_batches(example: torch.Tensor, batches: int = 6, size: int = 4) -> list[torch.Tensor]:
    """Random batches shaped and scaled like ``example``: int8 calibration when the model has no data of its own."""
    gen = torch.Generator().manual_seed(2)
    return [_random_like(example, size, gen) for _ in range(batches)]


def parity_inputs(example: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Named check batches: the example, its negation, one item alone and a fresh batch of another size.

    The negation sends a model that branches on the sign of its input down the other path; the other
    batch sizes show whether the batch dimension really is dynamic.
    """
    size = example.shape[0] + 1
    return [
        ("example", example),
        ("negated example", -example),
        ("single item", example[:1]),
        (f"fresh batch of {size}", _random_like(example, size, torch.Generator().manual_seed(0))),
    ]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def precisions(loaded, amp_dtype: torch.dtype | None) -> list[torch.dtype | None]:
    """What an artifact is checked in: its baked half type, or fp32 and (if autocast applies) the AMP dtype."""
    if loaded.input_dtype is not None:  # a half-precision AOTInductor graph
        return [loaded.input_dtype]
    if loaded.autocast and amp_dtype is not None:
        return [None, amp_dtype]
    return [None]


def check_parity(
    eager: Callable,
    artifact: Callable,
    inputs: torch.Tensor | Sequence[torch.Tensor] | Sequence[tuple[str, torch.Tensor]],
    amp: torch.dtype | None = None,
    artifact_autocast: bool = True,
    artifact_dtype: torch.dtype | None = None,
    hint: str = "",
    precision: str | None = None,
    tolerance: float | None = None,
) -> tuple[float, float]:
    """Worst relative error and lowest top-1 agreement of ``artifact`` vs ``eager`` over the batches.

    Raises :class:`ExportMismatch` at the first batch past the tolerance (by default the one for ``amp``).
    """
    batches = [("inputs", inputs)] if isinstance(inputs, torch.Tensor) else list(inputs)
    batches = [b if isinstance(b, tuple) else (f"batch {i + 1}", b) for i, b in enumerate(batches)]
    tol = TOLERANCE[amp] if tolerance is None else tolerance
    precision = precision or precision_name(amp)
    worst, lowest = 0.0, 1.0
    for label, x in batches:
        device = x.device
        with torch.inference_mode():
            with _autocast(device, amp):
                ref = eager(x)
            xa = x if artifact_dtype is None else x.to(artifact_dtype)
            with _autocast(device, amp if artifact_autocast else None):
                out = artifact(xa)
        err = relative_error(out, ref)
        agree = (
            float((out.float().argmax(-1) == ref.float().argmax(-1)).float().mean()) if out.shape == ref.shape else 0.0
        )
        if not err <= tol:
            raise ExportMismatch(
                f"exported artifact disagrees with the eager model under {precision} on the "
                f"{label} (shape {tuple(x.shape)}): relative error {err:.3g} (tolerance {tol:g}), "
                f"top-1 agreement {agree:.1%}; nothing was written.{hint}"
            )
        worst, lowest = max(worst, err), min(lowest, agree)
    return worst, lowest


def top1_agreement(eager: Callable, artifact: Callable, batches: Sequence[torch.Tensor]) -> float:
    """Share of all items in ``batches`` whose top-1 class is the same for both (fp32, no autocast)."""
    same = total = 0
    with torch.inference_mode():
        for x in batches:
            same += int((artifact(x).float().argmax(-1) == eager(x).float().argmax(-1)).sum())
            total += x.shape[0]
    return same / total if total else 1.0


def check_int8(
    model: Callable,
    loaded: Callable,
    batches: Sequence[tuple[str, torch.Tensor]],
    held: Sequence[torch.Tensor],
    hint: str,
) -> tuple[float, float]:
    """int8 vs fp32 eager: the relative error on each check batch, the top-1 agreement over all held-out items."""
    err, _ = check_parity(
        model, loaded, batches, artifact_autocast=False, hint=hint, precision="int8", tolerance=INT8_TOLERANCE
    )
    agreement = top1_agreement(model, loaded, held)
    if agreement < INT8_MIN_AGREEMENT:
        raise ExportMismatch(
            f"the int8 model's top-1 answer agrees with fp32 on only {agreement:.1%} of the held-out calibration "
            f"items (at least {INT8_MIN_AGREEMENT:.0%} needed); nothing was written. Calibrate on more "
            "representative inputs, or serve the fp32 export."
        )
    return err, agreement
