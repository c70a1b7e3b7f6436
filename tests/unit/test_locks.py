"""The hash locks in requirements/ agree with pyproject.toml and with each other, and the image's
requirement files are written from them as docker/build.sh expects."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOCKS = sorted((ROOT / "requirements").glob("*.txt"))
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "docker" / "requirements.py")
assert spec and spec.loader
image_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(image_requirements)


def pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of a lock."""
    return {
        image_requirements.canonical(name): version
        for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==([^\s;\\]+)", path.read_text(), re.M)
    }


def declared(reqs: list[str]) -> dict[str, str]:
    """{canonical name: version} of pyproject requirements written as name==version."""
    out = {}
    for req in reqs:
        if "==" in req:
            name, version = req.split("==")
            out[image_requirements.canonical(name)] = version
    return out


def test_every_lock_entry_carries_hashes():
    assert {p.name for p in LOCKS} == {
        "build.txt",
        "dev.txt",
        "local.txt",
        "torch.txt",
        "image-cpu.txt",
        "image-gpu.txt",
    }
    for lock in LOCKS:
        entries = image_requirements.read_lock(lock)
        assert entries, lock
        unhashed = [name for name, entry in entries.items() if "--hash=sha256:" not in entry]
        assert not unhashed, f"{lock.name}: {unhashed}"


def test_locks_agree_with_each_other():
    seen: dict[str, dict[str, str]] = {}
    for lock in LOCKS:
        for name, version in pins(lock).items():
            seen.setdefault(name, {})[lock.name] = version
    split = {name: where for name, where in seen.items() if len(set(where.values())) > 1}
    assert not split, f"one package, several versions across the locks (run make lock): {split}"


@pytest.mark.parametrize(
    ("lock", "wanted"),
    [
        ("dev.txt", ["dependencies", "cpu", "archive", "bench", "java", "dev"]),
        ("local.txt", ["dependencies", "cpu", "archive", "bench", "java"]),
        ("image-cpu.txt", ["dependencies", "cpu"]),
        ("image-gpu.txt", ["dependencies", "gpu"]),
    ],
)
def test_locks_hold_pyprojects_pins(lock, wanted):
    """A pin changed in pyproject.toml without `make lock` fails here."""
    extras = PROJECT["optional-dependencies"]
    want: dict[str, str] = {}
    for group in wanted:
        want |= declared(PROJECT["dependencies"] if group == "dependencies" else extras[group])
    if lock.startswith("image-"):  # the images take the torch pair from TORCH_INDEX_URL
        want = {k: v for k, v in want.items() if k not in ("torch", "torchvision")}
    have = pins(ROOT / "requirements" / lock)
    wrong = {name: (version, have.get(name)) for name, version in want.items() if have.get(name) != version}
    assert not wrong, f"{lock}: pyproject pin vs lock (run make lock): {wrong}"
    if lock.startswith("image-"):
        assert not {"torch", "captum", "matplotlib", "scikit-learn", "pytest"} & set(have), lock


def test_torch_lock_holds_the_pair_at_servekits_pins():
    have = pins(ROOT / "requirements" / "torch.txt")
    want = declared(PROJECT["dependencies"])
    assert have["torch"] == want["torch"] and have["torchvision"] == want["torchvision"]
    shared = {name for name in have if name in want}
    assert {"numpy", "pillow"} <= shared
    assert all(have[name] == want[name] for name in shared)


@pytest.mark.parametrize("variant", ["cpu", "gpu"])
def test_image_requirements_from_the_pypi_torch_lock(tmp_path, variant, capsys):
    image_requirements.main(variant, "pypi", tmp_path)
    torch_set = image_requirements.read_lock(tmp_path / "torch-requirements.txt")
    rest = image_requirements.read_lock(tmp_path / "requirements.txt")
    assert {"torch", "torchvision"} <= set(torch_set)
    assert not set(torch_set) & set(rest), "a package in both files would be installed twice"
    assert ("triton" in torch_set) == (variant == "gpu")
    assert ("onnxruntime-gpu" in rest) == (variant == "gpu") and ("onnxruntime" in rest) == (variant == "cpu")
    assert ("left out of the cpu image: triton" in capsys.readouterr().out) == (variant == "cpu")


def test_image_requirements_from_downloaded_wheels_hash_the_files(tmp_path):
    wheels = tmp_path / "torch-cpu"
    wheels.mkdir()
    files = {
        "torch-2.14.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl": b"torch bytes",
        "torchvision-0.29.1+cpu-cp311-cp311-manylinux_2_28_x86_64.whl": b"vision bytes",
        "sympy-1.14.0-py3-none-any.whl": b"sympy bytes",
        "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl": b"numpy from the index",
    }
    for name, data in files.items():
        (wheels / name).write_bytes(data)
    image_requirements.main("cpu", str(wheels), tmp_path / "out")
    torch_set = image_requirements.read_lock(tmp_path / "out" / "torch-requirements.txt")
    assert set(torch_set) == {"torch", "torchvision", "sympy"}, "numpy is the image lock's, not the index's"
    assert torch_set["torch"].startswith("torch==2.14.1+cpu ")
    assert hashlib.sha256(b"torch bytes").hexdigest() in torch_set["torch"]
    with pytest.raises(SystemExit, match="no torch wheel"):
        image_requirements.main("cpu", str(tmp_path / "out"), tmp_path / "none")


def test_a_missing_extra_names_itself():
    from servekit.errors import ConfigError
    from servekit.extras import require

    with pytest.raises(ConfigError, match=r"the plot needs no_such_module.*pip install 'servekit\[bench\]'"):
        require("no_such_module", "bench", "the plot")
    require("json", "bench", "never raised: the module is there")
    named = re.findall(
        r"""require\("[\w.]+", "(\w+)\"""", "".join(p.read_text() for p in (ROOT / "servekit").rglob("*.py"))
    )
    assert named and set(named) <= set(PROJECT["optional-dependencies"]), named
