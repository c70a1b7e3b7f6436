"""The preloader's fork protocol, with a stand-in worker script instead of TorchServe's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from servekit import preload, preload_client
from servekit.client import wait_until

CLIENT = Path(preload_client.__file__)
WORKER = """
import os, sys, time
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("PRELOAD_TEST"), "pid", os.getpid(), flush=True)
here = os.path.dirname(os.path.abspath(sys.argv[0]))
print("path0", sys.path[0] == here, "extra", "/extra/dir" in sys.path, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(600)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def preloader(tmp_path):
    sock = tmp_path / "p.sock"
    code = f"from pathlib import Path; from servekit.preload import serve; serve(Path({str(sock)!r}), ('json',))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    wait_until(lambda: sock.exists() or proc.poll() is not None, 30, what="the preloader")
    assert proc.poll() is None
    yield sock, proc
    proc.terminate()
    proc.wait(10)


def _script(tmp_path: Path) -> Path:
    script = tmp_path / "work" / preload_client.WORKER_SCRIPT
    script.parent.mkdir(exist_ok=True)
    script.write_text(WORKER)
    return script


def _client(sock: Path, *args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PRELOAD_TEST": "from-the-stand-in", "PYTHONPATH": "/extra/dir"}
    cmd = [sys.executable, str(CLIENT), str(sock), sys.executable, *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_forked_worker_gets_the_stand_ins_stdio_env_cwd_and_exit_code(preloader, tmp_path):
    sock, proc = preloader
    client = _client(sock, str(_script(tmp_path)), "3", cwd=tmp_path)
    out, err = client.communicate(timeout=30)
    assert client.returncode == 3, err
    assert f"argv ['3'] cwd {tmp_path} env from-the-stand-in" in out, out
    assert "path0 True extra True" in out and "plainly" not in err
    worker_pid = int(out.split("pid ")[1].split()[0])
    assert worker_pid != client.pid  # it ran in a fork of the preloader, not in the stand-in


def test_killing_the_stand_in_kills_its_worker(preloader, tmp_path):
    sock, proc = preloader
    client = _client(sock, str(_script(tmp_path)), "sleep", cwd=tmp_path)
    line = client.stdout.readline()
    worker = psutil.Process(int(line.split("pid ")[1].split()[0]))
    assert worker.ppid() == proc.pid
    client.kill()  # as TorchServe's destroyForcibly does
    wait_until(lambda: not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE, 10, what="the worker to end")


def test_a_killed_worker_ends_its_stand_in_with_the_signal_code(preloader, tmp_path):
    sock, _ = preloader
    client = _client(sock, str(_script(tmp_path)), "sleep", cwd=tmp_path)
    pid = int(client.stdout.readline().split("pid ")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    assert client.wait(10) == 128 + signal.SIGKILL


def test_without_a_preloader_or_for_other_commands_python_runs_plainly(tmp_path):
    client = _client(tmp_path / "missing.sock", str(_script(tmp_path)), "5", cwd=tmp_path)
    out, err = client.communicate(timeout=30)
    assert client.returncode == 5 and "starting the worker plainly" in err and "env from-the-stand-in" in out
    pip_like = _client(tmp_path / "missing.sock", "-c", "print('plain')", cwd=tmp_path)
    out, err = pip_like.communicate(timeout=30)
    assert pip_like.returncode == 0 and out.strip() == "plain" and err == ""


def test_a_worker_started_while_the_preloader_imports_waits_for_it(tmp_path):
    # The frontend boots beside the preloader: its first worker can come before the socket.
    sock = tmp_path / "p.sock"
    code = (
        "import time; time.sleep(2); from pathlib import Path; from servekit.preload import serve; "
        f"serve(Path({str(sock)!r}), ('json',))"
    )
    slow = subprocess.Popen([sys.executable, "-c", code])
    try:
        Path(f"{sock}{preload_client.PID_SUFFIX}").write_text(str(slow.pid))
        client = _client(sock, str(_script(tmp_path)), "0", cwd=tmp_path)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0 and "plainly" not in err, err
        assert f"pid {client.pid}" not in out  # forked by the preloader, not run in the stand-in
    finally:
        slow.terminate()
        slow.wait(10)
    # A preloader that has ended is not waited for.
    dead = tmp_path / "dead.sock"
    Path(f"{dead}{preload_client.PID_SUFFIX}").write_text(str(slow.pid))
    t0 = time.monotonic()
    client = _client(dead, str(_script(tmp_path)), "4", cwd=tmp_path)
    _, err = client.communicate(timeout=30)
    assert client.returncode == 4 and "starting the worker plainly" in err and time.monotonic() - t0 < 10


def test_a_bad_request_is_refused_and_the_preloader_keeps_serving(preloader, tmp_path):
    import socket

    sock, proc = preloader
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock))
        s.sendall(b"garbage without descriptors")
        time.sleep(0.3)
    assert proc.poll() is None
    client = _client(sock, str(_script(tmp_path)), "0", cwd=tmp_path)
    assert client.wait(30) == 0


def test_switch_is_read_from_the_environment():
    assert preload.enabled({preload.ENV: "1"}) and preload.enabled({preload.ENV: "true"})
    assert preload.enabled({}) and preload.enabled({preload.ENV: ""})  # on by default
    assert not preload.enabled({preload.ENV: "0"}) and not preload.enabled({preload.ENV: " Off "})
    assert not preload.enabled({preload.ENV: "false"}) and not preload.enabled({preload.ENV: "no"})
