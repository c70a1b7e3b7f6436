"""Image classification handler: JPEG, PNG or WebP in (raw, multipart or base64 JSON), top-k labels out."""

from __future__ import annotations

from pathlib import Path

import torch

from servekit.classify import ImageClassifier, load_labels
from servekit.config import ClassifierOptions, ModelConfig

try:  # inside the archive the handler is loaded as a top-level module
    from servekit.handlers.base_handler import BaseHandler
except ImportError:  # pragma: no cover
    from base_handler import BaseHandler  # type: ignore[no-redef]


class ImageClassifierHandler(BaseHandler):
    """Only the pipeline and its options differ from the base."""

    options_class = ClassifierOptions

    def build(self, artifact: Path, config: ModelConfig, device: torch.device) -> ImageClassifier:
        opts = config.handler
        assert isinstance(opts, ClassifierOptions)
        labels = load_labels(self.model_dir / opts.labels) if opts.labels else None
        return ImageClassifier(artifact, opts, device, labels, as_json=True)  # answers go out as they are
