"""The benchmark against real servers: the stock archive, the LitServe peer, stopping cleanly, and one
short end-to-end run against a real TorchServe (digits)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import psutil
import pytest
import requests
from urllib3 import encode_multipart_formdata

from servekit import preload, server
from servekit.archive import ArchiveRequest, build_artifact
from servekit.bench import build_parser, main, plan_from_args
from servekit.bench.packaging import ours_config
from servekit.bench.plan import Point
from servekit.bench.procs import worker_processes
from servekit.bench.serving import PEER_FIELD, start_litserve
from servekit.bench.stock import archive_stock
from servekit.client import wait_until
from servekit.config import ModelConfig
from servekit.hooks import MODELS_DIR, BuildHook
from servekit.store import read_manifest
from support.rel_support import digit_samples

DATA = Path(__file__).resolve().parents[1] / "data"


def test_stock_archive_uses_the_builtin_handler(tmp_path):
    model_dir = MODELS_DIR / "digits"
    artifact = build_artifact(
        ArchiveRequest("digits", model_dir, tmp_path / "unused"),
        ModelConfig.load(model_dir / "model-config.yaml"),
        BuildHook(model_dir),
        log=lambda *_: None,
    )
    mar = archive_stock(
        "digits",
        artifact,
        [str(i) for i in range(10)],
        tmp_path,
        {"minWorkers": 2, "batchSize": 4, "handler": {"amp": "off"}},
    )
    manifest = read_manifest(mar)
    assert manifest["model"]["handler"] == "image_classifier"
    assert manifest["model"]["serializedFile"] == "model.pt"


@pytest.mark.server
def test_litserve_peer_classifies_digits_and_answers_bad_input_with_json(tmp_path):
    model_dir = MODELS_DIR / "digits"
    cfg = ModelConfig.load(model_dir / "model-config.yaml")
    artifact = build_artifact(
        ArchiveRequest("digits", model_dir, tmp_path / "unused"), cfg, BuildHook(model_dir), log=lambda *_: None
    )
    plan = plan_from_args(build_parser().parse_args(["--model", "digits", "--configs", "litserve"]), [])
    point = Point(workers=1, batch=4, delay=5)
    serving = start_litserve(plan, artifact, ours_config(cfg.raw, point, {}), point, 1, tmp_path / "peer", b"", 3)

    def post(body: bytes, field: str = PEER_FIELD) -> requests.Response:
        form, ctype = encode_multipart_formdata({field: ("image.png", body, "image/png")})
        return requests.post(serving.target.url, data=form, headers={"Content-Type": ctype}, timeout=60)

    try:
        assert len(worker_processes(serving.pgid, serving.roles)) == 1
        for body, label in digit_samples(8):
            resp = post(body)
            assert resp.status_code == 200, resp.text
            top = resp.json()["predictions"][0]
            assert top["label"] == label and top["probability"] > 0.5
        bad = post(b"GIF89a not an image")
        assert bad.status_code == 415 and "not a JPEG, PNG or WebP" in bad.json()["detail"]
        missing = post(digit_samples(1)[0][0], field="file")
        assert missing.status_code == 400 and PEER_FIELD in missing.json()["detail"]
    finally:
        serving.stop()
    assert server.group_members(serving.pgid) == []  # API servers and workers are gone too


@pytest.mark.server
def test_a_terminated_bench_stops_the_server_it_started(tmp_path):
    """SIGTERM mid-run (kill, a CI timeout) unwinds the bench: the peer's whole process group goes too."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "servekit.bench", "--model", "digits", "--configs", "litserve", "--workers", "1"]
    cmd += ["--batch", "4", "--concurrency", "2", "--duration", "60", "--no-micro", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def peers() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter(["cmdline", "create_time"]):
            if p.info["create_time"] >= t0 - 1 and "servekit.bench.peer_app" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        return found

    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the peer serves and the load runs
            if "ready in" in line:
                break
        assert peers(), "the peer never started"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        assert rc == 128 + signal.SIGTERM, proc.stdout.read()[-3000:]
        wait_until(lambda: not peers(), 30, what="the peer's processes to exit")
    finally:
        proc.kill()
        for p in peers():
            p.kill()


@pytest.mark.server
def test_bench_end_to_end_smoke(tmp_path):
    out = tmp_path / "out"
    rc = main(
        [
            "--model",
            "digits",
            "--configs",
            "ours,ours-pt2,ours-int8,litserve",
            "--workers",
            "1",
            "--batch",
            "4",
            "--delay",
            "5",
            "--concurrency",
            "2",
            "--duration",
            "2",
            "--warmup",
            "0.5",
            "--micro-seconds",
            "0.1",
            "--ceiling-batch",
            "2",
            "--out",
            str(out),
            "--images",  # one of each format: every configuration answers every one (errors are counted)
            str(DATA / "digit-7.png"),
            str(DATA / "variants" / "lossy.webp"),
            str(DATA / "variants" / "tables16-progressive.jpg"),
        ]
    )
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["model"] == "digits" and results["meta"]["cores"] >= 1
    assert results["meta"]["litserve"] == version("litserve")  # the peer's version travels with its figures
    assert results["meta"]["images"]["formats"] == {"png": 1, "webp": 1, "jpeg": 1}
    run, pt2, int8, peer = results["runs"]
    assert run["config"] == "ours" and "error" not in run
    assert pt2["config"] == "ours-pt2" and "error" not in pt2 and pt2["amp"] == "pt2 (fp32)"
    assert pt2["points"][0]["errors"] == 0 and pt2["points"][0]["rps"] > 0
    assert int8["config"] == "ours-int8" and "error" not in int8 and int8["amp"] == "int8"
    assert int8["points"][0]["errors"] == 0 and int8["points"][0]["rps"] > 0
    assert run["model_config"]["batchSize"] == 4 and run["threads_per_worker"] >= 1
    assert run["preloaded"] is preload.enabled() and peer["preloaded"] is False  # what started the workers
    # The LitServe peer: same points, its own CPU split (API servers vs inference workers).
    assert peer["config"] == "litserve" and "error" not in peer and peer["api_servers"] == 1
    (peer_point,) = peer["points"]
    assert peer_point["errors"] == 0 and peer_point["rps"] > 0
    assert peer_point["frontend_cpu_cores"] > 0 and peer_point["workers_cpu_cores"] > 0
    (point,) = run["points"]
    assert point["concurrency"] == 2 and point["errors"] == 0 and point["completed"] > 0 and point["rps"] > 0
    assert set(point["latency_ms"]) == {"p50", "p90", "p99", "mean", "max"}
    assert 0 < point["latency_ms"]["p50"] <= point["latency_ms"]["p99"]
    assert point["loadgen_cpu_cores"] >= 0 and point["server_cpu_cores"] > 0
    # The server's CPU per request, split: TorchServe's Java frontend and the Python workers.
    assert point["frontend_cpu_cores"] > 0 and point["workers_cpu_cores"] > 0
    assert point["frontend_cpu_cores"] + point["workers_cpu_cores"] <= point["server_cpu_cores"] + 0.05
    assert point["workers_ms_per_request"] > 0 and point["requests_per_server_cpu_s"] > 0
    assert "frontend CPU ms/req" in (out / "report.md").read_text()
    assert {c["variant"] for c in results["ceiling"]} >= {"fp32", "bf16", "fp32+frozen", "int8+frozen", "pt2 (fp32)"}
    assert all(c["images_per_s"] > 0 for c in results["ceiling"] + results["decode"])
    assert results["comparison"][-1]["concurrency"] == "peak" and results["comparison"][-1]["ours"] > 0
    assert results["comparison"][-1]["ours-int8"] > 0 and results["comparison"][-1]["ours-pt2"] > 0
    report_md = (out / "report.md").read_text()
    assert "ours pt2 req/s" in report_md and "ours int8 req/s" in report_md and "ours/litserve" in report_md
    assert (out / "bench.png").stat().st_size > 10_000
    assert "| ours w1 b4 d5 |" in report_md and report_md.startswith("Request bodies: 3 image(s)")
    # The report command redraws the same tables from the JSON.
    assert main(["report", str(out / "results.json"), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "report.md").read_text() == (out / "report.md").read_text()
