"""TorchServe adapter: context -> device and config, per-item status codes, stage metrics."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from servekit.config import ModelConfig
from servekit.errors import ConfigError, ModelError, OutOfMemory, RequestError, UnsupportedMediaType, first_line
from servekit.inference import is_oom, select_device

log = logging.getLogger(__name__)

# Content types accepted for a request body; anything else is a 415.
ACCEPTED_TYPES = ("image/", "application/json", "application/octet-stream", "multipart/form-data")


class BaseHandler:
    """Reads the TorchServe context once, builds a pipeline, and adapts batches to it.

    Subclasses implement :meth:`build` (return the pipeline) and :meth:`run` (items -> results).
    """

    def __init__(self) -> None:
        self.initialized = False
        self.ready = False
        self.pipeline: Any = None
        self.config: ModelConfig | None = None
        self.device = torch.device("cpu")
        self.version = "unknown"
        self.model_name = "model"

    # -- load ---------------------------------------------------------------------------
    def initialize(self, context) -> None:
        """Load the artifact onto the assigned device, set threads, warm up, mark ready."""
        t0 = time.perf_counter()
        props = context.system_properties
        self.model_dir = Path(props.get("model_dir", "."))
        self.model_name = context.manifest.get("model", {}).get("modelName", self.model_name)
        self.config = ModelConfig.from_dict(getattr(context, "model_yaml_config", None) or {})
        opts = self.config.handler
        self.version = opts.version
        self.device = select_device(props.get("gpu_id"))
        torch.set_num_threads(opts.threads(self.config.max_workers))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            # Autotuning picks faster kernels per shape, at a start-up cost paid in the warm-up.
            torch.backends.cudnn.benchmark = opts.cudnn_benchmark
        serialized = context.manifest.get("model", {}).get("serializedFile")
        if not serialized:
            raise ConfigError("the archive's manifest names no serialized model file")
        self.pipeline = self.build(self.model_dir / serialized, self.config)
        self.warmup()
        self.initialized = self.ready = True
        log.info(
            "%s v%s ready on %s (%d threads) in %.1f s",
            self.model_name,
            self.version,
            self.device,
            torch.get_num_threads(),
            time.perf_counter() - t0,
        )

    def build(self, artifact: Path, config: ModelConfig) -> Any:
        """Return the pipeline for this model (override)."""
        raise NotImplementedError

    def warmup(self) -> None:
        """Run the configured warm-up batches (override when the pipeline has none)."""
        self.pipeline.warmup()

    # -- serve --------------------------------------------------------------------------
    def handle(self, data: list[dict], context) -> list[str]:
        """One TorchServe batch: items in, one JSON answer per item, order kept."""
        t0 = time.perf_counter()
        items = [self._item(row, context, i) for i, row in enumerate(data)]
        try:
            results = self.run(items)
        except Exception as exc:  # a bug or resource failure: answer every item, keep the worker
            log.exception("handler failed on a batch of %d", len(items))
            results = [_batch_error(exc)] * len(items)
        out = []
        for i, res in enumerate(results):
            context.set_response_header(i, "X-Model-Version", self.version)
            context.set_response_header(i, "X-Model-Name", self.model_name)
            if isinstance(res, RequestError):
                context.set_response_status(res.status, _reason(res.message), idx=i)
                out.append(json.dumps({"code": res.status, "type": type(res).__name__, "message": res.message}))
            else:
                out.append(json.dumps(res, separators=(",", ":")))
        self._metrics(context, len(data), sum(isinstance(r, RequestError) for r in results), t0)
        return out

    def _item(self, row: Any, context, idx: int) -> Any:
        """Pull the payload out of a request row; refuse content types we do not take."""
        ctype = ""
        try:
            ctype = (context.get_request_header(idx, "Content-Type") or "").lower()
        except Exception:  # headers are optional in TorchServe's context
            pass
        if ctype and not ctype.startswith(ACCEPTED_TYPES):
            return UnsupportedMediaType(
                f"content type {ctype!r} is not supported: send image/jpeg, image/png, "
                "multipart/form-data or application/json"
            )
        if isinstance(row, dict):
            for key in ("body", "data"):
                if key in row and row[key] is not None:
                    return row[key] if key == "body" else {"data": row[key]}
            return {k: v for k, v in row.items()}
        return row

    def run(self, items: list[Any]) -> list[Any]:
        """Turn items into results or :class:`RequestError` instances (override)."""
        raise NotImplementedError

    def stage_times(self) -> dict[str, float]:
        """Per-stage milliseconds of the last batch (override to report them)."""
        return {}

    def _metrics(self, context, batch: int, errors: int, t0: float) -> None:
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        from ts.metrics.dimension import Dimension

        def dims():
            # A fresh list each time: TorchServe's metric API appends to the list it is given.
            return [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]

        try:
            for stage, ms in self.stage_times().items():
                metrics.add_time(f"Stage{stage.capitalize()}Time", ms, None, "ms", dims())
            metrics.add_time("HandlerBatchTime", (time.perf_counter() - t0) * 1000, None, "ms", dims())
            metrics.add_counter("HandlerItems", batch, None, dims())
            if errors:
                metrics.add_counter("HandlerItemErrors", errors, None, dims())
        except Exception:  # metrics must never fail a request
            log.debug("metrics emission failed", exc_info=True)


def _batch_error(exc: Exception) -> RequestError:
    """The per-item error for an exception that escaped the pipeline (507 for out-of-memory, else 500)."""
    if isinstance(exc, RequestError):
        return exc
    text = f"{type(exc).__name__}: {first_line(exc)}" if str(exc).strip() else type(exc).__name__
    if is_oom(exc):
        return OutOfMemory(f"out of memory: {text}; retry, or lower batchSize")
    return ModelError(f"the handler failed on this batch: {text}")


def _reason(message: str) -> str:
    """An HTTP reason phrase of printable ASCII: TorchServe 0.12 frames the phrase by its length in
    characters, so one non-ASCII character (e.g. from a client's Content-Type) would corrupt the
    worker's reply and get the worker killed."""
    text = message.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if c.isprintable() else " " for c in text)
