"""Build hook for ResNet-50: torchvision's architecture, user weights or a seeded random init."""

from __future__ import annotations

import warnings

import torch
import torchvision

EXPORT_METHOD = "trace"
# Real weights come in by path: `make archive WEIGHTS=~/resnet50.pth`.
WEIGHTS_ENV = "WEIGHTS"
LABELS = list(torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"])


def build_model(weights: str | None = None, log=print) -> torch.nn.Module:
    """ResNet-50 with the state dict at ``weights``, or deterministic random weights (with a warning)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None)
    if weights:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        log(f"resnet50: loaded weights from {weights}")
    else:
        msg = (
            "resnet50: no WEIGHTS given; using a deterministic random initialisation. "
            "Predicted labels are meaningless (use WEIGHTS=path/to/state_dict.pt for real ones)."
        )
        warnings.warn(msg, stacklevel=2)
        log("WARNING: " + msg)
    return model.eval()


def example_inputs(batch: int = 2) -> torch.Tensor:
    """Sample inputs for tracing and parity checks."""
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def warmup_sample() -> tuple[bytes, str]:
    """A 256x256 colour gradient as JPEG: any image gets an answer (and it goes through nvjpeg on a GPU)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    gradient = Image.linear_gradient("L").resize((256, 256))
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), "image/jpeg"
