"""Two pods of the rendered CPU overlay under `podman kube play`, sharing one store and one versions file.

Each pod is the Deployment as shipped: the proxy container (nginx) in front, TorchServe and the
watcher on the pod's loopback (tests/support/pods.py says what podman 4.3 needs changed). In order:
  - the probe path answers 503 (JSON) while the models load and 200 once a worker is READY, and
    podman's run of the liveness probes (curl in the container) passes;
  - keys: the Secret's keys get 200; no key, a wrong key: 401 JSON; nothing but inference passes;
  - under load at both pods: v2 published with the publish Job's command, the versions file
    pointed at v2: both pods serve v2 within 30 s; pointed back at v1: both serve v1; 0 failures;
  - a key rotated in the Secret: old and new both work, then the old one gets 401, TorchServe untouched;
  - the logs of TorchServe, the watcher and the proxy are in `podman logs` (kubectl logs), and each
    pod's TorchServe hears only from its own workers;
  - a crashed server container is restarted in its pod and serves again from the run dir its last
    run left behind, preloaded, while the other pod carries on.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from servekit.client import InferenceClient, wait_until
from servekit.loadcheck import CheckedLoad
from support.podman import ROOT, podman, record
from support.pods import Cluster, write_atomic
from support.rel_support import digit_samples

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

KEY_1, KEY_2, SERVICE_KEY = "key-one-0123456789abcdef", "key-two-0123456789abcdef", "service-0123456789abcdef"
SWITCH_LIMIT_S = 30.0


def _kubectl() -> str:
    return str(Path(__import__("sys").executable).parent / "kubectl")


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """digits v1.0 and v2.0, built on the host with `servekit archive`."""
    out = tmp_path_factory.mktemp("pod-archives")
    from servekit.archive import ArchiveRequest, archive
    from servekit.hooks import MODELS_DIR

    mars = {
        v: archive(ArchiveRequest("digits", MODELS_DIR / "digits", out, version=v), log=lambda *_: None)
        for v in ("1.0", "2.0")
    }
    out.chmod(0o755)  # the publish Job reads them as the image's user
    for mar in mars.values():
        mar.chmod(0o644)
    return mars


@pytest.fixture(scope="module")
def cluster(image, archives, tmp_path_factory):
    """Two pods serving digits v1.0 (pinned by the versions file), with key-1 in the Secret."""
    rendered = subprocess.run(
        [_kubectl(), "kustomize", str(ROOT / "k8s" / "overlays" / "cpu")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    c = Cluster(tmp_path_factory.mktemp("pods"), image)
    try:
        c.prepare({"key-1": KEY_1}, SERVICE_KEY, 'digits: "1.0"\n')
        store = c.store()
        (store / archives["1.0"].name).write_bytes(archives["1.0"].read_bytes())
        t0 = time.monotonic()
        c.play(rendered, [f"servekit-a-{c.tag}", f"servekit-b-{c.tag}"])
        c.seen_before_ready = c.wait_ready()
        record("two pods until ready", time.monotonic() - t0)
        yield c
    finally:
        c.teardown()


@pytest.fixture(autouse=True)
def logs_on_failure(request, cluster):
    """After a failed test, the tail of every pod's server and proxy logs (a dead worker says why there)."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for pod in cluster.pods:
            for which in ("servekit", "proxy"):
                print(f"--- {pod.container(which)} ---\n{pod.logs(which)[-6000:]}")


def _post(pod, key: str | None, body: bytes, content_type: str = "image/png", path: str = "/predictions/digits"):
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})}
    return requests.post(pod.url + path, data=body, headers=headers, timeout=60)


def test_probe_path_is_ready_only_with_a_ready_worker(cluster):
    body, label = digit_samples(1)[0]
    for pod in cluster.pods:
        seen = cluster.seen_before_ready[pod.name]
        assert 503 in seen, f"{pod.name} was never seen not ready while loading: {seen}"
        # Ready now: a prediction is answered at once, so the 200 came with a READY worker.
        resp = _post(pod, KEY_1, body)
        assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == label, resp.text
        ready = requests.get(pod.url + "/healthz/ready", timeout=10)
        assert ready.json()["status"] == "ready" and "digits v1.0" in ready.json()["detail"]
        assert requests.get(pod.url + "/healthz/live", timeout=10).status_code == 200
        for which in ("proxy", "servekit"):  # podman runs the httpGet liveness probe as curl inside
            proc = podman("healthcheck", "run", pod.container(which), check=False, timeout=60)
            assert proc.returncode == 0, f"{pod.container(which)}: {proc.stdout}{proc.stderr}"


def test_keys_come_from_the_secret_and_only_inference_passes(cluster):
    body, label = digit_samples(1)[0]
    pod = cluster.pods[0]
    for key in (KEY_1, SERVICE_KEY):  # a file of the Secret; a secretKeyRef variable
        resp = _post(pod, key, body)
        assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == label
    for key in (None, "not-a-key-0123456789"):
        resp = _post(pod, key, body)
        assert resp.status_code == 401, resp.text
        assert resp.headers["Content-Type"] == "application/json" and resp.json()["type"] == "Unauthorized"
    auth = {"Authorization": f"Bearer {KEY_1}"}
    for method, path in (
        ("GET", "/models"),
        ("POST", "/models?url=digits-v1.0.mar"),
        ("GET", "/api-description"),
        ("OPTIONS", "/"),
        ("GET", "/ping"),
        ("DELETE", "/models/digits"),
    ):
        resp = requests.request(method, pod.url + path, headers=auth, timeout=30)
        assert resp.status_code == 404 and resp.json()["code"] == 404, (method, path, resp.text)
    assert requests.get(pod.url + "/predictions/digits", headers=auth, timeout=30).status_code == 405
    too_big = _post(pod, KEY_1, b"\xff\xd8\xff" + b"\0" * (11 << 20))
    assert too_big.status_code == 413 and too_big.json()["type"] == "PayloadTooLarge"
    form = _post(pod, KEY_1, body, "application/x-www-form-urlencoded")  # what curl --data-binary sends
    assert form.status_code == 415 and "Content-Type" in form.json()["message"]


def _only_version(load: CheckedLoad, version: str, since: float) -> float | None:
    """When answers at one pod became ``version`` only (the end of its last other answer after ``since``)."""
    outs = [o for o in load.snapshot() if o.ok and o.end >= since]
    if not outs or outs[-1].version != version:
        return None
    others = [o.end for o in outs if o.version != version]
    return max(others, default=since)


def test_versions_roll_out_and_back_across_both_pods_under_load(cluster, archives):
    samples = digit_samples(8)
    loads = [
        CheckedLoad(
            lambda p=pod: InferenceClient(p.url, api_key=KEY_1), "digits", samples, threads=2, timeout=60, pause=0.05
        )
        for pod in cluster.pods
    ]
    job = yaml.safe_load((ROOT / "k8s" / "store" / "publish-job.yaml").read_text())
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[2] == "/incoming/digits-v2.0.mar", command
    timings = {}
    try:
        for load in loads:
            load.start()
        wait_until(lambda: all(x.ok_streak() >= 5 for x in loads), 60, what="steady load at both pods")
        # Publish v2 with the Job's own command, in the image, as the Job's user.
        podman(
            "run",
            "--rm",
            "--user",
            "10001:10001",
            "--read-only",
            "--network",
            "none",
            "-v",
            f"{cluster.volume}:/models",
            "-v",
            f"{archives['2.0'].parent}:/incoming:ro",
            "--entrypoint",
            command[0],
            cluster.image,
            *command[1:],
            timeout=300,
        )
        assert (cluster.store() / "digits-v2.0.mar").read_bytes() == archives["2.0"].read_bytes()
        time.sleep(3)
        assert all(_only_version(x, "1.0", 0) is not None for x in loads), "v2.0 rolled out before the pin moved"
        for version in ("2.0", "1.0"):
            t0 = time.monotonic()
            write_atomic(cluster.versions_file, f'digits: "{version}"\n')
            wait_until(
                lambda v=version, t0=t0: all(_only_version(x, v, t0) is not None for x in loads),
                120,
                what=f"both pods to serve only v{version}",
            )
            timings[version] = max(_only_version(x, version, t0) for x in loads) - t0
            record(f"versions file -> both pods on v{version}", timings[version])
            for pod in cluster.pods:  # what each pod serves, as Prometheus would see it
                metrics = requests.get(pod.metrics_url + "/metrics/servekit", timeout=10).text
                assert f'servekit_model_version_info{{model="digits",version="{version}"}} 1.0' in metrics
        listing = podman("exec", cluster.pods[0].container("servekit"), "servekit", "reload", "list").stdout
        assert "pinned to v1.0" in listing and "* v1.0" in listing and "v2.0" in listing, listing
    finally:
        for load in loads:
            load.stop()
    for pod, load in zip(cluster.pods, loads):
        failures = load.failures()
        assert not failures, f"{pod.name}: {len(failures)} failed, first {[(o.status, o.error) for o in failures[:3]]}"
        assert {"1.0", "2.0"} <= set(load.versions(0)), load.versions(0)
    assert all(t <= SWITCH_LIMIT_S for t in timings.values()), timings


def test_key_rotation_needs_no_restart(cluster):
    body, label = digit_samples(1)[0]
    pids = {pod.name: pod.java_pid() for pod in cluster.pods}
    write_atomic(cluster.keys_dir / "key-2", KEY_2)  # the Secret holds both keys now
    for pod in cluster.pods:
        wait_until(lambda p=pod: _post(p, KEY_2, body).status_code == 200, 30, what="the new key to work")
        assert _post(pod, KEY_1, body).status_code == 200, "the old key stopped working while both are in the Secret"
    (cluster.keys_dir / "key-1").unlink()  # the old key leaves the Secret
    for pod in cluster.pods:
        wait_until(lambda p=pod: _post(p, KEY_1, body).status_code == 401, 30, what="the old key to be refused")
        resp = _post(pod, KEY_2, body)
        assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == label
    assert {pod.name: pod.java_pid() for pod in cluster.pods} == pids, "TorchServe was restarted"
    assert all(pod.restarts() == 0 for pod in cluster.pods)


def test_logs_go_to_the_container_output(cluster):
    for each in cluster.pods:  # each pod's workers are its own (pods sharing a run dir would swap them)
        hosts = set(re.findall(r"#hostname:([\w.-]+),", each.logs("servekit")))
        assert hosts == {f"{each.name}-pod-0"}, f"{each.name}'s TorchServe heard from workers on {hosts}"
    pod = cluster.pods[0]
    server = pod.logs("servekit")
    assert "org.pytorch.serve" in server and "MODEL_LOG" in server, server[-2000:]  # TorchServe, its workers
    assert "servekit.reload" in server and "switching to v2.0" in server, server[-2000:]  # the watcher
    proxy = pod.logs("proxy")
    assert "key=key-1" in proxy and '"POST /predictions/digits HTTP/1.1" 200' in proxy, proxy[-2000:]
    assert KEY_1 not in proxy and KEY_1 not in server, "a key was logged"
    assert "client keys changed (added ['key-2']" in proxy
    status = json.loads(podman("exec", pod.container("servekit"), "cat", "/run/servekit/reload-status.json").stdout)
    assert status["watcher"]["state"] == "running" and status["watcher"]["failed_polls"] == 0


def test_a_crashed_server_container_restarts_and_serves_from_the_same_run_dir(cluster):
    """The kubelet restarts a crashed container inside its pod, and the pod's run dir (an emptyDir)
    keeps what the last run left: pid files, the preloader's and the workers' sockets, the config,
    the watcher's status. None of it may stop the new run; the other pod never notices."""
    body, label = digit_samples(1)[0]
    pod, other = cluster.pods
    name = pod.container("servekit")
    left = podman("exec", name, "ls", "-A", "/run/servekit", "/run/servekit/preload", "/run/servekit/tmp").stdout
    assert "preload.sock" in left and ".ts.sock." in left and "server.pid" in left, left
    top = [line.split(None, 2) for line in podman("top", name, "pid", "ppid", "args").stdout.splitlines()[1:]]
    serve = next(pid for pid, ppid, args in top if ppid == "1" and "servekit serve" in args)  # tini's child
    podman("exec", name, "sh", "-c", f"kill -KILL {serve}")  # the server's main process dies: tini exits with it
    wait_until(lambda: pod.restarts() >= 1, 60, what="podman to restart the container")
    wait_until(lambda: _post(pod, KEY_2, body).status_code == 200, 180, what="the restarted container to serve")
    resp = _post(pod, KEY_2, body)
    assert resp.json()["predictions"][0]["label"] == label and resp.headers["X-Model-Version"] == "1.0"
    ready = wait_until(
        lambda: (r := requests.get(pod.url + "/healthz/ready", timeout=10)).status_code == 200 and r,
        60,
        what="the restarted pod to be ready (its watcher up again)",
    )
    assert "digits v1.0" in ready.json()["detail"]
    said = [line for line in pod.logs("servekit").splitlines() if line.startswith("servekit preload: ")]
    assert len(said) >= 2 and all(" ready in " in line for line in said), said  # both runs preloaded
    assert other.restarts() == 0 and _post(other, KEY_2, body).status_code == 200
