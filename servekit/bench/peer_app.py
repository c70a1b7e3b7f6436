"""The LitServe peer: the same artifact, decode and inference as our handler, served by LitServe.

Run by the bench as its own process group (``python -m servekit.bench.peer_app ...``); it needs
the optional extra ``litserve``. Requests are multipart uploads with the image in the field
``content``, as LitServe's own image examples take them. Only the serving framework differs from
TorchServe + our handler: the pipeline is servekit's ImageClassifier, built once per worker.
"""

# No ``from __future__ import annotations``: LitServe reads decode_request's annotation as a class.
import argparse
import os
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import HTTPException, Request

from ..batch import Batch
from ..classify import ImageClassifier, load_labels
from ..config import ClassifierOptions, ModelConfig
from ..errors import RequestError
from ..inference import prepare_process
from .serving import PEER_FIELD as FIELD


class ClassifierAPI(ls.LitAPI):
    """decode_request reads the upload; predict runs one batch through ImageClassifier."""

    def __init__(self, artifact: Path, config: ModelConfig, workers: int, pid_dir: Path, **kw: Any):
        super().__init__(**kw)
        self.artifact, self.config, self.workers, self.pid_dir = artifact, config, workers, pid_dir

    def setup(self, device: str) -> None:
        """Load and warm up in each inference worker; record its PID so the bench can split the CPU."""
        opts = self.config.handler
        assert isinstance(opts, ClassifierOptions)
        dev = torch.device(device)
        prepare_process(opts, dev, self.workers, self.config.batch_size)
        labels = load_labels(self.artifact.parent / opts.labels) if opts.labels else None
        self.pipeline = ImageClassifier(self.artifact, opts, dev, labels)
        self.pipeline.warmup()
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        (self.pid_dir / str(os.getpid())).write_text(device)

    # LitServe reads this annotation: ``Request`` makes it parse the body as a form (multipart), and the
    # method then receives that form, not the request.
    def decode_request(self, request: Request) -> bytes:
        """The uploaded image's bytes (400 when the field is missing)."""
        form: Any = request
        upload = form.get(FIELD) if hasattr(form, "get") else None
        if upload is None:
            raise HTTPException(400, f"send the image as a multipart field named {FIELD!r}")
        return upload.file.read() if hasattr(upload, "file") else bytes(upload)

    def batch(self, inputs: list[bytes]) -> list[bytes]:
        """Keep the list: the pipeline decodes the batch itself (nvjpeg on a GPU)."""
        return inputs

    def predict(self, x: list[bytes]) -> list[Any]:
        """One answer or RequestError per body, in order."""
        return self.pipeline.predict(Batch(x)).results

    def unbatch(self, output: list[Any]) -> list[Any]:
        """Already one per request."""
        return output

    def encode_response(self, output: Any) -> dict:
        """The answer, or the item's error as its HTTP status."""
        if isinstance(output, RequestError):
            raise HTTPException(output.status, output.message)
        return output


def main(argv: list[str] | None = None) -> None:
    """Serve until killed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True, help="the exported model (labels.json beside it)")
    ap.add_argument("--model-config", type=Path, required=True, help="model-config.yaml: batchSize, handler options")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--gpus", type=int, default=1, help="GPUs to spread the workers over")
    ap.add_argument("--workers", type=int, default=1, help="inference workers per device")
    ap.add_argument("--api-servers", type=int, default=0, help="LitServe API server processes (0: LitServe's default)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid-dir", type=Path, required=True, help="where each inference worker leaves its PID")
    args = ap.parse_args(argv)
    config = ModelConfig.load(args.model_config)
    api = ClassifierAPI(
        args.artifact,
        config,
        args.workers * (args.gpus if args.device == "cuda" else 1),
        args.pid_dir,
        max_batch_size=config.batch_size,
        batch_timeout=int(config.raw.get("maxBatchDelay", 5)) / 1000.0,
    )
    server = ls.LitServer(
        api,
        accelerator=args.device,
        devices=args.gpus if args.device == "cuda" else 1,
        workers_per_device=args.workers,
        timeout=300,
        fast_queue=True,  # LitServe's ZeroMQ transport, its faster option
    )
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.api_servers or None,
        log_level="warning",  # no per-request access log, as the TorchServe runs
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
