"""Validate custom resources (Prometheus Operator) against their CRD schemas, with the npm project in crd/."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

CRD = Path(__file__).resolve().parent / "crd"


def validate(files: list[Path]) -> subprocess.CompletedProcess:
    """``node validate.mjs FILE...``: exit 0 and one VALID line per object when all match their schemas."""
    node = shutil.which("node")
    assert node, "needs Node.js (the machine's, or apt-get install nodejs)"
    if not (CRD / "node_modules").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=CRD, check=True, capture_output=True, timeout=600)
    return subprocess.run([node, "validate.mjs", *map(str, files)], cwd=CRD, capture_output=True, text=True)
