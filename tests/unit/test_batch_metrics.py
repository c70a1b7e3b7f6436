"""A batch's metrics, written by a background thread through TorchServe's own metric cache."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from servekit.batch import Answers
from servekit.errors import InvalidInput
from servekit.handlers import batch_metrics
from servekit.handlers.batch_metrics import BatchMetrics

ts_metrics = pytest.importorskip("ts.metrics.metric_cache_yaml_impl")
METRICS_YAML = Path(batch_metrics.__file__).resolve().parents[1] / "metrics.yaml"


def _lines_with(caplog: pytest.LogCaptureFixture, marker: str, want: int) -> list[str]:
    for _ in range(100):  # the thread writes them after submit() returns
        lines = [r.getMessage() for r in caplog.records if marker in r.getMessage()]
        if len(lines) >= want:
            return lines
        time.sleep(0.02)
    return lines


def test_a_batch_metrics_reach_torchserves_metric_lines(caplog):
    cache = ts_metrics.MetricsCacheYamlImpl(config_file_path=str(METRICS_YAML))
    cache.initialize_cache()
    cache.model_name = "digits"
    metrics = BatchMetrics("digits")
    answers = Answers([{"predictions": []}, InvalidInput("bad")], {"decode": 0.002, "infer": 0.003})
    with caplog.at_level(logging.INFO):
        metrics.submit(cache, answers, 0.007)
        lines = _lines_with(caplog, "[METRICS]servekit_", 5)
    names = sorted(line.split("[METRICS]")[1].split(".")[0] for line in lines)
    assert names == [
        "servekit_decode_seconds",
        "servekit_handler_seconds",
        "servekit_infer_seconds",
        "servekit_item_errors",
        "servekit_items",
    ]
    items = next(line for line in lines if "servekit_items." in line)
    assert ":2|" in items and "ModelName:digits" in items


def test_no_metric_cache_no_thread():
    metrics = BatchMetrics("m")
    metrics.submit(None, Answers([]), 0.0)
    assert metrics._pid == 0


class _Stuck:
    """A metric cache whose writes block, as when nobody reads the worker's output."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def add_metric(self, *args, **kwargs) -> None:
        self.release.wait(10)


def test_metrics_are_dropped_not_hoarded_when_writes_block(monkeypatch, caplog):
    monkeypatch.setattr(batch_metrics, "QUEUED_BATCHES", 2)
    metrics, stuck = BatchMetrics("m"), _Stuck()
    with caplog.at_level(logging.WARNING, logger="servekit.handlers.batch_metrics"):
        for _ in range(10):
            metrics.submit(stuck, Answers([{}]), 0.001)
    stuck.release.set()
    # Two batches wait (and one more is being written, if the thread took it in time): the rest are
    # dropped, and it is said once.
    assert 7 <= metrics.dropped <= 8
    assert caplog.text.count("dropping them") == 1
