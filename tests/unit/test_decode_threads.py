"""A batch's CPU images decode side by side in the decode threads: the same pixels, errors kept per item."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from servekit.config import ImageOptions
from servekit.errors import ConfigError, RequestError
from servekit.vision import Preprocessor, check_image

CPU = torch.device("cpu")


def _encoded(fmt: str, seed: int, size: tuple[int, int] = (96, 64), **kw: object) -> bytearray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return bytearray(buf.getvalue())


def _batch() -> list[bytearray]:
    return [
        _encoded("PNG", 1),
        _encoded("JPEG", 2, progressive=True),
        _encoded("WEBP", 3, lossless=True),
        _encoded("PNG", 4)[:60],  # cut inside its pixel data: this one fails, its neighbours do not
        _encoded("JPEG", 5, (40, 30)),
    ]


def _decode(pre: Preprocessor, raws: list[bytearray]) -> list[torch.Tensor | RequestError]:
    return pre.decode_many(raws, [check_image(r, pre.opts) for r in raws])


def test_threads_give_the_pixels_of_one_thread_and_keep_each_items_error():
    raws = _batch()
    serial = _decode(Preprocessor(ImageOptions(decode_threads=1), CPU), raws)
    threaded = _decode(Preprocessor(ImageOptions(decode_threads=3), CPU), raws)
    for i, (one, many) in enumerate(zip(serial, threaded)):
        if i == 3:
            assert isinstance(one, RequestError) and isinstance(many, RequestError)
            assert (many.status, str(many)) == (one.status, str(one)) == (400, str(one))
        else:
            assert isinstance(many, torch.Tensor) and torch.equal(one, many), i


def test_a_batchs_images_are_decoded_in_several_threads_at_once():
    pre = Preprocessor(ImageOptions(decode_threads=4), CPU)
    decode, seen, lock = pre.decode_cpu, [], threading.Lock()
    running, most = [0], [0]

    def slow_decode(raw):  # as a large PNG would: the GIL is let go while it decodes
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            seen.append(threading.current_thread().name)
        time.sleep(0.1)
        with lock:
            running[0] -= 1
        return decode(raw)

    pre.decode_cpu = slow_decode  # type: ignore[method-assign]
    raws = [_encoded("PNG", i) for i in range(8)]
    t0 = time.monotonic()
    out = _decode(pre, raws)
    assert all(isinstance(img, torch.Tensor) for img in out)
    assert most[0] == 4 and all(name.startswith("servekit-decode") for name in seen)
    assert time.monotonic() - t0 < 0.6  # two rounds of four, not eight one after another (0.8 s)


def test_one_thread_or_one_image_needs_no_threads():
    one = Preprocessor(ImageOptions(decode_threads=1), CPU)
    assert one._decode_pool(one._decode_threads()) is None
    pre = Preprocessor(ImageOptions(decode_threads=2), CPU)
    (img,) = _decode(pre, [_encoded("PNG", 1)])
    assert isinstance(img, torch.Tensor) and pre._pool is None
    torch.set_num_threads(1)
    try:  # auto: the worker's torch threads, which prepare_process sets from cpu_threads
        auto = Preprocessor(ImageOptions(), CPU)
        assert auto._decode_pool(auto._decode_threads()) is None
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_worker_forked_after_a_decode_makes_its_own_threads():
    """A preloaded worker is a fork: the threads of its parent's pool do not exist in it."""
    pre = Preprocessor(ImageOptions(decode_threads=2), CPU)
    raws = [_encoded("PNG", i) for i in range(3)]
    assert all(isinstance(img, torch.Tensor) for img in _decode(pre, raws))
    parent_pool = pre._pool
    pid = os.fork()
    if pid == 0:  # the child: decode again and report through the exit code (a hang fails the wait)
        ok = all(isinstance(img, torch.Tensor) for img in _decode(pre, raws)) and pre._pool is not parent_pool
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child hung decoding: it used its parent's threads")


@pytest.mark.parametrize("bad", [0, -1, "many", 2.5, True])
def test_decode_threads_must_be_auto_or_a_count(bad):
    with pytest.raises(ConfigError, match="decode_threads must be 'auto' or an integer >= 1"):
        ImageOptions(decode_threads=bad)
