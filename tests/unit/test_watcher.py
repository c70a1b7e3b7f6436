"""The watcher's decisions against a fake TorchServe: what it registers, makes default, refuses and retires."""

from __future__ import annotations

import json
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from servekit.reload.capacity import DeviceFigures
from servekit.reload.pins import Pin, VersionsFile, choose_version
from servekit.reload.switch import Reloader, SwitchOptions
from servekit.reload.watcher import Watcher
from servekit.server import ServerConfig
from servekit.store import publish

MIB = 1 << 20


@dataclass
class Answer:
    """Just what the watcher reads from an HTTP answer."""

    status_code: int
    body: dict = field(default_factory=dict)
    headers: dict = field(default_factory=dict)

    def json(self) -> dict:
        return self.body

    @property
    def text(self) -> str:
        return json.dumps(self.body)


class FakeTorchServe:
    """The management and inference API calls the watcher makes, over an in-memory registry."""

    def __init__(self, fail_register: set[str] | None = None):
        self.registry: dict[str, dict[str, dict]] = {}  # model -> version -> {"workers", "default", "url"}
        self.fail_register = fail_register or set()
        self.calls: list[tuple] = []
        self.base = "fake://"

    # management
    def register(self, url, initial_workers=None, synchronous=True, timeout=0.0):
        name, version = url[: -len(".mar")].rsplit("-v", 1)
        self.calls.append(("register", name, version, initial_workers))
        if version in self.fail_register:
            return Answer(500, {"message": "Failed to start workers"})
        versions = self.registry.setdefault(name, {})
        versions[version] = {"workers": initial_workers or 1, "default": not versions, "url": url}
        return Answer(200)

    def describe(self, model, version="all"):
        versions = self.registry.get(model, {})
        if version == "":
            version = next((v for v, d in versions.items() if d["default"]), None)
        picked = versions.items() if version == "all" else [(version, versions[version])] if version in versions else []
        workers = [{"status": "READY", "pid": 100 + i, "memoryUsage": 500 * MIB} for i in range(8)]
        return [
            {
                "modelName": model,
                "modelVersion": v,
                "modelUrl": d["url"],
                "minWorkers": d["workers"],
                "workers": workers[: d["workers"]],
                "jobQueueStatus": {"pendingRequests": 0},
            }
            for v, d in picked
        ]

    def set_default(self, model, version):
        self.calls.append(("set_default", model, version))
        for v, d in self.registry[model].items():
            d["default"] = v == version
        return Answer(200)

    def unregister(self, model, version=None, timeout=0.0):
        self.calls.append(("unregister", model, version))
        self.registry.get(model, {}).pop(version, None)
        if not self.registry.get(model):
            self.registry.pop(model, None)
        return Answer(200)

    def scale(self, *a, **kw):
        return Answer(200)

    def models(self):
        return [{"modelName": m} for m in self.registry]

    # inference (the warm-up)
    def predict(self, model, body, content_type, version=None):
        self.calls.append(("warmup", model, version))
        return Answer(200, {"predictions": [{"label": "7"}]}, {"X-Model-Version": version})


class FakeProbe:
    def __init__(self, free: int):
        self.free = free

    def figures(self, workers):
        return [DeviceFigures("cuda:0", self.free, 2000 * MIB, len(workers))]


def write_archive(store: Path, name: str, version: str) -> Path:
    path = store / f"{name}-v{version}.mar"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": name, "modelVersion": version}}))
    return path


@pytest.fixture
def setup(tmp_path):
    store, run = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    run.mkdir()
    (tmp_path / "config.properties").write_text(
        "management_address=http://127.0.0.1:1\ninference_address=http://127.0.0.1:2\n"
    )

    def make(fake: FakeTorchServe, probe=None, pins: dict | None = None) -> Watcher:
        cfg = ServerConfig(run, store, tmp_path / "config.properties", {"disable_token_authorization": "true"})
        reloader = Reloader(cfg, SwitchOptions(drain_grace=0), probe=probe)
        reloader.mgmt = fake  # type: ignore[assignment]
        reloader.inference = fake  # type: ignore[assignment]
        versions = VersionsFile(run / "model-versions.yaml")
        if pins:
            versions.write(pins)
        watcher = Watcher(reloader, store, versions, interval=0.0)
        reloader.status.load()
        return watcher

    return store, make


def tick(watcher: Watcher, times: int = 2) -> None:
    for _ in range(times):  # the first poll only sees a file; the next one takes it (settled)
        watcher.tick()


def registered(fake: FakeTorchServe, model: str = "digits") -> tuple[list[str], str | None]:
    versions = fake.registry.get(model, {})
    return sorted(versions), next((v for v, d in versions.items() if d["default"]), None)


def test_new_model_then_new_version_switches_and_retires(setup):
    store, make = setup
    fake = FakeTorchServe()
    watcher = make(fake)
    write_archive(store, "digits", "1.0")
    tick(watcher)
    assert registered(fake) == (["1.0"], "1.0")
    fake.registry["digits"]["1.0"]["workers"] = 3
    write_archive(store, "digits", "2.0")
    fake.calls.clear()
    tick(watcher)
    assert registered(fake) == (["2.0"], "2.0")
    assert fake.calls == [
        ("register", "digits", "2.0", 3),
        ("warmup", "digits", "2.0"),
        ("set_default", "digits", "2.0"),
        ("unregister", "digits", "1.0"),
    ]
    assert watcher.reloader.status.model("digits")["last_event"]["event"] == "default"


def test_declared_pin_holds_a_version(setup):
    store, make = setup
    fake = FakeTorchServe()
    watcher = make(fake, pins={"digits": Pin("1.0")})
    write_archive(store, "digits", "1.0")
    write_archive(store, "digits", "2.0")
    tick(watcher, 3)
    assert registered(fake) == (["1.0"], "1.0")
    watcher.versions.write({"digits": Pin("2.0")})
    tick(watcher, 1)
    assert registered(fake) == (["2.0"], "2.0")


def test_failed_version_is_recorded_once_and_the_old_one_keeps_serving(setup):
    store, make = setup
    fake = FakeTorchServe(fail_register={"2.0"})
    watcher = make(fake)
    write_archive(store, "digits", "1.0")
    tick(watcher)
    write_archive(store, "digits", "2.0")
    tick(watcher, 4)
    assert registered(fake) == (["1.0"], "1.0")
    assert [c for c in fake.calls if c[0] == "register" and c[2] == "2.0"] == [("register", "digits", "2.0", 1)]
    failure = watcher.reloader.status.data["failed_archives"]["digits-v2.0.mar"]
    assert "Failed to start workers" in failure["reason"]


def test_no_room_refuses_the_new_version(setup):
    store, make = setup
    fake = FakeTorchServe()
    watcher = make(fake, probe=FakeProbe(free=3000 * MIB))  # 2000 MiB per worker + 20 % does not fit twice
    write_archive(store, "digits", "1.0")
    tick(watcher)
    fake.registry["digits"]["1.0"]["workers"] = 2
    write_archive(store, "digits", "2.0")
    tick(watcher, 3)
    assert registered(fake) == (["1.0"], "1.0")
    assert not [c for c in fake.calls if c[0] == "register" and c[2] == "2.0"], "registered without room"
    event = watcher.reloader.status.model("digits")["last_event"]
    assert event["event"] == "refused" and "not enough memory on cuda:0" in event["message"]


def test_removed_archive_unregisters_its_version(setup):
    store, make = setup
    fake = FakeTorchServe()
    watcher = make(fake)
    write_archive(store, "digits", "1.0")
    tick(watcher)
    fake.register("digits-v2.0.mar", 1)  # registered by hand, not the default
    write_archive(store, "digits", "2.0").unlink()
    tick(watcher)
    assert registered(fake) == (["1.0"], "1.0")
    (store / "digits-v1.0.mar").unlink()
    tick(watcher)
    assert registered(fake) == ([], None)


def test_an_archive_published_by_rename_is_taken_on_the_next_poll(setup, tmp_path):
    """The file event of an atomic publish skips the settle wait; a file written in place still waits."""
    store, make = setup
    fake = FakeTorchServe()
    watcher = make(fake)
    watcher.scanner.settle = 60.0  # as if polls were slow: only the event can make v1 count at once
    observer = watcher._observe()
    assert observer is not None, "watchdog is a dependency"
    try:
        aside = tmp_path / "aside"
        aside.mkdir()
        publish(write_archive(aside, "digits", "1.0"), store)
        assert watcher.wake.wait(10), "no file event woke the watcher"
        threading.Event().wait(0.2)  # the event thread may still be handling the rename
        watcher.tick()
        assert registered(fake) == (["1.0"], "1.0")
        write_archive(store, "digits", "2.0")  # written in place, no rename: it must settle first
        watcher.tick()
        assert registered(fake) == (["1.0"], "1.0")
    finally:
        observer.stop()
        observer.join(timeout=5)


def test_pins_hold_until_a_newer_version_arrives():
    assert choose_version([], None) is None
    assert choose_version(["1.0", "2.0", "10.0", "9.5"], None) == "10.0"
    pin = Pin("1.0", until_newer_than="2.0")
    assert choose_version(["1.0", "2.0"], pin) == "1.0"
    assert choose_version(["1.0", "2.0", "1.5"], pin) == "1.0", "an older publish released the pin"
    assert choose_version(["1.0", "2.0", "2.1"], pin) == "2.1"
    assert choose_version(["2.0", "3.0"], pin) == "3.0", "a pin on a version no longer usable held"
