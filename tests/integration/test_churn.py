"""Churn against a real TorchServe: management calls under load, hot reload while serving, restarts
and a soak past key expiry. Every request is answered or accounted for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import port_overrides, start_server
from servekit import preload, server
from servekit.client import model_states, wait_until
from servekit.loadcheck import CheckedLoad as Load
from servekit.reload import watch_command
from servekit.reload.pins import Pin, VersionsFile, default_versions_file
from support.rel_support import (
    assert_serves,
    digit_samples,
    together,
    top_label,
)
from support.reload_support import publish

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def churn_server(tmp_path, archives):
    """digits v1.0 served, v2.0 in the store; stopped after the test."""
    srv = start_server(tmp_path, archives, {"digits": "digits-v1.0.mar"})
    shutil.copy2(archives / "digits-v2.0.mar", srv.cfg.model_store)
    yield srv
    server.stop(srv.cfg.run_dir)


def test_concurrent_management_under_load(churn_server):
    make_mgmt = churn_server.cfg.management
    calls: list[tuple[str, int, float, str]] = []

    def timed(what: str, fn):
        t0 = time.monotonic()
        resp = fn()
        calls.append((what, resp.status_code, time.monotonic() - t0, resp.text[:300]))
        return resp

    def churn_v2():
        mgmt = make_mgmt()
        for _ in range(2):
            timed("register v2", lambda: mgmt.register("digits-v2.0.mar", initial_workers=1, timeout=120))
            timed("unregister v2", lambda: mgmt.unregister("digits", "2.0", timeout=120))
        return timed("register v2", lambda: mgmt.register("digits-v2.0.mar", initial_workers=1, timeout=120))

    def scale_v1():
        mgmt = make_mgmt()
        for n in (2, 1, 2, 1):
            timed(f"scale v1 to {n}", lambda n=n: mgmt.scale("digits", n, version="1.0"))

    def describe():
        mgmt = make_mgmt()
        for _ in range(20):
            timed("list", lambda: mgmt.request("GET", "/models"))
            timed("describe", lambda: mgmt.request("GET", "/models/digits/all"))

    # 30 s is ample for an answer here (under 5 s on 2 cores); a request TorchServe loses in a
    # scale-down never gets one, and the test would otherwise wait out a longer timeout for it.
    with Load(churn_server.cfg.inference, "digits", digit_samples(8), threads=3, timeout=30) as load:
        together([churn_v2, scale_v1, describe])
    bad = [c for c in calls if c[1] not in (200, 202)]
    assert not bad, bad
    assert max(c[2] for c in calls) < 120
    outcomes = load.snapshot()

    # A request that is inside a worker when a scale-down stops it is lost by TorchServe 0.12: it
    # gets 500 "Worker died." or, seen once, no answer until the client's timeout (SECURITY.md).
    # Those are counted and bounded; every other request must succeed.
    def lost_in_scale_down(o) -> bool:
        return (o.status is None and "Timeout" in (o.error or "")) or (
            o.status in (500, 503) and "Worker died" in (o.error or "")
        )

    answered = [o for o in outcomes if o.status is not None]
    lost = [o for o in outcomes if not o.ok and lost_in_scale_down(o)]
    other = [o for o in outcomes if not o.ok and not lost_in_scale_down(o)]
    assert answered and not other, [(o.status, o.error) for o in other][:5]
    # Each of scale_v1's two scale-downs can lose at most what the load has in flight: one request
    # per thread. (Three or more were lost in one run of 2026-11-29, with both cores busy elsewhere.)
    assert len(lost) <= 2 * 3, [(o.status, o.error) for o in lost][:5]
    # Every prediction came from the default v1.0. (A request lost in a scale-down is answered by
    # TorchServe itself, "Worker died.", without a model version: it is bounded above.)
    served = [o for o in answered if o.ok]
    assert served and all(o.version == "1.0" for o in served), sorted({o.version for o in served}, key=str)
    states = {(s.version, s.default): s.ready_workers for s in model_states(make_mgmt())}
    assert states == {("1.0", True): 1, ("2.0", False): 1}
    assert_serves(churn_server.inference)


# -- 9. hot reload while serving ----------------------------------------------------------------


def test_reload_while_serving_has_no_errors(tmp_path, archives):
    overrides = port_overrides()
    srv = start_server(tmp_path, archives, {"digits": "digits-v1.0.mar"}, **overrides)
    cmd = watch_command(srv.cfg, "--interval", "0.5")
    log = open(tmp_path / "watcher.log", "wb")
    watcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        with Load(srv.cfg.inference, "digits", digit_samples(8), threads=3, timeout=120) as load:
            wait_until(lambda: load.ok_streak() >= 10, 30, what="steady load")
            publish(archives / "digits-v2.0.mar", srv.cfg.model_store)
            wait_until(
                lambda: load.snapshot()[-1].version == "2.0" and load.ok_streak() >= 10, 180, what="v2.0 to answer"
            )
        assert watcher.poll() is None, (tmp_path / "watcher.log").read_text()[-3000:]
        outcomes = load.snapshot()
        assert all(o.ok for o in outcomes), [(o.status, o.error) for o in outcomes if not o.ok][:5]
        versions = [o.version for o in sorted(outcomes, key=lambda o: o.start)]
        assert versions[0] == "1.0" and versions[-1] == "2.0"
        default = [s for s in model_states(srv.management) if s.default]
        assert [(s.name, s.version) for s in default] == [("digits", "2.0")]
    finally:
        watcher.terminate()
        watcher.wait(30)
        server.stop(srv.cfg.run_dir)


# -- 14. restart brings back the same models ----------------------------------------------------


def _servekit(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "servekit.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture()
def restartable(tmp_path, archives):
    """A store with digits v1.0 and v2.0, a run dir, free ports; ``serve()`` starts with the CLI."""
    store, run = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    for v in ("1.0", "2.0"):
        shutil.copy2(archives / f"digits-v{v}.mar", store)
    overrides = port_overrides()
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]
    cfg = server.ServerConfig(run, store, overrides=overrides)

    def serve(*extra: str) -> list[tuple]:
        proc = _servekit("serve", "--run-dir", str(run), "--model-store", str(store), *sets, "--timeout", "300", *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return sorted((s.name, s.version, s.default, s.ready_workers) for s in model_states(cfg.management()))

    def stop() -> None:
        proc = _servekit("stop", "--run-dir", str(run), timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert server.read_pid(run) is None

    yield cfg, serve, stop
    _servekit("stop", "--run-dir", str(run), timeout=120)
    server.stop(run)


def test_restart_restores_models(restartable):
    cfg, serve, stop = restartable
    seen = []
    for _ in range(2):
        seen.append(serve("--no-watch"))
        body, label = digit_samples(1)[0]
        resp = cfg.inference().predict("digits", body, "image/png")
        assert top_label(resp) == label and resp.headers["X-Model-Version"] == "2.0"
        stop()
    assert seen[0] == seen[1] == [("digits", "2.0", True, 1)]


def test_restart_honours_pin(restartable):
    """A rollback pin in the versions file holds across a restart: `servekit serve` starts the pinned version."""
    cfg, serve, stop = restartable
    versions = VersionsFile(default_versions_file(cfg.run_dir))
    versions.write({"digits": Pin("1.0", until_newer_than="2.0", reason="rollback")})
    serve()

    def pinned_default() -> bool:
        return [(s.version, s.ready_workers) for s in model_states(cfg.management()) if s.default] == [("1.0", 1)]

    wait_until(pinned_default, 120, what="the watcher to honour the pin")
    body, label = digit_samples(1)[0]
    resp = cfg.inference().predict("digits", body, "image/png")
    assert top_label(resp) == label and resp.headers["X-Model-Version"] == "1.0"
    stop()


# -- soak ---------------------------------------------------------------------------------------


@pytest.mark.heavy
def test_soak_past_key_expiry(tmp_path):
    """scripts/soak.py for 150 s with keys expiring every 30 s, two publishes and a worker kill.

    Two kinds of client (servekit's, and a raw one that re-reads key_file.json once when refused)
    never fail outside the kill window; health stays ready, the watcher keeps polling, the logs roll
    over under their cap and memory stays flat.
    """
    out, work = tmp_path / "soak.json", tmp_path / "work"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--duration",
            "150",
            "--threads",
            "3",
            "--key-minutes",
            "0.5",  # TorchServe reads token_expiration_min as a real number
            "--publish-every",
            "60",
            # An access log line is about 87 bytes, so the least traffic accepted below (1,300
            # requests, 113 KB) rolls it over twice; at 1 MB a busy CI machine served too few.
            "--log-file-size",
            "0.05 MB",
            "--out",
            str(out),
            "--work-dir",
            str(work),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    failed = sorted(name for name, ok in result["checks"].items() if not ok)
    assert proc.returncode == 0 and result["passed"], (failed, result["events_s"], result["failures"])
    assert result["requests"]["servekit"] > 1000 and result["requests"]["raw"] > 300, result["requests"]
    # Keys were replaced several times while the clients ran: the raw client was refused and recovered.
    assert result["key_renewals"] >= 8 and result["raw_client_refusals"] >= 3, result
    assert [p["version"] for p in result["published"]] == ["2.0", "3.0"]
    logs = work / "run" / "logs"
    rolled = {name: (logs / f"{name}.1.log").exists() for name in ("ts_log", "access_log")}
    assert all(rolled.values()), (rolled, result["requests"], sorted(f.name for f in logs.iterdir()))
    assert result["logs_mb"]["max"] <= result["logs_mb"]["cap"]
    assert result["rss_mb"]["watcher_mb"]["max"] <= 150
    # The memory watched is the model workers' (with preloading, forks of the preloader, which is
    # watched too), not the small stand-ins TorchServe starts for them: a worker with torch and a
    # model is over 100 MB.
    assert result["checks"]["workers_measured"] and result["rss_mb"]["workers_mb"]["max"] > 100, result["rss_mb"]
    if preload.enabled():
        assert result["checks"]["preloader_rss_flat"] and result["rss_mb"]["preloader_mb"]["max"] > 100
    else:
        assert result["checks"]["preloader_rss_flat"] is None and result["rss_mb"]["preloader_mb"]["max"] == 0
