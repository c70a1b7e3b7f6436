"""A batch's metrics, emitted by a background thread once the handler has returned its answers.

TorchServe's metric API writes one log line per metric, which the frontend reads from the worker's
output and parses. Written from ``handle``, a batch's five lines sat on its latency path: at
concurrency 1 they were about a sixth of a GPU worker's time per request. A daemon thread writes
them instead, while the worker sends the reply and waits for the next batch. A metric line names
the request ids the metric cache holds when it is written, which may by then be the next batch's.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from servekit.batch import Answers

try:
    from ts.metrics.dimension import Dimension
    from ts.metrics.metric_type_enum import MetricTypes
except ImportError:  # pragma: no cover - servekit's core runs without TorchServe
    Dimension = MetricTypes = None

log = logging.getLogger(__name__)
# Batches whose metrics may wait to be written. The frontend reads the worker's output; should it
# stop, the writes block, and a bounded queue drops metrics (said once) instead of growing.
QUEUED_BATCHES = 1024
# One batch's metrics as queued: the metric cache, stage seconds, items, failed items, handler seconds.
Pending = tuple[Any, dict[str, float], int, int, float]


class BatchMetrics:
    """Per batch: each stage's and the handler's seconds (histograms), items and failed items (counters)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._queue: queue.Queue[Pending] = queue.Queue(QUEUED_BATCHES)
        self._pid = 0  # the process whose thread drains the queue (a forked worker starts its own)
        self.dropped = 0

    def submit(self, metrics: Any, answers: Answers, seconds: float) -> None:
        """Queue one batch's metrics for ``metrics`` (the context's metric cache; None: nothing to do)."""
        if metrics is None or Dimension is None:
            return
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._queue = queue.Queue(QUEUED_BATCHES)  # nothing of a parent's queue or its locks
            threading.Thread(target=self._drain, args=(self._queue,), name="servekit-metrics", daemon=True).start()
        try:
            self._queue.put_nowait(
                (metrics, dict(answers.stage_seconds), len(answers.results), answers.failed, seconds)
            )
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("metrics are written slower than batches arrive; dropping them until the queue drains")

    def _drain(self, pending: queue.Queue[Pending]) -> None:
        while True:
            metrics, stages, items, failed, seconds = pending.get()
            try:
                for stage, value in stages.items():
                    self._emit(metrics, f"servekit_{stage}_seconds", value, "seconds", MetricTypes.HISTOGRAM)
                self._emit(metrics, "servekit_handler_seconds", seconds, "seconds", MetricTypes.HISTOGRAM)
                self._emit(metrics, "servekit_items", items, "count", MetricTypes.COUNTER)
                if failed:
                    self._emit(metrics, "servekit_item_errors", failed, "count", MetricTypes.COUNTER)
            except Exception:  # metrics must never fail a request, nor stop the thread
                log.debug("metrics emission failed", exc_info=True)

    def _emit(self, metrics: Any, name: str, value: float, unit: str, kind: Any) -> None:
        # A fresh list each time: TorchServe's metric API appends to the list it is given.
        dims = [Dimension("ModelName", self.model_name), Dimension("Level", "Model")]
        metrics.add_metric(name, value, unit=unit, dimensions=dims, metric_type=kind)
