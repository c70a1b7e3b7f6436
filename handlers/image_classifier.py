"""Image classification handler: JPEG/PNG in (raw, multipart or base64 JSON), top-k labels out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from servekit.classify import ImageClassifier, load_labels
from servekit.config import ModelConfig
from servekit.errors import RequestError
from servekit.vision import extract_bytes

try:  # inside the archive the handler is loaded as a top-level module
    from handlers.base_handler import BaseHandler
except ImportError:  # pragma: no cover
    from base_handler import BaseHandler


class ImageClassifierHandler(BaseHandler):
    """Only the pipeline and the item conversion differ from the base."""

    def build(self, artifact: Path, config: ModelConfig) -> ImageClassifier:
        opts = config.handler
        labels = load_labels(self.model_dir / opts.labels) if opts.labels else None
        return ImageClassifier(artifact, opts, self.device, labels)

    def run(self, items: list[Any]) -> list[Any]:
        raws = []
        for item in items:
            if isinstance(item, RequestError):
                raws.append(item)
                continue
            try:
                raws.append(extract_bytes(item))
            except RequestError as err:
                raws.append(err)
        return self.pipeline.predict(raws)

    def stage_times(self) -> dict[str, float]:
        t = self.pipeline.last_times
        return {"decode": t.decode, "infer": t.infer, "postprocess": t.postprocess}
