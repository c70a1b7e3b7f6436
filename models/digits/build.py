"""Build hook for the digits model: train it and describe how to export it."""

from __future__ import annotations

import torch

from .model import SIZE, encode, held_out, train, training_batches

EXPORT_METHOD = "trace"
LABELS = [str(i) for i in range(10)]


def build_model(weights: str | None = None, log=print) -> torch.nn.Module:
    """Trained DigitsNet (or the state dict at ``weights``)."""
    if weights:
        from .model import DigitsNet

        model = DigitsNet()
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return model.eval()
    return train(log=log)


def example_inputs(batch: int = 4) -> torch.Tensor:
    """Sample inputs for tracing and parity checks."""
    return torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def calibration_inputs(batches: int = 8, size: int = 32) -> list[torch.Tensor]:
    """Real training digits, preprocessed as served: int8 calibration (and its held-out check)."""
    return training_batches(batches, size)


def warmup_sample() -> tuple[bytes, str]:
    """A held-out digit as PNG: a new version must classify it before it serves."""
    image, _ = held_out(1)[0]
    return encode(image, "PNG"), "image/png"
