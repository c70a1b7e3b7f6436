"""Load failures recorded by the worker: the handler's record, the watcher's read, the file's bound."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from servekit import load_errors
from servekit.errors import ConfigError
from servekit.handlers.image_classifier import ImageClassifierHandler


def _context(model_dir: Path, serialized: str | None) -> SimpleNamespace:
    model = {"modelName": "digits", "modelVersion": "3.1", **({"serializedFile": serialized} if serialized else {})}
    return SimpleNamespace(
        manifest={"model": model},
        system_properties={"model_dir": str(model_dir), "gpu_id": None},
        model_yaml_config={"handler": {"version": "3.1"}},
    )


def test_a_failed_initialize_is_recorded_with_its_qualified_type_and_still_raises(tmp_path, monkeypatch):
    monkeypatch.setenv(load_errors.DIR_ENV, str(tmp_path))
    before = time.time()
    with pytest.raises(ConfigError, match="names no serialized model file"):
        ImageClassifierHandler().initialize(_context(tmp_path, None))
    [entry] = load_errors.read(tmp_path)
    assert (entry.model, entry.version) == ("digits", "3.1") and entry.time >= before
    assert entry.error == "servekit.errors.ConfigError: the archive's manifest names no serialized model file"
    assert load_errors.latest(tmp_path, "digits", "3.1", since=before) == entry.error
    assert load_errors.latest(tmp_path, "digits", "3.1", since=time.time() + 1) is None  # an older attempt's
    assert load_errors.latest(tmp_path, "digits", "3.0") is None


def test_an_artifact_that_cannot_load_is_recorded(tmp_path, monkeypatch):
    monkeypatch.setenv(load_errors.DIR_ENV, str(tmp_path / "logs"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "model.pt").write_bytes(b"not a model")
    with pytest.raises(Exception) as caught:
        ImageClassifierHandler().initialize(_context(tmp_path, "model.pt"))
    recorded = load_errors.latest(tmp_path / "logs", "digits", "3.1")
    assert recorded == load_errors.describe_exception(caught.value), recorded


def test_builtin_exceptions_stay_bare_and_messages_keep_one_line():
    assert load_errors.describe_exception(RuntimeError("boom\ntrace")) == "RuntimeError: boom"
    assert load_errors.describe_exception(ConfigError("x")) == "servekit.errors.ConfigError: x"


def test_the_file_is_bounded_and_bad_lines_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(load_errors, "MAX_BYTES", 4096)
    path = tmp_path / load_errors.FILE
    path.write_text("not json\n" + json.dumps({"model": "m"}) + "\n")
    for i in range(100):
        load_errors.record("m", str(i), RuntimeError("x" * 40), tmp_path)
    entries = load_errors.read(tmp_path)
    assert path.stat().st_size <= 4096
    assert [e.version for e in entries] == [str(i) for i in range(100 - len(entries), 100)]
    assert len(entries) < 100 and not list(tmp_path.glob(".*"))


def test_an_unwritable_directory_or_none_records_nothing_and_raises_nothing(tmp_path, monkeypatch, caplog):
    load_errors.record("m", "1", RuntimeError("x"), tmp_path / "missing")
    assert "could not record the load failure" in caplog.text
    monkeypatch.delenv(load_errors.DIR_ENV, raising=False)
    load_errors.record("m", "1", RuntimeError("x"))
    assert load_errors.read(tmp_path / "missing") == []
