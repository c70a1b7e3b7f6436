"""Image embedding handler: JPEG/PNG in, one (L2-normalised) vector out per image.

A handler with options of its own (``normalize``), declared here and nowhere else: servekit's
image options (decoding, preprocessing, limits) plus what this handler adds.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from servekit.artifacts import load_artifact
from servekit.batch import Answers, Batch
from servekit.config import ImageOptions, ModelConfig
from servekit.errors import RequestError
from servekit.inference import Engine
from servekit.vision import Preprocessor

try:  # inside the archive the adapters are top-level modules
    from servekit.handlers.base_handler import BaseHandler, entry_point
except ImportError:  # pragma: no cover
    from base_handler import BaseHandler, entry_point  # type: ignore[no-redef]


@dataclass(frozen=True)
class EmbeddingOptions(ImageOptions):
    """Image options plus: scale each vector to unit length (cosine similarity = dot product)."""

    normalize: bool = True


class ImageEmbedder:
    """Decode a batch, one forward pass, one vector per image (a servekit Pipeline)."""

    def __init__(self, artifact: str | os.PathLike, opts: EmbeddingOptions, device: torch.device):
        self.opts = opts
        self.engine = Engine(load_artifact(artifact, device), opts)
        self.pre = Preprocessor(opts, device, dtype=self.engine.input_dtype)

    def warmup(self) -> None:
        """Decode once and run the configured batch sizes once at load."""
        self.pre.warmup()
        shape = (self.opts.channels, self.opts.crop, self.opts.crop)
        self.engine.warmup(self.opts.warmup_batch_sizes, shape, self.pre.memory_format)

    def predict(self, bodies: Batch[bytes]) -> Answers:
        """``{"embedding": [...], "dim": n}`` per image; a bad image fails alone."""
        t0 = time.perf_counter()
        images, x = self.pre.prepare(bodies)
        t1 = time.perf_counter()
        if x is None:
            return Answers(images.slots, {"decode": t1 - t0})  # type: ignore[arg-type]
        try:
            vectors = self.engine.forward(x).float().flatten(1)
        except RequestError as err:
            return Answers(images.fail_all(err).slots, {"decode": t1 - t0})  # type: ignore[arg-type]
        if self.opts.normalize:
            vectors = F.normalize(vectors, dim=1)
        rows = vectors.cpu().tolist()
        t2 = time.perf_counter()
        answers = images.map_all(lambda _: [{"embedding": [round(v, 6) for v in r], "dim": len(r)} for r in rows])
        return Answers(answers.slots, {"decode": t1 - t0, "infer": t2 - t1})


class EmbeddingHandler(BaseHandler):
    """Only the options and the pipeline differ from the base."""

    options_class = EmbeddingOptions

    def build(self, artifact: Path, config: ModelConfig, device: torch.device) -> ImageEmbedder:
        return ImageEmbedder(artifact, config.options(EmbeddingOptions), device)


# This module defines three classes: TorchServe calls this function instead of looking for one.
handle = entry_point(EmbeddingHandler)
