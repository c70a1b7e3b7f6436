"""The production image (docker/Dockerfile), built and run for real with podman.

One container for the module, started the way production runs it: read-only root filesystem,
tmpfs for /run/servekit and /tmp, a model store volume at /models, only the inference port
published (on the host's loopback). The tests then check, in file order:
  - a held-out handwritten digit sent to the published port, with the token from the container's
    key_file.json, is classified correctly;
  - the image's HEALTHCHECK command passes;
  - every process runs as UID/GID 10001 and the root filesystem is read-only;
  - the management API answers inside the container and is unreachable from outside it;
  - copying digits-v2.0.mar into the mounted store moves the answers to version 2.0 (hot reload);
  - `podman stop -t 30` ends the container with exit code 0 within the grace period.

The image (localhost/servekit:cpu, on localhost/debian-base:bookworm) is built once per session
when it is missing or older than the sources (SERVEKIT_REBUILD=1 forces a build; SERVEKIT_IMAGE
names another image). Without podman the module is skipped, except under CI=true where that
is a failure. Timings go to build/container-test-timings.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from support.podman import MODEL, ROOT, RUN_DIR, UID, connects, free_port, podman, record, servekit_cli

pytestmark = [
    pytest.mark.container,
    # The first test may build the base image and the image (minutes on a fresh machine).
    pytest.mark.timeout(3600),
]


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> tuple[Path, Path]:
    """(store, staging): the store holds digits-v1.0.mar, staging holds digits-v2.0.mar; built
    on the host with `servekit archive`."""
    store = tmp_path_factory.mktemp("container-store")
    staging = tmp_path_factory.mktemp("container-staging")
    t0 = time.monotonic()
    for args, out in (([MODEL], store), ([MODEL, "--version", "2.0"], staging)):
        proc = subprocess.run(
            [*servekit_cli(), "archive", *args, "--model-store", str(out)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"servekit archive {args} failed:\n{proc.stdout}\n{proc.stderr}"
    record("servekit archive v1.0 + v2.0", time.monotonic() - t0)
    assert (store / f"{MODEL}-v1.0.mar").is_file() and (staging / f"{MODEL}-v2.0.mar").is_file()
    # The container user (10001) only needs to read the store.
    store.chmod(0o755)
    for mar in (*store.glob("*.mar"), *staging.glob("*.mar")):
        mar.chmod(0o644)
    return store, staging


@dataclass
class Container:
    """The running container under test."""

    name: str
    port: int
    store: Path
    staging: Path
    notes: dict = field(default_factory=dict)

    def exec(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *cmd, check=check, timeout=timeout)

    def state(self, fmt: str) -> str:
        return podman("inspect", "--format", fmt, self.name).stdout.strip()

    def keys(self) -> dict:
        """key_file.json from the run dir (TorchServe may be rewriting it: retry briefly)."""
        for _ in range(50):
            text = self.exec("cat", f"{RUN_DIR}/key_file.json", check=False).stdout
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                time.sleep(0.2)
        raise AssertionError(f"unreadable {RUN_DIR}/key_file.json: {text!r}")

    def predict(self, png: bytes) -> requests.Response:
        """POST an image to the published inference port with the inference token."""
        token = self.keys()["inference"]["key"]
        return requests.post(
            f"http://127.0.0.1:{self.port}/predictions/{MODEL}",
            data=png,
            timeout=60,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
        )

    def watcher_running(self) -> bool:
        """Whether the reload watcher (python -m servekit.reload watch) is alive in the container."""
        top = podman("top", self.name, "args", check=False).stdout
        return "servekit.reload" in top

    def diagnostics(self) -> str:
        logs = podman("logs", "--tail", "60", self.name, check=False)
        ts = self.exec("sh", "-c", f"tail -n 60 {RUN_DIR}/logs/torchserve.out {RUN_DIR}/logs/watcher.log", check=False)
        return (
            f"--- podman logs {self.name} ---\n{logs.stdout}{logs.stderr}\n--- run dir logs ---\n{ts.stdout}{ts.stderr}"
        )


@pytest.fixture(scope="module")
def container(image, archives):
    """The image running read-only, non-root, with the store mounted; yields once healthy."""
    store, staging = archives
    name = f"servekit-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    t0 = time.monotonic()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--pull",
        "never",
        "--read-only",
        # Owned by the image's user (:U), so the non-root server can write its run dir.
        "--tmpfs",
        f"{RUN_DIR}:rw,size=256m,U",
        "--tmpfs",
        "/tmp:rw,size=512m",
        "--volume",
        f"{store}:/models",
        # Only the inference API leaves the container, and only to the host's loopback.
        "--publish",
        f"127.0.0.1:{port}:8080",
        image,
    )
    c = Container(name, port, store, staging)
    try:
        deadline = time.monotonic() + 600
        while True:
            if c.state("{{.State.Running}}") != "true":
                pytest.fail(
                    f"container exited ({c.state('{{.State.ExitCode}}')}) before it was healthy\n" + c.diagnostics()
                )
            health = c.exec("servekit", "health", "--run-dir", RUN_DIR, check=False, timeout=60)
            if health.returncode == 0:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"not healthy after 600 s: {health.stdout}{health.stderr}\n" + c.diagnostics())
            time.sleep(2)
        record("container start until healthy", time.monotonic() - t0)
        yield c
    finally:
        podman("rm", "--force", "--time", "0", name, check=False)


@pytest.fixture(scope="module")
def digits():
    """Held-out digits (never seen in training), one per class, as (png bytes, label)."""
    from models.digits.model import encode, held_out

    first: dict[int, bytes] = {}
    for img, label in held_out():
        first.setdefault(label, encode(img))
    return [(first[label], str(label)) for label in sorted(first)]


# -- tests ----------------------------------------------------------------------------------------
def test_classifies_held_out_digits_through_published_port(container, digits):
    results = []
    for png, label in digits:
        resp = container.predict(png)
        assert resp.status_code == 200, resp.text
        assert resp.headers.get("X-Model-Version") == "1.0"
        top1 = resp.json()["predictions"][0]["label"]
        results.append((label, top1))
    correct = sum(label == top1 for label, top1 in results)
    # A trained classifier, not chance (10 %): at most one of the ten classes may miss.
    assert correct >= 9, f"held-out digits (true, predicted): {results}"


def test_token_is_required(container, digits):
    png, _ = digits[0]
    resp = requests.post(f"http://127.0.0.1:{container.port}/predictions/{MODEL}", data=png, timeout=30)
    assert resp.status_code in (400, 401), resp.status_code
    wrong = requests.post(
        f"http://127.0.0.1:{container.port}/predictions/{MODEL}",
        data=png,
        timeout=30,
        headers={"Authorization": "Bearer not-the-key"},
    )
    assert wrong.status_code in (400, 401), wrong.status_code


def test_image_healthcheck_passes(container):
    cfg = podman("inspect", "--format", "{{json .Config.Healthcheck}}", container.name).stdout
    assert "servekit" in cfg and "health" in cfg, cfg
    proc = podman("healthcheck", "run", container.name, check=False, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runs_as_uid_10001_on_read_only_root(container):
    assert container.exec("id", "-u").stdout.strip() == str(UID)
    assert container.exec("id", "-g").stdout.strip() == str(UID)
    assert container.state("{{.Config.User}}") == f"{UID}:{UID}"
    assert container.state("{{.HostConfig.ReadonlyRootfs}}") == "true"
    # Every process of the container, seen from the host.
    top = podman("top", container.name, "huser", "user", "pid", "args").stdout.splitlines()
    rows = [line.split(None, 3) for line in top[1:] if line.strip()]
    assert len(rows) >= 3, top  # tini, servekit, java (TorchServe) at least
    for huser, user, pid, args in rows:
        if huser == "?":  # a process that ended while podman top read /proc
            continue
        assert huser == str(UID) and user in ("servekit", str(UID)), f"pid {pid} ({args}) runs as {huser}/{user}"
    # Only the tmpfs mounts and the store are writable.
    assert container.exec("touch", "/opt/venv/x", check=False).returncode != 0
    assert container.exec("touch", "/etc/x", check=False).returncode != 0
    assert container.exec("touch", f"{RUN_DIR}/x", "/tmp/x").returncode == 0


def test_management_only_inside_the_container(container):
    ports = podman("port", container.name).stdout
    assert "8081" not in ports and "8082" not in ports, ports
    assert f"127.0.0.1:{container.port}" in ports, ports
    key = container.keys()["management"]["key"]
    inside = container.exec(
        "python3",
        "-c",
        (
            "import json, sys, urllib.request as u\n"
            "r = u.urlopen(u.Request('http://127.0.0.1:8081/models',"
            " headers={'Authorization': 'Bearer ' + sys.argv[1]}), timeout=30)\n"
            "print(r.status, json.dumps(json.load(r)))"
        ),
        key,
    )
    assert inside.stdout.startswith("200 ") and MODEL in inside.stdout, inside.stdout
    # From the host: through the container's own address, inference answers, management refuses
    # (it listens on the container's loopback only) ...
    ip = container.state("{{.NetworkSettings.IPAddress}}")
    if ip:
        assert connects(ip, 8080), f"inference not reachable at {ip}:8080"
        assert not connects(ip, 8081), f"management reachable from outside at {ip}:8081"
    # ... and nothing of the container listens on the host's 8081.
    if connects("127.0.0.1", 8081):
        # Something else on this machine (a dev server) owns it; our key must not work there.
        resp = requests.get("http://127.0.0.1:8081/models", timeout=10, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code != 200, "the container's management API answers on the host's 8081"


def test_hot_reload_to_v2_inside_the_container(container, digits):
    assert container.watcher_running(), "the reload watcher is not running\n" + container.diagnostics()
    png, label = digits[3]
    src = container.staging / f"{MODEL}-v2.0.mar"
    tmp = container.store / f".{src.name}.partial"
    shutil.copyfile(src, tmp)
    tmp.chmod(0o644)
    os.replace(tmp, container.store / src.name)  # appears whole, like `mv` on the same disk
    t0 = time.monotonic()
    versions, failures = [], []
    checked = t0
    while True:
        resp = container.predict(png)
        if resp.status_code != 200:
            failures.append((resp.status_code, resp.text[:200]))
        else:
            versions.append(resp.headers.get("X-Model-Version"))
            if versions[-1] == "2.0":
                assert resp.json()["predictions"][0]["label"] == label
                break
        now = time.monotonic()
        waited, dead = now - t0, False
        if now - checked > 10:  # fail fast when the watcher died
            checked, dead = now, not container.watcher_running()
        if waited > 300 or dead:
            pytest.fail(
                f"not on 2.0 after {waited:.0f} s (watcher running: {container.watcher_running()}); "
                f"versions seen {sorted(set(map(str, versions)))}\n" + container.diagnostics()
            )
        time.sleep(0.5)
    record("hot reload v1.0 -> v2.0", time.monotonic() - t0)
    assert set(versions) <= {"1.0", "2.0"}, versions
    assert not failures, f"requests failed during the reload: {failures[:5]}"
    # It stays on 2.0.
    for _ in range(3):
        assert container.predict(png).headers.get("X-Model-Version") == "2.0"


def test_stop_exits_zero_within_grace_period(container):
    t0 = time.monotonic()
    podman("stop", "--time", "30", container.name, timeout=120)
    elapsed = time.monotonic() - t0
    record("podman stop -t 30", elapsed)
    assert container.state("{{.State.Running}}") == "false"
    code = container.state("{{.State.ExitCode}}")
    assert code == "0", f"exit code {code} after {elapsed:.1f} s\n" + container.diagnostics()
    assert elapsed < 30, f"took {elapsed:.1f} s: the grace period ran out (SIGKILL)"
