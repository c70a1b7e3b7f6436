"""int8 (post-training quantized) CPU artifacts: export checks, refusals, and serving through TorchServe."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, start_server
from models.digits.build import build_model, calibration_inputs, example_inputs
from models.digits.model import encode, held_out
from servekit import cli, server
from servekit.artifacts import is_quantized_torchscript, load_artifact
from servekit.batch import Batch
from servekit.classify import ImageClassifier
from servekit.config import ModelConfig
from servekit.errors import ConfigError, ExportMismatch
from servekit.export import export
from servekit.quantize import check_quantize, quantize_int8

INT8_VERSION = "1.0-int8"
INT8_MAR = f"digits-v{INT8_VERSION}.mar"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def fp32_model(digits_weights) -> torch.nn.Module:
    """The served digits v1.0 weights, as an eager model."""
    return build_model(str(digits_weights))


@pytest.fixture(scope="module")
def int8_artifact(fp32_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("int8") / "digits-int8.pt"
    report = export(
        fp32_model,
        example_inputs(),
        path,
        "trace",
        "cpu",
        "bf16",
        quantize="int8",
        calibration=calibration_inputs(),
        log_fn=lambda *_: None,
    )
    assert set(report.errors) == {"int8"} and report.errors["int8"] < 0.15
    assert report.top1_agreement["int8"] >= 0.9
    return path


def test_int8_artifact_classifies_held_out_digits_without_torchserve(int8_artifact, fp32_model):
    """The whole core path (decode, preprocess, int8 model, top-k) on real PNG/JPEG bytes."""
    assert is_quantized_torchscript(int8_artifact)
    opts = ModelConfig.load(ROOT / "models" / "digits" / "model-config.yaml").handler
    clf = ImageClassifier(int8_artifact, opts, CPU, [str(i) for i in range(10)])
    clf.warmup()
    assert clf.engine.amp is None  # int8 kernels take fp32 input: no autocast
    pairs = held_out()
    raws = [encode(img, "PNG" if i % 2 else "JPEG") for i, (img, _) in enumerate(pairs)]
    answers = []
    for start in range(0, len(raws), 16):
        answers += clf.predict(Batch(raws[start : start + 16])).results
    top1 = [a["predictions"][0]["label"] for a in answers]
    accuracy = sum(p == str(t) for p, (_, t) in zip(top1, pairs)) / len(pairs)
    assert accuracy >= 0.95, accuracy


def test_int8_is_refused_where_it_cannot_run(int8_artifact):
    with pytest.raises(ConfigError, match="cannot run on cuda"):
        check_quantize("int8", "trace", torch.device("cuda"))
    with pytest.raises(ConfigError, match="use --format trace"):
        check_quantize("int8", "pt2", CPU)
    with pytest.raises(ConfigError, match="unknown quantize"):
        check_quantize("int4", "trace", CPU)
    # Refused before anything touches a GPU, so this holds on machines without one.
    with pytest.raises(ConfigError, match="runs on the CPU only"):
        load_artifact(int8_artifact, torch.device("cuda"))


def test_int8_export_refuses_a_model_it_cannot_trace(tmp_path):
    from models.controlflow.build import build_model as controlflow
    from models.controlflow.build import example_inputs as cf_inputs

    with pytest.raises(ConfigError, match="int8 quantization cannot trace the model"):
        quantize_int8(controlflow(), [cf_inputs(), cf_inputs()])
    assert not list(tmp_path.iterdir())


def test_int8_export_refuses_calibration_that_misses_the_data(fp32_model, tmp_path):
    """Calibrated on tiny inputs, real digits saturate the int8 ranges: the held-out check must refuse."""
    tiny = [torch.randn(8, 1, 28, 28) * 1e-3 for _ in range(3)]
    check = [b for b in calibration_inputs(2, 32)]
    with pytest.raises(ExportMismatch, match="under int8"):
        export(
            fp32_model,
            example_inputs(),
            tmp_path / "bad.pt",
            "trace",
            "cpu",
            quantize="int8",
            calibration=[*tiny, *check[:1]],
            log_fn=lambda *_: None,
        )
    assert not (tmp_path / "bad.pt").exists()


def test_int8_export_refuses_a_model_whose_answers_drift(fp32_model, tmp_path, monkeypatch):
    """The top-1 agreement gate over all held-out items (raised past 100 % here, so nothing can pass)."""
    monkeypatch.setattr("servekit.parity.INT8_MIN_AGREEMENT", 1.01)
    with pytest.raises(ExportMismatch, match=r"agrees with fp32 on only 100\.0% of the held-out"):
        export(
            fp32_model,
            example_inputs(),
            tmp_path / "drift.pt",
            "trace",
            "cpu",
            quantize="int8",
            calibration=calibration_inputs(),
            log_fn=lambda *_: None,
        )
    assert not (tmp_path / "drift.pt").exists()


@pytest.mark.server
@pytest.mark.heavy
def test_int8_archive_serves_the_fp32_answers_through_torchserve(archives, digits_weights, tmp_path_factory):
    """`servekit archive --quantize int8` beside the fp32 version: same top-1 on held-out digits."""
    store = tmp_path_factory.mktemp("int8-store")
    (store / "digits-v1.0.mar").write_bytes((archives / "digits-v1.0.mar").read_bytes())
    rc = cli.main(
        [
            "archive",
            "digits",
            "--quantize",
            "int8",
            "--version",
            INT8_VERSION,
            "--weights",
            str(digits_weights),
            "--model-store",
            str(store),
        ]
    )
    assert rc == 0 and (store / INT8_MAR).is_file()
    srv = start_server(tmp_path_factory.mktemp("int8-server"), store, {"digits": "digits-v1.0.mar"})
    try:
        (srv.cfg.model_store / INT8_MAR).write_bytes((store / INT8_MAR).read_bytes())
        resp = srv.management.register(INT8_MAR, initial_workers=1)
        assert resp.status_code == 200, resp.text
        pairs = held_out()[:120]

        def both(pair):
            body = encode(pair[0], "PNG")
            out = {}
            for version in ("1.0", INT8_VERSION):
                r = srv.inference.predict("digits", body, "image/png", version=version)
                assert r.status_code == 200, r.text
                assert r.headers["X-Model-Version"] == version
                out[version] = r.json()["predictions"][0]
            return pair[1], out

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(both, pairs))
        agree = sum(a["1.0"]["label"] == a[INT8_VERSION]["label"] for _, a in results) / len(results)
        correct = sum(a[INT8_VERSION]["label"] == str(t) for t, a in results) / len(results)
        assert agree >= 0.97 and correct >= 0.95, (agree, correct)
        log = (srv.cfg.run_dir / "logs" / "model_log.log").read_text(errors="replace")
        assert "loaded torchscript artifact model.pt on cpu" in log
    finally:
        server.stop(srv.cfg.run_dir)
