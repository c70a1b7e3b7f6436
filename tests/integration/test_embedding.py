"""A second task added through its model folder alone (models/digits_embed/): archived and served by a real TorchServe.

The folder brings its build hook, its config and its own handler with its own option
(``normalize``); nothing under servekit/ names it. Embeddings of held-out digits must be unit
vectors that put digits of one class closer together than digits of different classes.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import start_server
from models.digits.model import encode, held_out
from servekit import server
from servekit.archive import ArchiveRequest, archive
from servekit.config import ModelConfig
from servekit.errors import ConfigError
from servekit.hooks import MODELS_DIR

pytestmark = pytest.mark.server
MODEL = "digits_embed"


@pytest.fixture(scope="module")
def embed_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embed")
    mar = archive(ArchiveRequest(MODEL, MODELS_DIR / MODEL, tmp / "built"), log=lambda *_: None)
    srv = start_server(tmp / "srv", mar.parent, {MODEL: mar.name})
    yield srv
    server.stop(srv.cfg.run_dir)


def test_embeddings_group_digits_of_a_class(embed_server):
    images = held_out(60)
    vectors, labels = [], []
    for img, label in images:
        resp = embed_server.inference.predict(MODEL, encode(img, "PNG"), "image/png")
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"].startswith("application/json")
        answer = resp.json()
        assert answer["dim"] == 64 == len(answer["embedding"])
        vectors.append(answer["embedding"])
        labels.append(label)
    v = torch.tensor(vectors)
    assert torch.allclose(v.norm(dim=1), torch.ones(len(v)), atol=1e-4), "normalize: true gives unit vectors"
    sim = v @ v.T
    same = torch.tensor(labels)[:, None] == torch.tensor(labels)[None, :]
    off_diagonal = ~torch.eye(len(v), dtype=torch.bool)
    within, across = sim[same & off_diagonal].mean().item(), sim[~same].mean().item()
    assert within > across + 0.2, f"cosine similarity within a class {within:.3f}, across classes {across:.3f}"


def test_a_bad_image_fails_alone_in_the_new_handler(embed_server):
    resp = embed_server.inference.predict(MODEL, b"not an image", "image/png")
    assert resp.status_code == 415 and resp.json()["type"] == "UnsupportedMediaType"


def test_the_handler_declares_its_own_options(tmp_path):
    """`normalize` is known only to the embedding handler; a classifier option is refused at archive time."""
    folder = tmp_path / MODEL
    shutil.copytree(MODELS_DIR / MODEL, folder, ignore=shutil.ignore_patterns("__pycache__"))
    config = (folder / "model-config.yaml").read_text()
    (folder / "model-config.yaml").write_text(config.replace("normalize: true", "normalize: true\n  topk: 3"))
    with pytest.raises(ConfigError, match=r"unknown handler option\(s\) \['topk'\].*normalize"):
        archive(ArchiveRequest(MODEL, folder, tmp_path / "store"), log=lambda *_: None)
    with pytest.raises(ConfigError, match=r"unknown handler option\(s\) \['normalize'\]"):
        ModelConfig.load(MODELS_DIR / MODEL / "model-config.yaml")  # the classifier's options
