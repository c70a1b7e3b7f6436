"""What the management API may reach: model URLs and directories only from the store, the model API
and workflows locked down, keys that expire and rotate."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest
import requests

from conftest import start_server
from servekit import server
from servekit.client import wait_until
from support.rel_support import (
    assert_serves,
    digit_samples,
    top_label,
)

pytestmark = pytest.mark.server


def _refused(resp: requests.Response) -> bool:
    """TorchServe 0.12 refuses a missing or wrong key with 400 InvalidKeyException (later releases: 401)."""
    return resp.status_code == 401 or (resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException")


@pytest.fixture(scope="module")
def url_server(tmp_path_factory, archives):
    """digits v1.0; an archive and an unpacked archive (v2.0) outside the store."""
    tmp = tmp_path_factory.mktemp("url-server")
    srv = start_server(tmp, archives, {"digits": "digits-v1.0.mar"})
    outside = tmp / "outside"
    (outside / "unpacked").mkdir(parents=True)
    shutil.copy2(archives / "digits-v2.0.mar", outside / "digits-v2.0.mar")
    with zipfile.ZipFile(archives / "digits-v2.0.mar") as zf:
        zf.extractall(outside / "unpacked")
    yield srv, outside
    server.stop(srv.cfg.run_dir)


def _listing(path: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*"))


def _register_raw(srv, query: str) -> requests.Response:
    """POST /models with a query string sent exactly as given (no client-side encoding)."""
    base = srv.cfg.address("management_address")
    return requests.post(f"{base}/models?{query}", headers=srv.cfg.tokens.header("management"), timeout=120)


def test_model_urls_outside_the_store_are_refused(url_server):
    srv, outside = url_server
    store = srv.cfg.model_store
    before = _listing(store)
    mar = outside / "digits-v2.0.mar"
    urls = [
        "../outside/digits-v2.0.mar",
        f"{store}/../outside/digits-v2.0.mar",
        str(mar),
        f"file://{mar}",
        f"file://{store}/../outside/digits-v2.0.mar",
        f"file://{outside / 'unpacked'}",
        "http://127.0.0.1:9/digits-v2.0.mar",
        "https://127.0.0.1:9/digits-v2.0.mar",
        "file:///etc/passwd",
    ]
    for url in urls:
        resp = srv.management.register(url, initial_workers=1, timeout=120)
        assert 400 <= resp.status_code < 500, f"{url}: {resp.status_code} {resp.text[:200]}"
    # Encoded traversal, decoded once by the server ("../") and sent double-encoded (stays literal).
    for query in (
        "url=%2e%2e%2foutside%2fdigits-v2.0.mar",
        "url=%252e%252e%252foutside%252fdigits-v2.0.mar",
        "url=..%2F..%2Fetc%2Fpasswd",
    ):
        resp = _register_raw(srv, query)
        assert 400 <= resp.status_code < 500, f"{query}: {resp.status_code} {resp.text[:200]}"
    assert _listing(store) == before
    assert [(m["modelName"], m["modelUrl"]) for m in srv.management.models()] == [("digits", "digits-v1.0.mar")]
    assert [d["modelVersion"] for d in srv.management.describe("digits")] == ["1.0"]
    assert_serves(srv.inference)


@pytest.mark.xfail(
    strict=True,
    reason="TorchServe 0.12 loads an absolute directory path from anywhere "
    "(ModelArchive.downloadModel); residual risk, see SECURITY.md",
)
def test_directory_outside_the_store_is_refused(url_server):
    srv, outside = url_server
    before = _listing(srv.cfg.model_store)
    try:
        resp = srv.management.register(str(outside / "unpacked"), initial_workers=1, timeout=120)
        assert _listing(srv.cfg.model_store) == before, "something was copied into the store"
        assert 400 <= resp.status_code < 500, f"{resp.status_code} {resp.text[:200]}"
    finally:
        srv.management.unregister("digits", "2.0")
        assert_serves(srv.inference)


def test_directory_load_needs_loopback_and_management_key(url_server):
    """The mitigations for the residual directory-URL risk: only a management-key holder on this host can
    register, and a wrong key or no key is refused before any path is looked at."""
    srv, outside = url_server
    base = srv.cfg.address("management_address")
    assert base.startswith("http://127.0.0.1:")
    for headers in ({}, {"Authorization": "Bearer wrong"}, srv.cfg.tokens.header("inference")):
        resp = requests.post(f"{base}/models", params={"url": str(outside / "unpacked")}, headers=headers, timeout=60)
        assert _refused(resp), resp.text
    assert [d["modelVersion"] for d in srv.management.describe("digits")] == ["1.0"]


# -- 11-12. model API disabled, expiring and rotated keys ---------------------------------------


def _rotate(cfg: server.ServerConfig, kind: str) -> None:
    """New key of ``kind`` through the token API (the API key does not expire)."""
    api = cfg.tokens.keys(force=True).api
    resp = requests.post(
        cfg.address("management_address") + "/token",
        params={"type": kind},
        headers={"Authorization": f"Bearer {api}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory, archives):
    """Model API off and keys that expire after 6 s; started and kept ready by rotating through the token API."""
    tmp = tmp_path_factory.mktemp("locked-server")
    store = tmp / "store"
    store.mkdir()
    shutil.copy2(archives / "digits-v1.0.mar", store)
    from conftest import port_overrides

    cfg = server.ServerConfig(
        tmp / "run", store, overrides={**port_overrides(), "enable_model_api": "false", "token_expiration_min": "0.1"}
    )
    proc = server.start(cfg, {"digits": "digits-v1.0.mar"}, log=lambda *_: None)

    def ready() -> bool:
        assert proc.poll() is None, "TorchServe exited"
        if not (cfg.run_dir / "key_file.json").exists():
            return False
        _rotate(cfg, "management")
        _rotate(cfg, "inference")
        described = cfg.management().describe("digits", "")
        return bool(described) and any(w["status"] == "READY" for w in described[0]["workers"])

    try:
        wait_until(ready, 300, interval=1, what="the locked server")
        yield cfg
    finally:
        server.stop(cfg.run_dir)


def test_model_api_disabled_refuses_register_and_unregister(locked_server, url_server):
    cfg = locked_server
    _, outside = url_server
    _rotate(cfg, "management")
    mgmt = cfg.management()
    for url in ("digits-v1.0.mar", str(outside / "unpacked")):
        assert mgmt.register(url, initial_workers=1).status_code == 405
    assert mgmt.unregister("digits", "1.0").status_code == 405
    assert mgmt.unregister("digits").status_code == 405
    assert [d["modelVersion"] for d in mgmt.describe("digits")] == ["1.0"]
    _rotate(cfg, "inference")
    assert_serves(cfg.inference())


def test_workflow_api_reads_only_the_store(locked_server, url_server):
    """The workflow API stays on with the model API off; it still takes nothing from outside the store."""
    _, outside = url_server
    _rotate(locked_server, "management")
    mgmt = locked_server.management()
    for url in (
        str(outside / "unpacked"),
        str(outside / "digits-v2.0.mar"),
        "http://127.0.0.1:9/x.war",
        f"file://{outside}/x.war",
        "../outside/x.war",
    ):
        resp = mgmt.request("POST", "/workflows", params={"url": url})
        assert resp.status_code == 404, f"{url}: {resp.status_code} {resp.text[:200]}"
    assert mgmt.request("GET", "/workflows").json()["workflows"] == []
    assert [d["modelVersion"] for d in mgmt.describe("digits")] == ["1.0"]


def test_expired_and_rotated_keys(locked_server):
    cfg = locked_server
    base = cfg.address("inference_address")
    body, label = digit_samples(1)[0]
    _rotate(cfg, "inference")
    client = cfg.inference()
    assert top_label(client.predict("digits", body, "image/png")) == label
    old = cfg.tokens.keys(force=True).inference

    def raw(key: str) -> requests.Response:
        return requests.post(
            base + "/predictions/digits",
            data=body,
            timeout=30,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"},
        )

    wait_until(lambda: _refused(raw(old)), 30, what="the inference key to expire")
    assert _refused(client.predict("digits", body, "image/png"))
    _rotate(cfg, "inference")
    assert top_label(client.predict("digits", body, "image/png")) == label
    # Rotation revokes the old key at once, and the same client follows the key file again.
    fresh = cfg.tokens.keys(force=True).inference
    _rotate(cfg, "inference")
    assert _refused(raw(fresh))
    assert top_label(client.predict("digits", body, "image/png")) == label
