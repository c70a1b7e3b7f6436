"""Two builds of one artifact at once: one exports, the other waits and reuses it."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from servekit import archive, export
from servekit.archive import ArchiveRequest, build_artifact
from servekit.hooks import MODELS_DIR, BuildHook


def test_concurrent_builds_of_one_artifact_export_it_once(tmp_path, monkeypatch):
    monkeypatch.setattr(archive, "BUILD_DIR", tmp_path / "build")
    exports: list[Path] = []

    def slow_export(model, example, out, fmt, *args, **kwargs) -> None:
        exports.append(out)
        time.sleep(0.5)  # long enough for the other build to arrive while this one runs
        Path(out).write_bytes(b"artifact")

    monkeypatch.setattr(export, "export", slow_export)
    hook = SimpleNamespace(
        export_method="trace",
        labels=None,
        weights=lambda given: None,
        build_model=lambda weights, log: object(),
        example_inputs=lambda: None,
    )
    cfg = SimpleNamespace(handler=SimpleNamespace(amp=None, channels_last=False))
    req = ArchiveRequest("digits", MODELS_DIR / "digits", tmp_path / "store")
    logs: list[str] = []
    results: list[Path] = []

    def build() -> None:
        results.append(build_artifact(req, cfg, hook, log=logs.append))  # type: ignore[arg-type]

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(exports) == 1 and len(results) == 2 and results[0] == results[1] == exports[0]
    assert sum("artifact up to date" in line for line in logs) == 1, logs


def test_a_hook_builds_its_model_once_and_hands_out_copies(tmp_path):
    """The bench exports one model in several formats: it is built (for digits, trained) once."""
    (tmp_path / "build.py").write_text(
        "import torch\n"
        "BUILT = []\n"
        "def build_model(weights, log=print):\n"
        "    BUILT.append(weights)\n"
        "    return torch.nn.Linear(2, 2)\n"
        "def example_inputs():\n"
        "    return torch.zeros(1, 2)\n"
    )
    hook = BuildHook(tmp_path)
    first, second = hook.build_model(None), hook.build_model(None)
    assert hook.module.BUILT == [None]
    with torch.no_grad():
        first.weight.zero_()  # what one export does to its copy, the next does not see
    assert torch.equal(second.weight, hook.build_model(None).weight) and bool(second.weight.any())
    hook.build_model("other.pt")
    assert hook.module.BUILT == [None, "other.pt"]
