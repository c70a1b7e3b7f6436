"""Preloaded workers (the default): forked from a preloader, served and replaced like plain ones; and plain ones."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from conftest import start_server
from servekit import preload, server
from servekit.bench.procs import torchserve_role, worker_processes
from servekit.client import wait_until
from support.rel_support import assert_serves, digit_samples, worker_pids


@pytest.fixture(scope="module")
def preloaded(tmp_path_factory, archives):
    srv = _start(tmp_path_factory.mktemp("preload"), archives, "1")
    yield srv
    server.stop(srv.cfg.run_dir)


def _start(tmp, archives, setting: str):
    """A digits server started with SERVEKIT_PRELOAD_WORKERS=``setting``."""
    os.environ[preload.ENV] = setting
    try:
        return start_server(tmp, archives, {"digits": "digits-v1.0.mar"})
    finally:
        del os.environ[preload.ENV]


def _preloader(srv) -> psutil.Process:
    group = os.getpgid(srv.proc.pid)
    # Forked workers share the preloader's command line; the preloader is the launcher's child.
    [proc] = [p for p in psutil.Process(srv.proc.pid).children() if p.cmdline()[-1:] == [str(_sock(srv))]]
    assert os.getpgid(proc.pid) == group, "the preloader is not in the server's process group"
    return proc


def _sock(srv):
    return srv.cfg.run_dir / preload.DIR / preload.SOCKET


def test_workers_are_forked_from_the_preloader_and_classify(preloaded):
    [pid] = worker_pids(preloaded.management, "digits")
    preloader = _preloader(preloaded)
    assert psutil.Process(pid).ppid() == preloader.pid
    # The bench tells them apart for its frontend/worker CPU split.
    group = os.getpgid(preloaded.proc.pid)
    assert [p.pid for p in worker_processes(group)] == [pid] and torchserve_role(preloader) == "preloader"
    assert torchserve_role(psutil.Process(preloaded.proc.pid)) == "other"  # the launcher
    assert_serves(preloaded.inference)
    out = (preloaded.cfg.run_dir / "logs" / "torchserve.out").read_text(errors="replace")
    assert "servekit preload: ready in" in out and "starting the worker plainly" not in out


def test_a_killed_worker_is_replaced_by_a_new_fork(preloaded):
    """A worker that dies idle is noticed at the next batch, answered "Worker died."; then a new fork serves."""
    mgmt = preloaded.management
    [old] = worker_pids(mgmt, "digits")
    os.kill(old, signal.SIGKILL)
    time.sleep(0.5)
    body, _ = digit_samples(1)[0]
    resp = preloaded.cfg.inference(timeout=30).predict("digits", body, "image/png")
    assert resp.status_code in (500, 507) and "Worker died" in resp.text, (resp.status_code, resp.text[:300])
    wait_until(lambda: (p := worker_pids(mgmt, "digits")) and p != [old], 120, what="a replacement worker")
    wait_until(lambda: mgmt.describe("digits")[0]["workers"][0]["status"] == "READY", 120, what="READY")
    [new] = worker_pids(mgmt, "digits")
    assert psutil.Process(new).ppid() == _preloader(preloaded).pid
    assert_serves(preloaded.inference)


def test_scaling_down_ends_the_forked_worker(preloaded):
    mgmt = preloaded.management
    assert mgmt.scale("digits", 2).status_code == 200
    pids = worker_pids(mgmt, "digits")
    assert len(pids) == 2
    assert mgmt.scale("digits", 1).status_code == 200
    gone = [p for p in pids if p not in worker_pids(mgmt, "digits")]
    wait_until(
        lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in gone),
        30,
        what="the removed worker to exit",
    )
    assert_serves(preloaded.inference)


def test_without_the_preloader_workers_start_plainly(preloaded):
    mgmt = preloaded.management
    preloader = _preloader(preloaded)
    preloader.kill()  # the launcher does not reap it: it stays a zombie
    wait_until(lambda: preloader.status() == psutil.STATUS_ZOMBIE, 30, what="the preloader to die")
    wait_until(lambda: len(worker_pids(mgmt, "digits")) >= 1, 120, what="the worker to come back")
    wait_until(lambda: mgmt.describe("digits")[0]["workers"][0]["status"] == "READY", 180, what="a plain READY worker")
    assert_serves(preloaded.inference)
    out = (preloaded.cfg.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    assert "starting the worker plainly" in out


def test_stop_leaves_no_process(tmp_path, archives):
    srv = _start(tmp_path, archives, "1")
    group = os.getpgid(srv.proc.pid)
    assert len(server.group_members(group)) >= 3  # launcher, preloader, frontend, stand-in, worker
    assert server.stop(srv.cfg.run_dir)
    time.sleep(0.5)
    assert server.group_members(group) == []
    out = (srv.cfg.run_dir / "logs" / "torchserve.out").read_text(errors="replace")
    assert "Traceback" not in out and "Exception ignored" not in out, out[-2000:]  # a clean shutdown


def test_preloading_off_starts_workers_plainly(tmp_path, archives):
    srv = _start(tmp_path, archives, "0")
    try:
        [pid] = worker_pids(srv.management, "digits")
        cmdline = psutil.Process(pid).cmdline()
        assert any(arg.endswith("model_service_worker.py") for arg in cmdline), cmdline
        assert not (srv.cfg.run_dir / preload.DIR).exists()
        assert_serves(srv.inference)
    finally:
        server.stop(srv.cfg.run_dir)
