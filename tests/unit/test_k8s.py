"""The Kubernetes manifests in k8s/: rendered with kustomize, schema-checked, and held to our rules.

Needs the pinned tools from ``scripts/k8s_tools.sh`` (kubectl with its built-in kustomize, and
kubernetes-validate) in this Python environment. Nothing here talks to a cluster.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from support.crd_schemas import validate as validate_crds
from support.k8s_rules import PVC_NAME, check_rules

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu")
# The kubectl that scripts/k8s_tools.sh installs (kustomize v5.8.1 inside).
KUBECTL_VERSION = "v1.37.1"
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
KUBE_VERSIONS = ("1.31.0", "1.37.0")

CRD_API_VERSIONS = ("monitoring.coreos.com/v1",)
INSTALL_HINT = "run scripts/k8s_tools.sh to install the pinned kubectl and kubernetes-validate"


# --------------------------------------------------------------------------- tools


def _tool(name: str) -> Path:
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    pytest.fail(f"{name} not found next to {sys.executable}: {INSTALL_HINT}", pytrace=False)


@pytest.fixture(scope="session")
def kubectl() -> Path:
    path = _tool("kubectl")
    out = subprocess.run([str(path), "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    if f"Client Version: {KUBECTL_VERSION}" not in out:
        pytest.fail(f"{path} is not kubectl {KUBECTL_VERSION} ({out.strip()!r}): {INSTALL_HINT}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def kubernetes_validate() -> Path:
    return _tool("kubernetes-validate")


def render(kubectl: Path, directory: Path) -> str:
    proc = subprocess.run([str(kubectl), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kustomize failed for {directory}:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def rendered(kubectl: Path) -> dict[str, str]:
    return {name: render(kubectl, K8S / "overlays" / name) for name in OVERLAYS}


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_follows_rules(rendered: dict[str, str], overlay: str) -> None:
    assert check_rules(docs_of(rendered[overlay]), overlay) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_image_variant(rendered: dict[str, str], overlay: str) -> None:
    (dep,) = [d for d in docs_of(rendered[overlay]) if d["kind"] == "Deployment"]
    images = {c["image"] for c in dep["spec"]["template"]["spec"]["containers"]}
    assert images == {f"servekit:{overlay}"}


def test_gpu_is_the_default(kubectl: Path, rendered: dict[str, str]) -> None:
    assert render(kubectl, K8S) == rendered["gpu"]


def test_kubernetes_validate_strict(
    kubernetes_validate: Path, kubectl: Path, rendered: dict[str, str], tmp_path: Path
) -> None:
    files = []
    for name, text in rendered.items():
        # The Prometheus Operator's kinds are checked against their CRD schemas (test_alert_rules.py).
        builtin = [d for d in docs_of(text) if d["apiVersion"] not in CRD_API_VERSIONS]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(builtin))
        files.append(str(tmp_path / f"{name}.yaml"))
    store = tmp_path / "store.yaml"
    store.write_text(render(kubectl, K8S / "store"))
    files += [str(store), str(K8S / "store" / "publish-job.yaml")]
    files += [str(p) for p in sorted((K8S / "tools").glob("*.yaml"))]
    for version in KUBE_VERSIONS:
        proc = subprocess.run(
            [str(kubernetes_validate), "--strict", "--kubernetes-version", version, *files],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out = proc.stdout + proc.stderr
        # An unknown kind only warns (and exits 0): treat that as a failure too.
        assert proc.returncode == 0 and "ERROR" not in out and "WARN" not in out, out
        assert out.count(" passed for resource ") == sum(len(docs_of(Path(f).read_text())) for f in files), out


def test_operator_objects_of_the_overlays_match_their_schemas(rendered: dict[str, str], tmp_path: Path) -> None:
    for name, text in rendered.items():
        custom = [d for d in docs_of(text) if d["apiVersion"] in CRD_API_VERSIONS]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump_all(custom))
        proc = validate_crds([tmp_path / f"{name}.yaml"])
        assert proc.returncode == 0 and proc.stdout.count("VALID") == len(custom) == 2, proc.stdout


def test_kubernetes_validate_rejects_unknown_field(
    kubernetes_validate: Path, rendered: dict[str, str], tmp_path: Path
) -> None:
    docs = docs_of(rendered["gpu"])
    _pod(docs)["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [str(kubernetes_validate), "--strict", "--kubernetes-version", KUBE_VERSIONS[0], str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "'pth' was unexpected" in proc.stdout + proc.stderr


# Each mutation breaks one rule; the checker must report it (so the tests above can fail).
def _svc(docs):
    return next(d for d in docs if d["kind"] == "Service")


def _pod(docs):
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]


def _ctr(docs, name="servekit"):
    return next(c for c in _pod(docs)["containers"] if c["name"] == name)


def _proxy(docs):
    return _ctr(docs, "proxy")


def _cm(docs):
    return next(d for d in docs if d["kind"] == "ConfigMap" and "config.properties" in d["data"])["data"]


def _set_prop(docs, key, value):
    data = _cm(docs)
    data["config.properties"] = "\n".join(
        f"{key}={value}" if line.startswith(key + "=") else line for line in data["config.properties"].splitlines()
    )


def _volume(docs, name):
    return next(v for v in _pod(docs)["volumes"] if v["name"] == name)


MUTATIONS = {
    "service exposes 8081": (
        lambda d: _svc(d)["spec"]["ports"].append({"name": "api", "port": 8081, "targetPort": 8081}),
        "Service servekit: exposes the management port",
    ),
    "service port named management": (
        lambda d: _svc(d)["spec"]["ports"].append({"name": "management", "port": 9000}),
        "Service servekit: exposes the management port",
    ),
    "service exposes metrics": (
        lambda d: _svc(d)["spec"]["ports"].append({"name": "metrics", "port": 8082, "targetPort": "metrics"}),
        "Service servekit: may expose only 8080",
    ),
    "containerPort 8081": (
        lambda d: _proxy(d)["ports"].append({"name": "mgmt", "containerPort": 8081}),
        "exposes the management port",
    ),
    "server declares a port": (
        lambda d: _ctr(d).update(ports=[{"name": "direct", "containerPort": 8180}]),
        "TorchServe listens on loopback; the container declares no ports",
    ),
    "exec readiness": (
        lambda d: _ctr(d).update(readinessProbe={"exec": {"command": ["servekit", "health"]}}),
        "readinessProbe must be an httpGet probe (no command, no key file)",
    ),
    "probe reads the key file": (
        lambda d: _proxy(d).update(livenessProbe={"exec": {"command": ["cat", "/run/servekit/key_file.json"]}}),
        "livenessProbe must be an httpGet probe (no command, no key file)",
    ),
    "probe straight to TorchServe": (
        lambda d: _ctr(d)["livenessProbe"]["httpGet"].update(port=8180),
        "livenessProbe must ask the proxy on 8080",
    ),
    "liveness on the ready path": (
        lambda d: _ctr(d)["livenessProbe"]["httpGet"].update(path="/healthz/ready"),
        "livenessProbe must ask for /healthz/live",
    ),
    "readiness on the live path": (
        lambda d: _proxy(d)["readinessProbe"]["httpGet"].update(path="/healthz/live"),
        "readinessProbe must ask for /healthz/ready",
    ),
    "no startup probe": (lambda d: _ctr(d).pop("startupProbe"), "no startupProbe"),
    "keys not from the Secret": (
        lambda d: _volume(d, "api-keys").update(secret=None, emptyDir={}),
        "client keys must come from the Secret servekit-api-keys",
    ),
    "keys written into the manifest": (
        lambda d: _proxy(d)["env"].append({"name": "SERVEKIT_API_KEYS", "value": "not-a-secret"}),
        "client keys must not be written into the manifest",
    ),
    "no proxy": (lambda d: _pod(d)["containers"].remove(_proxy(d)), "containers must be proxy and servekit"),
    "runs as root": (
        lambda d: _ctr(d)["securityContext"].update(runAsUser=0, runAsNonRoot=False),
        "runAsNonRoot must be true",
    ),
    "proxy writable root": (
        lambda d: _proxy(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem must be true",
    ),
    "privilege escalation": (
        lambda d: _ctr(d)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation must be false",
    ),
    "capabilities kept": (lambda d: _proxy(d)["securityContext"].pop("capabilities"), "capabilities must drop ALL"),
    "maxUnavailable 1": (
        lambda d: next(x for x in d if x["kind"] == "Deployment")["spec"]["strategy"]["rollingUpdate"].update(
            maxUnavailable=1
        ),
        "maxUnavailable 0",
    ),
    "model store not the PVC": (
        lambda d: _volume(d, "models").update(persistentVolumeClaim=None, emptyDir={}),
        "/models must come from the PVC servekit-models",
    ),
    "app owns the PVC": (
        lambda d: d.append({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": PVC_NAME}}),
        "the app must not own a PersistentVolumeClaim",
    ),
    "versions not mounted": (
        lambda d: _volume(d, "versions").update(configMap=None, emptyDir={}),
        "SERVEKIT_VERSIONS must be a file of the ConfigMap servekit-versions",
    ),
    "no gpu": (
        lambda d: _ctr(d)["resources"]["limits"].pop("nvidia.com/gpu"),
        "the gpu variant needs a nvidia.com/gpu limit",
    ),
    "no HPA": (
        lambda d: d.remove(next(x for x in d if x["kind"] == "HorizontalPodAutoscaler")),
        "missing HorizontalPodAutoscaler",
    ),
    "HPA on CPU alone": (
        lambda d: next(x for x in d if x["kind"] == "HorizontalPodAutoscaler")["spec"].update(
            metrics=[
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}},
                }
            ]
        ),
        "must scale on a serving signal",
    ),
    "no PodMonitor": (
        lambda d: d.remove(next(x for x in d if x["kind"] == "PodMonitor")),
        "missing PodMonitor",
    ),
    "no PDB": (
        lambda d: d.remove(next(x for x in d if x["kind"] == "PodDisruptionBudget")),
        "missing PodDisruptionBudget",
    ),
    "no NetworkPolicy": (
        lambda d: d.remove(next(x for x in d if x["kind"] == "NetworkPolicy")),
        "missing NetworkPolicy",
    ),
    "network policy opens 8081": (
        lambda d: next(x for x in d if x["kind"] == "NetworkPolicy")["spec"]["ingress"].append(
            {"ports": [{"port": 8081}]}
        ),
        "NetworkPolicy: ingress only to 8080 and 8082",
    ),
    "egress opened": (
        lambda d: next(x for x in d if x["kind"] == "NetworkPolicy")["spec"].update(egress=[{}]),
        "NetworkPolicy: egress beyond DNS",
    ),
    "management on all interfaces": (
        lambda d: _set_prop(d, "management_address", "http://0.0.0.0:8081"),
        "management_address must be on 127.0.0.1",
    ),
    "inference bypasses the proxy": (
        lambda d: _set_prop(d, "inference_address", "http://0.0.0.0:8180"),
        "inference_address must be on 127.0.0.1",
    ),
    "no OMP_NUM_THREADS": (lambda d: _ctr(d).update(env=[]), "OMP_NUM_THREADS must be set explicitly"),
    "no memory limit": (lambda d: _proxy(d)["resources"]["limits"].pop("memory"), "no memory limits"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_rule_checker_catches(rendered: dict[str, str], name: str) -> None:
    mutate, expected = MUTATIONS[name]
    docs = docs_of(rendered["gpu"])
    mutate(docs)
    problems = check_rules(docs, "gpu")
    assert any(expected in p for p in problems), problems


def test_rule_checker_catches_gpu_in_cpu_variant(rendered: dict[str, str]) -> None:
    problems = check_rules(docs_of(rendered["gpu"]), "cpu")
    assert any("the cpu variant's servekit must not ask for nvidia.com/gpu" in p for p in problems), problems
    assert any("the cpu variant must not target GPU nodes" in p for p in problems), problems


def test_rule_checker_catches_bare_service() -> None:
    """Without any rendering: a lone Service on 8081 is reported, and so is all that is missing."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "leak"},
            "spec": {"selector": {"app": "x"}, "ports": [{"port": 8081}]},
        }
    ]
    problems = check_rules(copy.deepcopy(docs), "gpu")
    assert any(p.startswith("Service leak: exposes the management port") for p in problems)
    assert "missing Deployment" in problems and "missing NetworkPolicy" in problems


def test_store_is_its_own_kustomization(kubectl: Path) -> None:
    """The store renders on its own (RWX, kept), and its claim is the one the app mounts."""
    docs = docs_of(render(kubectl, K8S / "store"))
    assert [d["kind"] for d in docs] == ["PersistentVolumeClaim"]
    (pvc,) = docs
    assert pvc["metadata"]["name"] == PVC_NAME and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["servekit.io/lifecycle"] == "keep"


def test_publish_job_runs_the_publish_command() -> None:
    """The Job copies one archive into the store's claim with `servekit publish` (atomic, immutable)."""
    (job,) = docs_of((K8S / "store" / "publish-job.yaml").read_text())
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"][:2] == ["servekit", "publish"] and c["command"][-2:] == ["--model-store", "/models"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"] == PVC_NAME
    assert c["command"][2].startswith("/incoming/") and "image" in volumes[mounts["/incoming"]]
