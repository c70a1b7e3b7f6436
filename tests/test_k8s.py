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

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
OVERLAYS = ("gpu", "cpu")
# The kubectl that scripts/k8s_tools.sh installs (kustomize v5.8.1 inside).
KUBECTL_VERSION = "v1.37.1"
# The oldest Kubernetes the manifests are meant for, and the newest the schemas know.
KUBE_VERSIONS = ("1.31.0", "1.37.0")

UID = 10001
RUN_DIR = "/run/servekit"
# The health command reads the server addresses from the same file the server was started with.
CONFIG = "/etc/servekit/config.properties"
MODEL_STORE = "/models"
PVC_NAME = "servekit-models"
INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT = 8080, 8081, 8082
GPU = "nvidia.com/gpu"
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
    out = subprocess.run(
        [str(path), "version", "--client"], capture_output=True, text=True, timeout=60
    ).stdout
    if f"Client Version: {KUBECTL_VERSION}" not in out:
        pytest.fail(f"{path} is not kubectl {KUBECTL_VERSION} ({out.strip()!r}): {INSTALL_HINT}",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def kubernetes_validate() -> Path:
    return _tool("kubernetes-validate")


def render(kubectl: Path, directory: Path) -> str:
    proc = subprocess.run(
        [str(kubectl), "kustomize", str(directory)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"kustomize failed for {directory}:\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def rendered(kubectl: Path) -> dict[str, str]:
    return {name: render(kubectl, K8S / "overlays" / name) for name in OVERLAYS}


def docs_of(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


# --------------------------------------------------------------------------- rules


def _properties(text: str) -> dict[str, str]:
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def _matches(selector: dict | None, labels: dict) -> bool:
    """A non-empty matchLabels selector that selects ``labels``."""
    selector = selector or {}
    if set(selector) - {"matchLabels"} or not selector.get("matchLabels"):
        return False
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


def _port_number(port, named: dict[str, int]):
    return named.get(port, port) if isinstance(port, str) else port


def _check_probes(where: str, container: dict) -> list[str]:
    problems = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            problems.append(f"{where}: no {kind}")
            continue
        others = sorted(set(probe) & {"httpGet", "tcpSocket", "grpc"})
        command = (probe.get("exec") or {}).get("command") or []
        if others or command[:2] != ["servekit", "health"]:
            problems.append(f"{where}: {kind} must be an exec probe running `servekit health`")
            continue
        for flag, value in (("--run-dir", RUN_DIR), ("--config", CONFIG)):
            if flag not in command or command[command.index(flag) + 1:][:1] != [value]:
                problems.append(f"{where}: {kind} must pass {flag} {value}")
        live = "--live" in command
        if kind == "livenessProbe" and not live:
            problems.append(f"{where}: livenessProbe must use `servekit health --live`")
        if kind != "livenessProbe" and live:
            problems.append(f"{where}: {kind} must check model readiness (no --live)")
    return problems


def _check_security(where: str, pod_sc: dict, container: dict) -> list[str]:
    sc = {**pod_sc, **(container.get("securityContext") or {})}
    problems = []
    if sc.get("runAsNonRoot") is not True:
        problems.append(f"{where}: runAsNonRoot must be true")
    if sc.get("runAsUser") != UID or sc.get("runAsGroup") != UID:
        problems.append(f"{where}: runAsUser/runAsGroup must be {UID}")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{where}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{where}: allowPrivilegeEscalation must be false")
    if sc.get("privileged"):
        problems.append(f"{where}: must not be privileged")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{where}: capabilities must drop ALL")
    if (sc.get("capabilities") or {}).get("add"):
        problems.append(f"{where}: must not add capabilities")
    if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append(f"{where}: seccompProfile must be RuntimeDefault")
    return problems


def check_rules(docs: list[dict], variant: str) -> list[str]:
    """Our deployment rules for one rendered overlay; returns the violations (empty: all good)."""
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind", "?"), []).append(doc)

    for kind in ("Deployment", "Service", "ConfigMap", "PersistentVolumeClaim",
                 "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                 "ServiceAccount"):
        if not by_kind.get(kind):
            problems.append(f"missing {kind}")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        if hpa.get("apiVersion") != "autoscaling/v2":
            problems.append("HorizontalPodAutoscaler must be autoscaling/v2")
    for sa in by_kind.get("ServiceAccount", []):
        if sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount {sa['metadata']['name']}: automountServiceAccountToken must be false")

    pvcs = {p["metadata"]["name"]: p for p in by_kind.get("PersistentVolumeClaim", [])}
    if PVC_NAME not in pvcs:
        problems.append(f"no PersistentVolumeClaim {PVC_NAME}")
    elif "ReadWriteMany" not in (pvcs[PVC_NAME].get("spec", {}).get("accessModes") or []):
        problems.append(f"PersistentVolumeClaim {PVC_NAME} must be ReadWriteMany")

    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    pod_labels: list[dict] = []
    named_ports: dict[str, int] = {}

    for dep in by_kind.get("Deployment", []):
        name = dep["metadata"]["name"]
        spec = dep.get("spec", {})
        strategy = spec.get("strategy") or {}
        rolling = strategy.get("rollingUpdate") or {}
        if strategy.get("type") != "RollingUpdate" or rolling.get("maxUnavailable") not in (0, "0%"):
            problems.append(f"Deployment {name}: strategy must be RollingUpdate with maxUnavailable 0")
        template = spec.get("template", {})
        labels = template.get("metadata", {}).get("labels") or {}
        pod_labels.append(labels)
        if not _matches(spec.get("selector"), labels):
            problems.append(f"Deployment {name}: selector does not select its pods")
        annotations = template.get("metadata", {}).get("annotations") or {}
        if (annotations.get("prometheus.io/scrape"), annotations.get("prometheus.io/port"),
                annotations.get("prometheus.io/path")) != ("true", str(METRICS_PORT), "/metrics"):
            problems.append(f"Deployment {name}: pods need the prometheus.io scrape annotations for {METRICS_PORT}")
        pod = template.get("spec", {})
        pod_sc = pod.get("securityContext") or {}
        if pod_sc.get("fsGroup") != UID:
            problems.append(f"Deployment {name}: fsGroup must be {UID}")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"Deployment {name}: automountServiceAccountToken must be false")
        if (pod.get("terminationGracePeriodSeconds") or 30) < 30:
            problems.append(f"Deployment {name}: terminationGracePeriodSeconds too short")
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        tolerations = pod.get("tolerations") or []
        if variant == "cpu" and (any(t.get("key") == GPU for t in tolerations)
                                 or GPU + ".present" in (pod.get("nodeSelector") or {})):
            problems.append(f"Deployment {name}: the cpu variant must not target GPU nodes")
        if variant == "gpu" and not pod.get("nodeSelector"):
            problems.append(f"Deployment {name}: the gpu variant needs a GPU nodeSelector")

        for c in pod.get("containers") or []:
            where = f"Deployment {name} container {c.get('name')}"
            for port in c.get("ports") or []:
                named_ports[port.get("name", "")] = port.get("containerPort")
                if port.get("containerPort") == MANAGEMENT_PORT or "manag" in port.get("name", ""):
                    problems.append(f"{where}: exposes the management port ({port})")
            problems += _check_probes(where, c)
            problems += _check_security(where, pod_sc, c)
            if not ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec"):
                problems.append(f"{where}: needs an exec preStop hook")
            if not any(e.get("name") == "OMP_NUM_THREADS" and e.get("value") for e in c.get("env") or []):
                problems.append(f"{where}: OMP_NUM_THREADS must be set explicitly")
            resources = c.get("resources") or {}
            for part in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in (resources.get(part) or {}):
                        problems.append(f"{where}: no {res} {part}")
            gpu_limit = (resources.get("limits") or {}).get(GPU)
            gpu_anywhere = GPU in (resources.get("limits") or {}) or GPU in (resources.get("requests") or {})
            if variant == "gpu" and not (gpu_limit and int(gpu_limit) >= 1):
                problems.append(f"{where}: the gpu variant needs a {GPU} limit")
            if variant == "cpu" and gpu_anywhere:
                problems.append(f"{where}: the cpu variant must not ask for {GPU}")

            mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
            store = volumes.get(mounts.get(MODEL_STORE, {}).get("name"), {})
            if (store.get("persistentVolumeClaim") or {}).get("claimName") != PVC_NAME:
                problems.append(f"{where}: {MODEL_STORE} must come from the PVC {PVC_NAME}")
            for path in (RUN_DIR, "/tmp", "/home/servekit"):
                if "emptyDir" not in volumes.get(mounts.get(path, {}).get("name"), {}):
                    problems.append(f"{where}: {path} must be an emptyDir mount")
            config = volumes.get(mounts.get(str(Path(CONFIG).parent), {}).get("name"), {})
            cm = configmaps.get((config.get("configMap") or {}).get("name"))
            if not cm or "config.properties" not in (cm.get("data") or {}):
                problems.append(f"{where}: /etc/servekit must be the ConfigMap with config.properties")
                continue
            props = _properties(cm["data"]["config.properties"])
            if not props.get("management_address", "").startswith("http://127.0.0.1:"):
                problems.append("config.properties: management_address must be on 127.0.0.1")
            if props.get("disable_token_authorization", "false").lower() != "false":
                problems.append("config.properties: token authorization must not be disabled")
            if props.get("inference_address") != f"http://0.0.0.0:{INFERENCE_PORT}":
                problems.append(f"config.properties: inference_address must be http://0.0.0.0:{INFERENCE_PORT}")
            if props.get("metrics_address") != f"http://0.0.0.0:{METRICS_PORT}":
                problems.append(f"config.properties: metrics_address must be http://0.0.0.0:{METRICS_PORT}")

    for svc in by_kind.get("Service", []):
        name = svc["metadata"]["name"]
        for port in svc.get("spec", {}).get("ports") or []:
            numbers = {port.get("port"), _port_number(port.get("targetPort", port.get("port")), named_ports)}
            if MANAGEMENT_PORT in numbers or "manag" in str(port.get("name", "")) \
                    or "manag" in str(port.get("targetPort", "")):
                problems.append(f"Service {name}: exposes the management port ({port})")
            elif numbers != {INFERENCE_PORT}:
                problems.append(f"Service {name}: may expose only {INFERENCE_PORT} ({port})")
        if svc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name}: must be ClusterIP")
        if not any(_matches({"matchLabels": svc.get("spec", {}).get("selector")}, l) for l in pod_labels):
            problems.append(f"Service {name}: selector does not select the pods")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(_matches(pdb.get("spec", {}).get("selector"), l) for l in pod_labels):
            problems.append("PodDisruptionBudget: selector does not select the pods")

    for policy in by_kind.get("NetworkPolicy", []):
        spec = policy.get("spec", {})
        if not any(_matches(spec.get("podSelector"), l) for l in pod_labels):
            problems.append("NetworkPolicy: podSelector does not select the pods")
        if set(spec.get("policyTypes") or []) != {"Ingress", "Egress"}:
            problems.append("NetworkPolicy: must restrict both Ingress and Egress")
        for rule in spec.get("ingress") or []:
            ports = [_port_number(p.get("port"), named_ports) for p in rule.get("ports") or []]
            if not ports or set(ports) - {INFERENCE_PORT, METRICS_PORT}:
                problems.append(f"NetworkPolicy: ingress only to {INFERENCE_PORT} and {METRICS_PORT} ({rule})")
            if METRICS_PORT in ports and not all(f.get("namespaceSelector") for f in rule.get("from") or [{}]):
                problems.append(f"NetworkPolicy: {METRICS_PORT} only from a monitoring namespace selector")
        for rule in spec.get("egress") or []:
            ports = [p.get("port") for p in rule.get("ports") or []]
            if not ports or set(ports) != {53}:
                problems.append(f"NetworkPolicy: egress beyond DNS ({rule})")
    return problems


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


def test_kubernetes_validate_strict(kubernetes_validate: Path, rendered: dict[str, str],
                                    tmp_path: Path) -> None:
    files = []
    for name, text in rendered.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        files.append(str(tmp_path / f"{name}.yaml"))
    files += [str(p) for p in sorted((K8S / "tools").glob("*.yaml"))]
    for version in KUBE_VERSIONS:
        proc = subprocess.run(
            [str(kubernetes_validate), "--strict", "--kubernetes-version", version, *files],
            capture_output=True, text=True, timeout=120,
        )
        out = proc.stdout + proc.stderr
        # An unknown kind only warns (and exits 0): treat that as a failure too.
        assert proc.returncode == 0 and "ERROR" not in out and "WARN" not in out, out
        assert out.count(" passed for resource ") == sum(
            len(docs_of(Path(f).read_text())) for f in files), out



def test_kubernetes_validate_rejects_unknown_field(kubernetes_validate: Path, rendered: dict[str, str],
                                                   tmp_path: Path) -> None:
    docs = docs_of(rendered["gpu"])
    _pod(docs)["containers"][0]["readinessProbe"]["exec"]["cmd"] = ["true"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [str(kubernetes_validate), "--strict", "--kubernetes-version", KUBE_VERSIONS[0], str(bad)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0 and "'cmd' was unexpected" in proc.stdout + proc.stderr

# Each mutation breaks one rule; the checker must report it (so the tests above can fail).
def _svc(docs):
    return next(d for d in docs if d["kind"] == "Service")


def _pod(docs):
    return next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]


def _ctr(docs):
    return _pod(docs)["containers"][0]


def _cm(docs):
    return next(d for d in docs if d["kind"] == "ConfigMap")["data"]


def _set_prop(docs, key, value):
    data = _cm(docs)
    data["config.properties"] = "\n".join(
        f"{key}={value}" if line.startswith(key + "=") else line
        for line in data["config.properties"].splitlines())


MUTATIONS = {
    "service exposes 8081": (
        lambda d: _svc(d)["spec"]["ports"].append({"name": "api", "port": 8081, "targetPort": 8081}),
        "Service servekit: exposes the management port"),
    "service port named management": (
        lambda d: _svc(d)["spec"]["ports"].append({"name": "management", "port": 9000}),
        "Service servekit: exposes the management port"),
    "service exposes metrics": (
        lambda d: _svc(d)["spec"]["ports"].append({"name": "metrics", "port": 8082, "targetPort": "metrics"}),
        "Service servekit: may expose only 8080"),
    "containerPort 8081": (
        lambda d: _ctr(d)["ports"].append({"name": "mgmt", "containerPort": 8081}),
        "exposes the management port"),
    "httpGet readiness": (
        lambda d: _ctr(d).update(readinessProbe={"httpGet": {"path": "/ping", "port": 8080}}),
        "readinessProbe must be an exec probe running `servekit health`"),
    "no startup probe": (lambda d: _ctr(d).pop("startupProbe"), "no startupProbe"),
    "liveness without --live": (
        lambda d: _ctr(d)["livenessProbe"]["exec"]["command"].remove("--live"),
        "livenessProbe must use `servekit health --live`"),
    "readiness with --live": (
        lambda d: _ctr(d)["readinessProbe"]["exec"]["command"].append("--live"),
        "readinessProbe must check model readiness (no --live)"),
    "probe reads another config": (
        lambda d: _ctr(d)["startupProbe"]["exec"].update(
            command=["servekit", "health", "--run-dir", "/run/servekit"]),
        "startupProbe must pass --config /etc/servekit/config.properties"),
    "runs as root": (
        lambda d: _ctr(d)["securityContext"].update(runAsUser=0, runAsNonRoot=False),
        "runAsNonRoot must be true"),
    "writable root": (
        lambda d: _ctr(d)["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem must be true"),
    "privilege escalation": (
        lambda d: _ctr(d)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation must be false"),
    "capabilities kept": (
        lambda d: _ctr(d)["securityContext"].pop("capabilities"), "capabilities must drop ALL"),
    "maxUnavailable 1": (
        lambda d: next(x for x in d if x["kind"] == "Deployment")["spec"]["strategy"]
        ["rollingUpdate"].update(maxUnavailable=1),
        "maxUnavailable 0"),
    "model store not the PVC": (
        lambda d: next(v for v in _pod(d)["volumes"] if v["name"] == "models").update(
            persistentVolumeClaim=None, emptyDir={}),
        "/models must come from the PVC servekit-models"),
    "no gpu": (lambda d: _ctr(d)["resources"]["limits"].pop("nvidia.com/gpu"),
               "the gpu variant needs a nvidia.com/gpu limit"),
    "no HPA": (lambda d: d.remove(next(x for x in d if x["kind"] == "HorizontalPodAutoscaler")),
               "missing HorizontalPodAutoscaler"),
    "no PDB": (lambda d: d.remove(next(x for x in d if x["kind"] == "PodDisruptionBudget")),
               "missing PodDisruptionBudget"),
    "no NetworkPolicy": (lambda d: d.remove(next(x for x in d if x["kind"] == "NetworkPolicy")),
                         "missing NetworkPolicy"),
    "network policy opens 8081": (
        lambda d: next(x for x in d if x["kind"] == "NetworkPolicy")["spec"]["ingress"].append(
            {"ports": [{"port": 8081}]}),
        "NetworkPolicy: ingress only to 8080 and 8082"),
    "egress opened": (
        lambda d: next(x for x in d if x["kind"] == "NetworkPolicy")["spec"].update(egress=[{}]),
        "NetworkPolicy: egress beyond DNS"),
    "management on all interfaces": (
        lambda d: _set_prop(d, "management_address", "http://0.0.0.0:8081"),
        "management_address must be on 127.0.0.1"),
    "token auth disabled": (
        lambda d: _set_prop(d, "disable_token_authorization", "true"),
        "token authorization must not be disabled"),
    "no OMP_NUM_THREADS": (lambda d: _ctr(d).update(env=[]), "OMP_NUM_THREADS must be set explicitly"),
    "no memory limit": (lambda d: _ctr(d)["resources"]["limits"].pop("memory"), "no memory limits"),
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
    assert any("the cpu variant must not ask for nvidia.com/gpu" in p for p in problems), problems
    assert any("the cpu variant must not target GPU nodes" in p for p in problems), problems


def test_rule_checker_catches_bare_service() -> None:
    """Without any rendering: a lone Service on 8081 is reported, and so is all that is missing."""
    docs = [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "leak"},
             "spec": {"selector": {"app": "x"}, "ports": [{"port": 8081}]}}]
    problems = check_rules(copy.deepcopy(docs), "gpu")
    assert any(p.startswith("Service leak: exposes the management port") for p in problems)
    assert "missing Deployment" in problems and "missing NetworkPolicy" in problems
