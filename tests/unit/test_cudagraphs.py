"""The GPU serving path: graph buckets and the wait mode here; capture and nvjpeg warm-up where a GPU is."""

from __future__ import annotations

import ctypes
import logging

import pytest
import torch

from servekit.artifacts import LoadedModel
from servekit.batch import Batch
from servekit.bench.images import synthetic_jpeg
from servekit.classify import ImageClassifier
from servekit.config import ClassifierOptions, HandlerOptions
from servekit.cudagraphs import GraphedForward, bucket_for, buckets, relative_error
from servekit.errors import ConfigError
from servekit.gpuwait import WAIT_FLAGS, set_gpu_wait
from servekit.inference import Engine, topk_head, unpack_topk
from servekit.vision import Preprocessor

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_buckets_are_powers_of_two_up_to_the_largest():
    assert buckets(32) == [1, 2, 4, 8, 16, 32]
    assert buckets(24) == [1, 2, 4, 8, 16, 24]
    assert buckets(1) == [1]
    with pytest.raises(ValueError):
        buckets(0)


def test_bucket_for_picks_the_smallest_that_holds_the_batch():
    sizes = [1, 2, 4, 8, 16, 32]
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 17, 32)] == [1, 2, 4, 8, 32, 32]
    assert bucket_for(33, sizes) is None


def test_relative_error():
    want = torch.tensor([[1.0, -4.0], [2.0, 0.0]])
    assert relative_error(want.clone(), want) == 0.0
    assert relative_error(want + torch.tensor([[0.0, 0.4], [0.0, 0.0]]), want) == pytest.approx(0.1)


def test_no_capture_on_the_cpu():
    assert GraphedForward.capture(lambda x: (x,), [1], lambda n: torch.zeros(n, 1), torch.device("cpu")) is None


def test_gpu_wait_is_checked_up_front():
    with pytest.raises(ConfigError, match="gpu_wait must be one of"):
        HandlerOptions.from_dict({"gpu_wait": "busy"})
    assert HandlerOptions().gpu_wait == "blocking" and HandlerOptions().cuda_graphs


class FakeDriver:
    """libcuda's four calls, recording the flags set; ``fail`` names a call that returns an error."""

    def __init__(self, fail: str = "", keep: int | None = None):
        self.fail, self.keep, self.flags = fail, keep, 0

    def _status(self, name: str) -> int:
        return 999 if name == self.fail else 0

    def cuInit(self, _flags):  # noqa: N802 - the driver's names
        return self._status("cuInit")

    def cuDeviceGet(self, dev, index):  # noqa: N802
        dev._obj.value = index
        return self._status("cuDeviceGet")

    def cuDevicePrimaryCtxSetFlags(self, _dev, flags):  # noqa: N802
        self.flags = flags if self.keep is None else self.keep
        return self._status("cuDevicePrimaryCtxSetFlags")

    def cuDevicePrimaryCtxGetState(self, _dev, flags, active):  # noqa: N802
        flags._obj.value, active._obj.value = self.flags, 1
        return self._status("cuDevicePrimaryCtxGetState")


def test_gpu_wait_sets_the_primary_context_flag():
    driver = FakeDriver()
    assert set_gpu_wait("blocking", 0, lib=driver) == "blocking"
    assert driver.flags == WAIT_FLAGS["blocking"]
    assert set_gpu_wait("auto", 0, lib=FakeDriver(fail="cuInit")) == "auto"  # not even asked


@pytest.mark.parametrize("driver", [FakeDriver(fail="cuDevicePrimaryCtxSetFlags"), FakeDriver(keep=0x01)])
def test_gpu_wait_degrades_to_the_driver_default_and_says_so(driver, caplog):
    with caplog.at_level(logging.WARNING, logger="servekit.gpuwait"):
        assert set_gpu_wait("blocking", 0, lib=driver) == "auto"
    assert "the driver decides how CUDA waits" in caplog.text


def test_gpu_wait_without_a_driver_library(monkeypatch, caplog):
    def missing(_name):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    with caplog.at_level(logging.WARNING, logger="servekit.gpuwait"):
        assert set_gpu_wait("blocking", 0) == "auto"
    assert "libcuda.so.1" in caplog.text


def _small_net(device: torch.device) -> torch.jit.ScriptModule:
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )
    return torch.jit.script(net.eval().to(device))


@needs_cuda
@pytest.mark.parametrize("amp", ["off", "fp16"])
def test_graphed_engine_matches_eager_at_every_batch_size(amp):
    device = torch.device("cuda", 0)
    module = _small_net(device)
    opts = ClassifierOptions(amp=amp, warmup_batch_sizes=(1, 8), crop=16, resize=16)
    engine = Engine(LoadedModel(module, "torchscript", device, autocast=True, graphable=True), opts)
    engine.warmup(opts.warmup_batch_sizes, (3, 16, 16), torch.contiguous_format)
    assert engine.graphs is not None and engine.graphs.sizes == [1, 2, 4, 8]
    for n in (1, 3, 8, 9):  # 9: above the largest graph, eager
        x = torch.randn(n, 3, 16, 16, device=device)
        got = engine.forward(x)
        with torch.inference_mode(), engine._autocast():
            want = module(x)
        assert got.shape == want.shape
        assert relative_error(got, want) < 1e-2


@needs_cuda
def test_the_top_k_head_is_replayed_with_the_forward():
    device = torch.device("cuda", 0)
    module = _small_net(device)
    opts = ClassifierOptions(amp="off", warmup_batch_sizes=(1, 8), crop=16, resize=16)
    engine = Engine(LoadedModel(module, "torchscript", device, autocast=True, graphable=True), opts, head=topk_head(3))
    engine.warmup(opts.warmup_batch_sizes, (3, 16, 16), torch.contiguous_format)
    assert engine.graphs is not None
    for n in (1, 3, 9):
        x = torch.randn(n, 3, 16, 16, device=device)
        got = unpack_topk(engine.infer(x))
        with torch.inference_mode():
            want = engine.topk(module(x), 3)
        assert got.indices == want.indices
        for g, w in zip(got.probs, want.probs):
            assert g == pytest.approx(w, rel=1e-4)


@needs_cuda
def test_a_batch_preprocessed_into_the_graph_input_replays_without_a_copy():
    device = torch.device("cuda", 0)
    opts = ClassifierOptions(amp="off", warmup_batch_sizes=(1, 4), crop=16, resize=16)
    model = LoadedModel(_small_net(device), "torchscript", device, autocast=True, graphable=True)
    engine = Engine(model, opts, head=topk_head(3))
    engine.warmup(opts.warmup_batch_sizes, (3, 16, 16), torch.contiguous_format)
    x = torch.randn(3, 3, 16, 16, device=device)
    want = unpack_topk(engine.infer(x))
    rows = engine.input_buffer(3)
    assert rows is not None and rows.shape == x.shape
    with torch.inference_mode():
        rows.copy_(x)
    got = unpack_topk(engine.infer(rows, to_host=True))
    assert got.indices == want.indices
    for g, w in zip(got.probs, want.probs):
        assert g == pytest.approx(w, rel=1e-4)
    assert engine.input_buffer(5) is None  # above the largest graph: no buffer, an eager run


@needs_cuda
def test_the_graphed_classifier_answers_as_the_eager_one(tmp_path):
    """Decode, preprocess into the graph's input, replay forward and top-k: the same answers as eagerly."""
    device = torch.device("cuda", 0)
    artifact = tmp_path / "model.pt"
    _small_net(device).save(str(artifact))
    bodies = [bytearray(synthetic_jpeg(seed=i)) for i in range(3)]
    answers = {}
    for graphs in (True, False):
        opts = ClassifierOptions(amp="off", warmup_batch_sizes=(1, 4), topk=3, cuda_graphs=graphs)
        clf = ImageClassifier(artifact, opts, device)
        clf.warmup()
        assert (clf.engine.graphs is not None) == graphs
        answers[graphs] = [clf.predict(Batch(bodies[:n])).results for n in (1, 3)]
    for graphed, eager in zip(answers[True], answers[False]):
        for g, e in zip(graphed, eager):
            assert [p["index"] for p in g["predictions"]] == [p["index"] for p in e["predictions"]]
            for pg, pe in zip(g["predictions"], e["predictions"]):
                assert pg["probability"] == pytest.approx(pe["probability"], rel=1e-3, abs=1e-6)


@needs_cuda
def test_a_model_that_cannot_be_captured_runs_eagerly(caplog):
    device = torch.device("cuda", 0)

    def host_sync(x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * float(x.sum().item() != 0.5),)  # .item() syncs: not allowed in a capture

    with caplog.at_level(logging.WARNING, logger="servekit.cudagraphs"):
        graphed = GraphedForward.capture(host_sync, [1, 2], lambda n: torch.zeros(n, 4, device=device), device)
    assert graphed is None
    assert "running it eagerly" in caplog.text


@needs_cuda
def test_preprocessor_warmup_starts_nvjpeg_at_load():
    pre = Preprocessor(ClassifierOptions(), torch.device("cuda", 0))
    pre.warmup()  # decodes a built-in JPEG on the GPU
    assert not pre._gpu_decode_failed


def test_preprocessor_warmup_is_a_no_op_on_the_cpu(monkeypatch):
    pre = Preprocessor(ClassifierOptions(), torch.device("cpu"))
    monkeypatch.setattr(pre, "decode_many", lambda *a: pytest.fail("decoded on the CPU"))
    pre.warmup()
