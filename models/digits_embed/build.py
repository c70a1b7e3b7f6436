"""Build hook for digits_embed: the digits CNN without its last layer, serving 64-d image embeddings.

Everything this model needs beyond servekit's core is in this folder: the build hook, its
model-config.yaml, and its handler (``embedding_handler.py``, with its own options).
"""

from __future__ import annotations

import torch
from torch import nn

from models.digits.model import SIZE, encode, held_out, train

EXPORT_METHOD = "trace"
HANDLER = "embedding_handler.py"


class DigitsEmbedding(nn.Module):
    """The trained digits network up to its 64-unit hidden layer."""

    def __init__(self, trained: nn.Module) -> None:
        super().__init__()
        self.features = trained.features
        self.embed = trained.head[:-1]  # Flatten, Linear(1568, 64), ReLU

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.features(x))


def build_model(weights: str | None = None, log=print) -> nn.Module:
    """The embedding trunk of a trained DigitsNet (trained here, or the digits state dict at ``weights``)."""
    if weights:
        from models.digits.model import DigitsNet

        trained = DigitsNet()
        trained.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    else:
        trained = train(log=log)
    return DigitsEmbedding(trained.eval()).eval()


def example_inputs(batch: int = 4) -> torch.Tensor:
    """Sample inputs for tracing and parity checks."""
    return torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def warmup_sample() -> tuple[bytes, str]:
    """A held-out digit as PNG."""
    image, _ = held_out(1)[0]
    return encode(image, "PNG"), "image/png"
