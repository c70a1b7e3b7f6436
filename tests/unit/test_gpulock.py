"""The per-GPU lock lets one holder in at a time and steps aside when its file cannot be trusted."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

import pytest
import torch

from servekit.bench.images import synthetic_jpeg
from servekit.config import ImageOptions
from servekit.gpulock import GpuLock
from servekit.vision import Preprocessor, check_image


def test_one_holder_at_a_time_across_open_files(tmp_path):
    first, second = GpuLock(0, "nvjpeg", tmp_path), GpuLock(0, "nvjpeg", tmp_path)  # as two workers open it
    other_gpu = GpuLock(1, "nvjpeg", tmp_path)
    assert first.enabled and second.enabled and first.path == second.path != other_gpu.path
    entered: list[float] = []

    def waiter() -> None:
        with second:
            entered.append(time.monotonic())

    with first:
        thread = threading.Thread(target=waiter)
        thread.start()
        with other_gpu:  # another GPU's lock is free
            pass
        time.sleep(0.3)
        released = time.monotonic()
    thread.join(5)
    assert entered and entered[0] >= released
    assert oct(os.stat(first.path).st_mode & 0o777) == "0o600"
    for lock in (first, second, other_gpu):
        lock.close()


def test_a_link_or_a_missing_directory_leaves_work_unlocked(tmp_path, caplog):
    target = tmp_path / "elsewhere"
    (tmp_path / "servekit-gpu0-nvjpeg.lock").symlink_to(target)
    with caplog.at_level(logging.WARNING, logger="servekit.gpulock"):
        linked = GpuLock(0, "nvjpeg", tmp_path)
        missing = GpuLock(0, "nvjpeg", tmp_path / "no-such-dir")
    assert not linked.enabled and not missing.enabled and not target.exists()
    assert caplog.text.count("runs without the per-GPU lock") == 2
    with linked, missing:  # entering does nothing and does not block
        pass


def test_the_cpu_preprocessor_takes_no_lock():
    pre = Preprocessor(ImageOptions(serial_gpu_decode=True), torch.device("cpu"))
    assert not pre.gpu_decode and not isinstance(pre.decode_lock, GpuLock)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_serial_gpu_decode_decodes_as_before(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    jpeg = synthetic_jpeg(64, 48, 4_000)
    headers = [check_image(jpeg, ImageOptions())] * 3
    plain = Preprocessor(ImageOptions(), torch.device("cuda", 0))
    serial = Preprocessor(ImageOptions(serial_gpu_decode=True), torch.device("cuda", 0))
    assert isinstance(serial.decode_lock, GpuLock) and serial.decode_lock.enabled
    assert serial.decode_lock.path.parent == tmp_path
    for a, b in zip(plain.decode_many([jpeg] * 3, headers), serial.decode_many([jpeg] * 3, headers)):
        assert torch.equal(a, b)
