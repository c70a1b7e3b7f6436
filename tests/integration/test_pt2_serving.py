"""An AOTInductor ``.pt2`` archive of digits, served by a real TorchServe and run without it."""

from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, start_server
from models.digits.model import encode, held_out
from servekit import cli, server
from servekit.artifacts import AOTI, TORCHSCRIPT
from servekit.batch import Batch
from servekit.classify import ImageClassifier, load_labels
from servekit.config import ModelConfig

pytestmark = [pytest.mark.server, pytest.mark.heavy]

PT2_VERSION = "1.0-pt2"
PT2_MAR = f"digits-v{PT2_VERSION}.mar"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pt2_store(archives, digits_weights, tmp_path_factory) -> Path:
    """digits-v1.0.mar (TorchScript) and, built by the CLI from the same weights, digits-v1.0-pt2.mar."""
    store = tmp_path_factory.mktemp("pt2-store")
    (store / "digits-v1.0.mar").write_bytes((archives / "digits-v1.0.mar").read_bytes())
    rc = cli.main(
        [
            "archive",
            "digits",
            "--format",
            "pt2",
            "--version",
            PT2_VERSION,
            "--weights",
            str(digits_weights),
            "--model-store",
            str(store),
        ]
    )
    assert rc == 0 and (store / PT2_MAR).is_file()
    return store


@pytest.fixture(scope="module")
def unpacked(pt2_store, tmp_path_factory) -> dict[str, Path]:
    """Each archive unpacked the way TorchServe does it (every file at the model dir's root)."""
    dirs = {}
    for version, mar in (("1.0", "digits-v1.0.mar"), (PT2_VERSION, PT2_MAR)):
        dirs[version] = tmp_path_factory.mktemp(f"unpacked-{version}")
        with zipfile.ZipFile(pt2_store / mar) as zf:
            zf.extractall(dirs[version])
    return dirs


@pytest.fixture(scope="module")
def pt2_server(pt2_store, tmp_path_factory):
    """One TorchServe with digits 1.0 (TorchScript, default) and 1.0-pt2 (AOTInductor) registered."""
    srv = start_server(tmp_path_factory.mktemp("pt2-server"), pt2_store, {"digits": "digits-v1.0.mar"})
    try:
        (srv.cfg.model_store / PT2_MAR).write_bytes((pt2_store / PT2_MAR).read_bytes())
        resp = srv.management.register(PT2_MAR, initial_workers=1)
        assert resp.status_code == 200, resp.text
        yield srv
    finally:
        server.stop(srv.cfg.run_dir)


@pytest.fixture(scope="module")
def digits_images():
    return held_out()


def test_pt2_archive_holds_the_package_and_its_dtype_side_by_side(pt2_store):
    with zipfile.ZipFile(pt2_store / PT2_MAR) as zf:
        names = set(zf.namelist())
        assert {"model.pt2", "model.pt2.dtype", "labels.json"} <= names
        assert zf.read("model.pt2.dtype").decode().strip() == "float32"


def test_pt2_serves_the_same_answers_as_torchscript(pt2_server, digits_images):
    client = pt2_server.inference

    def both(pair):
        body = encode(pair[0], "PNG")
        answers = {}
        for version in ("1.0", PT2_VERSION):
            resp = client.predict("digits", body, "image/png", version=version)
            assert resp.status_code == 200, resp.text
            assert resp.headers["X-Model-Version"] == version
            answers[version] = resp.json()["predictions"]
        return pair[1], answers

    # Concurrent requests, so TorchServe batches them and the package runs batches of several sizes.
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(both, digits_images[:120]))
    correct = 0
    for label, answers in results:
        ts, pt2 = answers["1.0"], answers[PT2_VERSION]
        assert [p["label"] for p in pt2] == [p["label"] for p in ts]
        assert [p["probability"] for p in pt2] == pytest.approx([p["probability"] for p in ts], abs=1e-4)
        correct += pt2[0]["label"] == str(label)
    assert correct / len(results) >= 0.9


def test_torchserve_unpacked_the_dtype_sidecar_beside_the_package(pt2_server):
    found = list((pt2_server.cfg.run_dir / "tmp").rglob("model.pt2.dtype"))
    assert found and all((f.parent / "model.pt2").is_file() for f in found)
    log = (pt2_server.cfg.run_dir / "logs" / "model_log.log").read_text(errors="replace")
    assert "loaded aoti artifact model.pt2 on cpu" in log


def test_pt2_classifies_held_out_digits_without_torchserve(unpacked, digits_images):
    """Decode, preprocess, infer and postprocess on the unpacked .pt2, as the handler would."""
    opts = ModelConfig.load(ROOT / "models" / "digits" / "model-config.yaml").handler
    classifiers = {}
    for version, folder in unpacked.items():
        labels = load_labels(folder / "labels.json")
        artifact = folder / ("model.pt2" if version == PT2_VERSION else "model.pt")
        classifiers[version] = ImageClassifier(artifact, opts, CPU, labels)
        classifiers[version].warmup()
    assert classifiers[PT2_VERSION].engine.model.kind == AOTI
    assert classifiers["1.0"].engine.model.kind == TORCHSCRIPT
    raws = [encode(img, "PNG" if i % 2 else "JPEG") for i, (img, _) in enumerate(digits_images)]
    answers = {v: [] for v in classifiers}
    for start in range(0, len(raws), 8):
        for version, clf in classifiers.items():
            answers[version] += clf.predict(Batch(raws[start : start + 8])).results
    labels = [str(label) for _, label in digits_images]
    top1 = {v: [a["predictions"][0]["label"] for a in ans] for v, ans in answers.items()}
    accuracy = sum(p == t for p, t in zip(top1[PT2_VERSION], labels)) / len(labels)
    assert accuracy >= 0.9, accuracy
    assert top1[PT2_VERSION] == top1["1.0"]
    for a, b in zip(answers[PT2_VERSION], answers["1.0"]):
        assert a["predictions"][0]["probability"] == pytest.approx(b["predictions"][0]["probability"], abs=1e-4)
