"""Archive the same artifact with TorchServe's stock ``image_classifier`` handler."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..archive import run_model_archiver
from ..extras import require

STOCK_HANDLER = "image_classifier"
# TorchServe's keys the stock handler understands; our `handler:` section would be ignored anyway.
TS_KEYS = ("minWorkers", "maxWorkers", "batchSize", "maxBatchDelay", "responseTimeout")


def index_to_name(labels: list[str]) -> dict[str, str]:
    """The stock handler's ``index_to_name.json``; repeated names get their index so top-k keys stay distinct."""
    seen: dict[str, int] = {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
    return {str(i): (f"{label} ({i})" if seen[label] > 1 else label) for i, label in enumerate(labels)}


def check_stock_available() -> None:
    """The stock vision handler imports captum at load; fail early with the fix if it is missing."""
    require("captum", "bench", "the stock TorchServe handler")


def stock_config(raw: dict[str, Any]) -> dict[str, Any]:
    """Only TorchServe's own keys from a model-config mapping."""
    return {k: raw[k] for k in TS_KEYS if k in raw}


def archive_stock(
    name: str,
    artifact: Path,
    labels: list[str],
    store: Path,
    config: dict[str, Any],
    version: str = "1.0",
    handler: str = STOCK_HANDLER,
) -> Path:
    """Package ``artifact`` with ``handler`` (TorchServe's image_classifier) into ``store``; returns the .mar."""
    if handler == STOCK_HANDLER:
        check_stock_available()
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_dir = Path(tmp)
        mapping = tmp_dir / "index_to_name.json"
        mapping.write_text(json.dumps(index_to_name(labels)))
        cfg_file = tmp_dir / "model-config.yaml"
        cfg_file.write_text(yaml.safe_dump(stock_config(config), sort_keys=False))
        run_model_archiver(name, version, artifact, handler, [mapping], cfg_file, tmp_dir, "default")
        target = store / f"{name}-stock-v{version}.mar"
        shutil.copy2(tmp_dir / f"{name}.mar", target)
    return target


def default_threads() -> int:
    """Torch's intra-op thread count in a fresh process with no thread settings: what stock workers get."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])
