"""The rendered CPU overlay as pods under ``podman kube play``, with what podman 4.3 needs changed.

podman 4.3 plays a Deployment as one pod, mounts a PersistentVolumeClaim as the named volume of the
same name, reads ConfigMaps from ``--configmap`` and runs an httpGet liveness probe as curl in the
container. It does not mount Secret volumes (it crashes) and copies ConfigMaps once at start. So,
as the kubelet would: the Secret's files are projected into a host folder (edited in place to
rotate keys, as the kubelet swaps a Secret's files), one more key comes from a podman secret by
``secretKeyRef`` (which podman supports), and the versions ConfigMap is a host folder too
(edited to roll versions out). podman 4.3 also makes an emptyDir the named volume of the
volume's own name, one for every pod that names it: two pods would share their run dir and /tmp,
so their TorchServes would bind each other's worker sockets. Each pod's emptyDirs are volumes of
its own instead. CPU limits are cut to fit the 2-core test machine, and the containerPorts
dropped: podman 4.3 would publish them on the host's own ports, so two pods clash.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import requests
import yaml

from .podman import podman

SERVICE_KEY_NAME = "service"


def _docs(rendered: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(rendered) if d]


def write_atomic(path: Path, text: str) -> None:
    """Replace a file by rename, as the kubelet updates a mounted ConfigMap or Secret."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o644)
    os.replace(tmp, path)


@dataclass
class Pod:
    """One played pod: its name, address and containers."""

    name: str
    ip: str = ""
    tag: str = ""

    @property
    def url(self) -> str:
        return f"http://{self.ip}:8080"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ip}:8082"

    def container(self, which: str) -> str:
        return f"{self.name}-pod-0-{which}"

    def logs(self, which: str) -> str:
        proc = podman("logs", self.container(which), check=False, timeout=60)
        return proc.stdout + proc.stderr

    def restarts(self, which: str = "servekit") -> int:
        """How many times podman restarted the container (by the pod's restartPolicy)."""
        return int(podman("inspect", self.container(which), "--format", "{{.RestartCount}}").stdout.strip())

    def java_pid(self) -> str:
        """The PID (in the pod) of TorchServe's frontend."""
        top = podman("top", self.container("servekit"), "pid", "args").stdout.splitlines()
        return next(line.split(None, 1)[0] for line in top[1:] if "java" in line)


@dataclass
class Cluster:
    """Pods playing the rendered overlay over one shared store, keys folder and versions file."""

    work: Path
    image: str
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    pods: list[Pod] = field(default_factory=list)
    configmap_volumes: set[str] = field(default_factory=set)
    scratch_volumes: list[str] = field(default_factory=list)  # the pods' emptyDirs

    @property
    def volume(self) -> str:
        return f"servekit-models-{self.tag}"

    @property
    def secret(self) -> str:
        return f"servekit-api-keys-{self.tag}"

    @property
    def keys_dir(self) -> Path:
        return self.work / "keys"

    @property
    def versions_file(self) -> Path:
        return self.work / "versions" / "model-versions.yaml"

    def store(self) -> Path:
        """The shared store volume's folder on this host."""
        return Path(podman("volume", "inspect", self.volume, "--format", "{{.Mountpoint}}").stdout.strip())

    def prepare(self, keys: dict[str, str], service_key: str, versions: str) -> None:
        """The store volume, the keys folder, the podman secret and the versions file."""
        podman("volume", "create", self.volume)
        os.chown(self.store(), 10001, 10001)
        self.keys_dir.mkdir(parents=True)
        for name, key in keys.items():
            write_atomic(self.keys_dir / name, key)
        self.keys_dir.chmod(0o755)
        self.versions_file.parent.mkdir(parents=True)
        self.versions_file.parent.chmod(0o755)
        write_atomic(self.versions_file, versions)
        secret = self.work / "secret.json"
        secret.write_text(json.dumps({SERVICE_KEY_NAME: base64.b64encode(service_key.encode()).decode()}))
        podman("secret", "create", self.secret, str(secret))

    def pod_yaml(self, rendered: str, name: str) -> tuple[str, str]:
        """(the Deployment, its ConfigMaps) for podman, from the rendered overlay."""
        docs = _docs(rendered)
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
        dep["metadata"]["name"] = name
        spec = dep["spec"]["template"]["spec"]
        for c in spec["containers"]:
            c["image"], c["imagePullPolicy"] = self.image, "Never"
            # podman 4.3 publishes a containerPort on the host's same port: pods are reached by their IP.
            c.pop("ports", None)
            for part in ("requests", "limits"):
                c["resources"][part]["cpu"] = "1" if c["name"] == "servekit" else "500m"
            if c["name"] == "proxy":
                c["env"].append(
                    {
                        "name": "SERVEKIT_API_KEYS",
                        "valueFrom": {"secretKeyRef": {"name": self.secret, "key": SERVICE_KEY_NAME}},
                    }
                )
        for v in spec["volumes"]:
            if "secret" in v:
                del v["secret"]
                v["hostPath"] = {"path": str(self.keys_dir), "type": "Directory"}
            elif v["name"] == "versions":
                del v["configMap"]
                v["hostPath"] = {"path": str(self.versions_file.parent), "type": "Directory"}
            elif "persistentVolumeClaim" in v:
                v["persistentVolumeClaim"]["claimName"] = self.volume
            elif "emptyDir" in v:
                del v["emptyDir"]
                v["persistentVolumeClaim"] = {"claimName": f"{name}-{v['name']}"}
        return yaml.safe_dump(dep), yaml.safe_dump_all(configmaps)

    def scratch(self, pod_text: str) -> None:
        """A pod's own empty volumes for its emptyDirs, writable by every user as the kubelet makes them."""
        for v in yaml.safe_load(pod_text)["spec"]["template"]["spec"]["volumes"]:
            claim = v.get("persistentVolumeClaim", {}).get("claimName", "")
            if claim and claim != self.volume:
                podman("volume", "create", claim)
                self.scratch_volumes.append(claim)
                mountpoint = podman("volume", "inspect", claim, "--format", "{{.Mountpoint}}").stdout.strip()
                os.chmod(mountpoint, 0o777)

    def play(self, rendered: str, names: list[str]) -> None:
        """Play one pod per name."""
        for name in names:
            pod_file, cm_file = self.work / f"{name}.yaml", self.work / f"{name}-configmaps.yaml"
            pod_text, cm_text = self.pod_yaml(rendered, name)
            pod_file.write_text(pod_text)
            cm_file.write_text(cm_text)
            self.scratch(pod_text)
            podman("kube", "play", "--configmap", str(cm_file), str(pod_file), timeout=300)
            # podman makes a named volume per ConfigMap and keeps it after the pod is gone.
            self.configmap_volumes |= {d["metadata"]["name"] for d in _docs(cm_text)}
            infra = podman("pod", "inspect", f"{name}-pod-0", "--format", "{{.InfraContainerID}}").stdout.strip()
            ip = podman("inspect", infra, "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
            self.pods.append(Pod(name, ip.stdout.strip(), self.tag))

    def wait_ready(self, timeout: float = 600) -> dict[str, list[int]]:
        """Poll every pod's probe path until 200; the statuses each pod answered before it."""
        seen: dict[str, list[int]] = {p.name: [] for p in self.pods}
        deadline = time.monotonic() + timeout
        waiting = list(self.pods)
        while waiting:
            for pod in list(waiting):
                try:
                    status = requests.get(pod.url + "/healthz/ready", timeout=10).status_code
                except requests.RequestException:
                    status = 0
                seen[pod.name].append(status)
                if status == 200:
                    waiting.remove(pod)
            if waiting and time.monotonic() > deadline:
                raise AssertionError(
                    f"not ready after {timeout:.0f} s: {[p.name for p in waiting]}\n"
                    + "\n".join(p.logs("servekit")[-3000:] for p in waiting)
                )
            time.sleep(1.0)
        return seen

    def teardown(self) -> None:
        for pod in self.pods:
            podman("pod", "rm", "--force", f"{pod.name}-pod-0", check=False, timeout=120)
        for volume in (self.volume, *self.scratch_volumes, *sorted(self.configmap_volumes)):
            podman("volume", "rm", "--force", volume, check=False)
        podman("secret", "rm", self.secret, check=False)
