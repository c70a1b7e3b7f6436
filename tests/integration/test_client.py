"""servekit.client.Client against a real TorchServe: a URL and a key from arguments or the environment,
parsed answers, typed errors, and retries with backoff while a version has no worker (503)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from conftest import start_server
from servekit import server
from servekit.client import Client, PredictionError
from support.rel_support import digit_samples

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def srv(tmp_path_factory, archives):
    s = start_server(tmp_path_factory.mktemp("client"), archives, {"digits": "digits-v1.0.mar"})
    shutil.copy2(archives / "digits-v2.0.mar", s.cfg.model_store)
    yield s
    server.stop(s.cfg.run_dir)


def test_url_and_key_file_from_the_environment_and_a_parsed_answer(srv, monkeypatch, tmp_path):
    body, label = digit_samples(1)[0]
    monkeypatch.setenv("SERVEKIT_URL", srv.cfg.address("inference_address"))
    monkeypatch.setenv("SERVEKIT_KEY_FILE", str(srv.cfg.key_file))
    pred = Client().predict("digits", body)  # the content type is sniffed from the bytes
    assert (pred.model, pred.version, pred.top.label) == ("digits", "1.0", label)
    assert pred.top.probability > 0.5 and len(pred.labels) == 3
    png = tmp_path / "digit.png"
    png.write_bytes(body)
    key = srv.cfg.tokens.keys().inference
    monkeypatch.delenv("SERVEKIT_KEY_FILE")
    assert Client(srv.cfg.address("inference_address"), key=key).predict("digits", png).top.label == label


def test_errors_are_typed(srv):
    client = Client(srv.cfg.address("inference_address"), key_file=srv.cfg.key_file)
    with pytest.raises(PredictionError) as bad:
        client.predict("digits", b"not an image")
    assert bad.value.status == 415 and bad.value.type == "UnsupportedMediaType"
    with pytest.raises(PredictionError) as refused:
        Client(srv.cfg.address("inference_address"), key="wrong").predict("digits", digit_samples(1)[0][0])
    assert refused.value.status in (400, 401)


def test_a_503_is_retried_with_backoff_until_a_worker_is_ready(srv):
    """v2.0 registered without workers answers 503; the client retries until a worker comes up."""
    mgmt = srv.cfg.management()
    assert mgmt.register("digits-v2.0.mar", initial_workers=1).status_code == 200
    assert mgmt.scale("digits", 0, version="2.0").status_code == 200  # the model-config's minWorkers is 1
    body, label = digit_samples(1)[0]
    client = Client(srv.cfg.address("inference_address"), key_file=srv.cfg.key_file, retries=8, backoff=0.5)
    with pytest.raises(PredictionError) as no_worker:
        Client(srv.cfg.address("inference_address"), key_file=srv.cfg.key_file, retries=0).predict(
            "digits", body, version="2.0"
        )
    assert no_worker.value.status == 503
    scaler = threading.Timer(1.0, lambda: mgmt.scale("digits", 1, version="2.0", synchronous=False))
    scaler.start()
    t0 = time.monotonic()
    pred = client.predict("digits", body, version="2.0")
    scaler.join()
    assert pred.version == "2.0" and pred.top.label == label
    assert client.retries >= 1, "answered without a retry: the test proved nothing"
    print(f"answered after {client.retries} retries, {time.monotonic() - t0:.1f} s")


def test_connection_errors_are_retried_then_raised():
    client = Client(f"http://127.0.0.1:{server.free_port()}", retries=2, backoff=0.05)
    t0 = time.monotonic()
    with pytest.raises(Exception) as failed:
        client.predict("digits", b"\x89PNG\r\n\x1a\n")
    assert "Max retries exceeded" in str(failed.value) and time.monotonic() - t0 >= 0.1
