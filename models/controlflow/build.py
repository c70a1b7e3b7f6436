"""Build hook for the control-flow model: which head runs depends on the input's values."""

from __future__ import annotations

import torch
from torch import nn

EXPORT_METHOD = "script"
LABELS = [str(i) for i in range(10)]
SIZE = 28
SEED = 0


class ControlFlowNet(nn.Module):
    """Shared features, then one of two heads chosen by the sign of the batch's sum.

    Tracing records only the branch its example took; scripting keeps the ``if``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Linear(8 * 7 * 7, 32),
            nn.ReLU(),
        )
        self.bright = nn.Linear(32, 10)
        self.dark = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if x.sum() > 0:
            return self.bright(h)
        return self.dark(h) - 1.0


def build_model(weights: str | None = None, log=print) -> nn.Module:
    """ControlFlowNet with the state dict at ``weights``, or a seeded random initialisation."""
    torch.manual_seed(SEED)
    model = ControlFlowNet()
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        log(f"controlflow: loaded weights from {weights}")
    else:
        log("controlflow: seeded random weights (a demonstration model; its labels mean nothing)")
    return model.eval()


def example_inputs(batch: int = 4) -> torch.Tensor:
    """Sample inputs for export; their sum is positive, so a trace records only the ``bright`` head."""
    x = torch.randn(batch, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    return x.abs() * 0.5
