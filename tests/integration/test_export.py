"""Export in every format, each checked against eager before it is written; one loader for all of them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from models.controlflow.build import build_model as build_controlflow
from models.controlflow.build import example_inputs as controlflow_inputs
from models.digits.model import DigitsNet
from servekit.artifacts import AOTI, EXPORTED, ONNX, TORCHSCRIPT, aoti_metadata, dtype_sidecar, load_artifact
from servekit.errors import ConfigError, ExportMismatch
from servekit.export import export
from servekit.formats import FORMATS
from servekit.parity import TOLERANCE, relative_error

CPU = torch.device("cpu")
quiet = lambda *_: None  # noqa: E731


@pytest.fixture(scope="module")
def digits_net() -> torch.nn.Module:
    """The digits architecture with seeded weights (parity is about the graph, not the training)."""
    torch.manual_seed(0)
    return DigitsNet().eval()


def digits_batch(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def assert_matches(model: torch.nn.Module, artifact, x: torch.Tensor, tol: float = 1e-4) -> None:
    with torch.inference_mode():
        assert relative_error(artifact(x), model(x)) <= tol


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- the four formats -------------------------------------------------------------------------------
KIND = {"trace": TORCHSCRIPT, "script": TORCHSCRIPT, "onnx": ONNX, "program": EXPORTED}


@pytest.mark.parametrize("fmt", ["trace", "script", "onnx", "program"])
def test_digits_exports_match_eager(fmt, digits_net, tmp_path):
    out = tmp_path / f"model{FORMATS[fmt].suffix}"
    report = export(digits_net, digits_batch(4), out, fmt, amp="bf16", log_fn=quiet)
    loaded = load_artifact(out, CPU)
    assert loaded.kind == KIND[fmt]
    # TorchScript runs under autocast at serving time, so bf16 is checked too; ONNX is an fp32 graph.
    assert set(report.errors) == ({"fp32"} if fmt == "onnx" else {"fp32", "bfloat16"})
    assert report.errors["fp32"] <= TOLERANCE[None] and report.top1_agreement["fp32"] == 1.0
    for n in (1, 3, 17):  # the batch dimension is dynamic in every format
        assert_matches(digits_net, loaded, digits_batch(n, seed=n))
    assert leftovers(tmp_path) == [out.name]


def test_onnx_graph_has_a_dynamic_batch_axis_at_the_chosen_opset(digits_net, tmp_path):
    import onnx

    out = tmp_path / "model.onnx"
    export(digits_net, digits_batch(4), out, "onnx", opset=17, log_fn=quiet)
    graph = onnx.load(str(out))
    assert [o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert graph.graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_fp16_amp_on_a_cpu_checks_fp32_only_as_serving_runs_it(digits_net, tmp_path):
    report = export(digits_net, digits_batch(4), tmp_path / "m.pt", "trace", amp="fp16", log_fn=quiet)
    assert set(report.errors) == {"fp32"}


def test_exported_program_pt2_loads_and_runs_under_autocast(digits_net, tmp_path):
    out = tmp_path / "program.pt2"
    program = torch.export.export(
        digits_net, (digits_batch(4),), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},)
    )
    torch.export.save(program, str(out))
    loaded = load_artifact(out, CPU)
    assert loaded.kind == EXPORTED and loaded.autocast
    x = digits_batch(5)
    assert_matches(digits_net, loaded, x)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16, ref_bf16 = loaded(x), digits_net(x)
    assert out_bf16.dtype == torch.bfloat16
    assert relative_error(out_bf16, ref_bf16) <= TOLERANCE[torch.bfloat16]


# -- data-dependent control flow -------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlflow():
    return build_controlflow(log=quiet)


def test_controlflow_model_takes_both_branches(controlflow):
    x = controlflow_inputs(4)
    with torch.inference_mode():
        assert x.sum() > 0 and (-x).sum() < 0
        assert relative_error(controlflow(-x), controlflow.bright(controlflow.features(-x))) > 0.1


@pytest.mark.parametrize("fmt", ["trace", "onnx"])
def test_tracing_control_flow_is_refused_and_nothing_is_written(fmt, controlflow, tmp_path):
    out = tmp_path / f"model{FORMATS[fmt].suffix}"
    with pytest.raises(ExportMismatch, match="on the negated example") as err:
        export(controlflow, controlflow_inputs(4), out, fmt, log_fn=quiet)
    assert "--format script" in err.value.message
    if fmt == "trace":
        assert "build.py:" in err.value.message  # the tracer's warning points at the branch
    assert leftovers(tmp_path) == []


def test_scripting_keeps_control_flow(controlflow, tmp_path):
    out = tmp_path / "model.pt"
    report = export(controlflow, controlflow_inputs(4), out, "script", log_fn=quiet)
    assert report.errors["fp32"] == pytest.approx(0.0, abs=1e-6)
    loaded = load_artifact(out, CPU)
    for x in (controlflow_inputs(3), -controlflow_inputs(6)):  # one batch down each branch
        assert_matches(controlflow, loaded, x)


def test_a_failed_export_leaves_the_previous_artifact_in_place(controlflow, tmp_path):
    out = tmp_path / "model.pt"
    export(controlflow, controlflow_inputs(4), out, "script", log_fn=quiet)
    before = out.read_bytes()
    with pytest.raises(ExportMismatch):
        export(controlflow, controlflow_inputs(4), out, "trace", log_fn=quiet)
    assert out.read_bytes() == before and leftovers(tmp_path) == ["model.pt"]


def test_torch_export_of_control_flow_names_the_line_and_the_fix(controlflow, tmp_path):
    with pytest.raises(ConfigError, match="torch.cond") as err:
        export(controlflow, controlflow_inputs(4), tmp_path / "model.pt2", "pt2", log_fn=quiet)
    assert "build.py" in err.value.message and "x.sum() > 0" in err.value.message
    assert leftovers(tmp_path) == []


def test_controlflow_is_not_archived_by_default():
    from servekit.hooks import default_models

    assert "controlflow" not in default_models() and "digits" in default_models()


def test_controlflow_archives_as_script_and_classifies(tmp_path):
    """Opting in (config copied to model-config.yaml) archives the scripted model; the handler path runs it."""
    from models.digits.model import encode, held_out
    from servekit.archive import ArchiveRequest, archive
    from servekit.batch import Batch
    from servekit.classify import ImageClassifier
    from servekit.config import ModelConfig
    from servekit.store import read_manifest

    model_dir = tmp_path / "controlflow"
    shutil.copytree(ROOT / "models" / "controlflow", model_dir, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(model_dir / "model-config.example.yaml", model_dir / "model-config.yaml")
    mar = archive(ArchiveRequest("controlflow", model_dir, tmp_path / "store", force=True), log=quiet)
    assert read_manifest(mar)["model"]["serializedFile"] == "model.pt"
    with zipfile.ZipFile(mar) as zf:
        zf.extract("model.pt", tmp_path / "unpacked")
    opts = ModelConfig.load(model_dir / "model-config.yaml").handler
    clf = ImageClassifier(tmp_path / "unpacked" / "model.pt", opts, CPU, [str(i) for i in range(10)])
    results = clf.predict(Batch([encode(img) for img, _ in held_out(8)])).results
    assert all(len(r["predictions"]) == opts.topk for r in results)


# -- ONNX: operators without an export -------------------------------------------------------------
class CumMax(torch.nn.Module):
    """aten::cummax has no ONNX export at any opset."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cummax(x.flatten(1), 1)[0]


class GridSample(torch.nn.Module):
    """aten::grid_sampler has an ONNX export from opset 16 on."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = torch.zeros(x.shape[0], 4, 4, 2)
        return F.grid_sample(x, grid, align_corners=False).flatten(1)


def test_onnx_unsupported_operator_is_named_with_what_to_do(tmp_path):
    with pytest.raises(ConfigError) as err:
        export(CumMax(), digits_batch(2), tmp_path / "m.onnx", "onnx", opset=18, log_fn=quiet)
    msg = err.value.message
    assert "operator aten::cummax is not supported at opset 18" in msg
    assert "replace the operator" in msg and "TorchScript or .pt2" in msg
    assert leftovers(tmp_path) == []


def test_onnx_operator_from_a_newer_opset_names_that_opset(tmp_path):
    with pytest.raises(ConfigError, match=r"aten::grid_sampler is not supported at opset 15.*--opset 16"):
        export(GridSample(), digits_batch(2), tmp_path / "m.onnx", "onnx", opset=15, log_fn=quiet)
    report = export(GridSample(), digits_batch(2), tmp_path / "m.onnx", "onnx", opset=16, log_fn=quiet)
    assert report.errors["fp32"] <= TOLERANCE[None]


@pytest.mark.parametrize("opset", [6, 21])
def test_onnx_opset_outside_the_exporters_range_is_refused(opset, digits_net, tmp_path):
    with pytest.raises(ConfigError, match=f"opset {opset} is not supported; choose 7..20"):
        export(digits_net, digits_batch(2), tmp_path / "m.onnx", "onnx", opset=opset, log_fn=quiet)


def test_suffix_must_match_the_format(digits_net, tmp_path):
    with pytest.raises(ConfigError, match=r"name it \*\.pt2"):
        export(digits_net, digits_batch(2), tmp_path / "m.pt", "pt2", log_fn=quiet)


# -- the loader's refusals -------------------------------------------------------------------------
def fake_aoti_package(path: Path, metadata: dict) -> Path:
    """A zip laid out like an AOTInductor package, enough for the checks made before loading."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data/aotinductor/model/abc.wrapper_metadata.json", json.dumps(metadata))
    return path


def test_cuda_package_on_a_cpu_machine_is_refused_clearly(tmp_path):
    pkg = fake_aoti_package(tmp_path / "m.pt2", {"AOTI_DEVICE_KEY": "cuda", "AOTI_MACHINE": "x86_64"})
    with pytest.raises(ConfigError, match="compiled for cuda, but it is being loaded on cpu") as err:
        load_artifact(pkg, CPU)
    assert "--device cpu" in err.value.message and "TorchScript/ONNX" in err.value.message


def test_package_for_another_architecture_is_refused(tmp_path):
    other = "aarch64" if os.uname().machine != "aarch64" else "x86_64"
    pkg = fake_aoti_package(tmp_path / "m.pt2", {"AOTI_DEVICE_KEY": "cpu", "AOTI_MACHINE": other})
    with pytest.raises(ConfigError, match=f"compiled for {other}"):
        load_artifact(pkg, CPU)


def test_package_needing_missing_cpu_features_is_refused(tmp_path):
    from servekit.artifacts import _ISA_CHECKS

    missing = [isa for isa, fn in _ISA_CHECKS.items() if not getattr(torch.cpu, fn)()]
    if not missing:
        pytest.skip("this CPU has every instruction set an AOTInductor package can ask for")
    meta = {"AOTI_DEVICE_KEY": "cpu", "AOTI_MACHINE": os.uname().machine, "AOTI_CPU_ISA": missing[-1].upper()}
    with pytest.raises(ConfigError, match=f"this CPU lacks {missing[-1]}.*illegal instruction"):
        load_artifact(fake_aoti_package(tmp_path / "m.pt2", meta), CPU)


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("m.pt2", b"not a zip", "not a valid .pt2 package"),
        ("m.h5", b"", "unknown artifact type '.h5'"),
        ("missing.pt", None, "model artifact not found"),
    ],
)
def test_loader_refuses_what_it_cannot_load(name, content, match, tmp_path):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ConfigError, match=match):
        load_artifact(tmp_path / name, CPU)


def test_a_state_dict_is_not_torchscript(digits_net, tmp_path):
    torch.save(digits_net.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ConfigError, match="not TorchScript: export it"):
        load_artifact(tmp_path / "weights.pt", CPU)


def test_a_zip_that_is_no_package_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "m.pt2", "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(ConfigError, match="neither an AOTInductor package nor a torch.export program"):
        load_artifact(tmp_path / "m.pt2", CPU)


def test_missing_compiler_is_reported_before_compiling(digits_net, tmp_path):
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": ("no-such-compiler-g++",)}):
        with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler"):
            export(digits_net, digits_batch(2), tmp_path / "m.pt2", "pt2", log_fn=quiet)
    assert leftovers(tmp_path) == []


# -- AOTInductor packages (compile: tens of seconds each on 2 cores) -------------------------------
@pytest.fixture(scope="module")
def digits_pt2(digits_net, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt2") / "model.pt2"
    report = export(digits_net, digits_batch(4), out, "pt2", amp="bf16", log_fn=quiet)
    return out, report


@pytest.mark.heavy
def test_digits_pt2_matches_eager_and_records_its_dtype(digits_net, digits_pt2):
    out, report = digits_pt2
    # AOTInductor on a CPU is an fp32 graph whatever the amp setting: only fp32 is checked.
    assert set(report.errors) == {"fp32"} and report.errors["fp32"] <= TOLERANCE[None]
    assert dtype_sidecar(out).read_text().strip() == "float32"
    meta = aoti_metadata(out)
    assert meta["AOTI_DEVICE_KEY"] == "cpu" and meta["servekit_input_dtype"] == "float32"
    loaded = load_artifact(out, CPU)
    assert loaded.kind == AOTI and not loaded.autocast and loaded.input_dtype is None
    for n in (1, 5, 300):
        assert_matches(digits_net, loaded, digits_batch(n, seed=n))


@pytest.mark.heavy
def test_pt2_converts_inputs_to_the_layout_it_was_compiled_for(digits_pt2):
    """A channels_last batch of one-channel images passes is_contiguous() yet has other strides."""
    out, _ = digits_pt2
    loaded = load_artifact(out, CPU)
    x = digits_batch(6)
    nhwc = torch.empty(6, 28, 28, 1).copy_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # strides (784, 1, 28, 1)
    wide = torch.cat([x, x], 3)[..., :28]
    with torch.inference_mode():
        ref = loaded(x)
        for y in (nhwc, wide):
            assert torch.equal(y, x) and y.stride() != x.stride()
            assert relative_error(loaded(y), ref) <= 1e-6


@pytest.mark.heavy
def test_pt2_sidecar_from_another_export_is_refused(digits_pt2, tmp_path):
    out, _ = digits_pt2
    copy = tmp_path / "model.pt2"
    shutil.copy(out, copy)
    dtype_sidecar(copy).write_text("float16\n")
    with pytest.raises(ConfigError, match="says float16 but model.pt2 was compiled for float32"):
        load_artifact(copy, CPU)
    dtype_sidecar(copy).unlink()  # no sidecar: the package's own record is used
    assert load_artifact(copy, CPU).input_dtype is None


@pytest.mark.heavy
def test_resnet50_every_format_matches_eager(tmp_path):
    """The served ResNet-50 (seeded weights) in all four formats; its amp (fp16) is off on a CPU.

    Its .pt2 is compiled channels_last (as its config asks); the loader converts contiguous input.
    """
    from models.resnet50.build import build_model, example_inputs

    with pytest.warns(UserWarning, match="no WEIGHTS given"):
        model = build_model(log=quiet)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        ref = model(x)
    for fmt in ("trace", "script", "onnx", "pt2"):
        out = tmp_path / f"{fmt}{FORMATS[fmt].suffix}"
        report = export(model, example_inputs(), out, fmt, amp="fp16", log_fn=quiet, channels_last=fmt == "pt2")
        assert report.errors == {"fp32": pytest.approx(0.0, abs=TOLERANCE[None])}, fmt
        with torch.inference_mode():
            assert relative_error(load_artifact(out, CPU)(x), ref) <= TOLERANCE[None], fmt
    assert aoti_metadata(tmp_path / "pt2.pt2")["servekit_memory_format"] == "channels_last"


# -- GPU-only: a half-precision package, and that package on a machine without a GPU ---------------
@pytest.mark.heavy
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pt2_is_a_half_graph_and_a_cpu_only_machine_refuses_it(digits_net, tmp_path):
    out = tmp_path / "model.pt2"
    report = export(digits_net, digits_batch(4), out, "pt2", device="cuda", amp="fp16", log_fn=quiet)
    assert set(report.errors) == {"float16"} and report.errors["float16"] <= TOLERANCE[torch.float16]
    assert dtype_sidecar(out).read_text().strip() == "float16"
    loaded = load_artifact(out, torch.device("cuda"))
    assert loaded.input_dtype == torch.float16
    with torch.inference_mode():
        assert loaded(digits_batch(3).cuda()).dtype == torch.float16
    code = (
        "import torch; from servekit.artifacts import load_artifact\n"
        "from servekit.errors import ConfigError\n"
        "assert not torch.cuda.is_available()\n"
        f"try: load_artifact({str(out)!r}, torch.device('cpu'))\n"
        "except ConfigError as e: print(e.message)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled for cuda, but it is being loaded on cpu and this machine has no usable CUDA GPU" in proc.stdout
