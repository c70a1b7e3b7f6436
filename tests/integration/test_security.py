"""Security against a real TorchServe: hostile input, model URLs, tokens, and the hardened config.

See SECURITY.md for the threat model these tests hold the deployment to.
"""

from __future__ import annotations

import base64
import json
import re
import stat

import psutil
import pytest
import requests

from models.digits.model import encode, held_out
from servekit import server
from servekit.config import read_properties
from support.rel_support import (
    assert_serves,
    digit_samples,
    jpeg_declaring,
    png_header_only,
    rss_mb,
    wait_workers,
    worker_pids,
)

pytestmark = pytest.mark.server

MIB = 1024 * 1024


def _png(width: int, height: int) -> bytes:
    from PIL import Image

    return encode(Image.new("L", (width, height), 40), "PNG")


def _jpeg() -> bytes:
    return encode(held_out(1)[0][0], "JPEG")


def _multipart(parts: bytes, boundary: str = "xyz") -> tuple[bytes, str]:
    return parts, f"multipart/form-data; boundary={boundary}"


# (name, body, content type or None for no header, expected status)
BAD_INPUTS = [
    ("not an image", b"hello, this is text and not a picture" * 4, "image/png", 415),
    ("truncated JPEG", _jpeg()[: len(_jpeg()) // 2], "image/jpeg", 400),
    ("truncated PNG", digit_samples(1)[0][0][:200], "image/png", 400),
    ("PNG bomb 30000x30000", png_header_only(30000, 30000), "image/png", 413),
    ("JPEG bomb 30000x30000", jpeg_declaring(_jpeg(), 30000, 30000), "image/jpeg", 413),
    ("PNG over max_image_pixels", png_header_only(3000, 3000), "image/png", 413),
    # Resized to the model's size on its short side, a 40000x1 image would be 28x1,120,000.
    ("PNG 40000x1, over max_aspect_ratio", png_header_only(40000, 1), "image/png", 413),
    ("empty body", b"", "image/png", 400),
    ("text/plain", digit_samples(1)[0][0], "text/plain", 415),
    ("application/xml", b"<image>1</image>", "application/xml", 415),
    # TorchServe frames the reply's reason phrase by character count: echoing this broke the worker.
    ("non-ASCII content type", b"\x89PNG\r\n", "\u00e9/\u00e9", 415),
    ("no content type, not an image", b"GIF89a" + b"\0" * 64, None, 415),
    ("multipart, garbage", *_multipart(b"this is not multipart at all"), 400),
    ("multipart, no boundary", b"--xyz\r\n\r\nabc\r\n--xyz--\r\n", "multipart/form-data", 415),
    (
        "multipart, wrong field",
        *_multipart(b'--xyz\r\nContent-Disposition: form-data; name="other"\r\n\r\nabc\r\n--xyz--\r\n'),
        400,
    ),
    (
        "multipart, unterminated",
        *_multipart(b'--xyz\r\nContent-Disposition: form-data; name="data"\r\n\r\n\x89PNG\r\n'),
        400,
    ),
    ("malformed JSON", b'{"data": "abc', "application/json", 400),
    ("JSON without an image", b'{"label": 3}', "application/json", 400),
    ("JSON list", b"[1, 2, 3]", "application/json", 400),
    ("invalid base64", b'{"data": "%%%not-base64%%%"}', "application/json", 400),
    (
        "base64 of text",
        json.dumps({"data": base64.b64encode(b"plain text").decode()}).encode(),
        "application/json",
        415,
    ),
]


def _post(srv, body: bytes, ctype: str | None) -> requests.Response:
    headers = {"Content-Type": ctype} if ctype else {}
    return srv.inference.request("POST", "/predictions/digits", data=body, headers=headers)


# -- 3-5. hostile and malformed input -----------------------------------------------------------


@pytest.mark.parametrize("name,body,ctype,status", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_refused(digits_server, name, body, ctype, status):
    resp = _post(digits_server, body, ctype)
    assert resp.status_code == status, resp.text[:300]
    message = resp.json()["message"]
    assert message and ".cpp:" not in message, message
    assert_serves(digits_server.inference)


def test_nameless_multipart_part_is_a_frontend_500(digits_server):
    """Documented: TorchServe's own multipart decoder fails with a 500 on a part without a name."""
    body, ctype = _multipart(b"--xyz\r\nContent-Disposition: form-data\r\n\r\nabc\r\n--xyz--\r\n")
    resp = _post(digits_server, body, ctype)
    assert resp.status_code == 500 and resp.json()["type"] == "ErrorDataDecoderException", resp.text
    assert_serves(digits_server.inference)


def test_bad_input_leaves_worker_alive_and_small(digits_server):
    mgmt = digits_server.management
    pids = wait_workers(mgmt, "digits")
    rss_before = rss_mb(pids)
    for _ in range(3):
        for _, body, ctype, status in BAD_INPUTS:
            assert _post(digits_server, body, ctype).status_code == status
    assert worker_pids(mgmt, "digits") == pids, "a worker died or was replaced"
    growth = rss_mb(pids) - rss_before
    assert growth < 100, f"worker RSS grew by {growth:.0f} MB"
    assert_serves(digits_server.inference)


def test_body_over_max_request_size_is_413(digits_server):
    limit = int(read_properties(digits_server.cfg.run_dir / "config.properties")["max_request_size"])
    resp = _post(digits_server, b"\0" * (limit + 1), "image/png")
    assert resp.status_code == 413
    assert_serves(digits_server.inference)


def test_max_image_pixels_is_enforced(digits_server):
    """digits' model-config sets max_image_pixels 4,000,000: a real 2000x2000 image passes, one more row fails."""
    assert digits_server.inference.predict("digits", _png(2000, 2000), "image/png").status_code == 200
    resp = digits_server.inference.predict("digits", _png(2000, 2001), "image/png")
    assert resp.status_code == 413 and "max_image_pixels" in resp.json()["message"]
    assert_serves(digits_server.inference)


def test_max_aspect_ratio_is_enforced(digits_server):
    """A side ratio of 25 (the default limit) is served; a real 20000x1 image gets a 413 naming the limit."""
    assert digits_server.inference.predict("digits", _png(2500, 100), "image/png").status_code == 200
    resp = digits_server.inference.predict("digits", _png(20000, 1), "image/png")
    assert resp.status_code == 413 and "max_aspect_ratio" in resp.json()["message"], resp.text
    assert_serves(digits_server.inference)


# -- hardening of the shipped configuration -----------------------------------------------------


def test_config_template_is_hardened():
    props = read_properties(server.DEFAULT_CONFIG)
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), f"{key}={props[key]}"
    assert props["disable_token_authorization"] == "false"
    assert props["allowed_urls"] == r"^file://MODEL_STORE/[^/]+\\.mar$"
    assert props["install_py_dep_per_model"] == "false"
    assert props["enable_envvars_config"] == "false"
    assert 0 < int(props["max_request_size"]) <= 64 * MIB
    assert 0 < int(props["max_response_size"]) <= 64 * MIB
    assert float(props["token_expiration_min"]) <= 24 * 60


def _java_regex(value: str) -> re.Pattern:
    """A properties-file regex as Java reads it (``\\\\`` is one backslash), compiled in Python."""
    return re.compile(value.replace("\\\\", "\\"), re.IGNORECASE)


def test_effective_config_pins_urls_to_the_store(digits_server):
    props = read_properties(digits_server.cfg.run_dir / "config.properties")
    store = digits_server.cfg.model_store.resolve()
    assert props["model_store"] == str(store)
    allowed = _java_regex(props["allowed_urls"])
    assert allowed.match(f"file://{store}/digits-v1.0.mar")
    for url in (
        f"file://{store}/../x.mar",
        f"file://{store}/sub/x.mar",
        f"file://{store.parent}/x.mar",
        f"file://{store}/x.mar.sh",
        "http://127.0.0.1/x.mar",
        "https://example.com/x.mar",
        "file:///etc/passwd",
    ):
        assert not allowed.match(url), url
    assert props["install_py_dep_per_model"] == "false"
    assert props["disable_token_authorization"] == "false"


def _frontend(srv) -> psutil.Process:
    pgid = server.read_pid(srv.cfg.run_dir)
    procs = [psutil.Process(p) for p in server.group_members(pgid)]
    return next(p for p in procs if "java" in p.name())


def test_server_listens_on_loopback_only(digits_server):
    listening = [c for c in _frontend(digits_server).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    ports = {c.laddr.port for c in listening}
    for key in ("inference_address", "management_address", "metrics_address"):
        assert int(digits_server.cfg.address(key).rsplit(":", 1)[1]) in ports
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening


def test_key_file_is_private(digits_server):
    mode = stat.S_IMODE((digits_server.cfg.run_dir / "key_file.json").stat().st_mode)
    assert mode == 0o600, oct(mode)


# -- 11-12. tokens ------------------------------------------------------------------------------


def _refused(resp: requests.Response) -> bool:
    """TorchServe 0.12 refuses a missing or wrong key with 400 InvalidKeyException (later releases: 401)."""
    return resp.status_code == 401 or (resp.status_code == 400 and resp.json()["type"] == "InvalidKeyException")


def test_management_needs_the_management_key(digits_server):
    base = digits_server.cfg.address("management_address")
    keys = digits_server.cfg.tokens.keys()
    # Changes aim at a model that does not exist: if auth were broken, the shared server stays intact.
    calls = [
        ("GET", "/models"),
        ("GET", "/models/digits"),
        ("POST", "/models?url=nothing-v1.0.mar"),
        ("PUT", "/models/nothing?min_worker=1"),
        ("DELETE", "/models/nothing"),
    ]
    for auth in (None, "Bearer wrong-key", f"Bearer {keys.inference}", f"Bearer {keys.api}", keys.management):
        headers = {"Authorization": auth} if auth else {}
        for method, path in calls:
            resp = requests.request(method, base + path, headers=headers, timeout=30)
            assert _refused(resp), f"{method} {path} with {auth!r}: {resp.status_code} {resp.text[:200]}"
        if auth != f"Bearer {keys.api}":  # the token API takes only the API key
            resp = requests.get(base + "/token?type=inference", headers=headers, timeout=30)
            assert _refused(resp), f"token API with {auth!r}: {resp.status_code}"
    wait_workers(digits_server.management, "digits")
    assert_serves(digits_server.inference)


def test_inference_needs_the_inference_key(digits_server):
    base = digits_server.cfg.address("inference_address")
    keys = digits_server.cfg.tokens.keys()
    body = digit_samples(1)[0][0]
    for auth in (None, "Bearer wrong-key", f"Bearer {keys.management}", f"Basic {keys.inference}"):
        headers = {"Authorization": auth} if auth else {}
        assert _refused(requests.get(base + "/ping", headers=headers, timeout=30))
        resp = requests.post(
            base + "/predictions/digits", data=body, headers={**headers, "Content-Type": "image/png"}, timeout=30
        )
        assert _refused(resp), f"{auth!r}: {resp.status_code}"
    assert_serves(digits_server.inference)


# -- 10. model URLs -----------------------------------------------------------------------------
