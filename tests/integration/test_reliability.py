"""Faults against a real TorchServe: bad archives, failing handlers, OOM, timeouts, killed workers,
concurrent management calls, hot reload and restarts. After every fault the service must still
classify a digit right."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import port_overrides, start_server
from servekit import load_errors, preload, server
from servekit.client import model_states, wait_until
from servekit.loadcheck import CheckedLoad as Load
from servekit.reload import watch_command
from servekit.reload.pins import Pin, VersionsFile, default_versions_file
from support.rel_fault_handler import OOM_BATCH, SLEEP_S
from support.rel_load_fail_handler import MESSAGE as LOAD_FAIL_MESSAGE
from support.rel_support import (
    assert_serves,
    digit_samples,
    fault_archive,
    solid_png,
    together,
    top_label,
    wait_workers,
    worker_pids,
)

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
FAULTY = "faulty"
RESPONSE_TIMEOUT_S = 2


@pytest.fixture(scope="module")
def faults_server(tmp_path_factory, archives):
    """digits v1.0 plus ``faulty`` (the fault handler, batchSize 8 / maxBatchDelay 200 ms, 2 s timeout)."""
    tmp = tmp_path_factory.mktemp("faults-server")
    srv = start_server(tmp, archives, {"digits": "digits-v1.0.mar"})
    try:
        fault_archive(
            srv.cfg.model_store,
            FAULTY,
            "rel_fault_handler.py",
            batchSize=8,
            maxBatchDelay=200,
            responseTimeout=RESPONSE_TIMEOUT_S,
        )
        resp = srv.management.register(f"{FAULTY}-v1.0.mar", initial_workers=1)
        assert resp.status_code == 200, resp.text
        yield srv
    finally:
        server.stop(srv.cfg.run_dir)


def _log(srv, name: str) -> str:
    path = srv.cfg.run_dir / "logs" / name
    return path.read_text(errors="replace") if path.exists() else ""


def _load_attempts(srv, model: str) -> list[load_errors.LoadError]:
    return [e for e in load_errors.read(srv.cfg.run_dir / "logs") if e.model == model]


def _message(resp) -> str:
    try:
        return str(resp.json().get("message", ""))
    except ValueError:
        return ""


# -- 1. corrupt archives ------------------------------------------------------------------------


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _corrupt_archives(archives: Path) -> dict[str, bytes]:
    good = (archives / "digits-v2.0.mar").read_bytes()
    with zipfile.ZipFile(archives / "digits-v2.0.mar") as zf:
        without_manifest = {n: zf.read(n) for n in zf.namelist() if not n.startswith("MAR-INF/")}
    return {
        "garbage": os.urandom(4096),
        "empty": b"",
        "truncated": good[: len(good) // 2],
        "no-manifest": _zip(without_manifest),
        "manifest-without-model": _zip({**without_manifest, "MAR-INF/MANIFEST.json": b'{"runtime": "python"}'}),
        "manifest-not-json": _zip({**without_manifest, "MAR-INF/MANIFEST.json": b"{not json"}),
    }


def test_corrupt_archives_are_rejected(faults_server, archives):
    mgmt = faults_server.management
    before = {(s.name, s.version) for s in model_states(mgmt)}
    for kind, data in _corrupt_archives(archives).items():
        name = f"{kind}-v1.0.mar"
        (faults_server.cfg.model_store / name).write_bytes(data)
        t0 = time.monotonic()
        resp = mgmt.register(name, initial_workers=1, timeout=120)
        assert 400 <= resp.status_code < 600, f"{kind}: {resp.status_code} {resp.text}"
        assert _message(resp), f"{kind}: no message in {resp.text!r}"
        assert time.monotonic() - t0 < 60, f"{kind}: rejection took {time.monotonic() - t0:.0f} s"
        assert faults_server.inference.ping().status_code == 200
    assert {(s.name, s.version) for s in model_states(mgmt)} == before
    assert_serves(faults_server.inference)


# -- 2. handlers that fail ----------------------------------------------------------------------


def test_load_failure_on_synchronous_register(faults_server):
    """TorchServe tries once and answers 500; the version is then gone (404) or left with no worker (503).

    Which of the two is a race inside TorchServe 0.12: the register's error callback unregisters the
    version on the worker's own thread, and when the worker process is still alive the kill wait is
    interrupted ("WorkerThread interrupted during waitFor") and the version is put back with no worker.
    Either way nothing retries, the server stays healthy and the other models keep serving.
    """
    mgmt, inf = faults_server.management, faults_server.inference
    fault_archive(faults_server.cfg.model_store, "loadfail", "rel_load_fail_handler.py")
    try:
        resp = mgmt.register("loadfail-v1.0.mar", initial_workers=1, timeout=120)
        assert resp.status_code == 500, resp.text
        assert "Failed to start workers" in _message(resp)
        # The worker recorded why before it died (TorchServe may drop its traceback from model_log.log).
        [failure] = _load_attempts(faults_server, "loadfail")
        assert failure.error == f"RuntimeError: {LOAD_FAIL_MESSAGE}" and failure.version == "1.0"
        t0 = time.monotonic()
        answer = inf.predict("loadfail", digit_samples(1)[0][0], "image/png")
        assert answer.status_code in (404, 503), answer.text
        registered = answer.status_code == 503
        assert ("no worker" if registered else "not found") in _message(answer).lower()
        assert time.monotonic() - t0 < 5
        if registered:
            [state] = [s for s in model_states(mgmt) if s.name == "loadfail"]
            assert state.workers == 0, state
        time.sleep(5)  # no retry happens behind the scenes
        assert len(_load_attempts(faults_server, "loadfail")) == 1
        assert inf.ping().status_code == 200
        assert_serves(inf)
    finally:
        assert mgmt.unregister("loadfail").status_code in (200, 404)
    assert "loadfail" not in {s.name for s in model_states(mgmt)}


def test_load_failure_retries_are_bounded(faults_server):
    """An asynchronously loaded model that cannot load (as at startup) is retried with back-off until
    maxRetryTimeoutInSec, then left stopped with /ping reporting Unhealthy; other models are served."""
    mgmt, inf = faults_server.management, faults_server.inference
    fault_archive(faults_server.cfg.model_store, "loadfail-async", "rel_load_fail_handler.py", maxRetryTimeoutInSec=5)

    def attempts() -> int:
        return len(_load_attempts(faults_server, "loadfail-async"))

    try:
        assert mgmt.register("loadfail-async-v1.0.mar", initial_workers=1, synchronous=False).status_code == 202
        wait_until(lambda: inf.ping().status_code == 500, 60, what="/ping to report the broken model")
        assert "Unhealthy" in inf.ping().text
        seen: list[tuple[float, int]] = []

        def settled() -> bool:
            """No new load attempt in the last 8 s."""
            seen.append((time.monotonic(), attempts()))
            older = [n for t, n in seen if t < seen[-1][0] - 8]
            return bool(older) and older[-1] == seen[-1][1]

        wait_until(settled, 60, what="worker restarts to stop")
        # TorchServe retries after 1, 1, 2, 3 s while less than maxRetryTimeoutInSec (5) has passed since
        # the first failure: 5 attempts when a load fails at once (a preloaded worker), fewer when it is slow.
        assert 2 <= seen[-1][1] <= 5, f"{seen[-1][1]} load attempts"
        assert inf.ping().status_code == 500
        assert "Retry worker" in _log(faults_server, "ts_log.log")
        assert_serves(inf)
    finally:
        resp = mgmt.unregister("loadfail-async", timeout=60)
    assert resp.status_code == 200, resp.text
    wait_until(lambda: inf.ping().status_code == 200, 30, what="/ping healthy again")
    assert_serves(inf)


def test_handler_error_fails_only_that_request(faults_server):
    inf = faults_server.inference
    wait_workers(faults_server.management, FAULTY)
    [pid] = worker_pids(faults_server.management, FAULTY)
    resp = inf.predict(FAULTY, solid_png(0), "image/png")
    assert resp.status_code == 500, resp.text
    assert resp.json()["type"] == "ModelError" and "all-black" in _message(resp)
    assert worker_pids(faults_server.management, FAULTY) == [pid]
    body, label = digit_samples(1)[0]
    assert top_label(inf.predict(FAULTY, body, "image/png")) == label
    assert_serves(inf)


# -- 5. a batch that mixes good and bad items ---------------------------------------------------


def test_mixed_batch_answers_each_item(faults_server):
    inf_factory = faults_server.cfg.inference
    wait_workers(faults_server.management, FAULTY)
    good = digit_samples(4)
    bad = [
        (b"not an image at all", "image/png", 415),
        (b"", "image/png", 400),
        (good[0][0], "text/plain", 415),
        (b'{"data": "!!not base64!!"}', "application/json", 400),
    ]
    calls = [lambda b=b: inf_factory().predict(FAULTY, b, "image/png") for b, _ in good]
    calls += [lambda b=b, c=c: inf_factory().predict(FAULTY, b, c) for b, c, _ in bad]
    answers = together(calls)
    for (_, label), resp in zip(good, answers[: len(good)]):
        assert top_label(resp) == label
    for (_, _, status), resp in zip(bad, answers[len(good) :]):
        assert resp.status_code == status, resp.text
        assert _message(resp)
    sizes = [int(r.headers.get("X-Batch-Size", 0)) for r in answers]
    assert max(sizes) > 1, f"requests were not batched: {sizes}"


# -- 6. out of memory in a batch ----------------------------------------------------------------


def test_oom_in_batch_answers_507(faults_server):
    inf_factory = faults_server.cfg.inference
    wait_workers(faults_server.management, FAULTY)
    samples = digit_samples(8)
    answers = together([lambda b=b: inf_factory().predict(FAULTY, b, "image/png") for b, _ in samples])
    oom = [r for r in answers if r.status_code == 507]
    assert oom, f"no batch larger than {OOM_BATCH} formed: {[r.headers.get('X-Batch-Size') for r in answers]}"
    for resp in oom:
        assert resp.json()["type"] == "OutOfMemory" and "lower batchSize" in resp.json()["message"]
        assert int(resp.headers["X-Batch-Size"]) > OOM_BATCH
    for (_, label), resp in zip(samples, answers):
        if resp.status_code != 507:
            assert top_label(resp) == label
    for body, label in samples[:3]:
        assert top_label(inf_factory().predict(FAULTY, body, "image/png")) == label
    assert_serves(faults_server.inference)


# -- 13. a request slower than responseTimeout --------------------------------------------------


def test_response_timeout_recovers(faults_server):
    mgmt, inf = faults_server.management, faults_server.inference
    [old] = wait_workers(mgmt, FAULTY)
    t0 = time.monotonic()
    resp = inf.predict(FAULTY, solid_png(255), "image/png")
    took = time.monotonic() - t0
    assert 500 <= resp.status_code < 600, resp.text
    assert took < SLEEP_S + 5, f"answered after {took:.1f} s"
    [new] = wait_workers(mgmt, FAULTY, timeout=60)
    assert new != old, "TorchServe did not replace the timed-out worker"
    body, label = digit_samples(1)[0]
    assert top_label(inf.predict(FAULTY, body, "image/png")) == label


# -- 7. a worker SIGKILLed under load -----------------------------------------------------------


def test_worker_sigkill_under_load(faults_server):
    mgmt = faults_server.management
    [old] = wait_workers(mgmt, "digits")
    with Load(faults_server.cfg.inference, "digits", digit_samples(8), threads=4, timeout=60) as load:
        wait_until(lambda: load.ok_streak() >= 10, 30, what="steady load")
        t_kill = time.monotonic()
        os.kill(old, signal.SIGKILL)
        wait_until(lambda: [p for p in worker_pids(mgmt, "digits") if p != old], 30, what="a new worker")
        wait_until(
            lambda: load.ok_streak() >= 20 and load.snapshot()[-1].start > t_kill, 30, what="success back to 100%"
        )
        recovered = time.monotonic() - t_kill
    outcomes = load.snapshot()
    assert all(o.status is not None for o in outcomes), [o.error for o in outcomes if o.status is None]
    failures = [o for o in outcomes if not o.ok]
    assert all(o.status >= 500 for o in failures), [(o.status, o.error) for o in failures]
    assert all(t_kill - 1 <= o.end <= t_kill + 30 for o in failures), "failures outside the kill window"
    assert recovered < 30
    assert all(o.ok for o in outcomes if failures and o.start > max(f.end for f in failures))
    assert_serves(faults_server.inference)


@pytest.mark.parametrize("after_s", [0.05, 0.12])
def test_worker_killed_while_a_batch_gathers(faults_server, request, after_s):
    """The request TorchServe is still batching (``faulty``: maxBatchDelay 200 ms) when its worker dies is answered.

    TorchServe 0.12 drops such a batch when the connection closes before it flushes it, and a plain
    worker's close can land there; preloaded workers hold the connection until the flush
    (servekit/preload_hold.py)."""
    if not preload.enabled():
        request.applymarker(pytest.mark.xfail(reason="TorchServe 0.12 drops a batch being gathered", strict=False))
    mgmt = faults_server.management
    [old] = wait_workers(mgmt, FAULTY)
    body, label = digit_samples(1)[0]
    inf = faults_server.cfg.inference(timeout=20)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(inf.predict, FAULTY, body, "image/png")
        time.sleep(after_s)  # the request is in TorchServe's 200 ms batch window, the worker idle
        os.kill(old, signal.SIGKILL)
        t_kill = time.monotonic()
        resp = pending.result()
    assert resp.status_code == 200 or "Worker died" in resp.text, (resp.status_code, resp.text[:300])
    assert time.monotonic() - t_kill < 10, "the answer waited for something other than the batch window"
    wait_until(lambda: [p for p in worker_pids(mgmt, FAULTY) if p != old], 60, what="a new worker")
    wait_workers(mgmt, FAULTY, timeout=60)
    assert top_label(faults_server.inference.predict(FAULTY, body, "image/png")) == label


# -- 8. management calls racing with traffic ----------------------------------------------------


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
    assert len(lost) <= 2, [(o.status, o.error) for o in lost][:5]
    # Every prediction came from the default v1.0. (A request lost in a scale-down is answered by
    # TorchServe itself, "Worker died.", without a model version: it is bounded above.)
    served = [o for o in answered if o.ok]
    assert served and all(o.version == "1.0" for o in served), sorted({o.version for o in served}, key=str)
    states = {(s.version, s.default): s.ready_workers for s in model_states(make_mgmt())}
    assert states == {("1.0", True): 1, ("2.0", False): 1}
    assert_serves(churn_server.inference)


# -- 9. hot reload while serving ----------------------------------------------------------------


def _publish(src: Path, store: Path) -> None:
    """Copy an archive into the store the way `servekit archive` does: atomically."""
    part = store / f".{src.name}.part"
    shutil.copy2(src, part)
    os.replace(part, store / src.name)


def test_reload_while_serving_has_no_errors(tmp_path, archives):
    overrides = port_overrides()
    srv = start_server(tmp_path, archives, {"digits": "digits-v1.0.mar"}, **overrides)
    cmd = watch_command(srv.cfg, "--interval", "0.5")
    log = open(tmp_path / "watcher.log", "wb")
    watcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        with Load(srv.cfg.inference, "digits", digit_samples(8), threads=3, timeout=120) as load:
            wait_until(lambda: load.ok_streak() >= 10, 30, what="steady load")
            _publish(archives / "digits-v2.0.mar", srv.cfg.model_store)
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
    """scripts/soak.py for 4 minutes with keys expiring every minute, two publishes and a worker kill.

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
            "240",
            "--threads",
            "3",
            "--key-minutes",
            "1",
            "--publish-every",
            "120",
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
    assert (logs / "ts_log.1.log").exists() and (logs / "access_log.1.log").exists(), "the logs never rolled over"
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
