"""Our deployment rules for a rendered overlay: ``check_rules(docs, variant)`` lists every violation."""

from __future__ import annotations

from pathlib import Path

UID = 10001
RUN_DIR = "/run/servekit"
CONFIG = "/etc/servekit/config.properties"
MODEL_STORE = "/models"
PVC_NAME = "servekit-models"
SECRET_NAME = "servekit-api-keys"
VERSIONS_CM = "servekit-versions"
INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT = 8080, 8081, 8082
GPU = "nvidia.com/gpu"
PROXY, SERVER = "proxy", "servekit"
# (container, probe) -> the path it must ask for on the proxy's port.
PROBE_PATHS = {
    (PROXY, "startupProbe"): "/healthz/proxy",
    (PROXY, "readinessProbe"): "/healthz/ready",
    (PROXY, "livenessProbe"): "/healthz/proxy",
    (SERVER, "startupProbe"): "/healthz/ready",
    (SERVER, "readinessProbe"): "/healthz/ready",
    (SERVER, "livenessProbe"): "/healthz/live",
}


def properties(text: str) -> dict[str, str]:
    """A Java properties text as a dict."""
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


def check_probes(where: str, name: str, container: dict, named_ports: dict[str, int]) -> list[str]:
    """HTTP probes on the proxy's inference port, each on its path: no command, no key file."""
    problems = []
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        if not probe:
            problems.append(f"{where}: no {kind}")
            continue
        get = probe.get("httpGet")
        if not get or set(probe) & {"exec", "tcpSocket", "grpc"}:
            problems.append(f"{where}: {kind} must be an httpGet probe (no command, no key file)")
            continue
        if _port_number(get.get("port"), named_ports) != INFERENCE_PORT:
            problems.append(f"{where}: {kind} must ask the proxy on {INFERENCE_PORT}")
        want = PROBE_PATHS.get((name, kind))
        if want and get.get("path") != want:
            problems.append(f"{where}: {kind} must ask for {want}, not {get.get('path')}")
    return problems


def check_security(where: str, pod_sc: dict, container: dict) -> list[str]:
    """Non-root, read-only root, no privilege, no capabilities, RuntimeDefault seccomp."""
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


def check_resources(where: str, variant: str, c: dict) -> list[str]:
    """Requests and limits for CPU and memory; a GPU only in the gpu variant's server container."""
    problems = []
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        for res in ("cpu", "memory"):
            if res not in (resources.get(part) or {}):
                problems.append(f"{where}: no {res} {part}")
    gpu_limit = (resources.get("limits") or {}).get(GPU)
    gpu_anywhere = GPU in (resources.get("limits") or {}) or GPU in (resources.get("requests") or {})
    if variant == "gpu" and c.get("name") == SERVER and not (gpu_limit and int(gpu_limit) >= 1):
        problems.append(f"{where}: the gpu variant needs a {GPU} limit")
    if (variant == "cpu" or c.get("name") == PROXY) and gpu_anywhere:
        problems.append(f"{where}: the {variant} variant's {c.get('name')} must not ask for {GPU}")
    return problems


def _env(c: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in c.get("env") or []}


def check_proxy(where: str, c: dict, volumes: dict[str, dict]) -> list[str]:
    """The client keys come from the Secret (a volume at SERVEKIT_KEYS_DIR, or env from secretKeyRef)."""
    env = _env(c)
    keys_dir = (env.get("SERVEKIT_KEYS_DIR") or {}).get("value", "/etc/servekit/api-keys")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    volume = volumes.get(mounts.get(keys_dir, {}).get("name"), {})
    from_volume = (volume.get("secret") or {}).get("secretName") == SECRET_NAME
    from_env = (((env.get("SERVEKIT_API_KEYS") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}).get(
        "name"
    ) == SECRET_NAME
    if not (from_volume or from_env):
        return [f"{where}: client keys must come from the Secret {SECRET_NAME} (mounted at {keys_dir})"]
    if (env.get("SERVEKIT_API_KEYS") or {}).get("value"):
        return [f"{where}: client keys must not be written into the manifest"]
    return []


def check_server(where: str, c: dict, volumes: dict[str, dict], configmaps: dict[str, dict]) -> list[str]:
    """No ports of its own; store, scratch, config and versions volumes; TorchServe on loopback only."""
    problems = []
    if c.get("ports"):
        problems.append(f"{where}: TorchServe listens on loopback; the container declares no ports")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
    store = volumes.get(mounts.get(MODEL_STORE, {}).get("name"), {})
    if (store.get("persistentVolumeClaim") or {}).get("claimName") != PVC_NAME:
        problems.append(f"{where}: {MODEL_STORE} must come from the PVC {PVC_NAME}")
    for path in (RUN_DIR, "/tmp", "/home/servekit"):
        if "emptyDir" not in volumes.get(mounts.get(path, {}).get("name"), {}):
            problems.append(f"{where}: {path} must be an emptyDir mount")
    versions = (_env(c).get("SERVEKIT_VERSIONS") or {}).get("value", "")
    mount = mounts.get(str(Path(versions).parent), {})
    if (volumes.get(mount.get("name"), {}).get("configMap") or {}).get("name") != VERSIONS_CM:
        problems.append(f"{where}: SERVEKIT_VERSIONS must be a file of the ConfigMap {VERSIONS_CM}")
    config = volumes.get(mounts.get(str(Path(CONFIG).parent), {}).get("name"), {})
    cm = configmaps.get((config.get("configMap") or {}).get("name"))
    if not cm or "config.properties" not in (cm.get("data") or {}):
        return problems + [f"{where}: /etc/servekit must be the ConfigMap with config.properties"]
    props = properties(cm["data"]["config.properties"])
    for key in ("inference_address", "management_address", "metrics_address"):
        if not props.get(key, "").startswith("http://127.0.0.1:"):
            problems.append(f"config.properties: {key} must be on 127.0.0.1 (the proxy is the way in)")
    for key in ("grpc_inference_address", "grpc_management_address"):
        if props.get(key) != "127.0.0.1":
            problems.append(f"config.properties: {key} must be 127.0.0.1")
    return problems


def check_pod(
    name: str, variant: str, pod: dict, configmaps: dict[str, dict], named_ports: dict[str, int]
) -> list[str]:
    """The pod spec: proxy + server containers, each held to the rules."""
    problems = []
    pod_sc = pod.get("securityContext") or {}
    if pod_sc.get("fsGroup") != UID:
        problems.append(f"Deployment {name}: fsGroup must be {UID}")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append(f"Deployment {name}: automountServiceAccountToken must be false")
    if (pod.get("terminationGracePeriodSeconds") or 30) < 30:
        problems.append(f"Deployment {name}: terminationGracePeriodSeconds too short")
    tolerations = pod.get("tolerations") or []
    if variant == "cpu" and (
        any(t.get("key") == GPU for t in tolerations) or GPU + ".present" in (pod.get("nodeSelector") or {})
    ):
        problems.append(f"Deployment {name}: the cpu variant must not target GPU nodes")
    if variant == "gpu" and not pod.get("nodeSelector"):
        problems.append(f"Deployment {name}: the gpu variant needs a GPU nodeSelector")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    containers = {c.get("name"): c for c in pod.get("containers") or []}
    if set(containers) != {PROXY, SERVER}:
        problems.append(f"Deployment {name}: containers must be {PROXY} and {SERVER}, got {sorted(containers)}")
    for c in containers.values():
        for port in c.get("ports") or []:
            named_ports[port.get("name", "")] = port.get("containerPort")
    for cname, c in containers.items():
        where = f"Deployment {name} container {cname}"
        for port in c.get("ports") or []:
            if port.get("containerPort") == MANAGEMENT_PORT or "manag" in port.get("name", ""):
                problems.append(f"{where}: exposes the management port ({port})")
        problems += check_probes(where, cname, c, named_ports)
        problems += check_security(where, pod_sc, c)
        problems += check_resources(where, variant, c)
        if not ((c.get("lifecycle") or {}).get("preStop") or {}).get("exec"):
            problems.append(f"{where}: needs an exec preStop hook")
        if not (_env(c).get("OMP_NUM_THREADS") or {}).get("value"):
            problems.append(f"{where}: OMP_NUM_THREADS must be set explicitly")
        if cname == PROXY:
            problems += check_proxy(where, c, volumes)
        elif cname == SERVER:
            problems += check_server(where, c, volumes, configmaps)
    return problems


def check_rules(docs: list[dict], variant: str) -> list[str]:
    """Our deployment rules for one rendered overlay; returns the violations (empty: all good)."""
    problems: list[str] = []
    by_kind: dict[str, list[dict]] = {}
    for doc in docs:
        by_kind.setdefault(doc.get("kind", "?"), []).append(doc)
    for kind in (
        "Deployment",
        "Service",
        "ConfigMap",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
        "PodMonitor",
        "PrometheusRule",
    ):
        if not by_kind.get(kind):
            problems.append(f"missing {kind}")
    if by_kind.get("PersistentVolumeClaim"):
        problems.append("the app must not own a PersistentVolumeClaim (the store is k8s/store)")
    if by_kind.get("Secret"):
        problems.append("the app must not carry a Secret (the keys are made by hand, never committed)")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        if hpa.get("apiVersion") != "autoscaling/v2":
            problems.append("HorizontalPodAutoscaler must be autoscaling/v2")
        kinds = {m.get("type") for m in (hpa.get("spec") or {}).get("metrics") or []}
        if not kinds & {"Pods", "Object", "External"}:
            problems.append("HorizontalPodAutoscaler must scale on a serving signal (a Pods metric), not CPU alone")
    for sa in by_kind.get("ServiceAccount", []):
        if sa.get("automountServiceAccountToken") is not False:
            problems.append(f"ServiceAccount {sa['metadata']['name']}: automountServiceAccountToken must be false")
    configmaps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    if VERSIONS_CM not in configmaps:
        problems.append(f"missing ConfigMap {VERSIONS_CM} (a fixed name: a change must not roll the pods)")
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
        if (
            annotations.get("prometheus.io/scrape"),
            annotations.get("prometheus.io/port"),
            annotations.get("prometheus.io/path"),
        ) != ("true", str(METRICS_PORT), "/metrics"):
            problems.append(f"Deployment {name}: pods need the prometheus.io scrape annotations for {METRICS_PORT}")
        problems += check_pod(name, variant, template.get("spec", {}), configmaps, named_ports)
    problems += check_network(by_kind, pod_labels, named_ports)
    for monitor in by_kind.get("PodMonitor", []):
        spec = monitor.get("spec") or {}
        if not any(_matches(spec.get("selector"), lab) for lab in pod_labels):
            problems.append("PodMonitor: selector does not select the pods")
        for endpoint in spec.get("podMetricsEndpoints") or []:
            if _port_number(endpoint.get("port"), named_ports) != METRICS_PORT:
                problems.append(f"PodMonitor: scrapes only the metrics port {METRICS_PORT} ({endpoint})")
    return problems


def check_network(by_kind: dict[str, list[dict]], pod_labels: list[dict], named_ports: dict[str, int]) -> list[str]:
    """Service on the inference port only; ingress to inference and metrics only; no egress."""
    problems = []
    for svc in by_kind.get("Service", []):
        name = svc["metadata"]["name"]
        for port in svc.get("spec", {}).get("ports") or []:
            numbers = {port.get("port"), _port_number(port.get("targetPort", port.get("port")), named_ports)}
            if (
                MANAGEMENT_PORT in numbers
                or "manag" in str(port.get("name", ""))
                or "manag" in str(port.get("targetPort", ""))
            ):
                problems.append(f"Service {name}: exposes the management port ({port})")
            elif numbers != {INFERENCE_PORT}:
                problems.append(f"Service {name}: may expose only {INFERENCE_PORT} ({port})")
        if svc.get("spec", {}).get("type", "ClusterIP") != "ClusterIP":
            problems.append(f"Service {name}: must be ClusterIP")
        if not any(_matches({"matchLabels": svc.get("spec", {}).get("selector")}, lab) for lab in pod_labels):
            problems.append(f"Service {name}: selector does not select the pods")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(_matches(pdb.get("spec", {}).get("selector"), lab) for lab in pod_labels):
            problems.append("PodDisruptionBudget: selector does not select the pods")
    for policy in by_kind.get("NetworkPolicy", []):
        spec = policy.get("spec", {})
        if not any(_matches(spec.get("podSelector"), lab) for lab in pod_labels):
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
