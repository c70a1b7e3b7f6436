"""TorchServe adapter: context -> device and config, request rows -> bodies, per-item status codes, metrics."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from servekit import load_errors
from servekit.batch import Answers, Batch, Body, Pipeline, encode_answer
from servekit.config import HandlerOptions, ModelConfig
from servekit.errors import ConfigError, ModelError, OutOfMemory, RequestError, first_line
from servekit.handlers.batch_metrics import BatchMetrics
from servekit.handlers.frontend_reader import BodyArena
from servekit.handlers.frontend_reader import install as install_frontend_reader
from servekit.inference import is_oom, prepare_process, select_device
from servekit.payload import body_bytes

log = logging.getLogger(__name__)
JSON = "application/json"


class BaseHandler:
    """Reads the TorchServe context once, builds a pipeline, and adapts batches to it.

    A subclass implements :meth:`build` (return the :class:`Pipeline`) and names its options
    class (``options_class``: :class:`HandlerOptions` plus what the handler declares).
    """

    options_class: type[HandlerOptions] = HandlerOptions

    def __init__(self) -> None:
        self.initialized = False
        self.pipeline: Pipeline | None = None
        self.config: ModelConfig | None = None
        self.version = "unknown"
        self.model_name = "model"
        self.model_dir = Path(".")
        self.metrics = BatchMetrics(self.model_name)

    # -- load ---------------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        """Load the artifact onto the assigned device, set threads, warm up, mark ready.

        A failure is also recorded in servekit's load-error file: TorchServe may drop the traceback.
        """
        manifest = context.manifest.get("model", {})
        self.model_name = self.metrics.model_name = manifest.get("modelName", self.model_name)
        try:
            self._load(context)
        except Exception as exc:
            load_errors.record(self.model_name, str(manifest.get("modelVersion", self.version)), exc)
            raise

    def _load(self, context: Any) -> None:
        t0 = time.perf_counter()
        props = context.system_properties
        self.model_dir = Path(props.get("model_dir", "."))
        self.config = ModelConfig.from_dict(getattr(context, "model_yaml_config", None) or {}, self.options_class)
        opts = self.config.handler
        self.version = opts.version
        device = select_device(props.get("gpu_id"))
        prepare_process(opts, device, self.config.max_workers, self.config.batch_size)
        if opts.buffered_reads:  # after prepare_process: a page-locked arena needs the GPU's context
            install_frontend_reader(body_arena(opts.body_buffer_mib, device))
        serialized = context.manifest.get("model", {}).get("serializedFile")
        if not serialized:
            raise ConfigError("the archive's manifest names no serialized model file")
        self.pipeline = self.build(self.model_dir / serialized, self.config, device)
        self.pipeline.warmup()
        self.initialized = True
        log.info(
            "%s v%s ready on %s (%d threads) in %.1f s",
            self.model_name,
            self.version,
            device,
            torch.get_num_threads(),
            time.perf_counter() - t0,
        )

    def build(self, artifact: Path, config: ModelConfig, device: torch.device) -> Pipeline:
        """Return the pipeline for this model (override)."""
        raise NotImplementedError

    # -- serve --------------------------------------------------------------------------
    def handle(self, data: list[Any], context: Any) -> list[str]:
        """One TorchServe batch: rows in, one JSON answer per row, order kept."""
        t0 = time.perf_counter()
        bodies: Batch[Body] = Batch([self._body(row, context, i) for i, row in enumerate(data)])
        try:
            assert self.pipeline is not None, "handle() before initialize()"
            answers = self.pipeline.predict(bodies)
        except Exception as exc:  # a bug or resource failure: answer every item, keep the worker
            log.exception("handler failed on a batch of %d", len(bodies))
            answers = Answers(bodies.fail_all(_batch_error(exc)).slots)  # type: ignore[arg-type]
        out = []
        for i, res in enumerate(answers.results):
            context.set_response_header(i, "X-Model-Version", self.version)
            context.set_response_header(i, "X-Model-Name", self.model_name)
            context.set_response_header(i, "Content-Type", JSON)
            if isinstance(res, RequestError):
                context.set_response_status(res.status, _reason(res.message), idx=i)
                out.append(json.dumps({"code": res.status, "type": type(res).__name__, "message": res.message}))
            else:
                out.append(res if isinstance(res, str) else encode_answer(res))
        self.metrics.submit(getattr(context, "metrics", None), answers, time.perf_counter() - t0)
        return out

    @staticmethod
    def _body(row: Any, context: Any, idx: int) -> Body | RequestError:
        """The body of one request row, or why it cannot be used (a RequestError: 400/415)."""
        try:
            ctype = context.get_request_header(idx, "Content-Type") or ""
        except Exception:  # headers are optional in TorchServe's context
            ctype = ""
        try:
            return body_bytes(row, ctype)
        except RequestError as err:
            return err


def entry_point(handler_class: type[BaseHandler]) -> Any:
    """A module-level ``handle(data, context)`` for TorchServe, for a handler module that defines more than
    one class (TorchServe loads a module's single class, or else its ``handle`` function):
    ``handle = entry_point(MyHandler)``."""
    service = handler_class()

    def handle(data: list[Any] | None, context: Any) -> list[str] | None:
        if data is None:  # TorchServe's load call
            service.initialize(context)
            return None
        return service.handle(data, context)

    return handle


def body_arena(mib: int, device: torch.device) -> BodyArena | None:
    """The arena a worker receives bodies into: page-locked on a GPU, plain memory if that fails; None for 0 MiB."""
    if mib <= 0:
        return None
    if device.type == "cuda":
        try:
            return BodyArena(mib << 20, pinned=True)
        except RuntimeError as exc:
            log.warning("cannot page-lock a %d MiB body arena (%s); bodies go to plain memory", mib, first_line(exc))
    return BodyArena(mib << 20)


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
