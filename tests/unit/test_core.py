"""Unit tests of the plain modules: no TorchServe involved."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from models.digits.model import encode, held_out
from servekit import server, tuning, vision
from servekit.batch import Batch
from servekit.config import ClassifierOptions, ConfigError, HandlerOptions, ImageOptions, ModelConfig
from servekit.errors import ExportMismatch, InvalidInput, PayloadTooLarge, UnsupportedMediaType
from servekit.inference import Engine, amp_dtype, topk_head, unpack_topk
from servekit.java import find_java, parse_java_version
from servekit.parity import check_parity
from servekit.payload import body_bytes
from servekit.store import version_key
from servekit.tokens import TokenFile
from servekit.vision import Preprocessor, check_image, reference_transform

CPU = torch.device("cpu")


def natural_image(w: int = 500, h: int = 375, seed: int = 0) -> Image.Image:
    """A smooth, textured RGB image (not noise: resizing must behave as on a photo)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = [
        np.sin(xx / (20 + 10 * c)) * np.cos(yy / (15 + 7 * c)) * 90 + 128 + rng.normal(0, 6, (h, w)) for c in range(3)
    ]
    return Image.fromarray(np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8), "RGB")


# -- config -----------------------------------------------------------------------------
def test_handler_options_reject_bad_values_with_actionable_message():
    with pytest.raises(ConfigError, match="amp must be one of"):
        HandlerOptions.from_dict({"amp": "fp8"})
    with pytest.raises(ConfigError, match=r"unknown handler option\(s\) \['colour'\]; known options"):
        ClassifierOptions.from_dict({"colour": 1})
    with pytest.raises(ConfigError, match="crop <= resize"):
        ImageOptions.from_dict({"crop": 300, "resize": 256})
    with pytest.raises(ConfigError, match="max_aspect_ratio must be >= 1"):
        ImageOptions.from_dict({"max_aspect_ratio": 0.5})
    assert ImageOptions.from_dict({"max_aspect_ratio": 100}).max_aspect_ratio == 100
    # A value of the wrong type is named with its option, not a TypeError from deep in a check.
    for key, bad, kind in (
        ("max_aspect_ratio", "wide", "a number"),
        ("max_image_pixels", 1.5, "an integer"),
        ("channels_last", "yes", "true or false"),
        ("mean", 0.5, "a list of numbers"),
    ):
        with pytest.raises(ConfigError, match=f"{key} must be {kind}, got"):
            ImageOptions.from_dict({key: bad})
    # A handler's own options are known only to its own class.
    with pytest.raises(ConfigError, match=r"unknown handler option\(s\) \['topk'\]"):
        ImageOptions.from_dict({"topk": 3})
    assert ClassifierOptions.from_dict({"topk": 3}).topk == 3
    for bad in (-1, True, 2048, "16"):
        with pytest.raises(ConfigError, match="body_buffer_mib must be an integer"):
            HandlerOptions.from_dict({"body_buffer_mib": bad})


def test_model_config_reads_yaml_off_as_amp_off(tmp_path):
    cfg_file = tmp_path / "model-config.yaml"
    cfg_file.write_text("batchSize: 4\nmaxWorkers: 2\nhandler:\n  amp: off\n  cpu_threads: auto\n")
    cfg = ModelConfig.load(cfg_file)
    assert cfg.handler.amp == "off" and cfg.batch_size == 4
    assert cfg.handler.threads(workers=2, cpus=16) == 8
    assert cfg.with_version("3.1").handler.version == "3.1"
    cfg_file.write_text("batchSize: four\n")
    with pytest.raises(ConfigError, match="must be integers"):
        ModelConfig.load(cfg_file)


def test_a_zero_batch_delay_is_refused_where_it_would_stop_batching():
    with pytest.raises(ConfigError, match="maxBatchDelay 0 does not batch"):
        ModelConfig.from_dict({"batchSize": 32, "maxBatchDelay": 0})
    assert ModelConfig.from_dict({"batchSize": 1, "maxBatchDelay": 0}).batch_size == 1  # nothing to batch
    assert ModelConfig.from_dict({"batchSize": 32, "maxBatchDelay": 1}).raw["maxBatchDelay"] == 1


# -- decoding and preprocessing ----------------------------------------------------------
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_preprocess_matches_torchvision_reference(fmt):
    opts = ImageOptions()
    img = natural_image()
    raw = encode(img, fmt)
    pre = Preprocessor(opts, CPU)
    ours = pre.to_batch([pre.decode_cpu(raw)])[0]
    ref = reference_transform(opts)(Image.open(io.BytesIO(raw)))
    assert ours.shape == ref.shape == (3, 224, 224)
    diff = (ours - ref).abs()
    # Both resize in 8-bit fixed point on a CPU, as stock's handler does through PIL: a pixel is at
    # most one level apart (1/255/std = 0.0175), and few are (resizing floats was 0.003 apart on average).
    assert diff.mean() < 0.0005 and diff.max() < 0.018, (diff.mean(), diff.max())


def test_grayscale_preprocess_matches_reference():
    opts = ImageOptions(channels=1, resize=28, crop=28, mean=(0.5,), std=(0.5,))
    img, _ = held_out(1)[0]
    raw = encode(img, "PNG")
    pre = Preprocessor(opts, CPU)
    ours = pre.to_batch([pre.decode_cpu(raw)])[0]
    ref = reference_transform(opts)(Image.open(io.BytesIO(raw)))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_body_bytes_takes_raw_multipart_and_base64_and_names_the_header_to_send():
    raw = encode(natural_image(64, 48), "JPEG")
    assert body_bytes({"body": raw}, "image/jpeg") == raw
    as_torchserve_gives_it = bytearray(raw)
    assert body_bytes({"body": as_torchserve_gives_it}, "image/jpeg") is as_torchserve_gives_it  # not copied
    arena = bytearray(len(raw) + 10)  # a worker's body arena: its bodies are views, and stay views
    arena[5 : 5 + len(raw)] = raw
    view = body_bytes({"body": memoryview(arena)[5 : 5 + len(raw)]}, "image/jpeg")
    assert isinstance(view, memoryview) and view == raw and view.obj is arena
    assert body_bytes({"body": memoryview(raw).cast("b")}, "image/jpeg") == raw
    with pytest.raises(InvalidInput, match="empty body"):
        body_bytes({"body": memoryview(arena)[:0]})
    assert body_bytes({"data": raw}, "multipart/form-data; boundary=x") == raw
    assert body_bytes({"data": base64.b64encode(raw).decode()}, "application/json") == raw
    assert body_bytes({"instances": [{"b64": base64.b64encode(raw).decode()}]}) == raw
    with pytest.raises(InvalidInput, match="not valid base64"):
        body_bytes({"data": "***not base64***"})
    with pytest.raises(InvalidInput, match="empty body"):
        body_bytes({"body": b""})
    with pytest.raises(InvalidInput, match="no image found"):
        body_bytes({"text": "hello"})
    with pytest.raises(InvalidInput, match="malformed JSON"):
        body_bytes({"body": b'{"data": '})
    with pytest.raises(InvalidInput, match="malformed JSON"):
        body_bytes({"body": bytearray(b"\n  [1, 2")})
    with pytest.raises(UnsupportedMediaType, match="Content-Type: image/jpeg"):
        body_bytes({"x": "y"}, "application/x-www-form-urlencoded")
    with pytest.raises(UnsupportedMediaType, match="'text/plain' is not supported"):
        body_bytes({"body": raw}, "text/plain")


def test_check_image_refuses_bombs_non_images_and_oversize():
    opts = ImageOptions(max_image_pixels=1000 * 1000, max_image_bytes=50_000)
    bomb = encode(Image.new("L", (2000, 2000)), "PNG")  # tiny file, 4 megapixels declared
    with pytest.raises(PayloadTooLarge, match="max_image_pixels"):
        check_image(bomb, opts)
    with pytest.raises(UnsupportedMediaType, match="not a JPEG, PNG or WebP"):
        check_image(b"GIF89a....", opts)
    with pytest.raises(PayloadTooLarge, match="max_image_bytes"):
        check_image(b"\xff\xd8\xff" + b"\0" * 60_000, opts)
    truncated = encode(natural_image(), "JPEG")[:20]
    with pytest.raises(InvalidInput):
        check_image(truncated, ImageOptions())
    for w, h in ((20000, 1), (10, 251)):  # resized to 256 on the short side: 256x5,120,000, 256x6,425
        with pytest.raises(PayloadTooLarge, match="side ratio of .*the limit is 25 .max_aspect_ratio."):
            check_image(encode(Image.new("L", (w, h)), "PNG"), ImageOptions())
    assert check_image(encode(Image.new("L", (10, 250)), "PNG"), ImageOptions()).height == 250


# -- inference and postprocessing --------------------------------------------------------
class _Fixed(torch.nn.Module):
    def forward(self, x):
        logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
        return logits.repeat(x.shape[0], 1)


def test_topk_orders_classes_and_probabilities():
    from servekit.artifacts import LoadedModel

    engine = Engine(LoadedModel(_Fixed(), "torchscript", CPU, autocast=True), HandlerOptions())
    top = engine.topk(engine.forward(torch.zeros(2, 3, 4, 4)), 3)
    expected = torch.softmax(torch.tensor([0.0, 3.0, 1.0, 2.0]), 0)
    assert top.indices == [[1, 3, 2], [1, 3, 2]]
    assert top.probs[0] == pytest.approx(expected[[1, 3, 2]].tolist(), rel=1e-6)


def test_the_top_k_head_packs_what_topk_returns():
    from servekit.artifacts import LoadedModel

    engine = Engine(LoadedModel(_Fixed(), "torchscript", CPU, autocast=True), HandlerOptions(), head=topk_head(3))
    engine.warmup([1, 2], (3, 4, 4), torch.contiguous_format)
    x = torch.zeros(2, 3, 4, 4)
    assert engine.forward(x).shape == (2, 4)  # the logits stay reachable beside the head
    packed = engine.infer(x)
    assert packed.shape == (2, 2, 3)
    assert unpack_topk(packed) == engine.topk(engine.forward(x), 3)


def test_fp16_amp_is_a_gpu_setting():
    assert amp_dtype("fp16", CPU) is None
    assert amp_dtype("bf16", CPU) is torch.bfloat16


def test_export_parity_check_refuses_a_disagreeing_artifact():
    model = torch.nn.Linear(8, 4).eval()
    x = torch.randn(5, 8)
    err, agree = check_parity(model, model, x)
    assert err == 0 and agree == 1
    wrong = torch.nn.Linear(8, 4).eval()
    with pytest.raises(ExportMismatch, match=r"relative error .* \(tolerance"):
        check_parity(model, wrong, x)


def test_classifier_keeps_order_and_fails_bad_items_alone(tmp_path):
    from models.digits.model import DigitsNet
    from servekit.classify import ImageClassifier

    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.jit.trace(DigitsNet().eval(), torch.zeros(1, 1, 28, 28)).save(str(path))
    opts = ModelConfig.load("models/digits/model-config.yaml").handler
    clf = ImageClassifier(path, opts, CPU, [str(i) for i in range(10)])
    good = encode(held_out(1)[0][0], "PNG")
    results = clf.predict(Batch([good, b"not an image", good, InvalidInput("pre-failed")])).results
    assert isinstance(results[1], UnsupportedMediaType)
    assert isinstance(results[3], InvalidInput) and results[3].message == "pre-failed"
    assert results[0] == results[2] and len(results[0]["predictions"]) == opts.topk
    probs = [p["probability"] for p in results[0]["predictions"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    # As a server sends them: the same answers, already JSON text; errors stay errors.
    as_json = ImageClassifier(path, opts, CPU, [str(i) for i in range(10)], as_json=True)
    texts = as_json.predict(Batch([good, b"not an image"])).results
    assert isinstance(texts[0], str) and json.loads(texts[0]) == results[0]
    assert isinstance(texts[1], UnsupportedMediaType)


def test_top_k_json_writes_what_the_encoder_writes():
    from servekit.classify import ImageClassifier, TopKJson

    encode = json.JSONEncoder(separators=(",", ":")).encode
    labels = ['say "cheese"', "back\\slash", "caf\u00e9 \u732b", "tab\there", "plain"]
    cases = [
        ([0, 1, 2], [0.9999999, 1e-07, 0.0]),
        ([3, 4, 7], [0.5, 0.25, 1.0]),  # 7: past the labels, answered by its index
        ([2, 9], [float("nan"), float("inf")]),
        ([4], [1 / 3]),
    ]
    for names in (labels, None):
        fast = TopKJson(names)
        dicts = ImageClassifier.__new__(ImageClassifier)
        dicts.labels = names
        for indices, probs in cases:
            assert fast.encode(indices, probs) == encode(dicts.format(indices, probs)), (names, indices)


# -- Java, tokens, versions, ports -------------------------------------------------------
def test_a_servers_private_ports_are_distinct_even_when_the_draws_repeat(monkeypatch):
    draws = iter([15000, 15000, 15001, 15000, 15001, 15002, 15003, 15002, 15004, 15005, 15006])
    monkeypatch.setattr(server.random, "randrange", lambda *_: next(draws))
    ports = server.private_ports()
    numbers = [int(v.rsplit(":", 1)[-1]) for k, v in ports.items() if k != "initial_worker_port"]
    assert sorted(numbers) == [15000, 15001, 15002, 15003, 15004]
    assert ports["initial_worker_port"] == str(20000 + 15005 % 20000)


def test_java_version_parsing_and_discovery():
    assert parse_java_version('openjdk version "17.0.15" 2025-04-15') == 17
    assert parse_java_version('java version "1.8.0_292"') == 8
    assert parse_java_version("garbage") is None
    assert find_java().major >= 17


def test_token_file_rereads_on_change(tmp_path):
    path = tmp_path / "key_file.json"

    def write(inf):
        path.write_text(json.dumps({"management": {"key": "m"}, "inference": {"key": inf}, "API": {"key": "a"}}))

    write("one")
    tokens = TokenFile(path)
    assert tokens.header() == {"Authorization": "Bearer one"}
    write("second")
    assert tokens.header()["Authorization"] == "Bearer second"
    assert tokens.keys().management == "m"


def test_versions_sort_numerically():
    assert version_key("1.10") > version_key("1.9") > version_key("1.0")
    assert sorted(["2.0", "1.10", "2.0-rc1", "1.0", "custom"], key=version_key) == [
        "custom",
        "1.0",
        "1.10",
        "2.0-rc1",
        "2.0",
    ]


def test_batch_of_mixed_sizes_keeps_order():
    """Same-sized images are resized together; the batch order is the input order."""
    pre = Preprocessor(ImageOptions(), CPU)
    sizes = [(500, 375), (320, 480), (500, 375), (256, 256)]
    imgs = [pre.decode_cpu(encode(natural_image(w, h, seed=i), "PNG")) for i, (w, h) in enumerate(sizes)]
    batch = pre.to_batch(imgs)
    for i, img in enumerate(imgs):
        assert torch.allclose(batch[i], pre.to_batch([img])[0], atol=1e-5), i


def test_large_images_are_resized_a_few_at_a_time_to_the_same_batch(monkeypatch):
    """Same-sized images past the chunk budget go in runs (memory bounded); the batch is the same, in order."""
    pre = Preprocessor(ImageOptions(), CPU)
    sizes = [(500, 375)] * 5 + [(320, 480)] * 2
    imgs = [pre.decode_cpu(encode(natural_image(w, h, seed=i), "PNG")) for i, (w, h) in enumerate(sizes)]
    whole = pre.to_batch(imgs)
    resized: list[int] = []
    resize_crop = pre.resize_crop
    monkeypatch.setattr(pre, "resize_crop", lambda x: resized.append(len(x)) or resize_crop(x))
    monkeypatch.setattr(vision, "_CHUNK_VALUES", 2 * 3 * 500 * 375)  # two of the 500x375 ones at a time
    assert torch.equal(pre.to_batch(imgs), whole)
    assert resized == [2, 2, 1, 2]


def test_a_batch_is_written_where_into_says():
    """What a CUDA graph's static input gets: an inference tensor, written in place, equal to a fresh batch."""
    pre = Preprocessor(ImageOptions(), CPU)
    imgs = [pre.decode_cpu(encode(natural_image(500, 375, seed=i), "PNG")) for i in range(2)]
    with torch.inference_mode():
        static = torch.zeros(4, 3, 224, 224)
    asked = []
    batch = pre.to_batch(imgs, into=lambda n: asked.append(n) or static[:n])
    assert asked == [2] and batch.data_ptr() == static.data_ptr()
    assert torch.equal(batch, pre.to_batch(imgs))
    assert torch.equal(pre.to_batch(imgs, into=lambda n: None), batch)  # nowhere given: a new tensor


def test_checked_load_judges_status_body_and_label():
    from servekit.loadcheck import check_answer

    def response(status: int, body: bytes) -> requests.Response:
        resp = requests.Response()
        resp.status_code, resp._content = status, body
        return resp

    good = b'{"predictions": [{"label": "7", "probability": 0.99}]}'
    assert check_answer(response(200, good), "7") == ""
    assert check_answer(response(200, good), None) == ""
    assert check_answer(response(200, good), "3") == "predicted 7, expected 3"
    assert check_answer(response(503, b"Worker died."), "7") == "503: Worker died."
    assert check_answer(response(200, b"not json"), "7").startswith("200 without predictions")
    assert check_answer(response(200, b'{"predictions": []}'), None).startswith("200 without predictions")


def test_torchserve_log_timeline_of_a_version(tmp_path):
    from servekit.tslogs import relative_timeline, worker_timeline

    ts = tmp_path / "ts_log.log"
    ts.write_text(
        "2026-11-25T18:38:30,926 [DEBUG] epollEventLoopGroup-3-2 ModelVersionedRefs - "
        "Adding new version 2.0 for model m\n"
        "2026-11-25T18:38:30,932 [DEBUG] W-9000-m_2.0 WorkerLifeCycle - Worker cmdline: [python, worker.py]\n"
        "2026-11-25T18:38:31,100 [DEBUG] W-9001-m_2.0 WorkerLifeCycle - Worker cmdline: [python, worker.py]\n"
        "2026-11-25T18:38:31,200 [DEBUG] W-8000-m_1.0 WorkerLifeCycle - Worker cmdline: [python, worker.py]\n"
        "    a continuation line without a time stamp\n"
        "2026-11-25T18:38:36,030 [DEBUG] W-9000-m_2.0 WorkerThread - W-9000-m_2.0 State change "
        "WORKER_STARTED -> WORKER_MODEL_LOADED\n"
    )
    (tmp_path / "model_log.log").write_text(
        "2026-11-25T18:38:32,128 [INFO ] W-9000-m_2.0-stdout MODEL_LOG - Torch worker started.\n"
        "2026-11-25T18:38:36,023 [INFO ] W-9000-m_2.0-stdout MODEL_LOG - m v2.0 ready on cpu (2 threads) in 2.8 s\n"
    )
    timeline = worker_timeline(tmp_path, "m", "2.0")
    zero = timeline["unpacked"][0]
    rel = relative_timeline(timeline, zero)
    assert list(rel) == ["unpacked", "process_spawned", "worker_started", "handler_ready", "model_loaded"]
    assert rel["process_spawned"] == [0.01, 0.17]  # first and last worker; v1.0's line is not counted
    assert rel["worker_started"] == [1.2, 1.2] and rel["model_loaded"] == [5.1, 5.1]
    assert worker_timeline(tmp_path / "missing", "m", "2.0") == {}


def test_frontend_threads_scale_with_the_cpus(tmp_path, monkeypatch):
    assert [tuning.frontend_threads(c) for c in (1, 2, 16, 32, 64)] == [4, 4, 4, 8, 16]
    monkeypatch.setattr(server, "available_cpus", lambda: 48)
    props = server.ServerConfig(tmp_path / "run", tmp_path / "store").properties()
    assert props["number_of_netty_threads"] == props["netty_client_threads"] == "12"
    mine = server.ServerConfig(tmp_path / "run", tmp_path / "store", overrides={"netty_client_threads": "6"})
    assert mine.properties()["netty_client_threads"] == "6"
    for template in ("docker/config.properties", "k8s/base/config.properties"):
        shipped = server.ServerConfig(
            tmp_path / "run", tmp_path / "store", Path(__file__).resolve().parents[2] / template
        ).properties()
        assert shipped["number_of_netty_threads"] == "12", template
