"""The core, end to end: a real TorchServe serving the digits model over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import yaml
from PIL import Image, ImageOps

from conftest import ROOT, port_overrides, start_server
from models.digits.model import encode, held_out
from servekit import server
from servekit.client import auth_failed, wait_until
from servekit.config import available_cpus

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def digits_images():
    """Held-out digits (never seen in training) with their labels."""
    return held_out()


def _classify_all(srv, images, fmt):
    client = srv.inference
    ctype = "image/png" if fmt == "PNG" else "image/jpeg"

    def one(pair):
        img, label = pair
        resp = client.predict("digits", encode(img, fmt), ctype)
        assert resp.status_code == 200, resp.text
        return resp.json()["predictions"][0]["label"] == str(label)

    with ThreadPoolExecutor(8) as pool:  # concurrent, so TorchServe batches them
        return list(pool.map(one, images))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_held_out_digits_are_classified_over_http(digits_server, digits_images, fmt):
    hits = _classify_all(digits_server, digits_images, fmt)
    accuracy = sum(hits) / len(hits)
    print(f"{fmt}: {accuracy:.3%} of {len(hits)} held-out digits")
    assert len(hits) >= 400 and accuracy >= 0.95


def test_inverted_digits_dark_on_light_are_read_too(digits_server, digits_images):
    """Digits drawn dark on light, as in any paint program."""
    inverted = [(ImageOps.invert(img), label) for img, label in digits_images]
    hits = _classify_all(digits_server, inverted, "PNG")
    accuracy = sum(hits) / len(hits)
    print(f"inverted: {accuracy:.3%} of {len(hits)} held-out digits")
    assert len(hits) >= 400 and accuracy >= 0.95


def test_answers_say_they_are_json(digits_server, digits_images):
    img, _ = digits_images[0]
    good = digits_server.inference.predict("digits", encode(img, "PNG"), "image/png")
    bad = digits_server.inference.predict("digits", b"not an image", "image/png")
    for resp in (good, bad):
        assert resp.headers["Content-Type"].startswith("application/json"), resp.headers
        resp.json()


def test_answer_shape_and_version_header(digits_server, digits_images):
    img, label = digits_images[0]
    resp = digits_server.inference.predict("digits", encode(img, "PNG"), "image/png")
    assert resp.status_code == 200
    assert resp.headers["X-Model-Version"] == "1.0" and resp.headers["X-Model-Name"] == "digits"
    preds = resp.json()["predictions"]
    assert [p["label"] for p in preds][0] == str(label) and len(preds) == 3
    assert preds[0]["probability"] > 0.5 and preds[0]["probability"] >= preds[1]["probability"]


def test_multipart_and_base64_json_inputs(digits_server, digits_images):
    img, label = digits_images[1]
    png = encode(img, "PNG")
    inf = digits_server.inference
    multipart = inf.request("POST", "/predictions/digits", files={"data": ("d.png", png, "image/png")})
    as_json = inf.request("POST", "/predictions/digits", json={"data": base64.b64encode(png).decode()})
    for resp in (multipart, as_json):
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0]["label"] == str(label)


def test_a_bad_item_in_a_batch_fails_alone(digits_server, digits_images):
    """Concurrent good and bad requests share batches; each bad one gets its own 4xx."""
    inf = digits_server.inference
    good = [(encode(img, "PNG"), "image/png", label) for img, label in digits_images[:12]]
    bad = [
        (b"definitely not an image", "image/png", None),
        (b"", "image/png", None),
        (encode(digits_images[0][0], "JPEG")[:40], "image/jpeg", None),
    ]
    items = [x for pair in zip(good, bad * 4) for x in pair]

    def send(item):
        body, ctype, label = item
        return label, inf.predict("digits", body, ctype)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, items))
    for label, resp in results:
        if label is None:
            assert 400 <= resp.status_code < 500, resp.text
            assert resp.json()["message"]
        else:
            assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == str(label)


def test_images_in_every_variant_are_classified_or_refused_with_a_clear_415(digits_server, digits_images):
    """Lossless, arithmetic-coded, 16-bit-table JPEGs, 16-bit PNGs and WebPs are read; the rest refused clearly."""
    variants = ROOT / "tests" / "data" / "variants"
    files = sorted(p for p in variants.iterdir() if p.suffix in (".jpg", ".png", ".webp"))
    refused = {"bits12.jpg": "only 8-bit JPEGs", "lossless16.jpg": "only 8-bit JPEGs", "animated.webp": "a still image"}
    label = str(digits_images[0][1])  # the files are this digit

    def send(path):
        return path.name, digits_server.inference.predict_file("digits", path)

    with ThreadPoolExecutor(8) as pool:  # concurrent: they share batches
        answers = dict(pool.map(send, files * 2))
    assert len(answers) == len(files) >= 16
    for name, resp in answers.items():
        if name in refused:
            assert resp.status_code == 415, (name, resp.text)
            assert refused[name] in resp.json()["message"], (name, resp.text)
        else:
            assert resp.status_code == 200, (name, resp.text)
            assert resp.json()["predictions"][0]["label"] == label, (name, resp.text)


def test_photos_stored_on_their_side_are_turned_upright_by_their_exif_orientation(digits_server, digits_images):
    """As phones store portrait photos: the pixels turned, and an EXIF orientation that says how to turn them back."""
    turns = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270, 3: Image.Transpose.ROTATE_180}
    cases = [(img.transpose(turns[o]), o, label) for (img, label), o in zip(digits_images[:60], [6, 8, 3] * 20)]

    def accuracy(with_exif: bool) -> float:
        def one(case):
            stored, orientation, label = case
            exif = Image.Exif()
            if with_exif:
                exif[0x0112] = orientation
            buf = io.BytesIO()
            stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
            resp = digits_server.inference.predict("digits", buf.getvalue(), "image/jpeg")
            assert resp.status_code == 200, resp.text
            return resp.json()["predictions"][0]["label"] == str(label)

        with ThreadPoolExecutor(8) as pool:
            hits = list(pool.map(one, cases))
        return sum(hits) / len(hits)

    upright, sideways = accuracy(with_exif=True), accuracy(with_exif=False)
    print(f"turned digits: {upright:.1%} with their orientation, {sideways:.1%} without")
    assert upright >= 0.95 and sideways < 0.6


def test_requests_without_or_with_a_wrong_token_are_rejected(digits_server, digits_images):
    """TorchServe 0.12 refuses a bad token with 400 InvalidKeyException (401 in later releases)."""
    cfg = digits_server.cfg
    inf, mgmt = cfg.address("inference_address"), cfg.address("management_address")
    body = encode(digits_images[0][0], "PNG")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        resp = requests.post(
            f"{inf}/predictions/digits", data=body, timeout=30, headers={**headers, "Content-Type": "image/png"}
        )
        assert auth_failed(resp), resp.text
        assert auth_failed(requests.get(f"{inf}/ping", headers=headers, timeout=30))
        assert auth_failed(requests.get(f"{mgmt}/models", headers=headers, timeout=30))
    # The inference key does not open the management API, and the right keys do.
    assert auth_failed(requests.get(f"{mgmt}/models", headers=cfg.tokens.header("inference"), timeout=30))
    assert requests.get(f"{mgmt}/models", headers=cfg.tokens.header("management"), timeout=30).status_code == 200
    assert requests.get(f"{inf}/ping", headers=cfg.tokens.header("inference"), timeout=30).status_code == 200


def test_ping_reports_healthy(digits_server):
    resp = digits_server.inference.ping()
    assert resp.status_code == 200 and resp.json()["status"] == "Healthy"


def test_metrics_report_handler_stage_timings(digits_server, digits_images):
    for img, _ in digits_images[:3]:
        assert digits_server.inference.predict("digits", encode(img, "PNG"), "image/png").status_code == 200
    text = ""
    for _ in range(20):  # metrics reach the frontend through the worker log; allow a moment
        text = requests.get(digits_server.cfg.address("metrics_address") + "/metrics", timeout=30).text
        if "servekit_infer_seconds_count" in text:
            break
        time.sleep(0.5)
    # Histograms in seconds, per model: a p99 can be derived from the buckets.
    for stage in ("decode", "infer", "postprocess", "handler"):
        name = f"servekit_{stage}_seconds"
        count = [
            line for line in text.splitlines() if line.startswith(name + "_count") and 'ModelName="digits"' in line
        ]
        buckets = [line for line in text.splitlines() if line.startswith(name + "_bucket") and 'le="+Inf"' in line]
        assert count and float(count[0].rsplit(" ", 1)[1]) >= 3, f"{name} missing from /metrics"
        assert buckets and buckets[0].rsplit(" ", 1)[1] == count[0].rsplit(" ", 1)[1]
    items = [line for line in text.splitlines() if line.startswith("servekit_items") and 'ModelName="digits"' in line]
    assert items and float(items[0].rsplit(" ", 1)[1]) >= 3, items


def test_ts_log_keeps_the_worker_lifecycle_not_a_line_per_request(digits_server, digits_images):
    for img, _ in digits_images[:5]:
        assert digits_server.inference.predict("digits", encode(img, "PNG"), "image/png").status_code == 200
    log = (digits_server.cfg.run_dir / "logs" / "ts_log.log").read_text(errors="replace")
    assert "Flushing req.cmd LOAD" in log and "WORKER_MODEL_LOADED" in log  # what the watcher reads
    assert "Sending response for jobId" not in log and "Waiting time ns" not in log
    access = (digits_server.cfg.run_dir / "logs" / "access_log.log").read_text(errors="replace")
    assert access.count("/predictions/digits") >= 5  # each request is still logged, once, in the access log


def test_effective_config_is_secure_by_default(digits_server):
    props = digits_server.cfg.properties()
    assert props["disable_token_authorization"] == "false"
    assert props["install_py_dep_per_model"] == "false"
    allowed = re.compile(props["allowed_urls"].replace("\\\\", "\\"))  # as Java reads the file
    store = digits_server.cfg.model_store
    assert allowed.fullmatch(f"file://{store}/digits-v1.0.mar")
    for url in ("http://example.com/x.mar", "file:///etc/x.mar", f"file://{store}/../x.mar/y.mar"):
        assert not allowed.fullmatch(url), url
    repo = server.read_properties(server.DEFAULT_CONFIG)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert repo[key].startswith("http://127.0.0.1:")


def test_a_second_server_on_a_shared_run_dir_is_refused_and_the_first_keeps_serving(digits_server, digits_images):
    """Another container sharing the run dir cannot see this one's processes (here: its pid file is
    out of sight), but the launcher's lock still refuses it, before it touches the key or config file."""
    cfg = digits_server.cfg
    pid_file = cfg.run_dir / server.PID_FILE
    keys, props = cfg.key_file.read_bytes(), (cfg.run_dir / "config.properties").read_bytes()
    aside = pid_file.rename(pid_file.with_suffix(".aside"))
    try:
        with pytest.raises(server.ConfigError, match="shared with another container"):
            server.start(cfg, {"digits": "digits-v1.0.mar"}, log=lambda *_: None)
    finally:
        aside.rename(pid_file)
    assert cfg.key_file.read_bytes() == keys and (cfg.run_dir / "config.properties").read_bytes() == props
    img, label = digits_images[0]
    resp = digits_server.inference.predict("digits", encode(img, "PNG"), "image/png")
    assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == str(label)


def test_cli_serve_predict_health_stop_leaves_no_process(tmp_path, archives):
    """`servekit serve` starts, answers, reports healthy; `servekit stop` leaves nothing behind."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "digits-v1.0.mar").write_bytes((archives / "digits-v1.0.mar").read_bytes())
    run = tmp_path / "run"
    sets = [arg for k, v in port_overrides().items() for arg in ("--set", f"{k}={v}")]
    common = ["--model-store", str(store), "--run-dir", str(run), *sets]
    cli = [sys.executable, "-m", "servekit.cli"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*cli, "serve", "--no-watch", *common], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "java:" in out.stdout and "Authorization: Bearer" in out.stdout
    pgid = server.read_pid(run)
    assert pgid and server.group_members(pgid)
    try:
        health = subprocess.run([*cli, "health", *common], capture_output=True, text=True, env=env, timeout=60)
        assert health.returncode == 0 and "digits v1.0" in health.stdout
        pred = subprocess.run(
            [*cli, "predict", str(ROOT / "tests/data/digit-7.png"), *common],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert pred.returncode == 0, pred.stderr
        assert pred.stdout.splitlines()[1].split()[-1] == "7"
        # The curl line printed by serve works as printed.
        curl = next(line for line in out.stdout.splitlines() if line.strip().startswith("curl"))
        shell = curl.replace("@tests/", f"@{ROOT}/tests/")
        answer = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
        assert json.loads(answer.stdout)["predictions"][0]["label"] == "7", answer.stdout + answer.stderr
    finally:
        stop = subprocess.run(
            [*cli, "stop", "--run-dir", str(run)], capture_output=True, text=True, env=env, timeout=120
        )
    assert stop.returncode == 0 and "stopped" in stop.stdout
    assert server.group_members(pgid) == []
    health = subprocess.run([*cli, "health", *common], capture_output=True, text=True, env=env, timeout=60)
    assert health.returncode == 1


def test_archives_are_stored_uncompressed(archives):
    """TorchServe unpacks an archive at every registration: stored entries make that a copy."""
    with zipfile.ZipFile(archives / "digits-v1.0.mar") as zf:
        infos = zf.infolist()
        assert {"MAR-INF/MANIFEST.json", "model.pt", "model-config.yaml"} <= {i.filename for i in infos}
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]["serializedFile"] == "model.pt"


def test_a_model_without_a_worker_count_gets_the_machines_default(tmp_path, archives, monkeypatch):
    """default_workers_per_model=auto: the count comes from the machine, and each worker splits the CPUs by it."""
    mar = tmp_path / "digits-v1.0.mar"
    with zipfile.ZipFile(archives / "digits-v1.0.mar") as src, zipfile.ZipFile(mar, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "model-config.yaml":
                raw = yaml.safe_load(data)
                raw.pop("minWorkers", None), raw.pop("maxWorkers", None)
                data = yaml.safe_dump(raw).encode()
            dst.writestr(info, data)
    # As on an 8-CPU machine without a GPU: auto is one worker per 4 CPUs.
    monkeypatch.setattr("servekit.server.available_cpus", lambda: 8)
    monkeypatch.setattr("servekit.tuning._nvidia_smi_gpus", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    srv = start_server(tmp_path / "srv", tmp_path, {"digits": mar.name})
    try:
        assert srv.cfg.properties()["default_workers_per_model"] == "2"
        (described,) = srv.management.describe("digits", "1.0")
        assert described["minWorkers"] == 2 and len(described["workers"]) == 2
        resp = srv.inference.predict_file("digits", ROOT / "tests/data/digit-7.png")
        assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == "7"
        # The workers learnt the count from SERVEKIT_DEFAULT_WORKERS: this machine's CPUs split two ways.
        ready = f"ready on cpu ({max(1, available_cpus() // 2)} threads)"  # the real CPUs, not the 8 above
        log = srv.cfg.run_dir / "logs" / "model_log.log"
        wait_until(lambda: log.read_text().count(ready) == 2, 30, what=f"two workers logging {ready!r}")
    finally:
        server.stop(srv.cfg.run_dir)
