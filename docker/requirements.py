"""Write the image's requirement files, every line with its sha256, from the locks in requirements/.

    python docker/requirements.py VARIANT TORCH_SOURCE WHEELS

VARIANT is cpu or gpu. TORCH_SOURCE is ``pypi`` (the torch pair and its dependencies come from
requirements/torch.txt) or a directory of wheels that `pip download` fetched from another index
(PyTorch's CPU or CUDA index): their hashes are computed here from the files themselves. Writes
WHEELS/requirements.txt (requirements/image-VARIANT.txt as it is) and WHEELS/torch-requirements.txt
(the torch set less what the image lock already pins, which wins). The CPU variant leaves out
triton, torch's GPU kernel compiler: nothing on a CPU runs it.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPU_ONLY_SKIPPED = {"triton"}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """A pip-compile output file as {name: its whole entry, hashes and comments included}."""
    entries: dict[str, str] = {}
    current = ""
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("#") or not line.strip():
            continue
        if not line.startswith(" "):
            current = canonical(re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0])
            entries[current] = line
        elif current:
            entries[current] += line
    return entries


def hashed_wheels(folder: Path) -> dict[str, str]:
    """Requirement lines pinning each wheel in ``folder`` to its version and its file's sha256."""
    entries: dict[str, str] = {}
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        entries[canonical(name)] = f"{name}=={version} \\\n    --hash=sha256:{digest}\n"
    return entries


def main(variant: str, torch_source: str, wheels: Path) -> None:
    """Write both files; print what was left out and why."""
    if variant not in ("cpu", "gpu"):
        raise SystemExit(f"VARIANT must be cpu or gpu, got {variant!r}")
    image = read_lock(ROOT / "requirements" / f"image-{variant}.txt")
    torch_set = (
        read_lock(ROOT / "requirements/torch.txt") if torch_source == "pypi" else hashed_wheels(Path(torch_source))
    )
    if "torch" not in torch_set:
        raise SystemExit(f"no torch wheel in {torch_source}")
    skipped = sorted(set(torch_set) & (CPU_ONLY_SKIPPED if variant == "cpu" else set()))
    kept = [entry for name, entry in sorted(torch_set.items()) if name not in image and name not in skipped]
    wheels.mkdir(parents=True, exist_ok=True)
    head = f"# written by docker/requirements.py for the {variant} image (torch from {torch_source})\n"
    (wheels / "torch-requirements.txt").write_text(head + "".join(kept))
    (wheels / "requirements.txt").write_text(head + "".join(entry for _, entry in sorted(image.items())))
    if skipped:
        print(f"left out of the {variant} image: {', '.join(skipped)} (GPU only)")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
