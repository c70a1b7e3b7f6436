"""SERVEKIT_REQUIRE_GPU: a GPU image refuses to serve on the CPU and says why; ONNX says when it falls back."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch

from servekit import artifacts, gpu
from servekit.errors import EXIT_CONFIG, ConfigError

ROOT = Path(__file__).resolve().parents[2]
PROC_PROPRIETARY = """\
NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023
GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)
"""
PROC_OPEN = """\
NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build  (dvs-builder@U16-I3-B03-4-3)
GCC version:  gcc version 13.3.0 (Ubuntu 13.3.0-6ubuntu2~24.04)
"""


# -- pure parts --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "value,on", [("1", True), ("true", True), (" YES ", True), ("0", False), ("", False), ("no", False)]
)
def test_gpu_required_reads_the_variable(value, on):
    assert gpu.gpu_required({gpu.REQUIRE_GPU_ENV: value}) is on
    assert gpu.gpu_required({}) is False


def test_parse_version():
    assert gpu.parse_version("580.65.06") == (580, 65, 6)
    assert gpu.parse_version(" 535.104.05\n") == (535, 104, 5)
    assert gpu.parse_version("13.0") == (13, 0)
    assert gpu.parse_version("N/A") is None


def test_driver_from_proc_reads_both_kernel_module_kinds():
    assert gpu.driver_from_proc(PROC_PROPRIETARY) == "535.104.05"
    assert gpu.driver_from_proc(PROC_OPEN) == "580.65.06"  # not x86_64, not the gcc version
    assert gpu.driver_from_proc("GCC version: gcc version 12.3.0\n") is None


def test_minimum_driver_per_cuda_major():
    assert gpu.min_driver("13.0") == gpu.min_driver("13.2") == "580.65.06"
    assert gpu.min_driver("12.8") == "525.60.13"
    assert gpu.min_driver("10.2") is None  # not in the table: not checked


@pytest.mark.parametrize(
    "cuda,driver,needed",
    [
        ("13.0", "575.57.08", "580.65.06"),
        ("13.0", "580.65.06", None),
        ("13.0", "580.159.04", None),
        ("13.0", "590.1", None),
        ("12.4", "520.61.05", "525.60.13"),
        ("12.4", "525.60.13", None),
        ("12.8", "575.57.08", None),
        ("99.0", "1.0", None),
    ],
)
def test_driver_too_old(cuda, driver, needed):
    assert gpu.driver_too_old(cuda, driver) == needed


def test_messages_say_what_is_wrong_and_how_to_fix_it():
    msg = gpu.cpu_build_message("2.14.1+cpu")
    assert "CPU-only build" in msg and "2.14.1+cpu" in msg and "fix:" in msg

    msg = gpu.old_driver_message("2.14.1+cu130", "13.0", "575.57.08", "nvidia-smi", "580.65.06")
    assert all(s in msg for s in ("575.57.08", "nvidia-smi", "CUDA 13.0", ">= 580.65.06", "upgrade"))

    env = {"CUDA_VISIBLE_DEVICES": "", "NVIDIA_VISIBLE_DEVICES": "void"}
    msg = gpu.no_gpu_message("2.14.1+cu130", "13.0", env, None, "", "CUDA driver initialization failed")
    for text in (
        "CUDA_VISIBLE_DEVICES=''",
        "NVIDIA_VISIBLE_DEVICES='void'",
        "NVIDIA Container Toolkit",
        "--gpus all",
        "nvidia.com/gpu: 1",
        "no NVIDIA driver",
        "torch says: CUDA driver initialization failed",
        f"unset {gpu.REQUIRE_GPU_ENV}",
    ):
        assert text in msg, text
    assert "CUDA_VISIBLE_DEVICES=<unset>" in gpu.no_gpu_message("2", "13.0", {}, "580.1.1", "NVML")

    line = gpu.passed_message(["NVIDIA H200", "NVIDIA H200"], "580.159.04", "2.14.1+cu130", "13.0")
    assert line == (
        "GPU check passed: cuda:0 NVIDIA H200, cuda:1 NVIDIA H200; driver 580.159.04; torch 2.14.1+cu130 (CUDA 13.0)"
    )
    assert "\n" not in line


# -- where the driver version comes from ---------------------------------------------------------
@pytest.fixture
def no_nvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails


def test_driver_version_from_proc(no_nvml, monkeypatch, tmp_path):
    (tmp_path / "version").write_text(PROC_OPEN)
    monkeypatch.setattr(gpu, "PROC_VERSION", tmp_path / "version")
    assert gpu.driver_version() == ("580.65.06", str(tmp_path / "version"))


def test_driver_version_from_nvidia_smi(no_nvml, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "PROC_VERSION", tmp_path / "absent")
    smi = tmp_path / "nvidia-smi"
    smi.write_text('#!/bin/sh\n[ "$1" = --query-gpu=driver_version ] && printf "580.95.05\\n580.95.05\\n"\n')
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert gpu.driver_version() == ("580.95.05", "nvidia-smi")


def test_driver_version_none_without_any_source(no_nvml, monkeypatch, tmp_path):
    monkeypatch.setattr(gpu, "PROC_VERSION", tmp_path / "absent")
    monkeypatch.setattr(gpu.shutil, "which", lambda _name: None)
    assert gpu.driver_version() is None


def test_driver_version_from_nvml(monkeypatch):
    calls = []
    fake = SimpleNamespace(
        nvmlInit=lambda: calls.append("init"),
        nvmlSystemGetDriverVersion=lambda: b"580.159.04",
        nvmlShutdown=lambda: calls.append("shutdown"),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu.driver_version() == ("580.159.04", "NVML")
    assert calls == ["init", "shutdown"]


# -- require_gpu with the machine's facts replaced ----------------------------------------------
@pytest.fixture
def machine(monkeypatch):
    """A CUDA 13 torch on a machine whose GPU, names and driver the test sets."""
    facts = SimpleNamespace(cuda="13.0", available=False, names=[], driver=None, warning="")

    def is_available():
        if facts.warning:
            warnings.warn(facts.warning, UserWarning, stacklevel=1)
        return facts.available

    monkeypatch.setattr(torch.version, "cuda", facts.cuda)
    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(facts.names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: facts.names[i])
    monkeypatch.setattr(gpu, "driver_version", lambda: facts.driver)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("NVIDIA_VISIBLE_DEVICES", "all")
    return facts


def test_require_gpu_refuses_a_cpu_only_torch(machine, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match="CPU-only build"):
        gpu.require_gpu()


def test_require_gpu_refuses_when_no_gpu_is_visible(machine):
    machine.warning = "CUDA initialization: CUDA driver initialization failed, you might not have a CUDA gpu."
    with pytest.raises(ConfigError) as err:
        gpu.require_gpu()
    msg = err.value.message
    assert "no usable GPU" in msg and "NVIDIA_VISIBLE_DEVICES='all'" in msg and "CUDA_VISIBLE_DEVICES=<unset>" in msg
    assert "torch says: CUDA initialization: CUDA driver initialization failed" in msg
    assert err.value.exit_code == EXIT_CONFIG


def test_require_gpu_blames_an_old_driver(machine):
    machine.driver = ("575.57.08", "/proc/driver/nvidia/version")
    with pytest.raises(ConfigError, match=r"driver 575\.57\.08 .* too old .* needs driver >= 580\.65\.06"):
        gpu.require_gpu()


def test_require_gpu_passes_with_one_line_naming_gpus_and_driver(machine):
    machine.available, machine.names, machine.driver = True, ["NVIDIA H200"], ("580.159.04", "NVML")
    lines: list[str] = []
    gpu.require_gpu(log_fn=lines.append)
    assert lines == [f"GPU check passed: cuda:0 NVIDIA H200; driver 580.159.04; torch {torch.__version__} (CUDA 13.0)"]


def test_require_gpu_trusts_a_working_gpu_over_the_driver_table(machine):
    """CUDA's forward compatibility package runs a newer CUDA on an older datacenter driver."""
    machine.available, machine.names, machine.driver = True, ["NVIDIA H100"], ("535.104.05", "NVML")
    gpu.require_gpu(log_fn=lambda _line: None)


# -- servekit serve on this machine ----------------------------------------------------------------
def test_serve_refuses_to_start_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU: the check passes and serve would start TorchServe")
    store, run_dir = tmp_path / "store", tmp_path / "run"
    store.mkdir()
    exe = Path(sys.executable).parent / "servekit"
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "servekit.cli"]
    env = {**os.environ, gpu.REQUIRE_GPU_ENV: "1"}
    proc = subprocess.run(
        [*cmd, "serve", "--model-store", str(store), "--run-dir", str(run_dir)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.startswith(f"error: {gpu.REQUIRE_GPU_ENV}=1 but ")
    assert any(s in proc.stderr for s in ("no usable GPU", "CPU-only build", "too old"))
    assert "fix:" in proc.stderr
    # Refused before anything started: no run dir written, no TorchServe (java) process for it.
    assert not run_dir.exists() or not any(run_dir.iterdir())
    for p in psutil.process_iter(["cmdline"]):
        assert str(tmp_path) not in " ".join(p.info["cmdline"] or []), p.info["cmdline"]


# -- ONNX on a GPU: say when onnxruntime runs on the CPU -------------------------------------------
class FakeSession:
    active = ["CPUExecutionProvider"]

    def __init__(self, path, options, providers):
        self.asked = providers

    def get_providers(self):
        return self.active

    def get_inputs(self):
        return [SimpleNamespace(name="input")]


def fake_ort(available: list[str]) -> SimpleNamespace:
    ort = SimpleNamespace(
        __version__="1.99.0",
        get_available_providers=lambda: available,
        SessionOptions=lambda: SimpleNamespace(),
        InferenceSession=FakeSession,
        preloaded=0,
    )

    def preload_dlls():
        ort.preloaded += 1

    ort.preload_dlls = preload_dlls
    return ort


@pytest.fixture
def fresh_once(monkeypatch):
    monkeypatch.setattr(artifacts, "_once", set())


def test_onnx_warns_once_when_the_cuda_provider_falls_back(monkeypatch, caplog, fresh_once):
    ort = fake_ort(["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    with caplog.at_level(logging.WARNING, logger="servekit.artifacts"):
        for _ in range(2):
            artifacts._load_onnx(Path("m.onnx"), torch.device("cuda"))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "runs on the CPU" in warned[0] and "onnxruntime-gpu" in warned[0]
    assert ort.preloaded == 1  # before the first CUDA session, once per process


def test_onnx_is_quiet_when_the_cuda_provider_is_active(monkeypatch, caplog, fresh_once):
    monkeypatch.setitem(sys.modules, "onnxruntime", fake_ort(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    monkeypatch.setattr(FakeSession, "active", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="servekit.artifacts"):
        artifacts._load_onnx(Path("m.onnx"), torch.device("cuda"))
    assert not caplog.records


def test_onnx_without_a_cuda_provider_names_the_package(monkeypatch, caplog, fresh_once):
    ort = fake_ort(["CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", ort)
    with caplog.at_level(logging.WARNING, logger="servekit.artifacts"):
        artifacts._load_onnx(Path("m.onnx"), torch.device("cuda"))
        artifacts._load_onnx(Path("m.onnx"), torch.device("cpu"))
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "pip install onnxruntime-gpu in place of onnxruntime" in warned[0]
    assert ort.preloaded == 0
