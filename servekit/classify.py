"""Image classification without TorchServe: bytes in, top-k labels out, one error per bad item."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .artifacts import load_artifact
from .config import HandlerOptions
from .errors import RequestError
from .inference import Engine
from .vision import Preprocessor, check_image


def load_labels(path: str | os.PathLike | None, num_classes: int | None = None) -> list[str] | None:
    """Labels from a JSON list, a JSON {index: label} map, or a text file with one label a line."""
    if path is None or not Path(path).is_file():
        return None
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            pairs = sorted(((int(k), v) for k, v in data.items()), key=lambda kv: kv[0])
            data = [v[-1] if isinstance(v, list) else v for _, v in pairs]
        labels = [str(v) for v in data]
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    return labels


@dataclass
class StageTimes:
    """Milliseconds spent in each stage of one batch."""

    decode: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0


class ImageClassifier:
    """Decode a batch, run one forward pass, return top-k per item; order is kept."""

    def __init__(
        self, artifact: str | os.PathLike, opts: HandlerOptions, device: torch.device, labels: list[str] | None = None
    ):
        self.opts = opts
        self.engine = Engine(load_artifact(artifact, device), opts)
        self.pre = Preprocessor(opts, device, dtype=self.engine.input_dtype)
        self.labels = labels
        self.last_times = StageTimes()

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.engine.device

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Run the configured batch sizes once at load."""
        shape = (self.opts.channels, self.opts.crop, self.opts.crop)
        self.engine.warmup(batch_sizes or self.opts.warmup_batch_sizes, shape, self.pre.memory_format)

    def predict(self, raws: Sequence[bytes | RequestError]) -> list[dict | RequestError]:
        """Top-k for every item; an item that is already an error, or fails to decode, fails alone."""
        times = StageTimes()
        t0 = time.perf_counter()
        results: list[dict | RequestError | None] = [None] * len(raws)
        good_idx, good_raw, headers = [], [], []
        for i, raw in enumerate(raws):
            if isinstance(raw, RequestError):
                results[i] = raw
                continue
            try:
                headers.append(check_image(raw, self.opts))
                good_idx.append(i)
                good_raw.append(raw)
            except RequestError as err:
                results[i] = err
        decoded = self.pre.decode_many(good_raw, headers) if good_raw else []
        ok_idx, images = [], []
        for i, img in zip(good_idx, decoded):
            if isinstance(img, RequestError):
                results[i] = img
            else:
                ok_idx.append(i)
                images.append(img)
        if images:
            batch = self.pre.to_batch(images)
            t1 = time.perf_counter()
            times.decode = (t1 - t0) * 1000
            try:
                logits = self.engine.forward(batch)
                top = self.engine.topk(logits, self.opts.topk)
            except RequestError as err:
                for i in ok_idx:
                    results[i] = err
            else:
                t3 = time.perf_counter()
                times.infer = (t3 - t1) * 1000  # forward + the one sync that top-k forces
                for i, idx, probs in zip(ok_idx, top.indices, top.probs):
                    results[i] = self.format(idx, probs)
                times.postprocess = (time.perf_counter() - t3) * 1000
        else:
            times.decode = (time.perf_counter() - t0) * 1000
        self.last_times = times
        return results  # type: ignore[return-value]

    def format(self, indices: list[int], probs: list[float]) -> dict:
        """One item's answer: ``{"predictions": [{"label", "index", "probability"}, ...]}``."""
        preds = []
        for idx, p in zip(indices, probs):
            label = self.labels[idx] if self.labels and idx < len(self.labels) else str(idx)
            preds.append({"label": label, "index": idx, "probability": round(float(p), 6)})
        return {"predictions": preds}
