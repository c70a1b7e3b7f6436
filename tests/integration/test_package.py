"""The wheel, installed into a fresh venv outside the checkout, works from any directory: its version,
a prediction against a real TorchServe (CLI and library), and defaults from the working directory."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from servekit import __version__

ROOT = Path(__file__).resolve().parents[2]
DIGIT = ROOT / "tests" / "data" / "digit-7.png"

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> dict:
    """servekit's wheel in a new venv; its dependencies are the checkout venv's (one .pth line).

    The wheel itself is installed for real; the 5 GB of locked dependencies are shared rather than
    installed again. Only the listed directory goes on sys.path: the checkout venv's own .pth files
    (the editable install) are not processed, so `import servekit` finds the wheel.
    """
    tmp = tmp_path_factory.mktemp("package")
    dist = tmp / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", dist, ROOT],
        check=True,
    )
    (wheel,) = dist.glob("servekit-*.whl")
    env_dir = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", env_dir], check=True)
    py = env_dir / "bin" / "python"
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(site, "checkout-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], check=True)
    work = tmp / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVEKIT_") and k != "PYTHONPATH"}
    return {"bin": env_dir / "bin", "wheel": wheel, "cwd": work, "env": env, "site": site}


def run(venv: dict, *args: str | os.PathLike, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args],
        cwd=venv["cwd"],
        env={**venv["env"], **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_wheel_holds_only_the_servekit_package(venv):
    names = zipfile.ZipFile(venv["wheel"]).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"servekit"}, top
    for data in ("config.properties", "metrics.yaml", "log4j2.xml", "nginx.conf.template"):
        assert f"servekit/{data}" in names


def test_version_and_the_import_come_from_the_installed_wheel(venv):
    out = run(venv, venv["bin"] / "servekit", "--version")
    assert out.returncode == 0 and out.stdout.strip() == f"servekit {__version__}", out
    where = run(venv, venv["bin"] / "python", "-c", "import servekit; print(servekit.__file__)")
    assert where.stdout.strip().startswith(venv["site"]), where


def test_predict_against_a_server_by_url_and_key_file(venv, digits_server):
    url = digits_server.cfg.address("inference_address")
    out = run(venv, venv["bin"] / "servekit", "predict", DIGIT, "--url", url, "--key-file", digits_server.cfg.key_file)
    assert out.returncode == 0, out.stderr
    assert "digits v1.0" in out.stdout and out.stdout.splitlines()[1].split()[-1] == "7", out.stdout
    assert "Traceback" not in out.stderr


def test_the_library_client_with_url_and_key_from_the_environment(venv, digits_server):
    code = (
        "import sys; from servekit.client import Client; "
        "p = Client().predict('digits', sys.argv[1]); print(p.top.label, p.version)"
    )
    env = {
        "SERVEKIT_URL": digits_server.cfg.address("inference_address"),
        "SERVEKIT_KEY": digits_server.cfg.tokens.keys().inference,
    }
    out = run(venv, venv["bin"] / "python", "-c", code, DIGIT, env=env)
    assert out.returncode == 0 and out.stdout.split() == ["7", "1.0"], out


def test_defaults_come_from_the_working_directory_not_site_packages(venv):
    """No server from here: a one-line answer naming ./.run, no traceback, no path into the venv."""
    out = run(venv, venv["bin"] / "servekit", "health")
    assert out.returncode != 0 and "Traceback" not in out.stderr, out
    said = out.stdout + out.stderr
    assert str(venv["cwd"] / ".run") in said and "site-packages" not in said, said
    wrong = run(venv, venv["bin"] / "servekit", "predict", "missing.png", "--url", "http://127.0.0.1:9")
    assert wrong.returncode not in (0, 2) and "Traceback" not in wrong.stderr, wrong
    assert "missing.png" in wrong.stderr
