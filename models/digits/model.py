"""A small CNN for handwritten digits, trained at build time on scikit-learn's bundled 8x8 digits."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

SIZE = 28
SEED = 0


class DigitsNet(nn.Module):
    """Two conv blocks and a small classifier head: 28x28 grey in, 10 logits out."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def render(digit: np.ndarray, size: int = SIZE) -> Image.Image:
    """An 8x8 digit (values 0..16) as a ``size``x``size`` greyscale image."""
    pixels = (np.clip(digit.reshape(8, 8), 0, 16) * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR)


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    """Image to PNG or JPEG bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def split():
    """The fixed train / held-out split: ((x_train, y_train), (x_test, y_test))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    return (x_tr, y_tr), (x_te, y_te)


def held_out(n: int | None = None) -> list[tuple[Image.Image, int]]:
    """Held-out digits as images with their true labels (never seen in training)."""
    _, (x, y) = split()
    pairs = [(render(d), int(t)) for d, t in zip(x, y)]
    return pairs[:n] if n else pairs


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    return (torch.from_numpy(arr).unsqueeze(1) - 0.5) / 0.5


def train(epochs: int = 12, log=print) -> DigitsNet:
    """Train on the training split (with small shifts as augmentation); deterministic for a seed."""
    torch.manual_seed(SEED)
    rng = np.random.default_rng(SEED)
    (x, y), (xt, yt) = split()
    base = [render(d) for d in x]
    # Shifted copies make the model robust to off-centre digits and JPEG ringing; inverted copies
    # (dark on light, as drawn in any paint program) make it read both polarities.
    shifted = [im.rotate(0, translate=tuple(int(v) for v in rng.integers(-2, 3, 2))) for im in base]
    inverted = [ImageOps.invert(im) for im in base + shifted]
    inputs = _tensor(base + shifted + inverted)
    targets = torch.as_tensor(np.concatenate([y, y, y, y]), dtype=torch.long)
    model = DigitsNet()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    # The learning rate falls over the run (one cycle): both polarities reach 99 % in 12 epochs.
    steps = epochs * ((len(inputs) + 63) // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=4e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(inputs), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss_fn(model(inputs[idx]), targets[idx]).backward()
            opt.step()
            schedule.step()
    model.eval()
    with torch.no_grad():
        held = [render(d) for d in xt]
        acc = (model(_tensor(held)).argmax(1).numpy() == yt).mean()
        inv = (model(_tensor([ImageOps.invert(im) for im in held])).argmax(1).numpy() == yt).mean()
    log(f"digits: trained {epochs} epochs, held-out accuracy {acc:.3f} ({inv:.3f} inverted)")
    return model


def training_batches(batches: int, size: int) -> list[torch.Tensor]:
    """``batches`` batches of ``size`` training digits, as model input (never the held-out split)."""
    (x, _), _ = split()
    rng = np.random.default_rng(SEED + 1)
    idx = rng.permutation(len(x))[: batches * size]
    images = _tensor([render(x[i]) for i in idx])
    return list(images.split(size))
