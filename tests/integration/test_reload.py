"""Hot reload against a real TorchServe: publish, fail, roll back, rotate keys, restart and remove, under load."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import start_server
from servekit import server
from servekit.archive import ArchiveRequest, archive
from servekit.client import model_states, wait_until
from servekit.hooks import MODELS_DIR
from servekit.loadcheck import CheckedLoad
from servekit.reload.__main__ import main as reload_main
from servekit.reload.pins import VersionsFile, default_versions_file
from servekit.server import free_port
from servekit.store import StoreScanner
from support.reload_support import INTERVAL, WatcherProcess, publish

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "support"
sys.path.insert(0, str(FIXTURES))
from reload_failing_handler import LOAD_ERROR  # noqa: E402

THREADS = 8


# -- helpers ------------------------------------------------------------------------------------
def digit_samples(cfg: server.ServerConfig, count: int = 60) -> list[tuple[bytes, str]]:
    """Held-out digits the served model classifies correctly (so a wrong label means a wrong answer)."""
    from models.digits.model import encode, held_out

    client = cfg.inference()
    good = []
    for image, label in held_out(count):
        body = encode(image, "PNG")
        resp = client.predict("digits", body, "image/png")
        assert resp.status_code == 200, resp.text
        if resp.json()["predictions"][0]["label"] == str(label):
            good.append((body, str(label)))
    assert len(good) >= count * 0.8, f"only {len(good)}/{count} held-out digits classified correctly"
    return good


def versions_of(cfg: server.ServerConfig, model: str = "digits") -> tuple[list[str], str | None]:
    """Registered versions of a model (sorted) and its default."""
    states = [s for s in model_states(cfg.management()) if s.name == model]
    return sorted(s.version for s in states), next((s.version for s in states if s.default), None)


def rotate_keys(cfg: server.ServerConfig) -> None:
    """Regenerate the management and inference keys through the token API, as an operator would."""
    base = cfg.address("management_address")
    for kind in ("management", "inference"):
        api_key = cfg.tokens.keys(force=True).api
        resp = requests.post(
            f"{base}/token", params={"type": kind}, headers={"Authorization": f"Bearer {api_key}"}, timeout=30
        )
        assert resp.status_code == 200, resp.text


def failing_archives(staging: Path, source: Path) -> tuple[Path, Path]:
    """digits v3.0 as random bytes, and digits v3.1 that registers but whose workers fail to load."""
    staging.mkdir(parents=True, exist_ok=True)
    corrupt = staging / "digits-v3.0.mar"
    corrupt.write_bytes(random.Random(3).randbytes(64 * 1024))
    refusing = archive(
        ArchiveRequest(
            "digits",
            MODELS_DIR / "digits",
            staging,
            version="3.1",
            artifact=_extract(source, "model.pt", staging),
            handler=FIXTURES / "reload_failing_handler.py",
        ),
        log=lambda *_: None,
    )
    return corrupt, refusing


def _extract(mar: Path, member: str, out: Path) -> Path:
    """Pull one file (and labels.json beside it) out of an archive, to package it again."""
    with zipfile.ZipFile(mar) as zf:
        for name in (member, "labels.json"):
            (out / name).write_bytes(zf.read(name))
    return out / member


# -- store scanning and pin rules (no server) ---------------------------------------------------
def test_scanner_takes_only_settled_readable_archives(tmp_path, archives):
    store = tmp_path / "store"
    store.mkdir()
    scanner = StoreScanner(store, settle=0.3)
    shutil.copyfile(archives / "digits-v1.0.mar", store / ".digits-v1.0.mar.part")
    (store / "digits-v9.0.mar.tmp").write_bytes(b"half")
    (store / ".hidden.mar").write_bytes(b"hidden")
    scan = scanner.poll()
    assert (scan.archives, scan.bad, scan.pending) == ([], [], [])

    os.replace(store / ".digits-v1.0.mar.part", store / "digits-v1.0.mar")
    assert scanner.poll().pending == [store / "digits-v1.0.mar"]
    assert scanner.poll().archives == [], "taken before it held still for the settle time"
    time.sleep(0.35)
    scan = scanner.poll()
    assert [(a.name, a.version, a.error) for a in scan.archives] == [("digits", "1.0", None)]

    growing = store / "digits-v3.0.mar"
    growing.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    scanner.poll()
    time.sleep(0.35)
    with open(growing, "ab") as f:
        f.write(b"\0" * 100)
    assert growing in scanner.poll().pending, "a file that changed between polls was taken"
    time.sleep(0.35)
    scan = scanner.poll()
    assert [(b.name, b.version) for b in scan.bad] == [("digits", "3.0")]
    assert "not a valid model archive" in scan.bad[0].error


def test_an_archive_renamed_into_place_counts_at_once(tmp_path, archives):
    store = tmp_path / "store"
    store.mkdir()
    scanner = StoreScanner(store, settle=60.0)
    publish(archives / "digits-v1.0.mar", store)
    target = store / "digits-v1.0.mar"
    assert scanner.poll().pending == [target], "without the file event it waits to settle"
    scanner.arrived(target.name)
    assert [(a.name, a.version) for a in scanner.poll().archives] == [("digits", "1.0")]
    assert scanner.poll().archives, "it stays taken"


# -- under load -----------------------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.heavy
def test_publish_failures_rollback_and_key_rotation_under_load(tmp_path, archives):
    """v1 -> v2 by publishing, corrupt and failing v3 ignored, rollback, rollout, key rotation: no failed request."""
    corrupt, refusing = failing_archives(tmp_path / "staging", archives / "digits-v1.0.mar")
    srv = start_server(tmp_path / "srv", archives, {"digits": "digits-v1.0.mar"})
    cfg, store = srv.cfg, srv.cfg.model_store
    watcher = WatcherProcess(cfg, tmp_path / "watcher.log", "--metrics-port", str(free_port()))
    # Bounded load (a pause between requests): the 2 cores need room for the worker being started.
    load = CheckedLoad(
        lambda: cfg.inference(timeout=60), "digits", digit_samples(cfg), threads=THREADS, timeout=60, pause=0.02
    )
    try:
        watcher.start()
        status = watcher.wait_polls(2)
        assert status["models"]["digits"]["default"] == "1.0"
        load.start()
        load_started = time.monotonic()
        time.sleep(2)

        # A new version: published by rename, answering within seconds, the old one retired.
        published = publish(archives / "digits-v2.0.mar", store)
        wait_until(lambda: load.first("2.0"), 60, what=f"a v2.0 answer\n{watcher.tail()}")
        first_v2 = load.first("2.0") - published
        wait_until(lambda: versions_of(cfg) == (["2.0"], "2.0"), 60, what="v1.0 to be unregistered")
        switched = time.monotonic()
        event = watcher.status()["models"]["digits"].get("last_event", {})
        assert (event.get("event"), event.get("version")) == ("default", "2.0"), event
        # TorchServe's own steps, read from its logs: in order, and within the switch.
        ts_steps = event["torchserve_steps"]
        assert {"unpacked", "worker_started", "model_loaded"} <= set(ts_steps), ts_steps
        assert 0 <= ts_steps["unpacked"][0] <= ts_steps["worker_started"][0] <= ts_steps["model_loaded"][1]
        assert ts_steps["model_loaded"][1] <= event["seconds"] + 1, (ts_steps, event["seconds"])
        listing = inventory_text(cfg)
        assert "took" in listing and "(register" in listing and "TorchServe: unpacked" in listing, listing
        print(f"\npublish -> first v2.0 answer: {first_v2:.2f} s (register to default: {event['seconds']} s)")

        # Keys rotate while the watcher and the clients run.
        rotate_keys(cfg)
        time.sleep(1)
        rotate_keys(cfg)

        # A corrupt archive and one whose model fails to load change nothing.
        publish(corrupt, store)
        publish(refusing, store)

        def both_failed():
            failed = watcher.status().get("failed_archives", {})
            return {"digits-v3.0.mar", "digits-v3.1.mar"} <= set(failed) and failed

        failed = wait_until(both_failed, 120, what=f"both v3 archives to be recorded as failed\n{watcher.tail()}")
        assert "not a valid model archive" in failed["digits-v3.0.mar"]["reason"]
        assert LOAD_ERROR in failed["digits-v3.1.mar"]["reason"], failed["digits-v3.1.mar"]
        assert versions_of(cfg) == (["2.0"], "2.0"), "a failed version stayed registered or took over"
        status = watcher.wait_polls(3)
        assert len(status["models"]["digits"]["failures"]) == 2, "a failed archive was retried"
        assert status["watcher"]["failed_polls"] == 0, status["watcher"]["last_error"]
        listing = inventory_text(cfg)
        assert "digits-v3.1.mar" in listing and LOAD_ERROR in listing, listing
        assert "digits-v3.0.mar" in listing and "FAILED" in listing, listing
        assert set(load.versions(switched + 3)) == {"2.0"}, "v1.0 answered after the switch"

        # Roll back to v1.0 (the watcher must not roll forward again), then out to v2.0.
        assert reload_main(["rollback", "digits", *cfg.cli_args()]) == 0
        rolled_back = time.monotonic()
        assert versions_of(cfg) == (["1.0"], "1.0")
        assert VersionsFile(default_versions_file(cfg.run_dir)).read()["digits"].version == "1.0"
        watcher.wait_polls(3)
        assert versions_of(cfg) == (["1.0"], "1.0"), "the watcher rolled forward past the pin"
        assert set(load.versions(rolled_back + 0.5)) == {"1.0"}

        assert reload_main(["rollout", "digits", "2.0", *cfg.cli_args()]) == 0
        rolled_out = time.monotonic()
        assert versions_of(cfg) == (["2.0"], "2.0")
        time.sleep(2)
        assert set(load.versions(rolled_out + 0.5)) == {"2.0"}
        metrics = requests.get(f"http://127.0.0.1:{watcher.extra[1]}/metrics", timeout=10).text
    finally:
        load.stop()
        load_seconds = time.monotonic() - load_started
        code = watcher.stop()
        server.stop(cfg.run_dir)
    assert code == 0, watcher.tail()
    failures = load.failures()
    assert not failures, f"{len(failures)} failed requests, first: {[(o.status, o.error) for o in failures[:5]]}"
    seen = load.versions(0)
    assert seen["1.0"] > 50 and seen["2.0"] > 50, seen
    assert 'servekit_reload_total{model="digits",result="success"} 1.0' in metrics
    assert 'servekit_reload_total{model="digits",result="failure"} 2.0' in metrics
    assert 'servekit_model_version_info{model="digits",version="2.0"} 1.0' in metrics
    assert "Traceback" not in watcher.tail(10**6), watcher.tail()
    result = {
        "publish_to_first_v2_s": round(first_v2, 3),
        "requests": sum(seen.values()),
        "answers_by_version": dict(seen),
        "clients": THREADS,
        "poll_interval_s": INTERVAL,
        "register_to_default_s": event["seconds"],
        "steps_s": event.get("steps"),
        "load_seconds": round(load_seconds, 1),
        "requests_per_s": round(sum(seen.values()) / load_seconds, 1),
    }
    (tmp_path / "reload-timing.json").write_text(json.dumps(result, indent=2))
    print(f"reload timing: {json.dumps(result)} ({tmp_path / 'reload-timing.json'})")
    assert first_v2 < 60


def inventory_text(cfg: server.ServerConfig) -> str:
    """What `servekit reload list` prints."""
    proc = subprocess.run(
        [sys.executable, "-m", "servekit.reload", "list", *cfg.cli_args()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# -- restart, new models, removal ----------------------------------------------------------------------
@pytest.mark.server
@pytest.mark.heavy
def test_restart_is_idempotent_and_removed_archives_unregister(tmp_path, archives):
    srv = start_server(tmp_path / "srv", archives, {"digits": "digits-v2.0.mar"})
    cfg, store = srv.cfg, srv.cfg.model_store
    shutil.copyfile(archives / "digits-v1.0.mar", store / "digits-v1.0.mar")
    staging = tmp_path / "staging"
    staging.mkdir()
    other = archive(
        ArchiveRequest(
            "digits-b",
            MODELS_DIR / "digits",
            staging,
            version="1.0",
            artifact=_extract(archives / "digits-v1.0.mar", "model.pt", staging),
        ),
        log=lambda *_: None,
    )
    metrics_port = free_port()
    log = tmp_path / "watcher.log"
    first = WatcherProcess(cfg, log).start()
    second = WatcherProcess(cfg, log, "--metrics-port", str(metrics_port))
    keeping = WatcherProcess(cfg, log, "--keep-removed")
    access_log = cfg.run_dir / "logs" / "access_log.log"
    try:
        first.wait_polls(2)
        assert versions_of(cfg) == (["2.0"], "2.0"), "the watcher moved an up-to-date model"
        # A version registered by hand (e.g. for /predictions/digits/1.0) is left alone while in the store.
        assert cfg.management().register("digits-v1.0.mar", initial_workers=1).status_code == 200
        first.wait_polls(2)
        before = versions_of(cfg)
        assert before == (["1.0", "2.0"], "2.0")

        assert first.stop() == 0, first.tail()
        assert first.status()["watcher"]["state"] == "stopped"
        registrations = access_log.read_text().count('"POST /models?')
        second.start()
        second.wait_polls(3)
        assert versions_of(cfg) == before, "the restarted watcher changed the registered versions"
        assert access_log.read_text().count('"POST /models?') == registrations, "the restart registered again"

        # A new model name is registered and made the default.
        publish(other, store)
        wait_until(
            lambda: versions_of(cfg, "digits-b") == (["1.0"], "1.0"),
            120,
            what=f"digits-b to be registered\n{second.tail()}",
        )
        from models.digits.model import encode, held_out

        image, label = held_out(1)[0]
        resp = cfg.inference().predict("digits-b", encode(image, "PNG"), "image/png")
        assert resp.status_code == 200 and resp.headers["X-Model-Name"] == "digits-b", resp.text
        assert resp.json()["predictions"][0]["label"] == str(label)

        # Removing a non-default version's archive unregisters that version only.
        (store / "digits-v1.0.mar").unlink()
        wait_until(lambda: versions_of(cfg) == (["2.0"], "2.0"), 60, what="v1.0 to be unregistered")
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert 'servekit_model_version_info{model="digits",version="2.0"} 1.0' in metrics
        assert 'servekit_model_version_info{model="digits-b",version="1.0"} 1.0' in metrics
        assert 'servekit_reload_total{model="digits-b",result="success"} 1.0' in metrics

        # Removing a model's last archive unregisters the model.
        (store / "digits-v2.0.mar").unlink()
        wait_until(lambda: versions_of(cfg) == ([], None), 60, what="digits to be unregistered")
        assert versions_of(cfg, "digits-b") == (["1.0"], "1.0"), "another model was touched"
        status = second.wait_polls(1)
        assert status["models"]["digits"]["last_event"]["event"] == "removed"
        assert status["models"]["digits"]["default"] is None
        assert second.stop() == 0, second.tail()

        # With --keep-removed, a model whose archive is gone keeps serving.
        keeping.start()
        (store / other.name).unlink()
        keeping.wait_polls(4)
        assert versions_of(cfg, "digits-b") == (["1.0"], "1.0")
    finally:
        for w in (first, second, keeping):
            w.stop()
        server.stop(cfg.run_dir)
    assert keeping.proc.returncode == 0, keeping.tail()
    assert "Traceback" not in log.read_text(), keeping.tail()
