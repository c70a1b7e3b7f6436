"""Image classification without TorchServe: bytes in, top-k labels out, one error per bad item."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .artifacts import load_artifact
from .batch import Answers, Batch, Body, encode_answer
from .config import ClassifierOptions
from .errors import RequestError
from .inference import Engine, topk_head, unpack_topk
from .vision import Preprocessor

_repr = float.__repr__


def load_labels(path: str | os.PathLike | None) -> list[str] | None:
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


def label_for(labels: list[str] | None, idx: int) -> str:
    """A class's label, or its index as text for a class past the labels (or without labels)."""
    return labels[idx] if labels and idx < len(labels) else str(idx)


class TopKJson:
    """One item's top-k answer straight to JSON, from per-class pieces built once.

    It writes what ``json.dumps(ImageClassifier.format(...), separators=(",", ":"))`` writes: the
    dicts and the encoder's walk over them cost about twice the pieces (docs/performance.md).
    """

    def __init__(self, labels: list[str] | None) -> None:
        self.labels = labels
        self.pieces = [self._piece(i) for i in range(len(labels or ()))]
        self.extra: dict[int, str] = {}  # classes past the labels, made at their first answer

    def _piece(self, idx: int) -> str:
        return f'{{"label":{encode_answer(label_for(self.labels, idx))},"index":{idx},"probability":'

    def encode(self, indices: list[int], probs: list[float]) -> str:
        """The answer's JSON text."""
        pieces, known, out = self.pieces, len(self.pieces), []
        for idx, p in zip(indices, probs):
            number = _repr(round(p, 6))
            if "n" in number:  # nan, inf: the encoder names them
                number = encode_answer(float(number))
            out.append((pieces[idx] if 0 <= idx < known else self._extra(idx)) + number + "}")
        return '{"predictions":[' + ",".join(out) + "]}"

    def _extra(self, idx: int) -> str:
        piece = self.extra.get(idx)
        if piece is None:
            piece = self.extra[idx] = self._piece(idx)
        return piece


class ImageClassifier:
    """Decode a batch, run one forward pass, return top-k per item; order is kept (a :class:`Pipeline`)."""

    def __init__(
        self,
        artifact: str | os.PathLike,
        opts: ClassifierOptions,
        device: torch.device,
        labels: list[str] | None = None,
        as_json: bool = False,
    ):
        self.opts = opts
        self.engine = Engine(load_artifact(artifact, device), opts, head=topk_head(opts.topk))
        self.pre = Preprocessor(opts, device, dtype=self.engine.input_dtype)
        self.labels = labels
        # as_json: answers are their JSON text (what a server sends), not dicts
        self.answer: Callable[[list[int], list[float]], dict | str] = (
            TopKJson(labels).encode if as_json else self.format
        )

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        return self.engine.device

    def warmup(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Decode once and run the configured batch sizes (forward and top-k, graphed together on a GPU) at load."""
        self.pre.warmup()
        shape = (self.opts.channels, self.opts.crop, self.opts.crop)
        self.engine.warmup(
            batch_sizes or self.opts.warmup_batch_sizes,
            shape,
            self.pre.memory_format,
        )

    def predict(self, bodies: Batch[Body]) -> Answers:
        """Top-k for every item; an item that is already an error, or fails to decode, fails alone."""
        t0 = time.perf_counter()
        images, x = self.pre.prepare(bodies, into=self.engine.input_buffer)
        t1 = time.perf_counter()
        seconds = {"decode": t1 - t0}
        if x is None:
            return Answers(images.slots, seconds)  # type: ignore[arg-type]
        try:
            top = unpack_topk(self.engine.infer(x, to_host=True))
        except RequestError as err:
            return Answers(images.fail_all(err).slots, seconds)  # type: ignore[arg-type]
        t2 = time.perf_counter()
        answer = self.answer
        answers: Batch[dict | str] = images.map_all(lambda _: [answer(i, p) for i, p in zip(top.indices, top.probs)])
        # infer: the forward and the one sync that top-k forces
        seconds.update(infer=t2 - t1, postprocess=time.perf_counter() - t2)
        return Answers(answers.slots, seconds)

    def format(self, indices: list[int], probs: list[float]) -> dict:
        """One item's answer: ``{"predictions": [{"label", "index", "probability"}, ...]}``."""
        preds = []
        for idx, p in zip(indices, probs):
            preds.append({"label": label_for(self.labels, idx), "index": idx, "probability": round(float(p), 6)})
        return {"predictions": preds}
