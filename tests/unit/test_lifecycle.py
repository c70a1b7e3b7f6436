"""Pure logic of a long-running deployment: key renewal, pins, room checks, warm-up samples, worker errors, proxy."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from servekit import server
from servekit.client import ManagementClient
from servekit.config import WORKERS_ENV, ModelConfig
from servekit.errors import ConfigError
from servekit.proxy import ProxySettings, keys_map, read_keys, render
from servekit.reload.capacity import DeviceFigures, check_room, room_problem
from servekit.reload.pins import Pin, VersionsFile, choose_version, parse_pins, released
from servekit.reload.switch import worker_error
from servekit.reload.warmup import generic_png, sample_of
from servekit.server import ServerConfig
from servekit.store import WARMUP_META, publish
from servekit.tokens import KeyRenewer, TokenFile, parse_keys, renew_at
from servekit.tuning import default_workers, gpu_count

MIB = 1 << 20


# -- keys ---------------------------------------------------------------------------------------
def key_file(path: Path, inference: str, management: str, expires: dict[str, str]) -> None:
    path.write_text(
        json.dumps(
            {
                "management": {"key": management, "expiration time": expires["management"]},
                "inference": {"key": inference, "expiration time": expires["inference"]},
                "API": {"key": "api-key"},
            }
        )
    )


def test_parse_keys_reads_java_instants():
    keys = parse_keys(
        json.dumps(
            {
                "management": {"key": "m", "expiration time": "2026-11-28T10:00:00.123456789Z"},
                "inference": {"key": "i", "expiration time": "2026-11-28T10:00:00Z"},
                "API": {"key": "a"},
            }
        )
    )
    assert (keys.inference, keys.management, keys.api) == ("i", "m", "a")
    assert keys.expires["inference"] == 1795860000.0
    assert keys.expires["management"] == pytest.approx(1795860000.123456)


def test_renewal_comes_a_third_of_the_lifetime_early_and_renews_both_keys(tmp_path):
    path = tmp_path / "key_file.json"
    key_file(path, "i1", "m1", {"inference": "2026-11-28T10:01:00Z", "management": "2026-11-28T10:01:30Z"})
    now = [1795860000.0]  # 10:00:00; the inference key expires in 60 s
    renewer = KeyRenewer("http://127.0.0.1:1", TokenFile(path), lifetime_s=60, clock=lambda: now[0])
    keys = renewer.tokens.keys()
    assert renew_at(keys.expires["inference"], 60) == 1795860040.0
    assert renewer.due(keys) == []
    assert renewer.next_check(keys) == pytest.approx(40.0)
    now[0] += 40
    assert renewer.due(keys) == ["inference", "management"], "one refusal per client, not one per key"
    # A long lifetime: checked at least once a minute (a replaced key file is noticed), renewed 20 min early.
    assert renew_at(1000.0 + 3600, 3600) == 1000.0 + 2400
    renewer.lifetime_s = 3600
    now[0] = 1795860000.0 - 3600
    assert renewer.next_check(keys) == 60.0


def test_renewal_that_fails_is_reported_and_retried(tmp_path):
    path = tmp_path / "key_file.json"
    key_file(path, "i1", "m1", {"inference": "2026-11-28T10:00:00Z", "management": "2026-11-28T10:00:00Z"})
    seen = []
    renewer = KeyRenewer(
        "http://127.0.0.1:9",
        TokenFile(path),
        lifetime_s=60,
        retry_s=2.5,
        on_renewal=lambda kind, ok, exp: seen.append((kind, ok)),
        clock=lambda: 1795860000.0,
    )
    assert renewer.step() == 2.5  # nothing listens on port 9
    assert seen == [("inference", False)] and renewer.failing


# -- pins -----------------------------------------------------------------------------------------
def test_declared_pins_hold_and_wait_for_their_version():
    pins = parse_pins({"digits": "2.0", "resnet50": "newest", "other": {"version": "1.0", "until_newer_than": "2.0"}})
    assert pins["resnet50"].follows_newest and pins["digits"].until_newer_than is None
    assert choose_version(["1.0", "2.0", "3.0"], pins["digits"], "3.0") == "2.0"
    assert choose_version(["1.0", "3.0"], pins["digits"], "1.0") == "1.0", "a pin to a version not yet there moved"
    assert choose_version(["1.0", "3.0"], pins["digits"], None) == "3.0"
    assert choose_version(["1.0", "3.0"], pins["resnet50"], "1.0") == "3.0"
    assert not released(pins["digits"], ["9.0"]) and released(pins["other"], ["1.0", "2.1"])
    with pytest.raises(ConfigError, match="digits: expected a version"):
        parse_pins({"digits": ["2.0"]})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_pins({"digits": {"version": "1.0", "newest": "2.0"}})


def test_versions_file_keeps_the_last_good_pins(tmp_path):
    versions = VersionsFile(tmp_path / "model-versions.yaml")
    assert versions.read() == {}
    versions.write({"digits": Pin("1.0", "2.0", "rollback", "t"), "resnet50": Pin("3")})
    assert versions.read() == {"digits": Pin("1.0", "2.0", "rollback", "t"), "resnet50": Pin("3")}
    assert "resnet50: '3'" in versions.path.read_text()
    versions.path.write_text("digits: [unclosed\n")
    assert versions.read()["digits"].version == "1.0", "a broken file rolled the model to its newest version"
    assert versions.error and "model-versions.yaml" in versions.error


# -- room for a new version ---------------------------------------------------------------------
class FakeProbe:
    def __init__(self, figures):
        self.figures_ = figures

    def figures(self, workers):
        return self.figures_


def test_room_check_with_fake_device_figures():
    gpu = DeviceFigures("cuda:0", free=10_000 * MIB, per_worker=2_000 * MIB, workers=4)
    assert room_problem(gpu, 4, margin=0.2) is None  # 4 x 2000 x 1.2 = 9600 MiB <= 10000
    problem = room_problem(gpu, 5, margin=0.2)  # 12000 MiB > 10000
    assert problem and "need 12000 MiB" in problem and "10000 MiB free" in problem and "keeps serving" in problem
    two = [DeviceFigures("cuda:0", 5_000 * MIB, 2_000 * MIB, 2), DeviceFigures("cuda:1", 3_000 * MIB, 2_000 * MIB, 2)]
    assert "cuda:1" in check_room(FakeProbe(two), [{}], new_workers=4, margin=0.2)  # 2 per GPU: cuda:1 is short
    assert check_room(FakeProbe(two), [{}], new_workers=2, margin=0.2) is None
    assert check_room(FakeProbe([]), [], new_workers=8, margin=0.2) is None  # nothing measured: not blocked


# -- warm-up samples ------------------------------------------------------------------------------
def test_generic_sample_is_a_real_png():
    with Image.open(io.BytesIO(generic_png())) as im:
        assert im.size == (64, 64) and im.mode == "L"
        assert im.getpixel((0, 0)) == 0 and im.getpixel((63, 0)) == 255


def test_sample_comes_from_the_archive(tmp_path):
    mar = tmp_path / "m.mar"
    with zipfile.ZipFile(mar, "w") as zf:
        zf.writestr(
            WARMUP_META, json.dumps({"file": "servekit-warmup.png", "content_type": "image/png", "strict": True})
        )
        zf.writestr("servekit-warmup.png", b"png-bytes")
    sample = sample_of(mar)
    assert (sample.body, sample.content_type, sample.strict) == (b"png-bytes", "image/png", True)
    bare = tmp_path / "bare.mar"
    with zipfile.ZipFile(bare, "w") as zf:
        zf.writestr("model.pt", b"")
    assert not sample_of(bare).strict and sample_of(bare).body == generic_png()


def test_worker_error_keeps_the_qualified_exception():
    log = (
        "2026-11-28T10:00:00,000 [INFO ] W-9001-digits_3.1-stdout MODEL_LOG - Traceback (most recent call last):\n"
        "2026-11-28T10:00:00,001 [INFO ] W-9001-digits_3.1-stdout MODEL_LOG - servekit.errors.ConfigError: "
        "cannot load model.pt as TorchScript: bad\n"
        "2026-11-28T10:00:00,002 [INFO ] W-9002-other_1.0-stdout MODEL_LOG - ValueError: not ours\n"
    )
    assert worker_error(log, "digits", "3.1") == "servekit.errors.ConfigError: cannot load model.pt as TorchScript: bad"
    assert worker_error(log, "digits", "3.0") is None
    assert worker_error(log.replace("servekit.errors.", ""), "digits", "3.1").startswith("ConfigError: ")


# -- publishing ----------------------------------------------------------------------------------
def test_publish_is_atomic_and_leaves_nothing_aside(tmp_path):
    src = tmp_path / "digits-v1.0.mar"
    src.write_bytes(b"x" * 3_000_000)
    store = tmp_path / "store"
    target = publish(src, store)
    assert target.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in store.iterdir()) == ["digits-v1.0.mar"]


# -- the proxy's configuration ------------------------------------------------------------------
def test_keys_come_one_per_file_and_bad_ones_are_named(tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "key-1").write_text("a" * 20 + "\n")
    (keys / "..data").mkdir()  # Kubernetes' own bookkeeping in a Secret volume
    assert read_keys(keys, "b" * 20) == {"key-1": "a" * 20, "env-1": "b" * 20}
    assert keys_map({"key-1": "k1", "odd name": "k2"}) == '"k1" "key-1";\n"k2" "odd_name";\n'
    (keys / "key-2").write_text('has"quote')
    with pytest.raises(ConfigError, match="'key-2'"):
        read_keys(keys)


def test_rendered_config_passes_nginx_t(tmp_path):
    assert shutil.which("nginx"), "needs Debian's nginx: apt-get install nginx-light (.ci/run does)"
    settings = ProxySettings(listen=18090, metrics_listen=18092, run_dir=tmp_path, max_body="2m", access_log=False)
    text = render(settings)
    assert "{{" not in text and "access_log off;" in text and "larger than 2 MiB" in text
    (tmp_path / "nginx.conf").write_text(text)
    (tmp_path / "keys.map").write_text(keys_map({"key-1": "k" * 20}))
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    proc = subprocess.run(
        ["nginx", "-t", "-e", "stderr", "-c", str(tmp_path / "nginx.conf")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# -- registries ------------------------------------------------------------------------------------
def test_every_format_record_has_its_exporter_and_loaders():
    from servekit.artifacts import LOADERS
    from servekit.export import EXPORTERS
    from servekit.formats import FORMATS

    for fmt in FORMATS.values():
        assert fmt.exporter in EXPORTERS, fmt
        assert set(fmt.loaders) <= set(LOADERS), fmt
        assert fmt.suffix in fmt.suffixes
    assert FORMATS["trace"].traced and not FORMATS["script"].traced and FORMATS["pt2"].device_specific


def test_side_files_travel_with_their_artifact(tmp_path):
    from servekit.formats import side_files

    pt2 = tmp_path / "model.pt2"
    pt2.write_bytes(b"")
    assert side_files(pt2) == []
    (tmp_path / "model.pt2.dtype").write_text("float16\n")
    assert side_files(pt2) == [tmp_path / "model.pt2.dtype"]
    assert side_files(tmp_path / "model.pt") == []


def test_every_bench_configuration_is_complete():
    from servekit.bench.configs import ALTERNATES, CONFIGS, OURS

    for name, c in CONFIGS.items():
        assert c.name == name and c.help and c.color.startswith("tab:")
        assert bool(c.export) == bool(c.variant), f"{name}: an own artifact needs its model-only variant"
        assert not (c.export or c.handler) or c.column, f"{name}: a variant of ours needs its own column"
        assert not (c.cpu_only and c.gpu_only), f"{name}: runs nowhere"
        assert not c.export or c.ours, f"{name}: only our handler serves an artifact of its own"
    assert "ours" in OURS and "stock" not in OURS and set(ALTERNATES) <= set(OURS)


def test_management_repeats_an_idempotent_put_after_a_500_but_never_a_post():
    """Scaling (PUT) that TorchServe answers with 500 once is sent again; a register (POST) is not."""
    seen: list[str] = []

    class Flaky(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(self.command)
            status = 500 if seen.count(self.command) == 1 else 200
            body = json.dumps({"status": "ok" if status == 200 else "boom"}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_POST = _answer

        def log_message(self, *args) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        mgmt = ManagementClient(f"http://127.0.0.1:{srv.server_port}")
        assert mgmt.scale("digits", 1, version="1.0").status_code == 200
        assert mgmt.register("digits-v2.0.mar").status_code == 500
        assert seen == ["PUT", "PUT", "POST"]
    finally:
        srv.shutdown()


@pytest.mark.parametrize(
    ("cpus", "gpus", "workers"),
    [
        (16, 1, 4),  # one H200 host: the measured peak (4 workers)
        (32, 2, 8),  # two-GPU host: 4 per GPU, 1.96x one GPU
        (64, 1, 4),  # more CPUs do not help past 4 per GPU: the GPU is the limit
        (8, 1, 2),
        (4, 2, 2),  # never fewer than one per GPU
        (2, 0, 1),  # CPU: one worker with both threads
        (16, 0, 4),
    ],
)
def test_default_workers_follow_the_measured_rule(cpus, gpus, workers):
    assert default_workers(cpus, gpus) == workers


def test_gpu_count_follows_torchserve(monkeypatch):
    assert gpu_count({"number_of_gpu": "2"}, env={"CUDA_VISIBLE_DEVICES": "0"}) == 2
    assert gpu_count({}, env={"CUDA_VISIBLE_DEVICES": "1,3"}) == 2
    monkeypatch.setattr("servekit.tuning._nvidia_smi_gpus", lambda: 0)
    assert gpu_count({}, env={}) == 0


def test_auto_workers_reach_the_config_and_the_workers_env(tmp_path, monkeypatch):
    monkeypatch.setattr("servekit.server.available_cpus", lambda: 16)
    monkeypatch.setattr("servekit.tuning._nvidia_smi_gpus", lambda: 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cfg = ServerConfig(tmp_path, tmp_path)
    assert cfg.properties()["default_workers_per_model"] == "4"
    assert (
        ServerConfig(tmp_path, tmp_path, overrides={"number_of_gpu": "0"}).properties()["default_workers_per_model"]
        == "4"
    )  # 16 CPUs, no GPU: one per 4 CPUs
    monkeypatch.setenv(WORKERS_ENV, "4")
    assert ModelConfig.from_dict({"batchSize": 32}).max_workers == 4  # resnet50 sets no count
    assert ModelConfig.from_dict({"minWorkers": 1, "maxWorkers": 2}).max_workers == 2


def test_workers_get_growable_gpu_memory_segments_unless_told_otherwise(tmp_path, monkeypatch):
    """Images of many sizes fragment torch's cached GPU blocks; a user's own allocator setting is kept."""
    cfg = ServerConfig(tmp_path, tmp_path)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    assert server._env(cfg, {}, tmp_path, False)["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128")
    assert server._env(cfg, {}, tmp_path, False)["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128"
